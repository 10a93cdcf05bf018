/*
 * py_bindings.h - what module.c collects from the binding files: one method
 * table per file, and the types they define.
 */
#ifndef PF_PY_BINDINGS_H
#define PF_PY_BINDINGS_H

#include "pf_py.h"

extern PyMethodDef pf_py_attn_methods[];   /* bind_attn.c: flash forward / backward, dropout mask */
extern PyMethodDef pf_py_paged_methods[];  /* bind_paged.c: paged attention, merge, cache ops */
extern PyMethodDef pf_py_tensor_methods[]; /* bind_tensor.c: describe, empty */

/* bind_block_pool.c: adds _C.BlockPool and _C.BlockStats (the stats struct sequence,
 * kept in the module state). Returns 0 or -1. */
int pf_py_block_pool_init(PyObject *module);

#endif /* PF_PY_BINDINGS_H */
