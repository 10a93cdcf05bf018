/*
 * library.c - the caller's library: where a call's results are allocated, which stream its
 * work runs on, and the copies an input needs (py_library.h). NumPy in, NumPy out (the
 * NumPy C API); a producer with the DLPack C exchange API in (torch), its own tensors out
 * (its allocator, its current stream); pagedflash.Tensor in, Tensor out. Any other
 * producer is left to the Python layer (pagedflash/_frameworks.py), which knows how to
 * allocate for CuPy or JAX and which stream CuPy calls current.
 */
#include "py_library.h"

#include "py_tensor.h"

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL pf_numpy_api
#include <numpy/arrayobject.h>

#include "pf_dlpack.h"

void pf_py_lib_of(PyObject *obj, pf_py_lib *lib) {
    lib->like = obj;
    lib->api = NULL;
    if (PyArray_Check(obj)) {
        lib->kind = PF_PY_LIB_NUMPY;
    } else if (pf_py_is_tensor(obj)) {
        lib->kind = PF_PY_LIB_TENSOR;
    } else if ((lib->api = pf_py_exchange_api(Py_TYPE(obj))) != NULL) {
        lib->kind = PF_PY_LIB_EXCHANGE;
    } else {
        lib->kind = PF_PY_LIB_OTHER;
    }
}

int pf_py_lib_needs_python(const pf_py_lib *lib, const pf_py_keep *keep, int allocates) {
    return lib->kind == PF_PY_LIB_OTHER && (allocates || !keep->stream_given);
}

int pf_py_lib_stream(const pf_py_lib *lib, const pf_tensor *like, pf_py_keep *keep) {
    if (keep->stream_given || like->device != PF_DEVICE_CUDA) return 0;
    if (lib->kind != PF_PY_LIB_EXCHANGE) return 0; /* NULL: the legacy default stream */
    void *stream = NULL;
    if (lib->api->current_work_stream(kDLCUDA, like->device_id, &stream) != 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "stream: the producer has no current stream");
        return -1;
    }
    keep->stream = stream;
    return 0;
}

/* ---- results ---- */

typedef struct alloc_error {
    char message[256];
    int set;
} alloc_error;

static void set_alloc_error(void *ctx, const char *kind, const char *message) {
    alloc_error *e = (alloc_error *)ctx;
    snprintf(e->message, sizeof e->message, "%s: %s", kind ? kind : "error", message ? message : "");
    e->set = 1;
}

static const DLDataType dl_types[] = {
    [PF_DTYPE_F32] = {kDLFloat, 32, 1},         [PF_DTYPE_F16] = {kDLFloat, 16, 1},
    [PF_DTYPE_BF16] = {kDLBfloat, 16, 1},       [PF_DTYPE_I32] = {kDLInt, 32, 1},
    [PF_DTYPE_I64] = {kDLInt, 64, 1},           [PF_DTYPE_U8] = {kDLUInt, 8, 1},
    [PF_DTYPE_F64] = {kDLFloat, 64, 1},         [PF_DTYPE_F8E4M3] = {kDLFloat8_e4m3fn, 8, 1},
    [PF_DTYPE_F8E5M2] = {kDLFloat8_e5m2, 8, 1}, [PF_DTYPE_I8] = {kDLInt, 8, 1},
};

static PyObject *empty_exchange(const pf_py_lib *lib, PyObject *module, const pf_tensor *like, int ndim,
                                const int64_t *shape, pf_dtype dtype) {
    int64_t dims[PF_MAX_DIMS];
    memcpy(dims, shape, sizeof(int64_t) * (size_t)ndim);
    DLTensor proto;
    memset(&proto, 0, sizeof proto);
    proto.device.device_type = like->device == PF_DEVICE_CUDA ? kDLCUDA : kDLCPU;
    proto.device.device_id = like->device == PF_DEVICE_CUDA ? like->device_id : 0;
    proto.ndim = ndim;
    proto.dtype = dl_types[dtype];
    proto.shape = dims;
    DLManagedTensorVersioned *mt = NULL;
    alloc_error err = {{0}, 0};
    if (lib->api->managed_tensor_allocator(&proto, &mt, &err, set_alloc_error) != 0 || !mt) {
        if (PyErr_Occurred()) return NULL;
        PyErr_Format(like->device == PF_DEVICE_CUDA ? pf_py_state(module)->cuda_error : PyExc_MemoryError,
                     "pagedflash: the caller's library could not allocate a result (%s)",
                     err.set ? err.message : "no reason given");
        return NULL;
    }
    void *obj = NULL;
    if (lib->api->managed_tensor_to_py_object_no_sync(mt, &obj) != 0 || !obj) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_MemoryError, "pagedflash: a result could not be wrapped");
        return NULL;
    }
    return (PyObject *)obj;
}

static PyObject *empty_numpy(PyObject *like, int ndim, const int64_t *shape, pf_dtype dtype, const pf_tensor *view) {
    npy_intp dims[PF_MAX_DIMS];
    for (int i = 0; i < ndim; i++) dims[i] = (npy_intp)shape[i];
    PyArray_Descr *descr;
    if (dtype == view->dtype) { /* q's own dtype object: ml_dtypes' bfloat16 included */
        descr = PyArray_DESCR((PyArrayObject *)like);
        Py_INCREF(descr);
    } else {
        static const int npy[] = {[PF_DTYPE_F32] = NPY_FLOAT32, [PF_DTYPE_F16] = NPY_FLOAT16,
                                  [PF_DTYPE_I32] = NPY_INT32,   [PF_DTYPE_I64] = NPY_INT64,
                                  [PF_DTYPE_U8] = NPY_UINT8,    [PF_DTYPE_F64] = NPY_FLOAT64,
                                  [PF_DTYPE_I8] = NPY_INT8}; /* results are never float8 */
        descr = PyArray_DescrFromType(npy[dtype]);
    }
    return PyArray_Empty(ndim, dims, descr, 0); /* steals descr */
}

PyObject *pf_py_lib_empty(const pf_py_lib *lib, PyObject *module, const pf_tensor *like, int ndim, const int64_t *shape,
                          pf_dtype dtype) {
    for (int i = 0; i < ndim; i++)
        if (shape[i] < 0) { /* from a malformed argument the core reports later: allocate nothing */
            PyErr_SetString(PyExc_ValueError, "pagedflash: a result would have a negative dimension");
            return NULL;
        }
    switch (lib->kind) {
        case PF_PY_LIB_NUMPY: return empty_numpy(lib->like, ndim, shape, dtype, like);
        case PF_PY_LIB_EXCHANGE: return empty_exchange(lib, module, like, ndim, shape, dtype);
        case PF_PY_LIB_TENSOR:
            return pf_py_tensor_empty(module, ndim, shape, dtype, like->device == PF_DEVICE_CUDA, like->device_id);
        default: Py_RETURN_NOTIMPLEMENTED;
    }
}

int pf_py_result_dtype(const char *name, const pf_tensor *like) {
    if (like->dtype == PF_DTYPE_F32 || like->dtype == PF_DTYPE_F16 || like->dtype == PF_DTYPE_BF16) return 0;
    PyErr_Format(PyExc_TypeError, "%s: expected dtype float16, bfloat16 or float32, got %s", name,
                 pf_dtype_name(like->dtype));
    return -1;
}

PyObject *pf_py_output(PyObject *module, const pf_py_lib *lib, PyObject *given, const char *name, const pf_tensor *like,
                       const char *like_name, int ndim, const int64_t *shape, pf_dtype dtype, pf_tensor *view,
                       pf_py_keep *keep) {
    PyObject *obj;
    if (given == Py_None) {
        if (dtype == like->dtype && pf_py_result_dtype(like_name, like) < 0) return NULL;
        obj = pf_py_lib_empty(lib, module, like, ndim, shape, dtype);
        PyObject *hook = pf_py_state(module)->result_hook;
        if (hook && obj && obj != Py_NotImplemented) {
            PyObject *r = PyObject_CallOneArg(hook, obj);
            if (!r) Py_CLEAR(obj);
            Py_XDECREF(r);
        }
    } else {
        obj = Py_NewRef(given);
    }
    if (obj && pf_py_tensor(obj, name, 1, view, keep) < 0) Py_CLEAR(obj);
    return obj;
}

int pf_py_opt_output(PyObject *module, const pf_py_lib *lib, PyObject *given, const char *name, const pf_tensor *like,
                     int ndim, const int64_t *shape, pf_dtype dtype, pf_tensor *view, pf_py_keep *keep,
                     PyObject **obj) {
    *obj = NULL;
    if (given == Py_None || given == Py_False) return 0;
    if (given == Py_True) {
        if (ndim < 0) return 0; /* q's rank is wrong: the core says so */
        given = Py_None;
    }
    *obj = pf_py_output(module, lib, given, name, like, "q", ndim, shape, dtype, view, keep);
    return *obj ? 0 : -1;
}

PyObject *pf_py_out_lse(PyObject *out, PyObject *want_lse, PyObject *lse) {
    if (want_lse == Py_None || want_lse == Py_False) return out;
    return pf_py_tuple(2, (PyObject *[]){out, lse ? lse : Py_NewRef(Py_None)});
}

/* ---- autograd ---- */

/* torch.is_grad_enabled(), looked up once in the torch its tensors came from (1 where no torch
 * is imported: an autograd library we do not know), or -1 with an exception. False inside
 * torch.no_grad(), an autograd.Function's forward and a custom operator's kernel (as
 * pagedflash.torch runs this library). */
static int torch_grad_enabled(pf_module_state *st) {
    if (!st->is_grad_enabled) {
        PyObject *name = PyUnicode_FromString("torch");
        PyObject *torch = name ? PyImport_GetModule(name) : NULL;
        Py_XDECREF(name);
        if (!torch) return PyErr_Occurred() ? -1 : 1;
        st->is_grad_enabled = PyObject_GetAttrString(torch, "is_grad_enabled");
        Py_DECREF(torch);
        if (!st->is_grad_enabled) return -1;
    }
    PyObject *r = PyObject_CallNoArgs(st->is_grad_enabled);
    if (!r) return -1;
    const int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    return v;
}

int pf_py_lib_warn_grad(PyObject *module, PyObject *const *arrays, int n) {
    pf_module_state *st = pf_py_state(module);
    if (st->grad_warned) return 0;
    int autograd = 0;
    for (int i = 0; i < n; i++) autograd |= pf_py_autograd_type(arrays[i]);
    if (!autograd) return 0;
    /* grad mode first: one call (~45 ns); under torch.no_grad() / inference_mode nothing else
     * is read, else requires_grad of each (~45 ns a tensor) */
    const int enabled = torch_grad_enabled(st);
    if (enabled <= 0) return enabled;
    int needs_grad = 0;
    for (int i = 0; i < n && !needs_grad; i++)
        if ((needs_grad = pf_py_requires_grad(arrays[i])) < 0) return -1;
    if (!needs_grad) return 0;
    st->grad_warned = 1;
    return PyErr_WarnEx(PyExc_UserWarning,
                        "pagedflash.flash_attn: q, k or v requires grad, but the plain functional API records no "
                        "autograd graph, so no gradient will reach them. Use pagedflash.torch.flash_attn (or "
                        "flash_attn_varlen) for a differentiable call, or detach the inputs / run under "
                        "torch.no_grad() to silence this. (Warned once per process.)",
                        3);
}

/* ---- inputs ---- */

int pf_py_input(PyObject *obj, const char *name, pf_tensor *out, pf_py_keep *keep) {
    if (pf_py_tensor(obj, name, 0, out, keep) < 0) return -1;
    const int last = out->ndim - 1;
    if (last < 0 || out->shape[last] <= 1 || out->strides[last] == 1) return 0;
    /* a strided last dimension: a contiguous copy in the caller's library (NumPy, or a
     * producer with a .contiguous() method such as torch); others are reported by the core */
    PyObject *copy = NULL;
    if (PyArray_Check(obj)) {
        copy = PyArray_NewCopy((PyArrayObject *)obj, NPY_CORDER);
    } else if (!pf_py_is_tensor(obj) && PyObject_HasAttrString(obj, "contiguous")) {
        copy = PyObject_CallMethod(obj, "contiguous", NULL);
    } else {
        return 0;
    }
    if (!copy) return -1;
    const int rc = pf_py_tensor(copy, name, 0, out, keep); /* the keep holds the copy */
    Py_DECREF(copy);
    return rc;
}
