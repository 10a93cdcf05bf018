/*
 * convert.c - the one argument-conversion layer of pagedflash._C: any array
 * object into a pf_tensor view without copying, streams, kernel hints, Python
 * ints and integer lists (with range checks that name the argument), caller-given
 * output arrays, and the common exit of a binding (pf_py_finish).
 *
 * Arrays, in order of preference:
 *   1. numpy.ndarray, through the NumPy C API (fastest; knows writability);
 *   2. __dlpack__ (versioned capsule first, then the legacy one), following the
 *      consumer rules: ask with stream= and max_version=(1, 0), fall back
 *      without keywords, check the major version, honour byte_offset and NULL
 *      strides, rename the capsule to used_*, call the deleter exactly once
 *      (at the end of the call, in pf_py_keep_release);
 *   3. __cuda_array_interface__ and __array_interface__ (version 3 dicts).
 * Every failure raises with a message naming the argument.
 */
#include "py_convert.h"

#include "py_tensor.h"

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define NO_IMPORT_ARRAY
#define PY_ARRAY_UNIQUE_SYMBOL pf_numpy_api
#include <numpy/arrayobject.h>

#include "pf_dlpack.h"

static void *const pf_empty_data = (void *)&pf_empty_data; /* non-NULL for empty tensors */

static int keep_push(pf_py_keep *keep, PyObject *owner, void *managed, int versioned) {
    if (keep->n >= PF_PY_MAX_ARGS) {
        PyErr_SetString(PyExc_RuntimeError, "pagedflash: too many tensor arguments in one call");
        return -1;
    }
    Py_XINCREF(owner);
    keep->items[keep->n].owner = owner;
    keep->items[keep->n].managed = managed;
    keep->items[keep->n].versioned = versioned;
    keep->n++;
    return 0;
}

void pf_py_keep_release(pf_py_keep *keep) {
    /* deleters may run Python code: keep a pending exception out of their way */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    for (int i = keep->n - 1; i >= 0; i--) {
        void *m = keep->items[i].managed;
        if (m) {
            if (keep->items[i].versioned) {
                DLManagedTensorVersioned *mt = (DLManagedTensorVersioned *)m;
                if (mt->deleter) mt->deleter(mt);
            } else {
                DLManagedTensor *mt = (DLManagedTensor *)m;
                if (mt->deleter) mt->deleter(mt);
            }
        }
        Py_XDECREF(keep->items[i].owner);
    }
    keep->n = 0;
    PyErr_Restore(type, value, tb);
}

static int dtype_from_dl(DLDataType t, pf_dtype *out) {
    *out = PF_DTYPE_INVALID;
    if (t.lanes != 1) return -1;
    if (t.code == kDLFloat && t.bits == 32)
        *out = PF_DTYPE_F32;
    else if (t.code == kDLFloat && t.bits == 16)
        *out = PF_DTYPE_F16;
    else if (t.code == kDLBfloat && t.bits == 16)
        *out = PF_DTYPE_BF16;
    else if (t.code == kDLInt && t.bits == 32)
        *out = PF_DTYPE_I32;
    else if (t.code == kDLInt && t.bits == 64)
        *out = PF_DTYPE_I64;
    else if (t.code == kDLUInt && t.bits == 8)
        *out = PF_DTYPE_U8;
    else if (t.code == kDLFloat && t.bits == 64)
        *out = PF_DTYPE_F64;
    else if (t.code == kDLInt && t.bits == 8)
        *out = PF_DTYPE_I8;
    else if (t.code == kDLFloat8_e4m3fn && t.bits == 8)
        *out = PF_DTYPE_F8E4M3;
    else if (t.code == kDLFloat8_e5m2 && t.bits == 8)
        *out = PF_DTYPE_F8E5M2;
    return *out == PF_DTYPE_INVALID ? -1 : 0;
}

static int device_from_dl(const char *name, DLDevice dev, pf_tensor *out) {
    out->device_id = dev.device_id;
    switch (dev.device_type) {
        case kDLCPU: out->device = PF_DEVICE_CPU; return 0;
        case kDLCUDA: out->device = PF_DEVICE_CUDA; return 0;
        case kDLCUDAHost: out->device = PF_DEVICE_CUDA_HOST; return 0;
        default:
            PyErr_Format(PyExc_NotImplementedError,
                         "%s: DLPack device type %d is not supported (CPU, CUDA and CUDA host are)", name,
                         (int)dev.device_type);
            return -1;
    }
}

/* The checks every producer's report goes through (DLPack, array interfaces, NumPy) once
 * out's dtype, ndim, shape and strides are filled: no negative dimension, an element count
 * and a byte extent that int64 holds, and -- when there are elements -- a non-NULL data
 * pointer aligned to the element size. `data` is the address of the first element (the
 * producer's byte offset applied). On success out->data is set; empty tensors get a
 * non-NULL placeholder that nothing reads. */
static int check_view(const char *name, pf_tensor *out, uintptr_t data) {
    const int64_t es = (int64_t)pf_dtype_size(out->dtype);
    int64_t numel = 1;
    for (int i = 0; i < out->ndim; i++) {
        if (out->shape[i] < 0) {
            PyErr_Format(PyExc_ValueError, "%s: dimension %d is negative (%lld)", name, i, (long long)out->shape[i]);
            return -1;
        }
        if (__builtin_mul_overflow(numel, out->shape[i], &numel)) {
            PyErr_Format(PyExc_ValueError, "%s: too many elements (the product of its shape overflows int64)", name);
            return -1;
        }
    }
    if (numel == 0) {
        out->data = pf_empty_data;
        return 0;
    }
    int64_t reach = 0; /* elements between the first and the farthest element */
    for (int i = 0; i < out->ndim; i++) {
        int64_t step, extent;
        if (out->strides[i] == INT64_MIN ||
            __builtin_mul_overflow(out->strides[i] < 0 ? -out->strides[i] : out->strides[i], out->shape[i] - 1,
                                   &step) ||
            __builtin_add_overflow(reach, step, &reach) || __builtin_add_overflow(reach, 1, &extent) ||
            __builtin_mul_overflow(extent, es, &extent)) {
            PyErr_Format(PyExc_ValueError, "%s: its strides reach beyond what int64 addresses", name);
            return -1;
        }
    }
    if (!data) {
        PyErr_Format(PyExc_ValueError, "%s: the producer reported a NULL data pointer for %lld elements", name,
                     (long long)numel);
        return -1;
    }
    if (data % (uintptr_t)es) {
        PyErr_Format(PyExc_ValueError, "%s: its data pointer %p is not aligned to its %lld-byte elements", name,
                     (void *)data, (long long)es);
        return -1;
    }
    out->data = (void *)data;
    return 0;
}

static int fill_from_dltensor(const char *name, const DLTensor *t, pf_tensor *out) {
    if (t->ndim < 0 || t->ndim > PF_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d dimensions are supported, got %d", name, PF_MAX_DIMS,
                     (int)t->ndim);
        return -1;
    }
    if (t->ndim > 0 && !t->shape) {
        PyErr_Format(PyExc_ValueError, "%s: the producer reported a NULL shape for %d dimensions", name, (int)t->ndim);
        return -1;
    }
    if (dtype_from_dl(t->dtype, &out->dtype) < 0) {
        static const char *const kinds[] = {"int",           "uint",
                                            "float",         "opaque",
                                            "bfloat",        "complex",
                                            "bool",          "float8_e3m4",
                                            "float8_e4m3",   "float8_e4m3b11fnuz",
                                            "float8_e4m3fn", "float8_e4m3fnuz",
                                            "float8_e5m2",   "float8_e5m2fnuz",
                                            "float8_e8m0fnu"};
        const char *kind = t->dtype.code < sizeof kinds / sizeof kinds[0] ? kinds[t->dtype.code] : "dtype code ";
        char dt[48];
        if (t->dtype.code == kDLBool && t->dtype.bits == 8)
            snprintf(dt, sizeof dt, "bool");
        else if (t->dtype.code >= 7 && t->dtype.code < sizeof kinds / sizeof kinds[0])
            snprintf(dt, sizeof dt, "%s (%d bits)", kind, (int)t->dtype.bits);
        else
            snprintf(dt, sizeof dt, "%s%d", kind, (int)t->dtype.bits);
        if (t->dtype.lanes != 1) snprintf(dt + strlen(dt), sizeof dt - strlen(dt), "x%d", (int)t->dtype.lanes);
        PyErr_Format(PyExc_TypeError,
                     "%s: unsupported dtype %s; expected float16, bfloat16 or float32 (or int32/int64 for "
                     "indices, float8_e4m3fn/float8_e5m2/int8 for KV caches)",
                     name, dt);
        return -1;
    }
    if (device_from_dl(name, t->device, out) < 0) return -1;
    out->ndim = t->ndim;
    int64_t stride = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        out->shape[i] = t->shape[i];
        out->strides[i] = t->strides ? t->strides[i] : stride;
        if (t->shape[i] > 0) stride = __builtin_mul_overflow(stride, t->shape[i], &stride) ? INT64_MAX : stride;
    }
    uintptr_t data = (uintptr_t)t->data;
    if (data && t->byte_offset > UINTPTR_MAX - data) {
        PyErr_Format(PyExc_ValueError, "%s: byte_offset %llu overflows the data pointer", name,
                     (unsigned long long)t->byte_offset);
        return -1;
    }
    return check_view(name, out, data ? data + (uintptr_t)t->byte_offset : 0);
}

static void export_failed(const char *name, const char *how);

/* Call obj.__dlpack__ with the consumer's keywords, falling back for old producers. */
static PyObject *call_dlpack(PyObject *obj, PyObject *stream_arg) {
    PyObject *meth = PyObject_GetAttrString(obj, "__dlpack__");
    if (!meth) return NULL;
    PyObject *args = PyTuple_New(0);
    PyObject *kw = Py_BuildValue("{s:O,s:(ii)}", "stream", stream_arg, "max_version", PF_DLPACK_MAJOR, PF_DLPACK_MINOR);
    PyObject *cap = (args && kw) ? PyObject_Call(meth, args, kw) : NULL;
    if (!cap && PyErr_ExceptionMatches(PyExc_TypeError)) {
        PyErr_Clear(); /* a producer that predates max_version */
        Py_XDECREF(kw);
        kw = Py_BuildValue("{s:O}", "stream", stream_arg);
        cap = kw ? PyObject_Call(meth, args, kw) : NULL;
        if (!cap && PyErr_ExceptionMatches(PyExc_TypeError) && stream_arg == Py_None) {
            PyErr_Clear();
            cap = PyObject_CallNoArgs(meth);
        }
    }
    Py_XDECREF(kw);
    Py_XDECREF(args);
    Py_DECREF(meth);
    return cap;
}

static int import_dlpack(PyObject *obj, const char *name, int writable, pf_tensor *out, pf_py_keep *keep) {
    /* Which device? CUDA producers need the consumer stream; CPU ones need None. */
    PyObject *stream_arg = Py_None;
    Py_INCREF(stream_arg);
    PyObject *dev = PyObject_CallMethod(obj, "__dlpack_device__", NULL);
    if (dev) {
        long dtype_code = -1;
        if (PyTuple_Check(dev) && PyTuple_GET_SIZE(dev) == 2) dtype_code = PyLong_AsLong(PyTuple_GET_ITEM(dev, 0));
        Py_DECREF(dev);
        if (PyErr_Occurred()) PyErr_Clear();
        if (dtype_code == kDLCUDA || dtype_code == kDLCUDAManaged) {
            Py_DECREF(stream_arg);
            /* 1 = the legacy default stream in the array API's convention */
            stream_arg = keep->stream ? PyLong_FromVoidPtr(keep->stream) : PyLong_FromLong(1);
            if (!stream_arg) return -1;
        }
    } else {
        PyErr_Clear();
    }
    PyObject *cap = call_dlpack(obj, stream_arg);
    Py_DECREF(stream_arg);
    if (!cap) {
        if (PyErr_ExceptionMatches(PyExc_BufferError) || PyErr_ExceptionMatches(PyExc_RuntimeError))
            export_failed(name, "DLPack");
        return -1;
    }
    int rc = -1;
    if (PyCapsule_IsValid(cap, "dltensor_versioned")) {
        DLManagedTensorVersioned *mt = (DLManagedTensorVersioned *)PyCapsule_GetPointer(cap, "dltensor_versioned");
        if (!mt) goto done;
        if (mt->version.major != PF_DLPACK_MAJOR) {
            PyErr_Format(PyExc_TypeError, "%s: DLPack major version %u is not supported (expected %d)", name,
                         mt->version.major, PF_DLPACK_MAJOR);
            goto done; /* the capsule's destructor still owns it */
        }
        if (PyCapsule_SetName(cap, "used_dltensor_versioned") < 0) goto done;
        if (keep_push(keep, NULL, mt, 1) < 0) {
            if (mt->deleter) mt->deleter(mt);
            goto done;
        }
        if (fill_from_dltensor(name, &mt->dl_tensor, out) < 0) goto done;
        if (writable && (mt->flags & DLPACK_FLAG_BITMASK_READ_ONLY)) {
            PyErr_Format(PyExc_ValueError, "%s: the array is read-only; an output must be writable", name);
            goto done;
        }
        rc = 0;
    } else if (PyCapsule_IsValid(cap, "dltensor")) {
        DLManagedTensor *mt = (DLManagedTensor *)PyCapsule_GetPointer(cap, "dltensor");
        if (!mt) goto done;
        if (PyCapsule_SetName(cap, "used_dltensor") < 0) goto done;
        if (keep_push(keep, NULL, mt, 0) < 0) {
            if (mt->deleter) mt->deleter(mt);
            goto done;
        }
        if (fill_from_dltensor(name, &mt->dl_tensor, out) < 0) goto done;
        rc = 0;
    } else {
        PyErr_Format(PyExc_TypeError, "%s: __dlpack__ did not return a DLPack capsule", name);
    }
done:
    {
        /* the capsule's destructor is the producer's code: keep a pending error out of its reach */
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        Py_DECREF(cap);
        PyErr_Restore(type, value, tb);
        return rc;
    }
}

static int dtype_from_typestr(const char *ts, pf_dtype *out) {
    /* "<f4", "|u1", ... ; byte order must be little or not applicable */
    *out = PF_DTYPE_INVALID;
    if (!ts || (ts[0] != '<' && ts[0] != '|' && ts[0] != '=')) return -1;
    if (!strcmp(ts + 1, "f4"))
        *out = PF_DTYPE_F32;
    else if (!strcmp(ts + 1, "f2"))
        *out = PF_DTYPE_F16;
    else if (!strcmp(ts + 1, "i4"))
        *out = PF_DTYPE_I32;
    else if (!strcmp(ts + 1, "i8"))
        *out = PF_DTYPE_I64;
    else if (!strcmp(ts + 1, "u1"))
        *out = PF_DTYPE_U8;
    else if (!strcmp(ts + 1, "f8"))
        *out = PF_DTYPE_F64;
    else if (!strcmp(ts + 1, "i1"))
        *out = PF_DTYPE_I8;
    return *out == PF_DTYPE_INVALID ? -1 : 0;
}

static int import_array_interface(PyObject *obj, PyObject *iface, const char *name, int writable, int cuda,
                                  pf_tensor *out, pf_py_keep *keep) {
    if (!PyDict_Check(iface)) {
        PyErr_Format(PyExc_TypeError, "%s: the array interface is not a dict", name);
        return -1;
    }
    PyObject *shape = PyDict_GetItemString(iface, "shape");
    PyObject *typestr = PyDict_GetItemString(iface, "typestr");
    PyObject *data = PyDict_GetItemString(iface, "data");
    PyObject *strides = PyDict_GetItemString(iface, "strides");
    PyObject *mask = PyDict_GetItemString(iface, "mask");
    if (!shape || !PyTuple_Check(shape) || !typestr || !PyUnicode_Check(typestr) || !data || !PyTuple_Check(data) ||
        PyTuple_GET_SIZE(data) != 2) {
        PyErr_Format(PyExc_TypeError, "%s: malformed array interface (shape, typestr, data)", name);
        return -1;
    }
    if (mask && mask != Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: masked arrays are not supported", name);
        return -1;
    }
    const char *ts = PyUnicode_AsUTF8(typestr);
    if (!ts) return -1;
    if (dtype_from_typestr(ts, &out->dtype) < 0) {
        PyErr_Format(PyExc_TypeError,
                     "%s: unsupported dtype '%s'; expected float16, bfloat16 or float32 (or int32/int64 "
                     "for indices, int8 for KV caches; float8 caches come through DLPack or NumPy)",
                     name, ts);
        return -1;
    }
    Py_ssize_t nd = PyTuple_GET_SIZE(shape);
    if (nd > PF_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d dimensions are supported, got %zd", name, PF_MAX_DIMS, nd);
        return -1;
    }
    int64_t esize = (int64_t)pf_dtype_size(out->dtype);
    out->ndim = (int32_t)nd;
    for (Py_ssize_t i = 0; i < nd; i++)
        if (pf_py_int64(PyTuple_GET_ITEM(shape, i), name, &out->shape[i]) < 0) return -1;
    if (strides && strides != Py_None) {
        if (!PyTuple_Check(strides) || PyTuple_GET_SIZE(strides) != nd) {
            PyErr_Format(PyExc_ValueError, "%s: malformed strides in the array interface", name);
            return -1;
        }
        for (Py_ssize_t i = 0; i < nd; i++) {
            int64_t sb;
            if (pf_py_int64(PyTuple_GET_ITEM(strides, i), name, &sb) < 0) return -1;
            if (sb % esize) {
                PyErr_Format(PyExc_ValueError,
                             "%s: strides must be multiples of the element size (%lld bytes), got %lld", name,
                             (long long)esize, (long long)sb);
                return -1;
            }
            out->strides[i] = sb / esize;
        }
    } else {
        int64_t s = 1;
        for (Py_ssize_t i = nd - 1; i >= 0; i--) {
            out->strides[i] = s;
            if (out->shape[i] > 0) s = __builtin_mul_overflow(s, out->shape[i], &s) ? INT64_MAX : s;
        }
    }
    if (!PyLong_Check(PyTuple_GET_ITEM(data, 0))) {
        PyErr_Format(PyExc_TypeError, "%s: the array interface's data pointer is not an int", name);
        return -1;
    }
    void *ptr = PyLong_AsVoidPtr(PyTuple_GET_ITEM(data, 0));
    if (PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: the array interface's data pointer is out of range", name);
        return -1;
    }
    int readonly = PyObject_IsTrue(PyTuple_GET_ITEM(data, 1));
    if (readonly < 0) return -1;
    if (writable && readonly) {
        PyErr_Format(PyExc_ValueError, "%s: the array is read-only; an output must be writable", name);
        return -1;
    }
    if (check_view(name, out, (uintptr_t)ptr) < 0) return -1;
    out->device = cuda ? PF_DEVICE_CUDA : PF_DEVICE_CPU;
    out->device_id = 0;
    if (cuda) {
        int dev = pf_cuda_pointer_device(ptr);
        out->device_id = dev >= 0 ? dev : 0;
    }
    return keep_push(keep, obj, NULL, 0);
}

static int import_ndarray(PyObject *obj, const char *name, int writable, pf_tensor *out, pf_py_keep *keep) {
    PyArrayObject *a = (PyArrayObject *)obj;
    int nd = PyArray_NDIM(a);
    if (nd > PF_MAX_DIMS) {
        PyErr_Format(PyExc_ValueError, "%s: at most %d dimensions are supported, got %d", name, PF_MAX_DIMS, nd);
        return -1;
    }
    PyArray_Descr *d = PyArray_DESCR(a);
    switch (d->type_num) {
        case NPY_FLOAT32: out->dtype = PF_DTYPE_F32; break;
        case NPY_FLOAT16: out->dtype = PF_DTYPE_F16; break;
        case NPY_INT32: out->dtype = PF_DTYPE_I32; break;
        case NPY_INT64: out->dtype = PF_DTYPE_I64; break;
        case NPY_UINT8: out->dtype = PF_DTYPE_U8; break;
        case NPY_FLOAT64: out->dtype = PF_DTYPE_F64; break;
        case NPY_INT8: out->dtype = PF_DTYPE_I8; break;
        default:
            /* ml_dtypes' types, known by name (their numbers are assigned at import; the type's
             * name is "ml_dtypes.float8_e4m3fn" or, in older releases, "float8_e4m3fn") */
            if (d->typeobj) {
                const char *tn = strrchr(d->typeobj->tp_name, '.');
                tn = tn ? tn + 1 : d->typeobj->tp_name;
                const size_t es = (size_t)PyDataType_ELSIZE(d);
                pf_dtype known = PF_DTYPE_INVALID;
                if (es == 2 && !strcmp(tn, "bfloat16")) known = PF_DTYPE_BF16;
                if (es == 1 && !strcmp(tn, "float8_e4m3fn")) known = PF_DTYPE_F8E4M3;
                if (es == 1 && !strcmp(tn, "float8_e5m2")) known = PF_DTYPE_F8E5M2;
                if (known != PF_DTYPE_INVALID) {
                    out->dtype = known;
                    break;
                }
            }
            PyErr_Format(PyExc_TypeError,
                         "%s: unsupported dtype %S; expected float16, bfloat16 or float32 (or "
                         "int32/int64 for indices, float8_e4m3fn/float8_e5m2/int8 for KV caches)",
                         name, (PyObject *)d);
            return -1;
    }
    if (!PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError, "%s: byte-swapped arrays are not supported", name);
        return -1;
    }
    if (writable && !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError, "%s: the array is read-only; an output must be writable", name);
        return -1;
    }
    int64_t esize = (int64_t)PyArray_ITEMSIZE(a);
    out->ndim = nd;
    for (int i = 0; i < nd; i++) {
        out->shape[i] = PyArray_DIM(a, i);
        npy_intp sb = PyArray_STRIDE(a, i);
        if (sb % esize) {
            PyErr_Format(PyExc_ValueError, "%s: strides must be multiples of the element size", name);
            return -1;
        }
        out->strides[i] = sb / esize;
    }
    if (check_view(name, out, (uintptr_t)PyArray_DATA(a)) < 0) return -1;
    out->device = PF_DEVICE_CPU;
    out->device_id = 0;
    return keep_push(keep, obj, NULL, 0);
}

/* ---- the DLPack C exchange API ---- */

/* Types seen, the exchange API each publishes (NULL: none) and whether it has autograd (a
 * `requires_grad` attribute: torch), most recent first. A type is kept alive by its entry (at
 * most PF_XAPI_CACHE of them, the tensor types of the libraries a process uses), and with it
 * the getter of its requires_grad descriptor, called directly: the generic attribute lookup
 * costs as much again as torch's getter (~45 ns each). The GIL guards the cache. */
#define PF_XAPI_CACHE 16
static struct {
    PyTypeObject *type;
    const PFDLPackExchangeAPI *api;
    int autograd;
    getter grad_get; /* NULL: requires_grad is not a plain getset descriptor (generic lookup) */
    void *grad_closure;
} xapi_cache[PF_XAPI_CACHE];

static const PFDLPackExchangeAPI *lookup_exchange_api(PyTypeObject *type) {
    PyObject *cap = PyObject_GetAttrString((PyObject *)type, "__dlpack_c_exchange_api__");
    if (!cap) {
        PyErr_Clear();
        return NULL;
    }
    const PFDLPackExchangeAPIHeader *h = NULL;
    if (PyCapsule_IsValid(cap, "dlpack_exchange_api"))
        h = (const PFDLPackExchangeAPIHeader *)PyCapsule_GetPointer(cap, "dlpack_exchange_api");
    Py_DECREF(cap); /* the table lives as long as the process (the API's rule) */
    while (h && h->version.major != PF_DLPACK_MAJOR) h = h->prev_api; /* a newer major: an older table */
    return (const PFDLPackExchangeAPI *)h;
}

/* The cache entry of `type`, made on first sight. */
static int xapi_entry(PyTypeObject *type) {
    for (int i = 0; i < PF_XAPI_CACHE && xapi_cache[i].type; i++)
        if (xapi_cache[i].type == type) return i;
    const PFDLPackExchangeAPI *api = lookup_exchange_api(type);
    PyObject *grad = PyObject_GetAttrString((PyObject *)type, "requires_grad"); /* the descriptor */
    if (!grad) PyErr_Clear();
    if (xapi_cache[PF_XAPI_CACHE - 1].type) Py_DECREF(xapi_cache[PF_XAPI_CACHE - 1].type);
    memmove(&xapi_cache[1], &xapi_cache[0], sizeof xapi_cache - sizeof xapi_cache[0]);
    Py_INCREF(type);
    xapi_cache[0].type = type;
    xapi_cache[0].api = api;
    xapi_cache[0].autograd = grad != NULL;
    xapi_cache[0].grad_get = NULL;
    if (grad && Py_IS_TYPE(grad, &PyGetSetDescr_Type) && PyType_IsSubtype(type, PyDescr_TYPE(grad))) {
        xapi_cache[0].grad_get = ((PyGetSetDescrObject *)grad)->d_getset->get; /* the type keeps it */
        xapi_cache[0].grad_closure = ((PyGetSetDescrObject *)grad)->d_getset->closure;
    }
    Py_XDECREF(grad);
    return 0;
}

const PFDLPackExchangeAPI *pf_py_exchange_api(PyTypeObject *type) { return xapi_cache[xapi_entry(type)].api; }

int pf_py_autograd_type(PyObject *obj) {
    return !PyArray_Check(obj) && !pf_py_is_tensor(obj) && xapi_cache[xapi_entry(Py_TYPE(obj))].autograd;
}

int pf_py_requires_grad(PyObject *obj) {
    if (!pf_py_autograd_type(obj)) return 0;
    const int i = xapi_entry(Py_TYPE(obj));
    PyObject *r = xapi_cache[i].grad_get ? xapi_cache[i].grad_get(obj, xapi_cache[i].grad_closure)
                                         : PyObject_GetAttrString(obj, "requires_grad");
    if (!r) return -1;
    const int v = PyObject_IsTrue(r);
    Py_DECREF(r);
    return v;
}

/* A producer's failure to export, as the ValueError that names the argument (a TypeError or
 * ValueError it raised stays as it is). */
static void export_failed(const char *name, const char *how) {
    if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_ValueError)) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    PyErr_Format(PyExc_ValueError, "%s: could not be exported through %s: %S", name, how, value ? value : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* A view through the producer's exchange API: no capsule, no Python call. The view is valid
 * while obj lives (the keep holds it) and nothing resizes it (the GIL is released only
 * around the core call, which owns no Python reference). */
static int import_exchange(PyObject *obj, const PFDLPackExchangeAPI *api, const char *name, pf_tensor *out,
                           pf_py_keep *keep) {
    DLTensor t;
    memset(&t, 0, sizeof t);
    if (api->dltensor_from_py_object_no_sync(obj, &t) != 0) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_ValueError, "%s: its producer's DLPack exchange API failed to view it", name);
        export_failed(name, "the DLPack exchange API");
        return -1;
    }
    if (fill_from_dltensor(name, &t, out) < 0) return -1;
    return keep_push(keep, obj, NULL, 0);
}

int pf_py_tensor(PyObject *obj, const char *name, int writable, pf_tensor *out, pf_py_keep *keep) {
    memset(out, 0, sizeof *out);
    if (PyArray_Check(obj)) return import_ndarray(obj, name, writable, out, keep);
    if (pf_py_is_tensor(obj)) {
        *out = *pf_py_tensor_view(obj);
        return keep_push(keep, obj, NULL, 0);
    }
    /* The exchange API means running on the producer's current stream without a sync: used
     * unless the caller named another stream (then __dlpack__(stream=) orders the two). */
    const PFDLPackExchangeAPI *api = pf_py_exchange_api(Py_TYPE(obj));
    if (api && !keep->stream_given) return import_exchange(obj, api, name, out, keep);
    if (api && PyObject_HasAttrString(obj, "detach")) {
        /* torch's __dlpack__ refuses a tensor that requires grad: export a detached view (the
         * same memory, held by the capsule's managed tensor until the call ends) */
        PyObject *detached = PyObject_CallMethod(obj, "detach", NULL);
        if (!detached) return -1;
        const int rc = import_dlpack(detached, name, writable, out, keep); /* the capsule owns the memory */
        Py_DECREF(detached);
        return rc;
    }
    if (PyObject_HasAttrString(obj, "__dlpack__")) return import_dlpack(obj, name, writable, out, keep);
    PyObject *iface = PyObject_GetAttrString(obj, "__cuda_array_interface__");
    if (iface) {
        int rc = import_array_interface(obj, iface, name, writable, 1, out, keep);
        Py_DECREF(iface);
        return rc;
    }
    PyErr_Clear();
    iface = PyObject_GetAttrString(obj, "__array_interface__");
    if (iface) {
        int rc = import_array_interface(obj, iface, name, writable, 0, out, keep);
        Py_DECREF(iface);
        return rc;
    }
    PyErr_Clear();
    PyErr_Format(PyExc_TypeError,
                 "%s: expected an array (an object with __dlpack__, __array_interface__ or "
                 "__cuda_array_interface__), got %.200s",
                 name, Py_TYPE(obj)->tp_name);
    return -1;
}

int pf_py_opt_tensor(PyObject *obj, const char *name, int writable, pf_tensor *out, pf_py_keep *keep) {
    if (obj == NULL || obj == Py_None) {
        memset(out, 0, sizeof *out);
        return 0;
    }
    return pf_py_tensor(obj, name, writable, out, keep);
}

int pf_py_stream(PyObject *obj, pf_py_keep *keep) {
    void **stream = &keep->stream;
    *stream = NULL;
    keep->stream_given = obj != NULL && obj != Py_None;
    if (!keep->stream_given) return 0;
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "stream: expected None or an int (a cudaStream_t), got %.200s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    *stream = PyLong_AsVoidPtr(obj);
    if (!*stream && PyErr_Occurred()) {
        if (PyErr_ExceptionMatches(PyExc_OverflowError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "stream: %.40R is not a stream handle (out of range)", obj);
        }
        return -1;
    }
    return 0;
}

int pf_py_kernel(PyObject *module, PyObject *obj, int32_t *kernel) {
    if (!PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "kernel: expected a str, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    const char *name = PyUnicode_AsUTF8(obj);
    if (!name) return -1;
    const pf_status st = pf_kernel_parse(name, kernel);
    if (st == PF_STATUS_OK) return 0;
    pf_py_raise(module, st);
    return -1;
}

PyObject *pf_py_finish(PyObject *module, pf_status status, pf_py_keep *keep) {
    return pf_py_done(module, status, keep) < 0 ? NULL : Py_NewRef(Py_None);
}

int pf_py_done(PyObject *module, pf_status status, pf_py_keep *keep) {
    pf_py_keep_release(keep);
    if (status != PF_STATUS_OK) {
        pf_py_raise(module, status);
        return -1;
    }
    return PyErr_Occurred() ? -1 : 0; /* a deleter's error, kept rather than returning with it set */
}

PyObject *pf_py_tuple(Py_ssize_t n, PyObject *const *items) {
    PyObject *t = PyTuple_New(n);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (t)
            PyTuple_SET_ITEM(t, i, items[i]);
        else
            Py_DECREF(items[i]);
    }
    return t;
}

PyObject *pf_py_fail(pf_py_keep *keep) {
    pf_py_keep_release(keep);
    if (!PyErr_Occurred())
        PyErr_SetString(PyExc_ValueError,
                        "pagedflash: an argument could not be converted (its producer raised an error and then "
                        "cleared it)");
    return NULL;
}

/* ---- scalars ---- */

int pf_py_int64(PyObject *obj, const char *name, int64_t *out) {
    PyObject *index = PyNumber_Index(obj); /* ints and anything with __index__ (NumPy integers) */
    if (!index) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: expected an int, got %.100s", name, Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(index, &overflow);
    Py_DECREF(index);
    if (overflow) {
        PyErr_Format(PyExc_ValueError, "%s: %R does not fit in int64", name, obj);
        return -1;
    }
    if (v == -1 && PyErr_Occurred()) return -1;
    *out = v;
    return 0;
}

int pf_py_int32(PyObject *obj, const char *name, int32_t *out) {
    int64_t v;
    if (pf_py_int64(obj, name, &v) < 0) return -1;
    if (v < INT32_MIN || v > INT32_MAX) {
        PyErr_Format(PyExc_ValueError, "%s: %lld does not fit in int32", name, (long long)v);
        return -1;
    }
    *out = (int32_t)v;
    return 0;
}

int pf_py_uint64(PyObject *obj, const char *name, uint64_t *out) {
    PyObject *index = PyNumber_Index(obj);
    if (!index) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: expected an int, got %.100s", name, Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(index);
    Py_DECREF(index);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: %R is not in [0, 2**64)", name, obj);
        return -1;
    }
    *out = v;
    return 0;
}

int pf_py_float(PyObject *obj, const char *name, float *out) {
    const double v = PyFloat_AsDouble(obj); /* floats, ints, anything with __float__ */
    if (v == -1.0 && PyErr_Occurred()) {
        const int overflow = PyErr_ExceptionMatches(PyExc_OverflowError);
        PyErr_Clear();
        if (overflow)
            PyErr_Format(PyExc_ValueError, "%s: %.40R is out of range", name, obj);
        else
            PyErr_Format(PyExc_TypeError, "%s: expected a number, got %.100s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = (float)v; /* out of range or not finite: the core names it */
    return 0;
}

int pf_py_bool(PyObject *obj, const char *name, int32_t *out) {
    const int v = PyObject_IsTrue(obj);
    if (v < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s: expected a bool, got %.100s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *out = v;
    return 0;
}

int pf_py_window(PyObject *obj, int32_t *left, int32_t *right) {
    if (obj == Py_None) {
        *left = *right = -1;
        return 0;
    }
    PyObject *seq = PySequence_Check(obj) && !PyUnicode_Check(obj) ? PySequence_Fast(obj, "window") : NULL;
    if (!seq || PySequence_Fast_GET_SIZE(seq) != 2) {
        Py_XDECREF(seq);
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "window: expected a pair (left, right) of ints, got %.200R", obj);
        return -1;
    }
    const int rc = pf_py_int32(PySequence_Fast_GET_ITEM(seq, 0), "window", left) < 0 ||
                           pf_py_int32(PySequence_Fast_GET_ITEM(seq, 1), "window", right) < 0
                       ? -1
                       : 0;
    Py_DECREF(seq);
    return rc;
}

int pf_py_scale(PyObject *obj, const char *name, pf_tensor *out, pf_py_keep *keep) {
    if (obj == NULL || obj == Py_None) return pf_py_opt_tensor(obj, name, 0, out, keep);
    long ndim = -1;
    if (PyArray_Check(obj)) {
        ndim = PyArray_NDIM((PyArrayObject *)obj);
    } else {
        PyObject *n = PyObject_GetAttrString(obj, "ndim");
        if (n && PyLong_Check(n)) ndim = PyLong_AsLong(n);
        Py_XDECREF(n);
        PyErr_Clear();
    }
    return pf_py_tensor(obj, name, !(ndim >= 0 && ndim <= 1), out, keep);
}

int pf_py_kv_cache_dtype(PyObject *obj, pf_tensor *k_cache, pf_tensor *v_cache) {
    if (obj == NULL || obj == Py_None) return 0;
    static const struct {
        const char *name;
        pf_dtype dtype;
    } names[] = {{"auto", PF_DTYPE_INVALID},    {"fp8", PF_DTYPE_F8E4M3},
                 {"fp8_e4m3", PF_DTYPE_F8E4M3}, {"float8_e4m3fn", PF_DTYPE_F8E4M3},
                 {"fp8_e5m2", PF_DTYPE_F8E5M2}, {"float8_e5m2", PF_DTYPE_F8E5M2},
                 {"int8", PF_DTYPE_I8},         {"float16", PF_DTYPE_F16},
                 {"bfloat16", PF_DTYPE_BF16},   {"float32", PF_DTYPE_F32}};
    const char *name = PyUnicode_Check(obj) ? PyUnicode_AsUTF8(obj) : NULL;
    if (!name) {
        if (!PyErr_Occurred())
            PyErr_Format(PyExc_TypeError, "kv_cache_dtype: expected a str, got %.100s", Py_TYPE(obj)->tp_name);
        return -1;
    }
    size_t i = 0;
    while (i < sizeof names / sizeof names[0] && strcmp(names[i].name, name) != 0) i++;
    if (i == sizeof names / sizeof names[0]) {
        PyErr_Format(PyExc_ValueError,
                     "kv_cache_dtype: unknown '%.100s'; expected auto, fp8 (= fp8_e4m3, float8_e4m3fn), fp8_e5m2 "
                     "(= float8_e5m2), int8, float16, bfloat16 or float32",
                     name);
        return -1;
    }
    const pf_dtype want = names[i].dtype;
    if (want == PF_DTYPE_INVALID) return 0;
    pf_tensor *caches[2] = {k_cache, v_cache};
    const char *cache_names[2] = {"k_cache", "v_cache"};
    for (int c = 0; c < 2; c++) {
        const pf_dtype have = caches[c]->dtype;
        if (have == want) continue;
        if (pf_dtype_size(want) == 1 && (have == PF_DTYPE_U8 || have == PF_DTYPE_I8)) {
            caches[c]->dtype = want; /* raw bytes: the codes of `want` */
            continue;
        }
        PyErr_Format(PyExc_TypeError, "%s: kv_cache_dtype '%s' needs a %s cache%s, got %s", cache_names[c], name,
                     pf_dtype_name(want), pf_dtype_size(want) == 1 ? " (or raw bytes: uint8 or int8)" : "",
                     pf_dtype_name(have));
        return -1;
    }
    return 0;
}

int pf_py_seed(PyObject *obj, uint64_t *out) {
    PyObject *index = PyNumber_Index(obj);
    if (!index) {
        if (PyErr_ExceptionMatches(PyExc_TypeError)) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "seed: expected an int, got %.100s", Py_TYPE(obj)->tp_name);
        }
        return -1;
    }
    *out = PyLong_AsUnsignedLongLongMask(index); /* any int, modulo 2**64 (two's complement) */
    Py_DECREF(index);
    return PyErr_Occurred() ? -1 : 0;
}

int pf_py_softmax_scale(PyObject *obj, const pf_tensor *q, float *out) {
    if (obj == NULL || obj == Py_None) {
        *out = pf_default_softmax_scale(q->ndim > 0 ? q->shape[q->ndim - 1] : 1);
        return 0;
    }
    if (pf_py_float(obj, "softmax_scale", out) < 0) return -1;
    return 0; /* a non-finite scale (also one beyond float's range) is refused by the core */
}

int pf_py_nargs(const char *fn, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi) {
    if (nargs < lo || nargs > hi) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd to %zd positional arguments (%zd given)", fn, lo, hi, nargs);
        return -1;
    }
    return 0;
}

/* ---- integer lists ---- */

void *pf_py_stage_get(pf_py_stage *s, size_t bytes) {
    if (bytes <= s->bytes) return s->ptr;
    size_t cap = s->bytes ? s->bytes : 1024;
    while (cap < bytes) cap *= 2;
    void *p = PyMem_Realloc(s->ptr, cap);
    if (!p) {
        PyErr_NoMemory();
        return NULL;
    }
    s->ptr = p;
    s->bytes = cap;
    return p;
}

void pf_py_stage_free(pf_py_stage *s) {
    PyMem_Free(s->ptr);
    s->ptr = NULL;
    s->bytes = 0;
}

/* A 1-d integer NumPy array, checked; NULL for anything else (no exception). */
static PyArrayObject *int_ndarray(PyObject *obj, const char *name, int *error) {
    *error = 0;
    if (!PyArray_Check(obj)) return NULL;
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_NDIM(a) != 1) {
        PyErr_Format(PyExc_ValueError, "%s: expected a 1-d array, got %d-d", name, PyArray_NDIM(a));
        *error = 1;
    } else if (!PyArray_ISINTEGER(a)) {
        PyErr_Format(PyExc_TypeError, "%s: expected integers, got dtype %S", name, (PyObject *)PyArray_DESCR(a));
        *error = 1;
    }
    return a;
}

/* The items of an int sequence, each through `store(buf, i, value)`; 0 or -1. */
static int int_sequence(PyObject *obj, const char *name, pf_py_stage *stage, size_t esize, void **data, Py_ssize_t *n,
                        int32_t lo, int32_t hi) {
    PyObject *seq = PySequence_Fast(obj, "");
    if (!seq) {
        PyErr_Format(PyExc_TypeError, "%s: expected a sequence of ints or an integer array, got %.100s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    Py_ssize_t len = PySequence_Fast_GET_SIZE(seq);
    char *buf = (char *)pf_py_stage_get(stage, (size_t)(len ? len : 1) * esize);
    if (!buf) {
        Py_DECREF(seq);
        return -1;
    }
    PyObject **items = PySequence_Fast_ITEMS(seq);
    char item_name[96];
    for (Py_ssize_t i = 0; i < len; i++) {
        snprintf(item_name, sizeof item_name, "%s[%zd]", name, i);
        int64_t v;
        if (pf_py_int64(items[i], item_name, &v) < 0) {
            Py_DECREF(seq);
            return -1;
        }
        if (esize == 4) {
            if (v < lo || v > hi) {
                PyErr_Format(PyExc_ValueError, "%s: %lld does not fit in int32", item_name, (long long)v);
                Py_DECREF(seq);
                return -1;
            }
            ((int32_t *)buf)[i] = (int32_t)v;
        } else {
            ((int64_t *)buf)[i] = v;
        }
    }
    Py_DECREF(seq);
    *data = buf;
    *n = len;
    return 0;
}

int pf_py_int64_list(PyObject *obj, const char *name, pf_py_stage *stage, const int64_t **data, Py_ssize_t *n,
                     PyObject **hold) {
    *hold = NULL;
    int error;
    if (int_ndarray(obj, name, &error)) {
        if (error) return -1;
        PyObject *c = PyArray_FROMANY(obj, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY_RO);
        if (!c) return -1;
        *hold = c;
        *data = (const int64_t *)PyArray_DATA((PyArrayObject *)c);
        *n = PyArray_DIM((PyArrayObject *)c, 0);
        return 0;
    }
    return int_sequence(obj, name, stage, sizeof(int64_t), (void **)data, n, 0, 0);
}

int pf_py_int32_list(PyObject *obj, const char *name, pf_py_stage *stage, const int32_t **data, Py_ssize_t *n,
                     PyObject **hold) {
    *hold = NULL;
    int error;
    PyArrayObject *a = int_ndarray(obj, name, &error);
    if (a) {
        if (error) return -1;
        if (PyArray_TYPE(a) == NPY_INT32 && PyArray_IS_C_CONTIGUOUS(a) && PyArray_ISNOTSWAPPED(a) &&
            PyArray_ISALIGNED(a)) {
            *hold = Py_NewRef(obj);
            *data = (const int32_t *)PyArray_DATA(a);
            *n = PyArray_DIM(a, 0);
            return 0;
        }
        PyObject *c = PyArray_FROMANY(obj, NPY_INT64, 1, 1, NPY_ARRAY_CARRAY_RO);
        if (!c) return -1;
        Py_ssize_t len = PyArray_DIM((PyArrayObject *)c, 0);
        const int64_t *src = (const int64_t *)PyArray_DATA((PyArrayObject *)c);
        int32_t *buf = (int32_t *)pf_py_stage_get(stage, (size_t)(len ? len : 1) * sizeof(int32_t));
        if (!buf) {
            Py_DECREF(c);
            return -1;
        }
        for (Py_ssize_t i = 0; i < len; i++) {
            if (src[i] < INT32_MIN || src[i] > INT32_MAX) {
                PyErr_Format(PyExc_ValueError, "%s[%zd]: %lld does not fit in int32", name, i, (long long)src[i]);
                Py_DECREF(c);
                return -1;
            }
            buf[i] = (int32_t)src[i];
        }
        Py_DECREF(c);
        *data = buf;
        *n = len;
        return 0;
    }
    return int_sequence(obj, name, stage, sizeof(int32_t), (void **)data, n, INT32_MIN, INT32_MAX);
}

static int npy_type_of(pf_dtype dtype) { return dtype == PF_DTYPE_I32 ? NPY_INT32 : NPY_INT64; }

int pf_py_out_array(PyObject *out, const char *name, int nd, pf_dtype dtype, Py_ssize_t rows) {
    if (!PyArray_Check(out)) {
        PyErr_Format(PyExc_TypeError, "%s: expected a numpy.ndarray, got %.100s", name, Py_TYPE(out)->tp_name);
        return -1;
    }
    PyArrayObject *a = (PyArrayObject *)out;
    if (PyArray_TYPE(a) != npy_type_of(dtype) || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError, "%s: expected dtype %s, got %S", name, pf_dtype_name(dtype),
                     (PyObject *)PyArray_DESCR(a));
        return -1;
    }
    if (PyArray_NDIM(a) != nd || (rows >= 0 && PyArray_DIM(a, 0) != rows) || !PyArray_IS_C_CONTIGUOUS(a) ||
        !PyArray_ISALIGNED(a) || !PyArray_ISWRITEABLE(a)) {
        PyErr_Format(PyExc_ValueError,
                     "%s: expected a writable, C-contiguous %d-d array%s%zd rows, got shape %d-d with %zd rows", name,
                     nd, rows >= 0 ? " with " : " (any rows: ", rows, PyArray_NDIM(a),
                     PyArray_NDIM(a) ? (Py_ssize_t)PyArray_DIM(a, 0) : 0);
        return -1;
    }
    return 0;
}

PyObject *pf_py_new_array(int nd, const Py_ssize_t *dims, int npy_type) {
    npy_intp d[PF_MAX_DIMS];
    for (int i = 0; i < nd; i++) d[i] = (npy_intp)dims[i];
    return PyArray_SimpleNew(nd, d, npy_type);
}
