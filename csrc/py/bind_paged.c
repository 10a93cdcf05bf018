/*
 * bind_paged.c - bindings of the serving entry points:
 *   _C.paged_attn(q, k_cache, v_cache, block_tables, seq_lens, out, lse=None, **options)
 *   _C.merge_attn_states(out_a, lse_a, out_b, lse_b, out, lse=None, *, num_threads, stream)
 *   _C.write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, stream)
 *   _C.copy_blocks(caches, block_mapping, *, stream)      caches: a sequence of arrays
 *   _C.swap_blocks(src, dst, block_mapping, *, stream)
 * The Python layer (pagedflash/paged.py) fills defaults and allocates outputs;
 * these functions only view tensors (no copies), fill the C params, release the
 * GIL around the core call and map its status to an exception. Caches are
 * viewed writable: they are written in place.
 */
#include "py_bindings.h"
#include "py_convert.h"

static PyObject *paged_attn(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q",       "k_cache",      "v_cache",       "block_tables", "seq_lens",    "out",
                             "lse",     "cu_seqlens_q", "softmax_scale", "causal",       "window_left", "window_right",
                             "softcap", "alibi_slopes", "num_splits",    "num_threads",  "stream",      "kernel",
                             NULL};
    PyObject *oq, *okc, *ovc, *obt, *osl, *oout, *olse = Py_None;
    PyObject *ocu = Py_None, *oalibi = Py_None, *ostream = Py_None, *oscale = Py_None;
    PyObject *owl = NULL, *owr = NULL, *osplits = NULL, *othreads = NULL; /* ints, converted below */
    double softcap = 0.0;
    int causal = 1;
    const char *kernel = "auto";
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOO|O$OOpOOdOOOOs:paged_attn", kwlist, &oq, &okc, &ovc, &obt,
                                     &osl, &oout, &olse, &ocu, &oscale, &causal, &owl, &owr, &softcap, &oalibi,
                                     &osplits, &othreads, &ostream, &kernel))
        return NULL;
    pf_paged_params p;
    memset(&p, 0, sizeof p);
    pf_py_keep keep = {0};
    pf_status status;
    if (pf_py_kernel(module, kernel, &p.kernel) < 0) goto fail;
    if (pf_py_stream(ostream, &keep.stream) < 0) goto fail;
    p.stream = keep.stream;
    if (pf_py_tensor(oq, "q", 0, &p.q, &keep) < 0) goto fail;
    if (pf_py_tensor(okc, "k_cache", 0, &p.k_cache, &keep) < 0) goto fail;
    if (pf_py_tensor(ovc, "v_cache", 0, &p.v_cache, &keep) < 0) goto fail;
    if (pf_py_tensor(obt, "block_tables", 0, &p.block_tables, &keep) < 0) goto fail;
    if (pf_py_tensor(osl, "seq_lens", 0, &p.seq_lens, &keep) < 0) goto fail;
    if (pf_py_tensor(oout, "out", 1, &p.out, &keep) < 0) goto fail;
    if (pf_py_opt_tensor(olse, "lse", 1, &p.lse, &keep) < 0) goto fail;
    if (pf_py_opt_tensor(ocu, "cu_seqlens_q", 0, &p.cu_seqlens_q, &keep) < 0) goto fail;
    if (pf_py_opt_tensor(oalibi, "alibi_slopes", 0, &p.alibi_slopes, &keep) < 0) goto fail;
    p.window_left = p.window_right = -1;
    if ((owl && pf_py_int32(owl, "window", &p.window_left) < 0) ||
        (owr && pf_py_int32(owr, "window", &p.window_right) < 0) ||
        (osplits && pf_py_int32(osplits, "num_splits", &p.num_splits) < 0) ||
        (othreads && pf_py_int32(othreads, "num_threads", &p.num_threads) < 0))
        goto fail;
    if (pf_py_softmax_scale(oscale, &p.q, &p.softmax_scale) < 0) goto fail;
    p.causal = causal;
    p.softcap = (float)softcap;
    PF_PY_CALL(status, pf_paged_attn(&p));
    return pf_py_finish(module, status, &keep);
fail:
    return pf_py_fail(&keep);
}

static PyObject *merge_attn_states(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"out_a", "lse_a", "out_b", "lse_b", "out", "lse", "num_threads", "stream", NULL};
    PyObject *oa, *ola, *ob, *olb, *oout, *olse = Py_None, *ostream = Py_None;
    int num_threads = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|O$iO:merge_attn_states", kwlist, &oa, &ola, &ob, &olb, &oout,
                                     &olse, &num_threads, &ostream))
        return NULL;
    pf_merge_params p;
    memset(&p, 0, sizeof p);
    pf_py_keep keep = {0};
    pf_status status;
    if (pf_py_stream(ostream, &keep.stream) < 0) goto fail;
    p.stream = keep.stream;
    p.num_threads = num_threads;
    if (pf_py_tensor(oa, "out_a", 0, &p.out_a, &keep) < 0) goto fail;
    if (pf_py_tensor(ola, "lse_a", 0, &p.lse_a, &keep) < 0) goto fail;
    if (pf_py_tensor(ob, "out_b", 0, &p.out_b, &keep) < 0) goto fail;
    if (pf_py_tensor(olb, "lse_b", 0, &p.lse_b, &keep) < 0) goto fail;
    if (pf_py_tensor(oout, "out", 1, &p.out, &keep) < 0) goto fail;
    if (pf_py_opt_tensor(olse, "lse", 1, &p.lse, &keep) < 0) goto fail;
    PF_PY_CALL(status, pf_merge_attn_states(&p));
    return pf_py_finish(module, status, &keep);
fail:
    return pf_py_fail(&keep);
}

static PyObject *write_kv_cache(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"k", "v", "k_cache", "v_cache", "slot_mapping", "stream", NULL};
    PyObject *ok, *ov, *okc, *ovc, *osm, *ostream = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOO|$O:write_kv_cache", kwlist, &ok, &ov, &okc, &ovc, &osm,
                                     &ostream))
        return NULL;
    pf_tensor k, v, kc, vc, sm;
    pf_py_keep keep = {0};
    pf_status status;
    if (pf_py_stream(ostream, &keep.stream) < 0) goto fail;
    if (pf_py_tensor(ok, "k", 0, &k, &keep) < 0) goto fail;
    if (pf_py_tensor(ov, "v", 0, &v, &keep) < 0) goto fail;
    if (pf_py_tensor(okc, "k_cache", 1, &kc, &keep) < 0) goto fail;
    if (pf_py_tensor(ovc, "v_cache", 1, &vc, &keep) < 0) goto fail;
    if (pf_py_tensor(osm, "slot_mapping", 0, &sm, &keep) < 0) goto fail;
    void *stream = keep.stream;
    PF_PY_CALL(status, pf_write_kv_cache(k, v, kc, vc, sm, stream));
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
    void *stream = NULL;
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
    if (pf_py_stream(ostream, &stream) < 0) goto done;
    for (Py_ssize_t i = 0; i < nkeeps; i++) keeps[i].stream = stream;
    if (pf_py_tensor(omap, "block_mapping", 0, &map, &keeps[0]) < 0) goto done;
    for (Py_ssize_t i = 0; i < n; i++) {
        char name[32];
        snprintf(name, sizeof name, "caches[%zd]", i);
        if (pf_py_tensor(PySequence_Fast_GET_ITEM(seq, i), name, 1, &caches[i], &keeps[1 + i / PF_PY_MAX_ARGS]) < 0)
            goto done;
    }
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
    static char *kwlist[] = {"src", "dst", "block_mapping", "stream", NULL};
    PyObject *osrc, *odst, *omap, *ostream = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$O:swap_blocks", kwlist, &osrc, &odst, &omap, &ostream))
        return NULL;
    pf_tensor src, dst, map;
    pf_py_keep keep = {0};
    pf_status status;
    if (pf_py_stream(ostream, &keep.stream) < 0) goto fail;
    if (pf_py_tensor(osrc, "src", 0, &src, &keep) < 0) goto fail;
    if (pf_py_tensor(odst, "dst", 1, &dst, &keep) < 0) goto fail;
    if (pf_py_tensor(omap, "block_mapping", 0, &map, &keep) < 0) goto fail;
    void *stream = keep.stream;
    PF_PY_CALL(status, pf_swap_blocks(src, dst, map, stream));
    return pf_py_finish(module, status, &keep);
fail:
    return pf_py_fail(&keep);
}

PyMethodDef pf_py_paged_methods[] = {
    {"paged_attn", (PyCFunction)(void (*)(void))paged_attn, METH_VARARGS | METH_KEYWORDS,
     "paged_attn(q, k_cache, v_cache, block_tables, seq_lens, out, lse=None, *, cu_seqlens_q=None, "
     "softmax_scale=None, causal=True, window_left=-1, window_right=-1, softcap=0.0, "
     "alibi_slopes=None, num_splits=0, num_threads=0, stream=None) -> None. Writes out (and lse)."},
    {"merge_attn_states", (PyCFunction)(void (*)(void))merge_attn_states, METH_VARARGS | METH_KEYWORDS,
     "merge_attn_states(out_a, lse_a, out_b, lse_b, out, lse=None, *, num_threads=0, "
     "stream=None) -> None. Writes out (and lse)."},
    {"write_kv_cache", (PyCFunction)(void (*)(void))write_kv_cache, METH_VARARGS | METH_KEYWORDS,
     "write_kv_cache(k, v, k_cache, v_cache, slot_mapping, *, stream=None) -> None. Writes the "
     "caches in place."},
    {"copy_blocks", (PyCFunction)(void (*)(void))copy_blocks, METH_VARARGS | METH_KEYWORDS,
     "copy_blocks(caches, block_mapping, *, stream=None) -> None. caches: a sequence of arrays, "
     "written in place."},
    {"swap_blocks", (PyCFunction)(void (*)(void))swap_blocks, METH_VARARGS | METH_KEYWORDS,
     "swap_blocks(src, dst, block_mapping, *, stream=None) -> None. Writes dst in place."},
    {NULL, NULL, 0, NULL},
};
