/*
 * bind_paged.c - bindings of the serving entry points:
 *   _C.paged_attn, _C.merge_attn_states, _C.write_kv_cache (METH_FASTCALL, positional: the
 *   whole call, results allocated in the caller's library as in bind_attn.c)
 *   _C.copy_blocks(caches, block_mapping, *, stream)      caches: a sequence of arrays
 *   _C.swap_blocks(src, dst, block_mapping, *, src_scale, dst_scale, stream)
 * Compressed caches: paged_attn and write_kv_cache take k_scale, v_scale and kv_cache_dtype
 * (pf_py_kv_cache_dtype: raw uint8 / int8 caches viewed as float8 or int8 codes).
 * Caches are viewed writable (written in place, never copied).
 */
#include "py_bindings.h"
#include "py_library.h"

/* _C.paged_attn(q, k_cache, v_cache, block_tables, seq_lens, out, lse, cu_seqlens_q,
 *               softmax_scale, causal, window, softcap, alibi_slopes, num_splits, stream, kernel
 *               [, k_scale, v_scale, kv_cache_dtype])
 * -> out or (out, lse); out None: allocated in q's library; lse False/None, True or an array.
 * NotImplemented where q's library is one the Python layer serves. */
static PyObject *paged_attn(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (pf_py_nargs("paged_attn", nargs, 16, 19) < 0) return NULL;
    PyObject *const opt = Py_None; /* k_scale, v_scale, kv_cache_dtype may be left out */
    PyObject *const ks_arg = nargs > 16 ? args[16] : opt, *const vs_arg = nargs > 17 ? args[17] : opt;
    PyObject *const kvdt_arg = nargs > 18 ? args[18] : opt;
    pf_paged_params p;
    memset(&p, 0, sizeof p);
    pf_py_keep keep = {0};
    pf_py_lib lib;
    PyObject *out = NULL, *lse = NULL;
    pf_status status;
    if (pf_py_stream(args[14], &keep) < 0) goto fail;
    pf_py_lib_of(args[0], &lib);
    if (pf_py_lib_needs_python(&lib, &keep, args[5] == Py_None || args[6] == Py_True)) Py_RETURN_NOTIMPLEMENTED;
    if (pf_py_kernel(module, args[15], &p.kernel) < 0) goto fail;
    if (pf_py_input(args[0], "q", &p.q, &keep) < 0) goto fail;
    if (pf_py_lib_stream(&lib, &p.q, &keep) < 0) goto fail;
    p.stream = keep.stream;
    if (pf_py_tensor(args[1], "k_cache", 0, &p.k_cache, &keep) < 0) goto fail;
    if (pf_py_tensor(args[2], "v_cache", 0, &p.v_cache, &keep) < 0) goto fail;
    if (pf_py_kv_cache_dtype(kvdt_arg, &p.k_cache, &p.v_cache) < 0) goto fail;
    if (pf_py_opt_tensor(ks_arg, "k_scale", 0, &p.k_scale, &keep) < 0) goto fail;
    if (pf_py_opt_tensor(vs_arg, "v_scale", 0, &p.v_scale, &keep) < 0) goto fail;
    if (pf_py_input(args[3], "block_tables", &p.block_tables, &keep) < 0) goto fail;
    if (pf_py_input(args[4], "seq_lens", &p.seq_lens, &keep) < 0) goto fail;
    if (pf_py_opt_tensor(args[7], "cu_seqlens_q", 0, &p.cu_seqlens_q, &keep) < 0) goto fail;
    if (pf_py_softmax_scale(args[8], &p.q, &p.softmax_scale) < 0) goto fail;
    if (pf_py_bool(args[9], "causal", &p.causal) < 0) goto fail;
    if (pf_py_window(args[10], &p.window_left, &p.window_right) < 0) goto fail;
    if (pf_py_float(args[11], "softcap", &p.softcap) < 0) goto fail;
    if (pf_py_opt_tensor(args[12], "alibi_slopes", 0, &p.alibi_slopes, &keep) < 0) goto fail;
    if (pf_py_int32(args[13], "num_splits", &p.num_splits) < 0) goto fail;
    p.num_threads = pf_py_state(module)->num_threads;
    out = pf_py_output(module, &lib, args[5], "out", &p.q, "q", p.q.ndim, p.q.shape, p.q.dtype, &p.out, &keep);
    if (!out) goto fail;
    { /* lse [num_heads, total_q] */
        const int64_t *s = p.q.shape;
        const int64_t total = p.q.ndim == 4 && args[7] == Py_None ? s[0] * s[1] : s[0];
        const int64_t shape[2] = {p.q.ndim >= 2 ? s[p.q.ndim - 2] : 0, total};
        if (pf_py_opt_output(module, &lib, args[6], "lse", &p.q, p.q.ndim >= 3 ? 2 : -1, shape, PF_DTYPE_F32, &p.lse,
                             &keep, &lse) < 0)
            goto fail;
    }
    PF_PY_CALL(status, pf_paged_attn(&p));
    if (pf_py_done(module, status, &keep) < 0) goto fail_released;
    return pf_py_out_lse(out, args[6], lse);
fail:
    pf_py_fail(&keep);
fail_released:
    Py_XDECREF(out);
    Py_XDECREF(lse);
    return NULL;
}

/* _C.merge_attn_states(out_a, lse_a, out_b, lse_b, out, out_lse, stream) -> (out, out_lse);
 * None results are allocated in out_a's library (out_lse in lse_a's layout). NotImplemented as
 * paged_attn. */
static PyObject *merge_attn_states(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (pf_py_nargs("merge_attn_states", nargs, 7, 7) < 0) return NULL;
    pf_merge_params p;
    memset(&p, 0, sizeof p);
    pf_py_keep keep = {0};
    pf_py_lib lib;
    PyObject *res[2] = {NULL, NULL};
    pf_status status;
    if (pf_py_stream(args[6], &keep) < 0) goto fail;
    pf_py_lib_of(args[0], &lib);
    if (pf_py_lib_needs_python(&lib, &keep, args[4] == Py_None || args[5] == Py_None)) Py_RETURN_NOTIMPLEMENTED;
    if (pf_py_input(args[0], "out_a", &p.out_a, &keep) < 0) goto fail;
    if (pf_py_lib_stream(&lib, &p.out_a, &keep) < 0) goto fail;
    p.stream = keep.stream;
    p.num_threads = pf_py_state(module)->num_threads;
    if (pf_py_tensor(args[1], "lse_a", 0, &p.lse_a, &keep) < 0) goto fail;
    if (pf_py_input(args[2], "out_b", &p.out_b, &keep) < 0) goto fail;
    if (pf_py_tensor(args[3], "lse_b", 0, &p.lse_b, &keep) < 0) goto fail;
    const pf_tensor *a = &p.out_a;
    res[0] = pf_py_output(module, &lib, args[4], "out", a, "out_a", a->ndim, a->shape, a->dtype, &p.out, &keep);
    if (!res[0]) goto fail;
    /* out_lse in lse_a's layout: [batch, num_heads, seqlen] (flash_attn's) where lse_a has it and
     * out_a is [batch, seqlen, num_heads, head_dim], else [num_heads, tokens] */
    int64_t lse_shape[3] = {0, 0, 0};
    int lse_ndim = 2;
    if (a->ndim == 4 && p.lse_a.ndim == 3) {
        lse_ndim = 3;
        lse_shape[0] = a->shape[0];
        lse_shape[1] = a->shape[2];
        lse_shape[2] = a->shape[1];
    } else if (a->ndim >= 2) {
        lse_shape[0] = a->shape[a->ndim - 2];
        lse_shape[1] = 1;
        for (int i = 0; i < a->ndim - 2; i++) lse_shape[1] *= a->shape[i]; /* the view's count fits int64 */
    }
    res[1] =
        pf_py_output(module, &lib, args[5], "out_lse", a, "out_a", lse_ndim, lse_shape, PF_DTYPE_F32, &p.lse, &keep);
    if (!res[1]) goto fail;
    PF_PY_CALL(status, pf_merge_attn_states(&p));
    if (pf_py_done(module, status, &keep) < 0) goto fail_released;
    return pf_py_tuple(2, res);
fail:
    pf_py_fail(&keep);
fail_released:
    Py_XDECREF(res[0]);
    Py_XDECREF(res[1]);
    return NULL;
}

/* _C.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, stream[, k_scale, v_scale, kv_cache_dtype])
 * -> None; the caches (and per-(token, head) scales) are written in place on their library's
 * current stream. NotImplemented as paged_attn. */
static PyObject *write_kv_cache(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (pf_py_nargs("write_kv_cache", nargs, 6, 9) < 0) return NULL;
    PyObject *const opt = Py_None; /* k_scale, v_scale, kv_cache_dtype may be left out */
    PyObject *const ks_arg = nargs > 6 ? args[6] : opt, *const vs_arg = nargs > 7 ? args[7] : opt;
    PyObject *const kvdt_arg = nargs > 8 ? args[8] : opt;
    pf_tensor k, v, kc, vc, sm, ks, vs;
    pf_py_keep keep = {0};
    pf_py_lib lib;
    pf_status status;
    if (pf_py_stream(args[5], &keep) < 0) goto fail;
    pf_py_lib_of(args[2], &lib);
    if (pf_py_lib_needs_python(&lib, &keep, 0)) Py_RETURN_NOTIMPLEMENTED;
    if (pf_py_tensor(args[2], "k_cache", 1, &kc, &keep) < 0) goto fail;
    if (pf_py_lib_stream(&lib, &kc, &keep) < 0) goto fail;
    if (pf_py_tensor(args[3], "v_cache", 1, &vc, &keep) < 0) goto fail;
    if (pf_py_kv_cache_dtype(kvdt_arg, &kc, &vc) < 0) goto fail;
    if (pf_py_input(args[0], "k", &k, &keep) < 0) goto fail;
    if (pf_py_input(args[1], "v", &v, &keep) < 0) goto fail;
    if (pf_py_input(args[4], "slot_mapping", &sm, &keep) < 0) goto fail;
    /* a per-(token, head) scale is written: viewed writable (a per-tensor one is only read, but a
     * read-only array cannot be told apart here before its shape is known: views are taken
     * writable only when they have three dimensions) */
    if (pf_py_scale(ks_arg, "k_scale", &ks, &keep) < 0) goto fail;
    if (pf_py_scale(vs_arg, "v_scale", &vs, &keep) < 0) goto fail;
    void *stream = keep.stream;
    PF_PY_CALL(status, pf_write_kv_cache_scaled(k, v, kc, vc, sm, ks, vs, stream));
    return pf_py_finish(module, status, &keep);
fail:
    return pf_py_fail(&keep);
}

/* copy_blocks takes any number of caches: the imports are spread over as many
 * pf_py_keep blocks as they need (PF_PY_MAX_ARGS each). */
static PyObject *copy_blocks(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"caches", "block_mapping", "stream", NULL};
    PyObject *ocaches, *omap, *ostream = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO|$O:copy_blocks", kwlist, &ocaches, &omap, &ostream)) return NULL;
    PyObject *seq = PySequence_Fast(ocaches, "caches: expected a sequence of arrays");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *result = NULL;
    pf_tensor *caches = NULL, map;
    pf_py_keep *keeps = NULL;
    Py_ssize_t nkeeps = 1 + (n + PF_PY_MAX_ARGS - 1) / PF_PY_MAX_ARGS;
    if (n > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "caches: too many caches");
        goto done;
    }
    keeps = (pf_py_keep *)PyMem_Calloc((size_t)nkeeps, sizeof(pf_py_keep));
    caches = (pf_tensor *)PyMem_Calloc((size_t)(n ? n : 1), sizeof(pf_tensor));
    if (!keeps || !caches) {
        PyErr_NoMemory();
        goto done;
    }
    if (pf_py_stream(ostream, &keeps[0]) < 0) goto done;
    for (Py_ssize_t i = 1; i < nkeeps; i++) keeps[i].stream_given = keeps[0].stream_given;
    if (pf_py_tensor(omap, "block_mapping", 0, &map, &keeps[0]) < 0) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "caches[%zd]", i);
        if (pf_py_tensor(PySequence_Fast_GET_ITEM(seq, i), name, 1, &caches[i], &keeps[1 + i / PF_PY_MAX_ARGS]) < 0)
            goto done;
    }
    if (n > 0) { /* no stream given: the first cache's library's current stream */
        pf_py_lib lib;
        pf_py_lib_of(PySequence_Fast_GET_ITEM(seq, 0), &lib);
        if (pf_py_lib_stream(&lib, &caches[0], &keeps[0]) < 0) goto done;
    }
    void *stream = keeps[0].stream;
    pf_status status;
    Py_BEGIN_ALLOW_THREADS
    status = pf_copy_blocks(caches, (int32_t)n, map, stream);
    Py_END_ALLOW_THREADS
    if (status != PF_STATUS_OK) {
        pf_py_raise(module, status);
        goto done;
    }
    result = Py_NewRef(Py_None);
done:
    if (!result && !PyErr_Occurred()) /* a producer cleared its error: still a failure */
        PyErr_SetString(PyExc_ValueError,
                        "caches: an argument could not be converted (its producer cleared its error)");
    if (keeps)
        for (Py_ssize_t i = nkeeps - 1; i >= 0; i--) pf_py_keep_release(&keeps[i]);
    PyMem_Free(keeps);
    PyMem_Free(caches);
    Py_DECREF(seq);
    return result;
}

static PyObject *swap_blocks(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"src", "dst", "block_mapping", "src_scale", "dst_scale", "stream", NULL};
    PyObject *osrc, *odst, *omap, *osrc_scale = Py_None, *odst_scale = Py_None, *ostream = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$OOO:swap_blocks", kwlist, &osrc, &odst, &omap, &osrc_scale,
                                     &odst_scale, &ostream))
        return NULL;
    pf_tensor src, dst, map, src_scale, dst_scale;
    pf_py_keep keep = {0};
    pf_status status;
    if (pf_py_stream(ostream, &keep) < 0) goto fail;
    if (pf_py_tensor(osrc, "src", 0, &src, &keep) < 0) goto fail;
    if (pf_py_tensor(odst, "dst", 1, &dst, &keep) < 0) goto fail;
    if (pf_py_tensor(omap, "block_mapping", 0, &map, &keep) < 0) goto fail;
    if (pf_py_opt_tensor(osrc_scale, "src_scale", 0, &src_scale, &keep) < 0) goto fail;
    if (pf_py_opt_tensor(odst_scale, "dst_scale", 1, &dst_scale, &keep) < 0) goto fail;
    { /* no stream given: the current stream of the CUDA side's library */
        const int dst_side = dst.device == PF_DEVICE_CUDA;
        pf_py_lib lib;
        pf_py_lib_of(dst_side ? odst : osrc, &lib);
        if (pf_py_lib_stream(&lib, dst_side ? &dst : &src, &keep) < 0) goto fail;
    }
    void *stream = keep.stream;
    PF_PY_CALL(status, pf_swap_blocks_scaled(src, dst, src_scale, dst_scale, map, stream));
    return pf_py_finish(module, status, &keep);
fail:
    return pf_py_fail(&keep);
}

PyMethodDef pf_py_paged_methods[] = {
    {"paged_attn", (PyCFunction)(void (*)(void))paged_attn, METH_FASTCALL,
     "paged_attn(q, k_cache, v_cache, block_tables, seq_lens, out, lse, cu_seqlens_q, softmax_scale, causal, "
     "window, softcap, alibi_slopes, num_splits, stream, kernel, k_scale, v_scale, kv_cache_dtype) -> out or "
     "(out, lse); all positional."},
    {"merge_attn_states", (PyCFunction)(void (*)(void))merge_attn_states, METH_FASTCALL,
     "merge_attn_states(out_a, lse_a, out_b, lse_b, out, out_lse, stream) -> (out, out_lse); all positional."},
    {"write_kv_cache", (PyCFunction)(void (*)(void))write_kv_cache, METH_FASTCALL,
     "write_kv_cache(k, v, k_cache, v_cache, slot_mapping, stream, k_scale, v_scale, kv_cache_dtype) -> None. "
     "Writes the caches (and per-(token, head) scales) in place."},
    {"copy_blocks", (PyCFunction)(void (*)(void))copy_blocks, METH_VARARGS | METH_KEYWORDS,
     "copy_blocks(caches, block_mapping, *, stream=None) -> None. caches: a sequence of arrays, "
     "written in place."},
    {"swap_blocks", (PyCFunction)(void (*)(void))swap_blocks, METH_VARARGS | METH_KEYWORDS,
     "swap_blocks(src, dst, block_mapping, *, src_scale=None, dst_scale=None, stream=None) -> None. Writes dst "
     "(and dst_scale) in place."},
    {NULL, NULL, 0, NULL},
};
