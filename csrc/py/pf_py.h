/*
 * pf_py.h - shared pieces of the extension pagedflash._C: module state, the
 * tensor import layer (DLPack, array interfaces, NumPy) and status-to-exception
 * mapping. Every binding file includes this.
 */
#ifndef PF_PY_H
#define PF_PY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "pagedflash.h"

typedef struct pf_module_state {
    PyObject *tensor_type;    /* pagedflash.Tensor */
    PyObject *out_of_blocks;  /* pagedflash.OutOfBlocks(MemoryError) */
    PyObject *cuda_error;     /* pagedflash.CudaError(RuntimeError) */
} pf_module_state;

pf_module_state *pf_py_state(PyObject *module);

/* Imports held for the duration of one call, released (deleters run) at its end. */
#define PF_PY_MAX_ARGS 64
typedef struct pf_py_keep {
    int n;
    struct {
        PyObject *owner;   /* strong reference to what we imported from */
        void *managed;     /* DLManagedTensor* or DLManagedTensorVersioned* */
        int versioned;
    } items[PF_PY_MAX_ARGS];
    void *stream;          /* the consumer stream for CUDA producers */
} pf_py_keep;

/* View `obj` as a pf_tensor without copying. `writable` requires a writable
 * buffer (outputs). Returns 0, or -1 with a Python exception that names `name`. */
int pf_py_tensor(PyObject *obj, const char *name, int writable, pf_tensor *out, pf_py_keep *keep);
/* As pf_py_tensor, but None gives an absent tensor (data NULL, ndim 0). */
int pf_py_opt_tensor(PyObject *obj, const char *name, int writable, pf_tensor *out,
                     pf_py_keep *keep);
void pf_py_keep_release(pf_py_keep *keep);

/* A kernel hint by name ("auto", "sm80", "8x8", ...; pagedflash.h) into *kernel.
 * Returns 0, or -1 with ValueError. */
int pf_py_kernel(PyObject *module, const char *name, int32_t *kernel);

/* Parse a stream argument (None or an int cudaStream_t). Returns 0 or -1. */
int pf_py_stream(PyObject *obj, void **stream);

/* Run `call` (a pf_status expression) with the GIL released, storing its status. */
#define PF_PY_CALL(status, call) \
    do {                         \
        Py_BEGIN_ALLOW_THREADS   \
        (status) = (call);       \
        Py_END_ALLOW_THREADS     \
    } while (0)

/* The end of every binding: release the imports (deleters run, even on error), then
 * return None, or raise the exception for a failed status / a pending Python error. */
PyObject *pf_py_finish(PyObject *module, pf_status status, pf_py_keep *keep);

/* Raise the exception for `status` with pf_last_error(); returns NULL. */
PyObject *pf_py_raise(PyObject *module, pf_status status);

/* Binding tables, one per file, added to the module at exec time. */
extern PyMethodDef pf_py_attn_methods[];
extern PyMethodDef pf_py_tensor_methods[];
extern PyMethodDef pf_py_paged_methods[];      /* bind_paged.c: cache ops, paged attention, merge */
extern PyMethodDef pf_py_block_pool_methods[]; /* bind_block_pool.c: the BlockManager's pool */

/* pagedflash.Tensor */
PyObject *pf_py_tensor_type_create(PyObject *module);
int pf_py_is_tensor(PyObject *module, PyObject *obj);
/* The tensor view of a pagedflash.Tensor. */
const pf_tensor *pf_py_tensor_view(PyObject *obj);

#endif /* PF_PY_H */
