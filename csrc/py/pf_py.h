/*
 * pf_py.h - the base of the extension pagedflash._C, included by every file of
 * csrc/py: Python.h, the public C API, the module state (the Tensor type and the
 * exception types), and the mapping of a pf_status to its exception (errors.c).
 *
 * The files form layers, each using only the ones below it (no cycles):
 *   errors.c              module state, status -> exception           (pf_py.h)
 *   tensor.c              the pagedflash.Tensor type                  (py_tensor.h)
 *   convert.c             every argument conversion: arrays (NumPy, DLPack and its C
 *                         exchange API, array interfaces) into pf_tensor views, streams,
 *                         kernel hints, numbers, integer lists, output arrays
 *                                                                     (py_convert.h)
 *   library.c             the caller's library: results allocated there, its current
 *                         stream, contiguous copies of inputs        (py_library.h)
 *   bind_*.c              the bindings: parse, convert, call the core, map the status
 *                                                                     (py_bindings.h)
 *   module.c              module definition: creates the types, adds the bindings
 */
#ifndef PF_PY_H
#define PF_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pagedflash.h"

typedef struct pf_module_state {
    PyObject *tensor_type;      /* pagedflash.Tensor */
    PyObject *block_stats_type; /* pagedflash.BlockStats (a struct sequence) */
    PyObject *out_of_blocks;    /* pagedflash.OutOfBlocks(MemoryError) */
    PyObject *cuda_error;       /* pagedflash.CudaError(RuntimeError) */
    int32_t num_threads;        /* the CPU backend's threads for every call (0: one per core) */
    uint64_t rng;               /* dropout seeds drawn when the caller gives none */
    PyObject *result_hook;      /* tests: called on every result the library allocates (NULL: none) */
    PyObject *is_grad_enabled;  /* torch.is_grad_enabled, looked up on first need (library.c) */
    int grad_warned;            /* the warning about a dropped gradient was given (library.c) */
} pf_module_state;

pf_module_state *pf_py_state(PyObject *module);
/* A fresh 64-bit seed (dropout without an explicit seed). */
uint64_t pf_py_random_seed(PyObject *module);

/* Raise the exception for `status` with pf_last_error() (the one place statuses map to
 * exceptions: DESIGN.md's table); returns NULL. */
PyObject *pf_py_raise(PyObject *module, pf_status status);

#endif /* PF_PY_H */
