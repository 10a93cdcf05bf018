/*
 * bind_paged.c - bindings of the paged entry points (filled in by its issue).
 */
#include "pf_py.h"

PyMethodDef pf_py_paged_methods[] = {
    {NULL, NULL, 0, NULL},
};
