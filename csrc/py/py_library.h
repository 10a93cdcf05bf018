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
 * result of `shape` and `dtype` in the library (a dtype other than float32 copies an input's,
 * `like`, named `like_name`: TypeError unless it is a float dtype); viewed writable into
 * `view`. NULL with an exception; NotImplemented cannot come back (callers check
 * PF_PY_LIB_OTHER first). */
PyObject *pf_py_output(PyObject *module, const pf_py_lib *lib, PyObject *given, const char *name, const pf_tensor *like,
                       const char *like_name, int ndim, const int64_t *shape, pf_dtype dtype, pf_tensor *view,
                       pf_py_keep *keep);

/* pf_py_tensor for an input (read-only) whose last dimension the core needs contiguous:
 * NumPy arrays and producers with .contiguous() (torch) are copied when it is strided. */
int pf_py_input(PyObject *obj, const char *name, pf_tensor *out, pf_py_keep *keep);

#endif /* PF_PY_LIBRARY_H */
