/*
 * bind_block_pool.c - the heap type pagedflash._C.BlockPool, a thin wrapper of
 * the C block pool (csrc/core/block_pool.c) used by pagedflash.BlockManager.
 *
 * Every method is positional-only METH_FASTCALL (the Python BlockManager fills
 * defaults): the scheduler calls some of them every step for hundreds of
 * sequences, so argument handling stays as cheap as possible:
 *   - id and count lists come as any integer sequence or NumPy integer array;
 *     contiguous int64 (ids) / int32 (counts, tokens) arrays are read in place,
 *     anything else is converted into per-object staging buffers;
 *   - results are fresh NumPy arrays, or the caller's `out` array.
 * Calls keep the GIL: they take microseconds (less than releasing it costs), and
 * holding it serializes access to the pool, which is not thread-safe.
 * Status codes become exceptions through pf_py_raise (ValueError for bad ids or
 * arguments, pagedflash.OutOfBlocks when blocks run out, RuntimeError for a
 * broken invariant found by check()).
 */
#include "py_bindings.h"
#include "py_convert.h"

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL pf_numpy_api
#include <numpy/arrayobject.h>

typedef struct PfBlockPool {
    PyObject_HEAD
    pf_block_pool_t *pool;
    pf_py_stage ids, counts, tokens, cow; /* staging for converted arguments and results */
} PfBlockPool;

static PyObject *raise_status(PyObject *self, pf_status st) { return pf_py_raise(PyType_GetModule(Py_TYPE(self)), st); }

/* Sequence ids for the batched calls, at most INT32_MAX of them (the core takes an int32
 * count). *hold is released again on failure. */
static int as_seq_ids(PfBlockPool *self, PyObject *obj, const int64_t **data, Py_ssize_t *n, PyObject **hold) {
    if (pf_py_int64_list(obj, "seq_ids", &self->ids, data, n, hold) < 0) return -1;
    if (*n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "seq_ids: too many sequences");
        Py_CLEAR(*hold);
        return -1;
    }
    return 0;
}

/* A per-sequence count argument: an int (uniform, *per = NULL) or an int list of n. */
static int as_counts(PfBlockPool *self, PyObject *obj, const char *name, Py_ssize_t n, const int32_t **per,
                     int32_t *uniform, PyObject **hold) {
    *per = NULL;
    *uniform = 0;
    *hold = NULL;
    if (PyLong_Check(obj)) return pf_py_int32(obj, name, uniform);
    Py_ssize_t m;
    if (pf_py_int32_list(obj, name, &self->counts, per, &m, hold) < 0) return -1;
    if (m != n) {
        PyErr_Format(PyExc_ValueError, "%s: expected one count per sequence (%zd), got %zd", name, n, m);
        Py_CLEAR(*hold);
        return -1;
    }
    return 0;
}

/* The positional-argument check of BlockPool.<fn>. */
#define CHECK_NARGS(fn, lo, hi) \
    if (pf_py_nargs("BlockPool." fn, nargs, lo, hi) < 0) return NULL

/* The data of a NumPy array made by pf_py_new_array or checked by pf_py_out_array. */
#define ARRAY_DATA(T, obj) ((T *)PyArray_DATA((PyArrayObject *)(obj)))

/* ------------------------------------------------------------------------ */

static PyObject *bp_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"num_blocks", "block_size", "num_cpu_blocks", "enable_prefix_caching", NULL};
    int num_blocks, block_size, num_cpu_blocks = 0, caching = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "ii|ip:BlockPool", kwlist, &num_blocks, &block_size, &num_cpu_blocks,
                                     &caching))
        return NULL;
    PfBlockPool *self = (PfBlockPool *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    pf_block_pool_config cfg = {num_blocks, block_size, num_cpu_blocks, caching};
    pf_status st = pf_block_pool_init(&self->pool, &cfg);
    if (st != PF_STATUS_OK) {
        pf_py_raise(PyType_GetModule(type), st);
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static void bp_dealloc(PfBlockPool *self) {
    PyTypeObject *tp = Py_TYPE(self);
    pf_block_pool_free(self->pool);
    pf_py_stage_free(&self->ids);
    pf_py_stage_free(&self->counts);
    pf_py_stage_free(&self->tokens);
    pf_py_stage_free(&self->cow);
    tp->tp_free((PyObject *)self);
    Py_DECREF(tp);
}

/* allocate(seq_id, token_ids | num_tokens) -> num_cached_tokens */
static PyObject *bp_allocate(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("allocate", 2, 2);
    int64_t id;
    if (pf_py_int64(args[0], "seq_id", &id) < 0) return NULL;
    const int32_t *tok = NULL;
    Py_ssize_t n;
    PyObject *hold = NULL;
    if (PyLong_Check(args[1])) {
        int64_t v; /* beyond int64: ValueError naming it; the core range-checks the rest */
        if (pf_py_int64(args[1], "num_tokens", &v) < 0) return NULL;
        n = (Py_ssize_t)v;
    } else if (pf_py_int32_list(args[1], "token_ids", &self->tokens, &tok, &n, &hold) < 0) {
        return NULL;
    }
    int64_t cached = 0;
    pf_status st = pf_block_pool_allocate(self->pool, id, tok, n, &cached);
    Py_XDECREF(hold);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    return PyLong_FromLongLong(cached);
}

/* prefix_lookup(token_ids) -> (hit_blocks, hit_evictable) */
static PyObject *bp_prefix_lookup(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("prefix_lookup", 1, 1);
    const int32_t *tok;
    Py_ssize_t n;
    PyObject *hold;
    if (pf_py_int32_list(args[0], "token_ids", &self->tokens, &tok, &n, &hold) < 0) return NULL;
    int32_t hits = 0, ev = 0;
    pf_status st = pf_block_pool_prefix_lookup(self->pool, tok, n, &hits, &ev);
    Py_XDECREF(hold);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    return Py_BuildValue("(ii)", hits, ev);
}

/* append(seq_id, num_new_tokens, token_ids | None) -> [(src, dst)] */
static PyObject *bp_append(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("append", 3, 3);
    int64_t id;
    int32_t k;
    if (pf_py_int64(args[0], "seq_id", &id) < 0 || pf_py_int32(args[1], "num_new_tokens", &k) < 0) return NULL;
    const int32_t *tok = NULL;
    Py_ssize_t ntok = 0;
    PyObject *hold = NULL;
    if (args[2] != Py_None) {
        if (pf_py_int32_list(args[2], "token_ids", &self->tokens, &tok, &ntok, &hold) < 0) return NULL;
        if (ntok != k) {
            Py_XDECREF(hold);
            return PyErr_Format(PyExc_ValueError, "token_ids: expected num_new_tokens = %d token ids, got %zd", (int)k,
                                ntok);
        }
    }
    int64_t cow[2];
    int32_t ncow = 0;
    pf_status st = pf_block_pool_append(self->pool, &id, 1, NULL, k, tok, cow, &ncow);
    Py_XDECREF(hold);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    if (!ncow) return PyList_New(0);
    return Py_BuildValue("[(LL)]", (long long)cow[0], (long long)cow[1]);
}

/* append_batch(seq_ids, num_new_tokens (int | list), token_ids | None) -> int64 [k, 2] */
static PyObject *bp_append_batch(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("append_batch", 3, 3);
    const int64_t *ids;
    Py_ssize_t n;
    PyObject *hold_ids = NULL, *hold_k = NULL, *hold_t = NULL, *cow = NULL, *result = NULL;
    const int32_t *per = NULL, *tok = NULL;
    int32_t uniform = 0;
    if (as_seq_ids(self, args[0], &ids, &n, &hold_ids) < 0) goto done;
    if (as_counts(self, args[1], "num_new_tokens", n, &per, &uniform, &hold_k) < 0) goto done;
    if (args[2] != Py_None) {
        Py_ssize_t ntok;
        if (pf_py_int32_list(args[2], "token_ids", &self->tokens, &tok, &ntok, &hold_t) < 0) goto done;
        int64_t total = 0;
        for (Py_ssize_t i = 0; i < n; i++) total += per ? per[i] : uniform;
        if (ntok != total) {
            PyErr_Format(PyExc_ValueError,
                         "token_ids: expected %lld token ids (the new tokens of every sequence, "
                         "concatenated), got %zd",
                         (long long)total, ntok);
            goto done;
        }
    }
    int64_t *pairs = (int64_t *)pf_py_stage_get(&self->cow, (size_t)(n ? n : 1) * 2 * sizeof(int64_t));
    if (!pairs) goto done;
    int32_t ncow = 0;
    pf_status st = pf_block_pool_append(self->pool, ids, (int32_t)n, per, uniform, tok, pairs, &ncow);
    if (st != PF_STATUS_OK) {
        raise_status((PyObject *)self, st);
        goto done;
    }
    Py_ssize_t dims[2] = {ncow, 2};
    cow = pf_py_new_array(2, dims, NPY_INT64);
    if (!cow) goto done;
    if (ncow) memcpy(ARRAY_DATA(int64_t, cow), pairs, (size_t)ncow * 2 * sizeof(int64_t));
    result = Py_NewRef(cow);
done:
    Py_XDECREF(cow);
    Py_XDECREF(hold_ids);
    Py_XDECREF(hold_k);
    Py_XDECREF(hold_t);
    return result;
}

static PyObject *bp_fork(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("fork", 2, 2);
    int64_t parent, child;
    if (pf_py_int64(args[0], "parent_id", &parent) < 0 || pf_py_int64(args[1], "child_id", &child) < 0) return NULL;
    pf_status st = pf_block_pool_fork(self->pool, parent, child);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    Py_RETURN_NONE;
}

static PyObject *bp_release(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("release", 1, 1);
    int64_t id;
    if (pf_py_int64(args[0], "seq_id", &id) < 0) return NULL;
    pf_status st = pf_block_pool_release(self->pool, id);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    Py_RETURN_NONE;
}

/* swap_count(seq_ids, to_host) -> distinct blocks */
static PyObject *bp_swap_count(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("swap_count", 2, 2);
    const int64_t *ids;
    Py_ssize_t n;
    PyObject *hold;
    int to_host = PyObject_IsTrue(args[1]);
    if (to_host < 0) return NULL;
    if (pf_py_int64_list(args[0], "seq_ids", &self->ids, &ids, &n, &hold) < 0) return NULL;
    int32_t count = 0;
    pf_status st = n > INT32_MAX ? PF_STATUS_INVALID_VALUE
                                 : pf_block_pool_swap_count(self->pool, ids, (int32_t)n, to_host, &count);
    Py_XDECREF(hold);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    return PyLong_FromLong(count);
}

/* swap(seq_ids, to_host) -> int64 [n, 2] (src, dst) */
static PyObject *bp_swap(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("swap", 2, 2);
    const int64_t *ids;
    Py_ssize_t n;
    PyObject *hold, *out = NULL;
    int to_host = PyObject_IsTrue(args[1]);
    if (to_host < 0) return NULL;
    if (pf_py_int64_list(args[0], "seq_ids", &self->ids, &ids, &n, &hold) < 0) return NULL;
    int32_t count = 0;
    int64_t np = 0;
    pf_status st = n > INT32_MAX ? PF_STATUS_INVALID_VALUE
                                 : pf_block_pool_swap_count(self->pool, ids, (int32_t)n, to_host, &count);
    if (st == PF_STATUS_OK) {
        Py_ssize_t dims[2] = {count, 2};
        out = pf_py_new_array(2, dims, NPY_INT64);
        if (!out) {
            Py_XDECREF(hold);
            return NULL;
        }
        st = pf_block_pool_swap(self->pool, ids, (int32_t)n, to_host, ARRAY_DATA(int64_t, out), count, &np);
    }
    Py_XDECREF(hold);
    if (st != PF_STATUS_OK) {
        Py_XDECREF(out);
        return raise_status((PyObject *)self, st);
    }
    return out;
}

/* seq_info(seq_id) -> (num_tokens, num_blocks, swapped) */
static PyObject *bp_seq_info(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("seq_info", 1, 1);
    int64_t id, len = 0;
    int32_t nb = 0, swapped = 0;
    if (pf_py_int64(args[0], "seq_id", &id) < 0) return NULL;
    pf_status st = pf_block_pool_seq_info(self->pool, id, &len, &nb, &swapped);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    return Py_BuildValue("(LiO)", (long long)len, (int)nb, swapped ? Py_True : Py_False);
}

/* seq_len(seq_id) -> int */
static PyObject *bp_seq_len(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("seq_len", 1, 1);
    int64_t id, len = 0;
    if (pf_py_int64(args[0], "seq_id", &id) < 0) return NULL;
    pf_status st = pf_block_pool_seq_info(self->pool, id, &len, NULL, NULL);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    return PyLong_FromLongLong(len);
}

/* block_table(seq_id) -> int32 [num_blocks] (host ids if swapped) */
static PyObject *bp_block_table(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("block_table", 1, 1);
    int64_t id;
    int32_t nb = 0;
    if (pf_py_int64(args[0], "seq_id", &id) < 0) return NULL;
    pf_status st = pf_block_pool_seq_info(self->pool, id, NULL, &nb, NULL);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    Py_ssize_t dims[1] = {nb};
    PyObject *out = pf_py_new_array(1, dims, NPY_INT32);
    if (!out) return NULL;
    st = pf_block_pool_block_table(self->pool, id, ARRAY_DATA(int32_t, out), nb, &nb);
    if (st != PF_STATUS_OK) {
        Py_DECREF(out);
        return raise_status((PyObject *)self, st);
    }
    return out;
}

/* The exit of the methods that fill an output array (reached by success and by every
 * failure): releases the holds; returns out when the core call succeeded and no Python error
 * is pending, else drops out and raises st (or keeps the error already set). */
static PyObject *fill_exit(PfBlockPool *self, pf_status st, PyObject *hold, PyObject *hold2, PyObject *out) {
    Py_XDECREF(hold);
    Py_XDECREF(hold2);
    if (st == PF_STATUS_OK && !PyErr_Occurred()) return out;
    Py_XDECREF(out);
    return st != PF_STATUS_OK ? raise_status((PyObject *)self, st) : NULL;
}

/* block_tables(seq_ids, max_blocks (-1 = longest), pad, out | None) -> int32 [n, max_blocks] */
static PyObject *bp_block_tables(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("block_tables", 4, 4);
    const int64_t *ids;
    Py_ssize_t n;
    int32_t width, pad;
    PyObject *hold = NULL, *out = NULL;
    if (pf_py_int32(args[1], "max_blocks", &width) < 0 || pf_py_int32(args[2], "pad", &pad) < 0) return NULL;
    if (as_seq_ids(self, args[0], &ids, &n, &hold) < 0) return NULL;
    pf_status st = PF_STATUS_OK;
    if (args[3] != Py_None) {
        if (pf_py_out_array(args[3], "out", 2, PF_DTYPE_I32, n) < 0) goto done;
        Py_ssize_t w = PyArray_DIM((PyArrayObject *)args[3], 1);
        if (width >= 0 && w != width) {
            PyErr_Format(PyExc_ValueError, "out: expected %d columns (max_blocks), got %zd", (int)width, (Py_ssize_t)w);
            goto done;
        }
        if (w > INT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "out: too many columns");
            goto done;
        }
        width = (int32_t)w;
        out = Py_NewRef(args[3]);
    } else {
        /* the ids checked (and the longest table found) before anything is allocated: a
         * failing call allocates no n x max_blocks array */
        int32_t longest = 0;
        st = pf_block_pool_max_blocks(self->pool, ids, (int32_t)n, &longest);
        if (st != PF_STATUS_OK) goto done;
        if (width < 0) width = longest;
        Py_ssize_t dims[2] = {n, width};
        out = pf_py_new_array(2, dims, NPY_INT32);
        if (!out) goto done;
    }
    st = pf_block_pool_block_tables(self->pool, ids, (int32_t)n, ARRAY_DATA(int32_t, out), width, pad);
done:
    return fill_exit(self, st, hold, NULL, out);
}

/* seq_lens(seq_ids, out | None) -> int32 [n] */
static PyObject *bp_seq_lens(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("seq_lens", 2, 2);
    const int64_t *ids;
    Py_ssize_t n;
    PyObject *hold = NULL, *out = NULL;
    if (as_seq_ids(self, args[0], &ids, &n, &hold) < 0) return NULL;
    pf_status st = PF_STATUS_OK;
    if (args[1] != Py_None) {
        if (pf_py_out_array(args[1], "out", 1, PF_DTYPE_I32, n) < 0) goto done;
        out = Py_NewRef(args[1]);
    } else {
        Py_ssize_t dims[1] = {n};
        out = pf_py_new_array(1, dims, NPY_INT32);
        if (!out) goto done;
    }
    st = pf_block_pool_seq_lens(self->pool, ids, (int32_t)n, ARRAY_DATA(int32_t, out));
done:
    return fill_exit(self, st, hold, NULL, out);
}

/* slot_mapping(seq_ids, num_new_tokens (int | list), out | None) -> int64 [sum] */
static PyObject *bp_slot_mapping(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("slot_mapping", 3, 3);
    const int64_t *ids;
    Py_ssize_t n;
    PyObject *hold = NULL, *hold_k = NULL, *out = NULL;
    const int32_t *per = NULL;
    int32_t uniform = 0;
    pf_status st = PF_STATUS_OK;
    if (as_seq_ids(self, args[0], &ids, &n, &hold) < 0) return NULL;
    if (as_counts(self, args[1], "num_new_tokens", n, &per, &uniform, &hold_k) < 0) goto done;
    /* the result's length, bounded by the tokens the sequences hold (a count beyond its
     * sequence, 2**31 - 1 say, is the core's error to report, not an allocation to attempt) */
    int64_t total = 0, held = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        int64_t len = 0;
        total += per ? per[i] : uniform;
        if (pf_block_pool_seq_info(self->pool, ids[i], &len, NULL, NULL) == PF_STATUS_OK) held += len;
    }
    if (total < 0 || total > held) total = 0; /* the core rejects the counts with a message */
    if (args[2] != Py_None) {
        if (pf_py_out_array(args[2], "out", 1, PF_DTYPE_I64, -1) < 0) goto done;
        out = Py_NewRef(args[2]);
    } else {
        Py_ssize_t dims[1] = {(Py_ssize_t)total};
        out = pf_py_new_array(1, dims, NPY_INT64);
        if (!out) goto done;
    }
    int64_t written = 0;
    st = pf_block_pool_slot_mapping(self->pool, ids, (int32_t)n, per, uniform, ARRAY_DATA(int64_t, out),
                                    PyArray_DIM((PyArrayObject *)out, 0), &written);
done:
    return fill_exit(self, st, hold, hold_k, out);
}

/* seq_tokens(seq_id) -> int32 [num_tokens] */
static PyObject *bp_seq_tokens(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("seq_tokens", 1, 1);
    int64_t id, len = 0;
    if (pf_py_int64(args[0], "seq_id", &id) < 0) return NULL;
    pf_status st = pf_block_pool_seq_info(self->pool, id, &len, NULL, NULL);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    Py_ssize_t dims[1] = {(Py_ssize_t)len};
    PyObject *out = pf_py_new_array(1, dims, NPY_INT32);
    if (!out) return NULL;
    st = pf_block_pool_seq_tokens(self->pool, id, ARRAY_DATA(int32_t, out), len, &len);
    if (st != PF_STATUS_OK) {
        Py_DECREF(out);
        return raise_status((PyObject *)self, st);
    }
    return out;
}

/* seq_ids() -> list[int] */
static PyObject *bp_seq_ids(PfBlockPool *self, PyObject *unused) {
    (void)unused;
    pf_block_pool_stats s;
    pf_block_pool_stats_get(self->pool, &s);
    int64_t *buf = (int64_t *)PyMem_Malloc((size_t)(s.num_seqs ? s.num_seqs : 1) * sizeof(int64_t));
    if (!buf) return PyErr_NoMemory();
    int32_t n = 0;
    pf_status st = pf_block_pool_seq_ids(self->pool, buf, s.num_seqs, &n);
    PyObject *list = NULL;
    if (st != PF_STATUS_OK) {
        raise_status((PyObject *)self, st);
    } else if ((list = PyList_New(n))) {
        for (int32_t i = 0; i < n; i++) {
            PyObject *v = PyLong_FromLongLong(buf[i]);
            if (!v) {
                Py_CLEAR(list);
                break;
            }
            PyList_SET_ITEM(list, i, v);
        }
    }
    PyMem_Free(buf);
    return list;
}

/* stats() -> pagedflash.BlockStats: pf_block_pool_stats (pagedflash.h) as a struct sequence
 * (a named tuple). PF_BLOCK_STATS is the one list of its fields: name, C type, doc. */
#define PF_BLOCK_STATS(X)                                                                        \
    X(num_blocks, int32_t, "device blocks")                                                      \
    X(block_size, int32_t, "tokens per block")                                                   \
    X(num_cpu_blocks, int32_t, "host blocks for swapping")                                       \
    X(num_free_blocks, int32_t, "device blocks allocatable now (free list + evictable)")         \
    X(num_evictable_blocks, int32_t, "cached device blocks no sequence references")              \
    X(num_used_blocks, int32_t, "device blocks referenced by a sequence")                        \
    X(num_cached_blocks, int32_t, "device blocks in the prefix cache (in use or evictable)")     \
    X(num_free_cpu_blocks, int32_t, "host blocks free for swapping out")                         \
    X(num_used_cpu_blocks, int32_t, "host blocks holding swapped-out sequences")                 \
    X(num_seqs, int32_t, "live sequences, swapped-out ones included")                            \
    X(prefix_cache_queries, int64_t, "full prompt blocks eligible for a prefix hit, cumulative") \
    X(prefix_cache_hits, int64_t, "of those, the blocks found in the cache")

#define STATS_FIELD(name, type, doc) {#name, doc},
#define STATS_SIZE(name, type, doc) +sizeof(type)
#define STATS_COUNT(name, type, doc) +1
static PyStructSequence_Field block_stats_fields[] = {PF_BLOCK_STATS(STATS_FIELD){NULL, NULL}};
_Static_assert(0 PF_BLOCK_STATS(STATS_SIZE) == sizeof(pf_block_pool_stats),
               "PF_BLOCK_STATS must list every field of pf_block_pool_stats");

static PyStructSequence_Desc block_stats_desc = {
    "pagedflash.BlockStats",
    "The block pool's counters at one moment (BlockManager.stats()): a named tuple. "
    "num_free_blocks + num_used_blocks == num_blocks.",
    block_stats_fields,
    0 PF_BLOCK_STATS(STATS_COUNT),
};

static PyObject *bp_stats(PfBlockPool *self, PyObject *unused) {
    (void)unused;
    pf_block_pool_stats s;
    pf_block_pool_stats_get(self->pool, &s);
    PyObject *type = pf_py_state(PyType_GetModule(Py_TYPE(self)))->block_stats_type;
    PyObject *r = PyStructSequence_New((PyTypeObject *)type);
    if (!r) return NULL;
    Py_ssize_t i = 0;
#define STATS_SET(name, type, doc)                            \
    {                                                         \
        PyObject *v = PyLong_FromLongLong((long long)s.name); \
        if (!v) {                                             \
            Py_DECREF(r);                                     \
            return NULL;                                      \
        }                                                     \
        PyStructSequence_SetItem(r, i++, v);                  \
    }
    PF_BLOCK_STATS(STATS_SET)
#undef STATS_SET
    return r;
}

/* num_free_blocks() -> int (device, evictable included) */
static PyObject *bp_num_free(PfBlockPool *self, PyObject *unused) {
    (void)unused;
    pf_block_pool_stats s;
    pf_block_pool_stats_get(self->pool, &s);
    return PyLong_FromLong(s.num_free_blocks);
}

/* block_states(on_host) -> (refcounts int32, states int32, hashes uint64) */
static PyObject *bp_block_states(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("block_states", 1, 1);
    int on_host = PyObject_IsTrue(args[0]);
    if (on_host < 0) return NULL;
    pf_block_pool_stats s;
    pf_block_pool_stats_get(self->pool, &s);
    Py_ssize_t dims[1] = {on_host ? s.num_cpu_blocks : s.num_blocks};
    PyObject *r = pf_py_new_array(1, dims, NPY_INT32), *t = pf_py_new_array(1, dims, NPY_INT32),
             *h = pf_py_new_array(1, dims, NPY_UINT64);
    if (!r || !t || !h) goto fail;
    pf_status st = pf_block_pool_block_states(self->pool, on_host, ARRAY_DATA(int32_t, r), ARRAY_DATA(int32_t, t),
                                              ARRAY_DATA(uint64_t, h));
    if (st != PF_STATUS_OK) {
        raise_status((PyObject *)self, st);
        goto fail;
    }
    return Py_BuildValue("(NNN)", r, t, h);
fail:
    Py_XDECREF(r);
    Py_XDECREF(t);
    Py_XDECREF(h);
    return NULL;
}

/* free_list(on_host) -> int32 [n] (next taken first) */
static PyObject *bp_free_list(PfBlockPool *self, PyObject *const *args, Py_ssize_t nargs) {
    CHECK_NARGS("free_list", 1, 1);
    int on_host = PyObject_IsTrue(args[0]);
    if (on_host < 0) return NULL;
    pf_block_pool_stats s;
    pf_block_pool_stats_get(self->pool, &s);
    Py_ssize_t cap = on_host ? s.num_free_cpu_blocks : s.num_free_blocks - s.num_evictable_blocks;
    PyObject *out = pf_py_new_array(1, &cap, NPY_INT32);
    if (!out) return NULL;
    int32_t n = 0;
    pf_status st = pf_block_pool_free_list(self->pool, on_host, ARRAY_DATA(int32_t, out), (int32_t)cap, &n);
    if (st != PF_STATUS_OK) {
        Py_DECREF(out);
        return raise_status((PyObject *)self, st);
    }
    return out;
}

/* evictable() -> int32 [n] (next evicted first) */
static PyObject *bp_evictable(PfBlockPool *self, PyObject *unused) {
    (void)unused;
    pf_block_pool_stats s;
    pf_block_pool_stats_get(self->pool, &s);
    Py_ssize_t cap = s.num_evictable_blocks;
    PyObject *out = pf_py_new_array(1, &cap, NPY_INT32);
    if (!out) return NULL;
    int32_t n = 0;
    pf_status st = pf_block_pool_evictable(self->pool, ARRAY_DATA(int32_t, out), (int32_t)cap, &n);
    if (st != PF_STATUS_OK) {
        Py_DECREF(out);
        return raise_status((PyObject *)self, st);
    }
    return out;
}

static PyObject *bp_reset_prefix_cache(PfBlockPool *self, PyObject *unused) {
    (void)unused;
    int32_t n = 0;
    pf_status st = pf_block_pool_reset_prefix_cache(self->pool, &n);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    return PyLong_FromLong(n);
}

static PyObject *bp_check(PfBlockPool *self, PyObject *unused) {
    (void)unused;
    pf_status st = pf_block_pool_check(self->pool);
    if (st != PF_STATUS_OK) return raise_status((PyObject *)self, st);
    Py_RETURN_NONE;
}

#define FAST(name, fn, doc) {name, (PyCFunction)(void (*)(void))fn, METH_FASTCALL, doc}

static PyMethodDef bp_methods[] = {
    FAST("allocate", bp_allocate, "allocate(seq_id, token_ids | num_tokens) -> num_cached_tokens"),
    FAST("prefix_lookup", bp_prefix_lookup, "prefix_lookup(token_ids) -> (hit_blocks, hit_evictable)"),
    FAST("append", bp_append, "append(seq_id, num_new_tokens, token_ids | None) -> [(src, dst)] copy-on-write pairs"),
    FAST("append_batch", bp_append_batch,
         "append_batch(seq_ids, num_new_tokens (int | list), token_ids | None) -> int64 [k, 2] copy-on-write pairs"),
    FAST("fork", bp_fork, "fork(parent_id, child_id) -> None"),
    FAST("release", bp_release, "release(seq_id) -> None"),
    FAST("swap_count", bp_swap_count, "swap_count(seq_ids, to_host) -> distinct blocks needed"),
    FAST("swap", bp_swap, "swap(seq_ids, to_host) -> int64 [n, 2] (src, dst) block mapping"),
    FAST("seq_info", bp_seq_info, "seq_info(seq_id) -> (num_tokens, num_blocks, swapped)"),
    FAST("seq_len", bp_seq_len, "seq_len(seq_id) -> int"),
    FAST("block_table", bp_block_table, "block_table(seq_id) -> int32 [num_blocks]"),
    FAST("block_tables", bp_block_tables,
         "block_tables(seq_ids, max_blocks (-1 = longest), pad, out | None) -> int32 [n, max_blocks]"),
    FAST("seq_lens", bp_seq_lens, "seq_lens(seq_ids, out | None) -> int32 [n]"),
    FAST("slot_mapping", bp_slot_mapping,
         "slot_mapping(seq_ids, num_new_tokens (int | list), out | None) -> int64 [total]"),
    FAST("seq_tokens", bp_seq_tokens, "seq_tokens(seq_id) -> int32 [num_tokens] (-1 = unknown)"),
    {"seq_ids", (PyCFunction)bp_seq_ids, METH_NOARGS, "seq_ids() -> list of live sequence ids"},
    {"stats", (PyCFunction)bp_stats, METH_NOARGS, "stats() -> pagedflash.BlockStats (a named tuple of counters)"},
    {"num_free_blocks", (PyCFunction)bp_num_free, METH_NOARGS, "num_free_blocks() -> int"},
    FAST("block_states", bp_block_states, "block_states(on_host) -> (refcounts, states, hashes)"),
    FAST("free_list", bp_free_list, "free_list(on_host) -> int32 [n], next taken first"),
    {"evictable", (PyCFunction)bp_evictable, METH_NOARGS, "evictable() -> int32 [n], next evicted first"},
    {"reset_prefix_cache", (PyCFunction)bp_reset_prefix_cache, METH_NOARGS,
     "reset_prefix_cache() -> number of evicted blocks"},
    {"check", (PyCFunction)bp_check, METH_NOARGS, "check() -> None; RuntimeError if an internal invariant is broken"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot bp_slots[] = {
    {Py_tp_new, bp_new},
    {Py_tp_dealloc, bp_dealloc},
    {Py_tp_methods, bp_methods},
    {Py_tp_doc,
     "BlockPool(num_blocks, block_size, num_cpu_blocks=0, enable_prefix_caching=False): "
     "the C block pool under pagedflash.BlockManager. Use BlockManager."},
    {0, NULL},
};

static PyType_Spec bp_spec = {
    .name = "pagedflash._C.BlockPool",
    .basicsize = sizeof(PfBlockPool),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = bp_slots,
};

/* Called once from module_exec: adds _C.BlockPool and _C.BlockStats (kept in the state). */
int pf_py_block_pool_init(PyObject *module) {
    PyTypeObject *stats = PyStructSequence_NewType(&block_stats_desc);
    if (!stats) return -1;
    pf_py_state(module)->block_stats_type = (PyObject *)stats;
    if (PyModule_AddObjectRef(module, "BlockStats", (PyObject *)stats) < 0) return -1;
    PyObject *type = PyType_FromModuleAndSpec(module, &bp_spec, NULL);
    if (!type) return -1;
    int rc = PyModule_AddObjectRef(module, "BlockPool", type);
    Py_DECREF(type);
    return rc;
}
