/*
 * py_tensor.h - the pagedflash.Tensor type (tensor.c): the result type for
 * callers whose library pagedflash does not allocate for (anything but NumPy and
 * torch); exports its memory through DLPack and the array interfaces.
 */
#ifndef PF_PY_TENSOR_H
#define PF_PY_TENSOR_H

#include "pf_py.h"

/* The type object, created once per module (module.c stores it in the state). */
PyObject *pf_py_tensor_type_create(PyObject *module);
/* Whether obj is a pagedflash.Tensor, and its view. */
int pf_py_is_tensor(PyObject *obj);
const pf_tensor *pf_py_tensor_view(PyObject *obj);
/* A new uninitialized Tensor of `shape` (ndim entries, >= 0) and dtype on the CPU or
 * CUDA device `device_id`; NULL with an exception. */
PyObject *pf_py_tensor_empty(PyObject *module, int ndim, const int64_t *shape, pf_dtype dtype, int on_device,
                             int device_id);

#endif /* PF_PY_TENSOR_H */
