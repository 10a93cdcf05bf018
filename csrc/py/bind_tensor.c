/*
 * bind_tensor.c - bindings around arrays themselves:
 *   _C.describe(array, name='array') -> (shape, dtype name, 'cpu' | 'cuda', device_id) of any array
 *       pagedflash accepts (an error names the argument `name`)
 *   _C.empty(shape, dtype, device='cpu', device_id=0) -> pagedflash.Tensor (uninitialized)
 */
#include "py_bindings.h"
#include "py_convert.h"
#include "py_tensor.h"

#include <string.h>

static int dtype_from_name(const char *name, pf_dtype *dt) {
    static const pf_dtype all[] = {PF_DTYPE_F32, PF_DTYPE_F16, PF_DTYPE_BF16,   PF_DTYPE_I32,    PF_DTYPE_I64,
                                   PF_DTYPE_U8,  PF_DTYPE_F64, PF_DTYPE_F8E4M3, PF_DTYPE_F8E5M2, PF_DTYPE_I8};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        if (!strcmp(name, pf_dtype_name(all[i]))) {
            *dt = all[i];
            return 0;
        }
    return -1;
}

/* _C.empty(shape, dtype, device="cpu", device_id=0) -> Tensor (uninitialized). */
static PyObject *tensor_empty(PyObject *module, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"shape", "dtype", "device", "device_id", NULL};
    PyObject *shape, *odevice_id = NULL;
    const char *dtype_name, *device = "cpu";
    int32_t device_id = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Os|sO:empty", kwlist, &shape, &dtype_name, &device, &odevice_id))
        return NULL;
    if (odevice_id && pf_py_int32(odevice_id, "device_id", &device_id) < 0) return NULL;
    pf_dtype dt;
    if (dtype_from_name(dtype_name, &dt) < 0) {
        PyErr_Format(PyExc_TypeError, "dtype: unknown dtype '%s'", dtype_name);
        return NULL;
    }
    PyObject *seq = PySequence_Fast(shape, "shape: expected a sequence of ints");
    if (!seq) return NULL;
    Py_ssize_t nd = PySequence_Fast_GET_SIZE(seq);
    if (nd > PF_MAX_DIMS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "shape: at most %d dimensions, got %zd", PF_MAX_DIMS, nd);
        return NULL;
    }
    int on_device = !strcmp(device, "cuda");
    if (!on_device && strcmp(device, "cpu")) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "device: expected 'cpu' or 'cuda', got '%s'", device);
        return NULL;
    }
    int64_t dims[PF_MAX_DIMS];
    for (Py_ssize_t i = 0; i < nd; i++) {
        if (pf_py_int64(PySequence_Fast_GET_ITEM(seq, i), "shape", &dims[i]) < 0 || dims[i] < 0) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "shape: dimensions must be >= 0, got %lld", (long long)dims[i]);
            Py_DECREF(seq);
            return NULL;
        }
    }
    Py_DECREF(seq);
    return pf_py_tensor_empty(module, (int)nd, dims, dt, on_device, device_id);
}

static PyObject *tensor_describe(PyObject *module, PyObject *args) {
    (void)module;
    PyObject *obj;
    const char *name = "array";
    if (!PyArg_ParseTuple(args, "O|s:describe", &obj, &name)) return NULL;
    pf_py_keep keep = {0};
    pf_tensor v;
    PyObject *result = NULL;
    if (pf_py_tensor(obj, name, 0, &v, &keep) == 0) {
        PyObject *shape = PyTuple_New(v.ndim);
        for (int i = 0; shape && i < v.ndim; i++) PyTuple_SET_ITEM(shape, i, PyLong_FromLongLong(v.shape[i]));
        if (shape)
            result = Py_BuildValue("(Nssi)", shape, pf_dtype_name(v.dtype), v.device == PF_DEVICE_CUDA ? "cuda" : "cpu",
                                   (int)v.device_id);
    }
    pf_py_keep_release(&keep);
    if (result && PyErr_Occurred()) Py_CLEAR(result); /* a deleter's error, as pf_py_finish keeps it */
    if (!result && !PyErr_Occurred()) /* a producer cleared its error: still a failure */
        PyErr_Format(PyExc_ValueError, "%s: could not be converted (its producer raised an error and then cleared it)",
                     name);
    return result;
}

/* Whether obj's type publishes a DLPack C exchange API this build can use (tests, diagnostics). */
static PyObject *has_exchange_api(PyObject *module, PyObject *obj) {
    (void)module;
    return PyBool_FromLong(pf_py_exchange_api(Py_TYPE(obj)) != NULL);
}

PyMethodDef pf_py_tensor_methods[] = {
    {"has_exchange_api", has_exchange_api, METH_O,
     "has_exchange_api(array) -> bool: whether its type publishes a usable DLPack C exchange API"},
    {"describe", tensor_describe, METH_VARARGS,
     "describe(array, name='array') -> (shape, dtype, device, device_id) of any array pagedflash accepts; "
     "errors name the argument `name`"},
    {"empty", (PyCFunction)(void (*)(void))tensor_empty, METH_VARARGS | METH_KEYWORDS,
     "empty(shape, dtype, device='cpu', device_id=0) -> pagedflash.Tensor (uninitialized)"},
    {NULL, NULL, 0, NULL},
};
