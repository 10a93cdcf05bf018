/*
 * module.c - the extension module pagedflash._C: multi-phase init, the module
 * state's types (Tensor, BlockPool, BlockStats) and exceptions, build
 * information, and the binding tables of bind_*.c. The top layer of csrc/py
 * (pf_py.h lists the layers).
 */
#include "py_bindings.h"
#include "py_convert.h"
#include "py_tensor.h"

#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#define PY_ARRAY_UNIQUE_SYMBOL pf_numpy_api
#include <numpy/arrayobject.h>

#define PF_STR_(x) #x
#define PF_STR(x) PF_STR_(x)
#define PF_VERSION_STRING PF_STR(PF_VERSION_MAJOR) "." PF_STR(PF_VERSION_MINOR) "." PF_STR(PF_VERSION_PATCH)

/* Why the build left the CUDA backend out (setup.py defines it then), e.g. "nvcc not found". */
#ifndef PF_CUDA_NOTE
#define PF_CUDA_NOTE ""
#endif

static PyObject *build_info(PyObject *module, PyObject *unused) {
    (void)module;
    (void)unused;
    return Py_BuildValue("{s:i,s:s,s:s,s:i,s:i,s:s}", "cuda", pf_has_cuda(), "cuda_archs", pf_cuda_archs(), "cuda_note",
                         PF_CUDA_NOTE, "cuda_devices", pf_cuda_device_count(), "cpu_count", pf_cpu_count(), "version",
                         PF_VERSION_STRING);
}

/* The CPU backend's thread count for every later call (pagedflash.set_num_threads checks the
 * argument's type; the range is checked here). */
static PyObject *set_num_threads(PyObject *module, PyObject *arg) {
    int32_t n;
    if (pf_py_int32(arg, "num_threads", &n) < 0) return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "num_threads: must be >= 0 (0 = one per core), got %d", (int)n);
        return NULL;
    }
    pf_py_state(module)->num_threads = n;
    Py_RETURN_NONE;
}

static PyObject *get_num_threads(PyObject *module, PyObject *unused) {
    (void)unused;
    return PyLong_FromLong(pf_py_state(module)->num_threads);
}

/* Tests: hook(result) runs on every result array the library allocates itself (out, lse,
 * gradients, a dropout mask), before the kernel writes it -- tests/conftest.py fills them with
 * NaN so that an element a kernel never writes fails the comparison. None removes it. */
static PyObject *set_result_hook(PyObject *module, PyObject *hook) {
    if (hook != Py_None && !PyCallable_Check(hook)) {
        PyErr_SetString(PyExc_TypeError, "hook: expected a callable or None");
        return NULL;
    }
    pf_module_state *st = pf_py_state(module);
    Py_XSETREF(st->result_hook, hook == Py_None ? NULL : Py_NewRef(hook));
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"_set_result_hook", set_result_hook, METH_O,
     "_set_result_hook(hook) -> None: tests only: hook(result) on every result the library allocates"},
    {"build_info", build_info, METH_NOARGS,
     "build_info() -> dict: cuda (built), cuda_archs, cuda_note (why not built), cuda_devices (driver-visible), "
     "cpu_count, version"},
    {"set_num_threads", set_num_threads, METH_O,
     "set_num_threads(n) -> None: the CPU backend's threads (0: one per core)"},
    {"get_num_threads", get_num_threads, METH_NOARGS, "get_num_threads() -> int: as set (0: one per core)"},
    {NULL, NULL, 0, NULL},
};

static PyMethodDef *const binding_tables[] = {
    pf_py_attn_methods,
    pf_py_tensor_methods,
    pf_py_paged_methods,
};

static int module_exec(PyObject *m) {
    if (_import_array() < 0) return -1;
    pf_module_state *st = pf_py_state(m);
    st->tensor_type = pf_py_tensor_type_create(m);
    if (!st->tensor_type || PyModule_AddObjectRef(m, "Tensor", st->tensor_type) < 0) return -1;
    st->out_of_blocks = PyErr_NewExceptionWithDoc(
        "pagedflash.OutOfBlocks", "No free KV-cache blocks are left for the request.", PyExc_MemoryError, NULL);
    if (!st->out_of_blocks || PyModule_AddObjectRef(m, "OutOfBlocks", st->out_of_blocks) < 0) return -1;
    st->cuda_error = PyErr_NewExceptionWithDoc("pagedflash.CudaError",
                                               "A CUDA call failed; the message holds CUDA's text and the call site.",
                                               PyExc_RuntimeError, NULL);
    if (!st->cuda_error || PyModule_AddObjectRef(m, "CudaError", st->cuda_error) < 0) return -1;
    for (size_t i = 0; i < sizeof binding_tables / sizeof binding_tables[0]; i++)
        if (PyModule_AddFunctions(m, binding_tables[i]) < 0) return -1;
    if (pf_py_block_pool_init(m) < 0) return -1;
    /* the state of the dropout seeds drawn for calls without one */
    PyObject *os = PyImport_ImportModule("os");
    PyObject *bytes = os ? PyObject_CallMethod(os, "urandom", "i", 8) : NULL;
    Py_XDECREF(os);
    if (!bytes || !PyBytes_Check(bytes) || PyBytes_GET_SIZE(bytes) != 8) {
        if (bytes) PyErr_SetString(PyExc_RuntimeError, "pagedflash: os.urandom(8) did not return 8 bytes");
        Py_XDECREF(bytes);
        return -1;
    }
    memcpy(&st->rng, PyBytes_AS_STRING(bytes), 8);
    Py_DECREF(bytes);
    return 0;
}

static int module_traverse(PyObject *m, visitproc visit, void *arg) {
    pf_module_state *st = pf_py_state(m);
    Py_VISIT(st->tensor_type);
    Py_VISIT(st->block_stats_type);
    Py_VISIT(st->out_of_blocks);
    Py_VISIT(st->cuda_error);
    Py_VISIT(st->result_hook);
    Py_VISIT(st->is_grad_enabled);
    return 0;
}

static int module_clear(PyObject *m) {
    pf_module_state *st = pf_py_state(m);
    Py_CLEAR(st->tensor_type);
    Py_CLEAR(st->block_stats_type);
    Py_CLEAR(st->out_of_blocks);
    Py_CLEAR(st->cuda_error);
    Py_CLEAR(st->result_hook);
    Py_CLEAR(st->is_grad_enabled);
    return 0;
}

static void module_free(void *m) { module_clear((PyObject *)m); }

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pagedflash._C",
    .m_doc = "pagedflash C core bindings. Use the pagedflash package, not this module.",
    .m_size = sizeof(pf_module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&module_def); }
