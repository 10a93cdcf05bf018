/*
 * bind_attn.c - bindings of the attention entry points:
 *   _C.flash_fwd, _C.flash_bwd, _C.dropout_mask (METH_FASTCALL, positional)
 * The whole call of the common libraries happens here: view the arrays (through the
 * DLPack C exchange API for torch), allocate missing results in the caller's library,
 * take its current stream, fill pf_attn_params, release the GIL around the core call,
 * map its status to an exception. The Python layer (pagedflash/api.py) only orders the
 * arguments, and serves the libraries this layer leaves to it (NotImplemented).
 */
#include "py_bindings.h"
#include "py_library.h"

/* The options every attention binding takes, positionally, after its arrays (the Python
 * layer, pagedflash/api.py, passes them in this order). */
enum {
    OPT_CU_Q,
    OPT_CU_K,
    OPT_MAX_Q,
    OPT_MAX_K,
    OPT_SCALE,
    OPT_CAUSAL,
    OPT_WINDOW,
    OPT_SOFTCAP,
    OPT_ALIBI,
    OPT_DROPOUT,
    OPT_SEED,
    OPT_OFFSET,
    OPT_DETERMINISTIC,
    OPT_STREAM,
    OPT_KERNEL,
    NUM_OPTS
};
#define OPTS_DOC                                                                                       \
    "cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window, softcap, " \
    "alibi_slopes, dropout_p, seed, offset, deterministic, stream, kernel"

/* Everything else once q is viewed (softmax_scale None is 1/sqrt(head_dim) of q; seed None
 * is a fresh random seed when dropout_p > 0, an error in the backward). Every integer range-checked, every message
 * naming its argument. */
static int opts_fill(PyObject *module, PyObject *const *o, pf_attn_params *p, pf_py_keep *keep, int backward) {
    if (pf_py_kernel(module, o[OPT_KERNEL], &p->kernel) < 0) return -1;
    if (pf_py_opt_tensor(o[OPT_CU_Q], "cu_seqlens_q", 0, &p->cu_seqlens_q, keep) < 0) return -1;
    if (pf_py_opt_tensor(o[OPT_CU_K], "cu_seqlens_k", 0, &p->cu_seqlens_k, keep) < 0) return -1;
    if (pf_py_opt_tensor(o[OPT_ALIBI], "alibi_slopes", 0, &p->alibi_slopes, keep) < 0) return -1;
    if (pf_py_int64(o[OPT_MAX_Q], "max_seqlen_q", &p->max_seqlen_q) < 0) return -1;
    if (pf_py_int64(o[OPT_MAX_K], "max_seqlen_k", &p->max_seqlen_k) < 0) return -1;
    if (pf_py_window(o[OPT_WINDOW], &p->window_left, &p->window_right) < 0) return -1;
    if (pf_py_float(o[OPT_SOFTCAP], "softcap", &p->softcap) < 0) return -1;
    if (pf_py_float(o[OPT_DROPOUT], "dropout_p", &p->dropout_p) < 0) return -1;
    if (pf_py_uint64(o[OPT_OFFSET], "offset", &p->offset) < 0) return -1;
    if (o[OPT_SEED] == Py_None && backward && p->dropout_p > 0.0f) {
        PyErr_SetString(PyExc_ValueError,
                        "seed: required with dropout_p > 0 in the backward (pass the forward's seed so the same "
                        "dropout mask is regenerated)");
        return -1;
    }
    if (o[OPT_SEED] == Py_None)
        p->seed = p->dropout_p > 0.0f ? pf_py_random_seed(module) : 0;
    else if (pf_py_seed(o[OPT_SEED], &p->seed) < 0)
        return -1;
    if (pf_py_bool(o[OPT_CAUSAL], "causal", &p->causal) < 0) return -1;
    if (pf_py_bool(o[OPT_DETERMINISTIC], "deterministic", &p->deterministic) < 0) return -1;
    if (pf_py_softmax_scale(o[OPT_SCALE], &p->q, &p->softmax_scale) < 0) return -1;
    p->num_threads = pf_py_state(module)->num_threads;
    p->stream = keep->stream;
    return 0;
}

/* _C.flash_fwd(q, k, v, out, lse, <options>) -> out or (out, lse)
 * out None: allocated in q's library; lse False/None: not computed, True: allocated, an
 * array: written. NotImplemented where q's library is one the Python layer serves. */
static PyObject *flash_fwd(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (pf_py_nargs("flash_fwd", nargs, 5 + NUM_OPTS, 5 + NUM_OPTS) < 0) return NULL;
    PyObject *const *o = args + 5;
    pf_attn_params p;
    memset(&p, 0, sizeof p);
    pf_py_keep keep = {0};
    pf_py_lib lib;
    PyObject *out = NULL, *lse = NULL;
    pf_status status;
    if (pf_py_stream(o[OPT_STREAM], &keep) < 0) goto fail; /* first: it decides how arrays are viewed */
    pf_py_lib_of(args[0], &lib);
    if (pf_py_lib_warn_grad(module, args, 3) < 0) goto fail; /* q, k, v: no autograd graph here */
    if (pf_py_lib_needs_python(&lib, &keep, args[3] == Py_None || args[4] == Py_True)) Py_RETURN_NOTIMPLEMENTED;
    if (pf_py_input(args[0], "q", &p.q, &keep) < 0) goto fail;
    if (opts_fill(module, o, &p, &keep, 0) < 0) goto fail;
    if (pf_py_lib_stream(&lib, &p.q, &keep) < 0) goto fail;
    p.stream = keep.stream;
    if (pf_py_input(args[1], "k", &p.k, &keep) < 0) goto fail;
    if (pf_py_input(args[2], "v", &p.v, &keep) < 0) goto fail;
    out = pf_py_output(module, &lib, args[3], "out", &p.q, "q", p.q.ndim, p.q.shape, p.q.dtype, &p.out, &keep);
    if (!out) goto fail;
    { /* lse [batch, num_heads, seqlen_q], packed [num_heads, total_q] */
        const int varlen = o[OPT_CU_Q] != Py_None || o[OPT_CU_K] != Py_None;
        const int64_t *s = p.q.shape, dense[3] = {s[0], s[2], s[1]}, packed[2] = {s[1], s[0]};
        const int ndim = p.q.ndim == (varlen ? 3 : 4) ? (varlen ? 2 : 3) : -1;
        if (pf_py_opt_output(module, &lib, args[4], "lse", &p.q, ndim, varlen ? packed : dense, PF_DTYPE_F32, &p.lse,
                             &keep, &lse) < 0)
            goto fail;
    }
    PF_PY_CALL(status, pf_flash_fwd(&p));
    if (pf_py_done(module, status, &keep) < 0) goto fail_released;
    return pf_py_out_lse(out, args[4], lse);
fail:
    pf_py_fail(&keep);
fail_released:
    Py_XDECREF(out);
    Py_XDECREF(lse);
    return NULL;
}
/* _C.flash_bwd(dout, q, k, v, out, lse, dq, dk, dv, <options>) -> (dq, dk, dv)
 * dq/dk/dv None: allocated in q's library (q's dtype). NotImplemented as flash_fwd. */
static PyObject *flash_bwd(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (pf_py_nargs("flash_bwd", nargs, 9 + NUM_OPTS, 9 + NUM_OPTS) < 0) return NULL;
    PyObject *const *o = args + 9;
    pf_attn_params p;
    memset(&p, 0, sizeof p);
    pf_py_keep keep = {0};
    pf_py_lib lib;
    PyObject *grads[3] = {NULL, NULL, NULL};
    pf_status status;
    if (pf_py_stream(o[OPT_STREAM], &keep) < 0) goto fail; /* first: it decides how arrays are viewed */
    pf_py_lib_of(args[1], &lib);
    if (pf_py_lib_needs_python(&lib, &keep, args[6] == Py_None || args[7] == Py_None || args[8] == Py_None))
        Py_RETURN_NOTIMPLEMENTED;
    if (pf_py_input(args[0], "dout", &p.dout, &keep) < 0) goto fail;
    if (pf_py_input(args[1], "q", &p.q, &keep) < 0) goto fail;
    if (opts_fill(module, o, &p, &keep, 1) < 0) goto fail;
    if (pf_py_lib_stream(&lib, &p.q, &keep) < 0) goto fail;
    p.stream = keep.stream;
    if (pf_py_input(args[2], "k", &p.k, &keep) < 0) goto fail;
    if (pf_py_input(args[3], "v", &p.v, &keep) < 0) goto fail;
    if (pf_py_input(args[4], "out", &p.out, &keep) < 0) goto fail;
    if (pf_py_tensor(args[5], "lse", 0, &p.lse, &keep) < 0) goto fail;
    const pf_tensor *like[3] = {&p.q, &p.k, &p.v};
    pf_tensor *views[3] = {&p.dq, &p.dk, &p.dv};
    static const char *const names[3] = {"dq", "dk", "dv"};
    for (int i = 0; i < 3; i++) {
        grads[i] = pf_py_output(module, &lib, args[6 + i], names[i], &p.q, "q", like[i]->ndim, like[i]->shape,
                                p.q.dtype, views[i], &keep);
        if (!grads[i]) goto fail;
    }
    PF_PY_CALL(status, pf_flash_bwd(&p));
    if (pf_py_done(module, status, &keep) < 0) goto fail_released;
    return pf_py_tuple(3, grads);
fail:
    pf_py_fail(&keep);
fail_released:
    for (int i = 0; i < 3; i++) Py_XDECREF(grads[i]);
    return NULL;
}

/* _C.dropout_mask(q, k, mask, <options>) -> None: writes the uint8 keep mask (allocated by
 * the Python layer, which knows its shape from the host cu_seqlens). */
static PyObject *dropout_mask(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (pf_py_nargs("dropout_mask", nargs, 3 + NUM_OPTS, 3 + NUM_OPTS) < 0) return NULL;
    PyObject *const *o = args + 3;
    pf_attn_params p;
    memset(&p, 0, sizeof p);
    pf_py_keep keep = {0};
    pf_py_lib lib;
    pf_tensor mask;
    pf_status status;
    if (pf_py_stream(o[OPT_STREAM], &keep) < 0) goto fail; /* first: it decides how arrays are viewed */
    pf_py_lib_of(args[0], &lib);
    if (pf_py_input(args[0], "q", &p.q, &keep) < 0) goto fail;
    if (opts_fill(module, o, &p, &keep, 0) < 0) goto fail;
    if (pf_py_lib_stream(&lib, &p.q, &keep) < 0) goto fail;
    p.stream = keep.stream;
    if (pf_py_input(args[1], "k", &p.k, &keep) < 0) goto fail;
    if (pf_py_tensor(args[2], "mask", 1, &mask, &keep) < 0) goto fail;
    PF_PY_CALL(status, pf_dropout_mask(&p, mask));
    return pf_py_finish(module, status, &keep);
fail:
    return pf_py_fail(&keep);
}

PyMethodDef pf_py_attn_methods[] = {
    {"flash_fwd", (PyCFunction)(void (*)(void))flash_fwd, METH_FASTCALL,
     "flash_fwd(q, k, v, out, lse, " OPTS_DOC ") -> out or (out, lse); all positional. out None: allocated "
     "in q's library; lse False/None: none, True: allocated, an array: written. NotImplemented for a "
     "library the Python layer allocates for."},
    {"flash_bwd", (PyCFunction)(void (*)(void))flash_bwd, METH_FASTCALL,
     "flash_bwd(dout, q, k, v, out, lse, dq, dk, dv, " OPTS_DOC ") -> (dq, dk, dv); None gradients are "
     "allocated in q's library."},
    {"dropout_mask", (PyCFunction)(void (*)(void))dropout_mask, METH_FASTCALL,
     "dropout_mask(q, k, mask, " OPTS_DOC ") -> None. Writes the u8 keep mask that dropout_p, seed and "
     "offset give."},
    {NULL, NULL, 0, NULL},
};
