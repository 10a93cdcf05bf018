/*
 * bind_block_pool.c - bindings of the block_pool entry points (filled in by its issue).
 */
#include "pf_py.h"

PyMethodDef pf_py_block_pool_methods[] = {
    {NULL, NULL, 0, NULL},
};
