/*
 * py_library.h - the caller's library (library.c): results are allocated where the first
 * array argument came from, work runs on that library's current stream, inputs with a
 * strided last dimension are copied there. Layered above convert.c (pf_py.h).
 */
#ifndef PF_PY_LIBRARY_H
#define PF_PY_LIBRARY_H

#include "py_convert.h"

typedef enum pf_py_lib_kind {
    PF_PY_LIB_NUMPY,    /* numpy.ndarray: NumPy results */
    PF_PY_LIB_EXCHANGE, /* a producer with the DLPack C exchange API (torch): its results, its stream */
    PF_PY_LIB_TENSOR,   /* pagedflash.Tensor: Tensor results */
    PF_PY_LIB_OTHER,    /* anything else: the Python layer allocates and picks the stream */
} pf_py_lib_kind;

typedef struct pf_py_lib {
    pf_py_lib_kind kind;
    const struct PFDLPackExchangeAPI *api; /* PF_PY_LIB_EXCHANGE */
    PyObject *like;                        /* the argument it was taken from (borrowed) */
} pf_py_lib;

/* The library of `obj` (never fails). */
void pf_py_lib_of(PyObject *obj, pf_py_lib *lib);

/* Whether a binding must leave the call to the Python layer (answer NotImplemented): a library
 * this layer cannot allocate in (`allocates`: a result is missing) or whose current stream
 * it cannot ask (no stream given). */
int pf_py_lib_needs_python(const pf_py_lib *lib, const pf_py_keep *keep, int allocates);

/* Unless the caller named a stream (keep->stream_given): the library's current stream on
 * `like`'s CUDA device into keep->stream (torch: torch.cuda.current_stream()); NULL, the
 * legacy default stream, for other libraries. Returns 0 or -1 with an exception. */
int pf_py_lib_stream(const pf_py_lib *lib, const pf_tensor *like, pf_py_keep *keep);

/* A new uninitialized result of `shape` and `dtype` on `like`'s device, in the library;
 * NotImplemented (a new reference) for PF_PY_LIB_OTHER; NULL with an exception. */
PyObject *pf_py_lib_empty(const pf_py_lib *lib, PyObject *module, const pf_tensor *like, int ndim, const int64_t *shape,
                          pf_dtype dtype);

/* 0 when `like` (an input whose dtype a result copies) has a float dtype, else -1 with a
 * TypeError naming `name`. */
int pf_py_result_dtype(const char *name, const pf_tensor *like);

/* An output argument `name`: the caller's array `given` (a new reference), or for None a new
 * result of `shape` and `dtype` in the library (a result with the dtype of the input `like`,
 * named `like_name`: TypeError unless that is a float dtype); viewed writable into
 * `view`. NULL with an exception; NotImplemented cannot come back (callers check
 * PF_PY_LIB_OTHER first). */
PyObject *pf_py_output(PyObject *module, const pf_py_lib *lib, PyObject *given, const char *name, const pf_tensor *like,
                       const char *like_name, int ndim, const int64_t *shape, pf_dtype dtype, pf_tensor *view,
                       pf_py_keep *keep);

/* An optional result such as lse, by its argument `given`: None or False, none (*obj NULL);
 * True, a new one of `shape` (none where ndim < 0: q's rank is wrong and the core says so);
 * an array, that array. Viewed writable into `view`. Returns 0, or -1 with an exception. */
int pf_py_opt_output(PyObject *module, const pf_py_lib *lib, PyObject *given, const char *name, const pf_tensor *like,
                     int ndim, const int64_t *shape, pf_dtype dtype, pf_tensor *view, pf_py_keep *keep, PyObject **obj);

/* A binding's result: out, or (out, lse) when `want_lse` (the lse argument) is not None or
 * False, lse None where none was made. Steals out and lse. */
PyObject *pf_py_out_lse(PyObject *out, PyObject *want_lse, PyObject *lse);

/* The plain forward of a library with autograd (torch) records no graph: where one of
 * arrays[0..n) requires grad while the library's autograd is on (torch.is_grad_enabled()), a
 * UserWarning says that no gradient will flow and names pagedflash.torch.flash_attn, once per
 * process; after that nothing is checked. Returns 0, or -1 with an exception (a warning filter
 * that raises). */
int pf_py_lib_warn_grad(PyObject *module, PyObject *const *arrays, int n);

/* pf_py_tensor for an input (read-only) whose last dimension the core needs contiguous:
 * NumPy arrays and producers with .contiguous() (torch) are copied when it is strided. */
int pf_py_input(PyObject *obj, const char *name, pf_tensor *out, pf_py_keep *keep);

#endif /* PF_PY_LIBRARY_H */
