/*
 * tensor.c - pagedflash.Tensor: the result type handed to callers whose array
 * library pagedflash does not allocate for itself (anything but NumPy and
 * torch). It owns its memory and exports it without copying through
 * __dlpack__ / __dlpack_device__ (versioned and legacy capsules) and through
 * __array_interface__ (host memory) or __cuda_array_interface__ (device memory),
 * so np.from_dlpack, torch.from_dlpack, cupy.from_dlpack and jax take it.
 */
#include "py_tensor.h"

#include <stdlib.h>
#include <string.h>

#include "pf_dlpack.h"

typedef struct {
    PyObject_HEAD
    pf_tensor view;
    void *alloc;       /* owned allocation */
    int on_device;     /* alloc came from pf_device_alloc */
} PfTensor;

static void tensor_dealloc(PyObject *self) {
    PfTensor *t = (PfTensor *)self;
    PyTypeObject *tp = Py_TYPE(self);
    if (t->alloc) {
        if (t->on_device)
            pf_device_free(t->alloc, t->view.device_id);
        else
            free(t->alloc);
    }
    tp->tp_free(self);
    Py_DECREF(tp);
}

int pf_py_is_tensor(PyObject *obj) { return Py_TYPE(obj)->tp_dealloc == tensor_dealloc; }

const pf_tensor *pf_py_tensor_view(PyObject *obj) { return &((PfTensor *)obj)->view; }

PyObject *pf_py_tensor_empty(PyObject *module, int ndim, const int64_t *shape, pf_dtype dtype, int on_device,
                             int device_id) {
    pf_module_state *st = pf_py_state(module);
    PfTensor *t = (PfTensor *)PyType_GenericAlloc((PyTypeObject *)st->tensor_type, 0);
    if (!t) return NULL;
    t->view.ndim = (int32_t)ndim;
    t->view.dtype = dtype;
    t->view.device = on_device ? PF_DEVICE_CUDA : PF_DEVICE_CPU;
    t->view.device_id = on_device ? device_id : 0;
    /* the byte size must fit int64 (else it wrapped into a small allocation behind a huge shape) */
    int64_t numel = 1, stride = 1, bytes = 0;
    int overflow = 0;
    for (int i = ndim - 1; i >= 0; i--) {
        t->view.shape[i] = shape[i];
        t->view.strides[i] = stride;
        overflow |= __builtin_mul_overflow(stride, shape[i] ? shape[i] : 1, &stride);
        overflow |= __builtin_mul_overflow(numel, shape[i], &numel);
    }
    for (int i = 0; i < ndim; i++)
        if (shape[i] == 0) numel = 0, overflow = 0; /* empty: no element is ever addressed */
    if (overflow || __builtin_mul_overflow(numel, (int64_t)pf_dtype_size(dtype), &bytes)) {
        Py_DECREF(t);
        PyErr_SetString(PyExc_ValueError, "shape: too many elements (the size in bytes overflows int64)");
        return NULL;
    }
    if (on_device) {
        pf_status status = pf_device_alloc(&t->alloc, bytes ? (size_t)bytes : 1, device_id);
        if (status != PF_STATUS_OK) {
            Py_DECREF(t);
            return pf_py_raise(module, status);
        }
        t->on_device = 1;
    } else {
        t->alloc = pf_host_alloc((size_t)bytes);
        if (!t->alloc) {
            Py_DECREF(t);
            return PyErr_NoMemory();
        }
    }
    t->view.data = t->alloc;
    return (PyObject *)t;
}

/* ---- DLPack export ---- */

typedef struct {
    DLManagedTensorVersioned mt;
    int64_t shape[PF_MAX_DIMS], strides[PF_MAX_DIMS];
} export_versioned;

typedef struct {
    DLManagedTensor mt;
    int64_t shape[PF_MAX_DIMS], strides[PF_MAX_DIMS];
} export_legacy;

static void release_owner(void *owner) {
    PyGILState_STATE g = PyGILState_Ensure();
    Py_XDECREF((PyObject *)owner);
    PyGILState_Release(g);
}

static void deleter_versioned(DLManagedTensorVersioned *mt) {
    release_owner(mt->manager_ctx);
    free(mt);
}

static void deleter_legacy(DLManagedTensor *mt) {
    release_owner(mt->manager_ctx);
    free(mt);
}

static void capsule_destructor_versioned(PyObject *cap) {
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *mt = (DLManagedTensorVersioned *)PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (mt && mt->deleter) mt->deleter(mt);
    }
}

static void capsule_destructor_legacy(PyObject *cap) {
    if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *mt = (DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
        if (mt && mt->deleter) mt->deleter(mt);
    }
}

static void fill_dltensor(PfTensor *t, DLTensor *d, int64_t *shape, int64_t *strides) {
    const pf_tensor *v = &t->view;
    d->data = v->data;
    d->device.device_type = v->device == PF_DEVICE_CUDA ? kDLCUDA : kDLCPU;
    d->device.device_id = v->device == PF_DEVICE_CUDA ? v->device_id : 0;
    d->ndim = v->ndim;
    switch (v->dtype) {
        case PF_DTYPE_F32: d->dtype = (DLDataType){kDLFloat, 32, 1}; break;
        case PF_DTYPE_F16: d->dtype = (DLDataType){kDLFloat, 16, 1}; break;
        case PF_DTYPE_BF16: d->dtype = (DLDataType){kDLBfloat, 16, 1}; break;
        case PF_DTYPE_I32: d->dtype = (DLDataType){kDLInt, 32, 1}; break;
        case PF_DTYPE_I64: d->dtype = (DLDataType){kDLInt, 64, 1}; break;
        case PF_DTYPE_U8: d->dtype = (DLDataType){kDLUInt, 8, 1}; break;
        case PF_DTYPE_I8: d->dtype = (DLDataType){kDLInt, 8, 1}; break;
        case PF_DTYPE_F8E4M3: d->dtype = (DLDataType){kDLFloat8_e4m3fn, 8, 1}; break;
        case PF_DTYPE_F8E5M2: d->dtype = (DLDataType){kDLFloat8_e5m2, 8, 1}; break;
        default: d->dtype = (DLDataType){kDLFloat, 64, 1}; break;
    }
    for (int i = 0; i < v->ndim; i++) {
        shape[i] = v->shape[i];
        strides[i] = v->strides[i];
    }
    d->shape = shape;
    d->strides = strides;
    d->byte_offset = 0;
}

static PyObject *tensor_dlpack(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"stream", "max_version", "dl_device", "copy", NULL};
    PyObject *stream = Py_None, *max_version = Py_None, *dl_device = Py_None, *copy = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OOOO:__dlpack__", kwlist, &stream, &max_version, &dl_device,
                                     &copy))
        return NULL;
    PfTensor *t = (PfTensor *)self;
    if (copy == Py_True) {
        PyErr_SetString(PyExc_BufferError, "pagedflash.Tensor: copy=True is not supported");
        return NULL;
    }
    if (dl_device != Py_None) {
        int dev_type = -1, dev_id = -1;
        if (!PyTuple_Check(dl_device) || !PyArg_ParseTuple(dl_device, "ii", &dev_type, &dev_id)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "dl_device: expected a (device_type, device_id) tuple of ints, got %R",
                         dl_device);
            return NULL;
        }
        int mine = t->view.device == PF_DEVICE_CUDA ? kDLCUDA : kDLCPU;
        if (dev_type != mine || (mine == kDLCUDA && dev_id != t->view.device_id)) {
            PyErr_SetString(PyExc_BufferError, "pagedflash.Tensor: export to another device is not supported");
            return NULL;
        }
    }
    long major = 0;
    if (max_version != Py_None) {
        if (!PyTuple_Check(max_version) || PyTuple_GET_SIZE(max_version) < 1) {
            PyErr_SetString(PyExc_TypeError, "max_version: expected a (major, minor) tuple");
            return NULL;
        }
        int overflow = 0; /* a major beyond long: a consumer of some future version, which takes 1.x */
        major = PyLong_AsLongAndOverflow(PyTuple_GET_ITEM(max_version, 0), &overflow);
        if (major == -1 && PyErr_Occurred()) return NULL;
        if (overflow) major = overflow > 0 ? LONG_MAX : -1;
    }
    /* Device memory is written on pf streams ordered by the caller: pagedflash
     * never leaves work pending on a stream other than the one it was given. */
    (void)stream;
    if (major >= 1) {
        export_versioned *e = (export_versioned *)calloc(1, sizeof *e);
        if (!e) return PyErr_NoMemory();
        e->mt.version.major = 1;
        e->mt.version.minor = 0;
        e->mt.manager_ctx = self;
        e->mt.deleter = deleter_versioned;
        e->mt.flags = 0;
        fill_dltensor(t, &e->mt.dl_tensor, e->shape, e->strides);
        Py_INCREF(self);
        PyObject *cap = PyCapsule_New(&e->mt, "dltensor_versioned", capsule_destructor_versioned);
        if (!cap) deleter_versioned(&e->mt);
        return cap;
    }
    export_legacy *e = (export_legacy *)calloc(1, sizeof *e);
    if (!e) return PyErr_NoMemory();
    e->mt.manager_ctx = self;
    e->mt.deleter = deleter_legacy;
    fill_dltensor(t, &e->mt.dl_tensor, e->shape, e->strides);
    Py_INCREF(self);
    PyObject *cap = PyCapsule_New(&e->mt, "dltensor", capsule_destructor_legacy);
    if (!cap) deleter_legacy(&e->mt);
    return cap;
}

static PyObject *tensor_dlpack_device(PyObject *self, PyObject *unused) {
    (void)unused;
    PfTensor *t = (PfTensor *)self;
    if (t->view.device == PF_DEVICE_CUDA) return Py_BuildValue("(ii)", kDLCUDA, (int)t->view.device_id);
    return Py_BuildValue("(ii)", kDLCPU, 0);
}

static const char *typestr_of(pf_dtype dt) {
    switch (dt) {
        case PF_DTYPE_F32: return "<f4";
        case PF_DTYPE_F16: return "<f2";
        case PF_DTYPE_BF16: return "<V2"; /* no standard code: raw 2-byte elements */
        case PF_DTYPE_I32: return "<i4";
        case PF_DTYPE_I64: return "<i8";
        case PF_DTYPE_U8: return "|u1";
        case PF_DTYPE_I8: return "|i1";
        case PF_DTYPE_F8E4M3:
        case PF_DTYPE_F8E5M2: return "|V1"; /* no standard code: raw bytes, as bfloat16 */
        default: return "<f8";
    }
}

static PyObject *interface_dict(PfTensor *t) {
    const pf_tensor *v = &t->view;
    PyObject *shape = PyTuple_New(v->ndim), *strides = PyTuple_New(v->ndim);
    if (!shape || !strides) {
        Py_XDECREF(shape);
        Py_XDECREF(strides);
        return NULL;
    }
    size_t es = pf_dtype_size(v->dtype);
    for (int i = 0; i < v->ndim; i++) {
        PyTuple_SET_ITEM(shape, i, PyLong_FromLongLong(v->shape[i]));
        PyTuple_SET_ITEM(strides, i, PyLong_FromLongLong(v->strides[i] * (int64_t)es));
    }
    return Py_BuildValue("{s:N,s:s,s:(NO),s:N,s:i}", "shape", shape, "typestr", typestr_of(v->dtype), "data",
                         PyLong_FromVoidPtr(v->data), Py_False, "strides", strides, "version", 3);
}

static PyObject *tensor_array_interface(PyObject *self, void *closure) {
    (void)closure;
    PfTensor *t = (PfTensor *)self;
    if (t->view.device == PF_DEVICE_CUDA) {
        PyErr_SetString(PyExc_AttributeError,
                        "__array_interface__: the tensor is in CUDA memory; use __cuda_array_interface__ "
                        "or __dlpack__");
        return NULL;
    }
    return interface_dict(t);
}

static PyObject *tensor_cuda_array_interface(PyObject *self, void *closure) {
    (void)closure;
    PfTensor *t = (PfTensor *)self;
    if (t->view.device != PF_DEVICE_CUDA) {
        PyErr_SetString(PyExc_AttributeError,
                        "__cuda_array_interface__: the tensor is in host memory; use "
                        "__array_interface__ or __dlpack__");
        return NULL;
    }
    PyObject *d = interface_dict(t);
    if (d && PyDict_SetItemString(d, "stream", Py_None) < 0) Py_CLEAR(d);
    return d;
}

static PyObject *tensor_shape(PyObject *self, void *closure) {
    (void)closure;
    const pf_tensor *v = &((PfTensor *)self)->view;
    PyObject *t = PyTuple_New(v->ndim);
    for (int i = 0; t && i < v->ndim; i++) PyTuple_SET_ITEM(t, i, PyLong_FromLongLong(v->shape[i]));
    return t;
}

static PyObject *tensor_strides(PyObject *self, void *closure) {
    (void)closure;
    const pf_tensor *v = &((PfTensor *)self)->view;
    PyObject *t = PyTuple_New(v->ndim);
    for (int i = 0; t && i < v->ndim; i++) PyTuple_SET_ITEM(t, i, PyLong_FromLongLong(v->strides[i]));
    return t;
}

static PyObject *tensor_dtype(PyObject *self, void *closure) {
    (void)closure;
    return PyUnicode_FromString(pf_dtype_name(((PfTensor *)self)->view.dtype));
}

static PyObject *tensor_device(PyObject *self, void *closure) {
    (void)closure;
    const pf_tensor *v = &((PfTensor *)self)->view;
    if (v->device == PF_DEVICE_CUDA) return PyUnicode_FromFormat("cuda:%d", (int)v->device_id);
    return PyUnicode_FromString("cpu");
}

static PyObject *tensor_ndim(PyObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(((PfTensor *)self)->view.ndim);
}

static PyObject *tensor_data_ptr(PyObject *self, void *closure) {
    (void)closure;
    return PyLong_FromVoidPtr(((PfTensor *)self)->view.data);
}

static PyObject *tensor_repr(PyObject *self) {
    PyObject *shape = tensor_shape(self, NULL), *dev = tensor_device(self, NULL);
    PyObject *r = NULL;
    if (shape && dev)
        r = PyUnicode_FromFormat("pagedflash.Tensor(shape=%R, dtype=%s, device=%U)", shape,
                                 pf_dtype_name(((PfTensor *)self)->view.dtype), dev);
    Py_XDECREF(shape);
    Py_XDECREF(dev);
    return r;
}

static PyMethodDef tensor_type_methods[] = {
    {"__dlpack__", (PyCFunction)(void (*)(void))tensor_dlpack, METH_VARARGS | METH_KEYWORDS,
     "__dlpack__(*, stream=None, max_version=None, dl_device=None, copy=None) -> PyCapsule"},
    {"__dlpack_device__", tensor_dlpack_device, METH_NOARGS, "(device_type, device_id)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef tensor_getset[] = {
    {"__array_interface__", tensor_array_interface, NULL, "NumPy array interface (host memory)", NULL},
    {"__cuda_array_interface__", tensor_cuda_array_interface, NULL, "CUDA array interface", NULL},
    {"shape", tensor_shape, NULL, "shape as a tuple", NULL},
    {"strides", tensor_strides, NULL, "strides in elements", NULL},
    {"dtype", tensor_dtype, NULL, "dtype name ('float16', 'bfloat16', 'float32', ...)", NULL},
    {"device", tensor_device, NULL, "'cpu' or 'cuda:N'", NULL},
    {"ndim", tensor_ndim, NULL, "number of dimensions", NULL},
    {"data_ptr", tensor_data_ptr, NULL, "address of the first element", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyType_Slot tensor_slots[] = {
    {Py_tp_dealloc, tensor_dealloc},
    {Py_tp_methods, tensor_type_methods},
    {Py_tp_getset, tensor_getset},
    {Py_tp_repr, tensor_repr},
    {Py_tp_doc,
     "pagedflash.Tensor: an array owned by pagedflash, exported via DLPack and the array "
     "interfaces. Created by pagedflash for callers whose library it does not allocate for."},
    {0, NULL},
};

static PyType_Spec tensor_spec = {
    .name = "pagedflash.Tensor",
    .basicsize = sizeof(PfTensor),
    .itemsize = 0,
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_IMMUTABLETYPE,
    .slots = tensor_slots,
};

PyObject *pf_py_tensor_type_create(PyObject *module) { return PyType_FromModuleAndSpec(module, &tensor_spec, NULL); }
