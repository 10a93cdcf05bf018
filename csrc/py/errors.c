/*
 * errors.c - the module state accessor and the status -> exception mapping of
 * pagedflash._C (DESIGN.md, "Errors").
 */
#include "pf_py.h"

pf_module_state *pf_py_state(PyObject *module) { return (pf_module_state *)PyModule_GetState(module); }

uint64_t pf_py_random_seed(PyObject *module) {
    /* splitmix64 over a state seeded from os.urandom at import (module.c) */
    uint64_t z = (pf_py_state(module)->rng += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

PyObject *pf_py_raise(PyObject *module, pf_status status) {
    pf_module_state *st = pf_py_state(module);
    PyObject *type;
    switch (status) {
        case PF_STATUS_INVALID_VALUE: type = PyExc_ValueError; break;
        case PF_STATUS_INVALID_TYPE: type = PyExc_TypeError; break;
        case PF_STATUS_NOT_SUPPORTED: type = PyExc_NotImplementedError; break;
        case PF_STATUS_OUT_OF_BLOCKS: type = st->out_of_blocks; break;
        case PF_STATUS_CUDA_ERROR: type = st->cuda_error; break;
        case PF_STATUS_OUT_OF_MEMORY: type = PyExc_MemoryError; break;
        default: type = PyExc_RuntimeError; break;
    }
    const char *msg = pf_last_error();
    PyErr_SetString(type, msg && msg[0] ? msg : pf_status_string(status));
    return NULL;
}
