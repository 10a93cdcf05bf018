/*
 * bind_attn.c - bindings of the attention entry points:
 *   _C.flash_fwd(q, k, v, out, lse=None, **options)
 * The Python layer (pagedflash/api.py) fills defaults and allocates outputs;
 * these functions only view tensors, fill pf_attn_params, release the GIL
 * around the core call and map its status to an exception.
 */
#include "py_bindings.h"
#include "py_convert.h"

/* Options shared by forward and backward, parsed from keywords. */
typedef struct attn_opts {
    PyObject *cu_q, *cu_k, *alibi, *stream;
    PyObject *max_q, *max_k, *scale, *wl, *wr, *seed, *offset, *num_threads; /* ints / floats, converted below */
    double softcap, dropout_p;
    int causal, deterministic;
    const char *kernel;
} attn_opts;

/* View the shared optional tensors and convert the scalar options into p (every integer
 * range-checked with a ValueError naming it). softmax_scale None: 1/sqrt(head_dim) of q,
 * which must be converted already. */
static int fill_options(PyObject *module, const attn_opts *o, pf_attn_params *p, pf_py_keep *keep) {
    if (pf_py_kernel(module, o->kernel, &p->kernel) < 0) return -1;
    if (pf_py_stream(o->stream, &keep->stream) < 0) return -1;
    p->stream = keep->stream;
    if (pf_py_opt_tensor(o->cu_q, "cu_seqlens_q", 0, &p->cu_seqlens_q, keep) < 0) return -1;
    if (pf_py_opt_tensor(o->cu_k, "cu_seqlens_k", 0, &p->cu_seqlens_k, keep) < 0) return -1;
    if (pf_py_opt_tensor(o->alibi, "alibi_slopes", 0, &p->alibi_slopes, keep) < 0) return -1;
    if (pf_py_int64(o->max_q, "max_seqlen_q", &p->max_seqlen_q) < 0) return -1;
    if (pf_py_int64(o->max_k, "max_seqlen_k", &p->max_seqlen_k) < 0) return -1;
    if (pf_py_int32(o->wl, "window", &p->window_left) < 0 || pf_py_int32(o->wr, "window", &p->window_right) < 0)
        return -1;
    if (pf_py_uint64(o->seed, "seed", &p->seed) < 0 || pf_py_uint64(o->offset, "offset", &p->offset) < 0) return -1;
    if (pf_py_int32(o->num_threads, "num_threads", &p->num_threads) < 0) return -1;
    if (pf_py_softmax_scale(o->scale, &p->q, &p->softmax_scale) < 0) return -1;
    p->causal = o->causal;
    p->softcap = (float)o->softcap;
    p->dropout_p = (float)o->dropout_p;
    p->deterministic = o->deterministic;
    return 0;
}

#define ATTN_OPT_KWLIST                                                                                           \
    "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "softmax_scale", "causal", "window_left",     \
        "window_right", "softcap", "alibi_slopes", "dropout_p", "seed", "offset", "num_threads", "deterministic", \
        "stream", "kernel"
#define ATTN_OPT_FORMAT "OOOOOpOOdOdOOOpOs"
#define ATTN_OPT_ARGS(o)                                                                                               \
    &(o).cu_q, &(o).cu_k, &(o).max_q, &(o).max_k, &(o).scale, &(o).causal, &(o).wl, &(o).wr, &(o).softcap, &(o).alibi, \
        &(o).dropout_p, &(o).seed, &(o).offset, &(o).num_threads, &(o).deterministic, &(o).stream, &(o).kernel

static void opts_init(attn_opts *o) {
    static PyObject *minus_one, *zero;
    memset(o, 0, sizeof *o);
    if (!minus_one) minus_one = PyLong_FromLong(-1), zero = PyLong_FromLong(0); /* immortal small ints */
    o->cu_q = o->cu_k = o->alibi = o->stream = o->scale = Py_None;
    o->wl = o->wr = minus_one;
    o->max_q = o->max_k = o->seed = o->offset = o->num_threads = zero;
    o->kernel = "auto";
}

static PyObject *flash_fwd(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "k", "v", "out", "lse", ATTN_OPT_KWLIST, NULL};
    PyObject *oq, *ok, *ov, *oout, *olse = Py_None;
    attn_opts o;
    opts_init(&o);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOO|O$" ATTN_OPT_FORMAT ":flash_fwd", kwlist, &oq, &ok, &ov, &oout,
                                     &olse, ATTN_OPT_ARGS(o)))
        return NULL;
    pf_attn_params p;
    memset(&p, 0, sizeof p);
    pf_py_keep keep = {0};
    pf_status status;
    if (pf_py_tensor(oq, "q", 0, &p.q, &keep) < 0) goto fail;
    if (fill_options(module, &o, &p, &keep) < 0) goto fail;
    if (pf_py_tensor(ok, "k", 0, &p.k, &keep) < 0) goto fail;
    if (pf_py_tensor(ov, "v", 0, &p.v, &keep) < 0) goto fail;
    if (pf_py_tensor(oout, "out", 1, &p.out, &keep) < 0) goto fail;
    if (pf_py_opt_tensor(olse, "lse", 1, &p.lse, &keep) < 0) goto fail;
    PF_PY_CALL(status, pf_flash_fwd(&p));
    return pf_py_finish(module, status, &keep);
fail:
    return pf_py_fail(&keep);
}

static PyObject *flash_bwd(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"dout", "q", "k", "v", "out", "lse", "dq", "dk", "dv", ATTN_OPT_KWLIST, NULL};
    PyObject *odout, *oq, *ok, *ov, *oout, *olse, *odq, *odk, *odv;
    attn_opts o;
    opts_init(&o);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOO|$" ATTN_OPT_FORMAT ":flash_bwd", kwlist, &odout, &oq, &ok,
                                     &ov, &oout, &olse, &odq, &odk, &odv, ATTN_OPT_ARGS(o)))
        return NULL;
    pf_attn_params p;
    memset(&p, 0, sizeof p);
    pf_py_keep keep = {0};
    pf_status status;
    if (pf_py_tensor(odout, "dout", 0, &p.dout, &keep) < 0) goto fail;
    if (pf_py_tensor(oq, "q", 0, &p.q, &keep) < 0) goto fail;
    if (fill_options(module, &o, &p, &keep) < 0) goto fail;
    if (pf_py_tensor(ok, "k", 0, &p.k, &keep) < 0) goto fail;
    if (pf_py_tensor(ov, "v", 0, &p.v, &keep) < 0) goto fail;
    if (pf_py_tensor(oout, "out", 0, &p.out, &keep) < 0) goto fail;
    if (pf_py_tensor(olse, "lse", 0, &p.lse, &keep) < 0) goto fail;
    if (pf_py_tensor(odq, "dq", 1, &p.dq, &keep) < 0) goto fail;
    if (pf_py_tensor(odk, "dk", 1, &p.dk, &keep) < 0) goto fail;
    if (pf_py_tensor(odv, "dv", 1, &p.dv, &keep) < 0) goto fail;
    PF_PY_CALL(status, pf_flash_bwd(&p));
    return pf_py_finish(module, status, &keep);
fail:
    return pf_py_fail(&keep);
}

static PyObject *dropout_mask(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"q", "k", "mask", ATTN_OPT_KWLIST, NULL};
    PyObject *oq, *ok, *omask;
    attn_opts o;
    opts_init(&o);
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOO|$" ATTN_OPT_FORMAT ":dropout_mask", kwlist, &oq, &ok, &omask,
                                     ATTN_OPT_ARGS(o)))
        return NULL;
    pf_attn_params p;
    memset(&p, 0, sizeof p);
    pf_py_keep keep = {0};
    pf_tensor mask;
    pf_status status;
    if (pf_py_tensor(oq, "q", 0, &p.q, &keep) < 0) goto fail;
    if (fill_options(module, &o, &p, &keep) < 0) goto fail;
    if (pf_py_tensor(ok, "k", 0, &p.k, &keep) < 0) goto fail;
    if (pf_py_tensor(omask, "mask", 1, &mask, &keep) < 0) goto fail;
    PF_PY_CALL(status, pf_dropout_mask(&p, mask));
    return pf_py_finish(module, status, &keep);
fail:
    return pf_py_fail(&keep);
}

PyMethodDef pf_py_attn_methods[] = {
    {"flash_fwd", (PyCFunction)(void (*)(void))flash_fwd, METH_VARARGS | METH_KEYWORDS,
     "flash_fwd(q, k, v, out, lse=None, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, "
     "max_seqlen_k=0, softmax_scale=None, causal=False, window_left=-1, window_right=-1, softcap=0.0, "
     "alibi_slopes=None, dropout_p=0.0, seed=0, offset=0, num_threads=0, deterministic=False, "
     "stream=None, kernel='auto') -> None. Writes out (and lse)."},
    {"flash_bwd", (PyCFunction)(void (*)(void))flash_bwd, METH_VARARGS | METH_KEYWORDS,
     "flash_bwd(dout, q, k, v, out, lse, dq, dk, dv, *, <the options of flash_fwd>) -> None. "
     "Writes dq, dk, dv."},
    {"dropout_mask", (PyCFunction)(void (*)(void))dropout_mask, METH_VARARGS | METH_KEYWORDS,
     "dropout_mask(q, k, mask, *, <the options of flash_fwd>) -> None. Writes the u8 keep mask "
     "[batch, num_heads, seqlen_q, seqlen_k] that dropout_p, seed and offset give."},
    {NULL, NULL, 0, NULL},
};
