/*
 * py_convert.h - the one argument-conversion layer of pagedflash._C (convert.c):
 * every binding turns its Python arguments into C values through these, so every
 * argument is checked the same way and every message names it.
 */
#ifndef PF_PY_CONVERT_H
#define PF_PY_CONVERT_H

#include "pf_py.h"

/* ---- arrays ---- */

/* Imports held for the duration of one call, released (deleters run) at its end. */
#define PF_PY_MAX_ARGS 64
typedef struct pf_py_keep {
    int n;
    struct {
        PyObject *owner; /* strong reference to what we imported from */
        void *managed;   /* DLManagedTensor* or DLManagedTensorVersioned* */
        int versioned;
    } items[PF_PY_MAX_ARGS];
    void *stream;     /* the consumer stream for CUDA producers */
    int stream_given; /* the caller named the stream: producers are asked to order their work
                         before it (__dlpack__(stream=)) instead of viewed through the exchange API */
} pf_py_keep;

/* The DLPack C exchange API that obj's type publishes (type(obj).__dlpack_c_exchange_api__,
 * major version 1), or NULL; looked up once per type. */
struct PFDLPackExchangeAPI;
const struct PFDLPackExchangeAPI *pf_py_exchange_api(PyTypeObject *type);
/* Whether `obj`'s type is an autograd library's array (it has `requires_grad`: torch); a cached
 * per-type answer, never an error. */
int pf_py_autograd_type(PyObject *obj);
/* obj.requires_grad for such an array (its type's getter called directly), 0 for any other:
 * 1 or 0, or -1 with an exception. */
int pf_py_requires_grad(PyObject *obj);

/* View `obj` as a pf_tensor without copying. `writable` requires a writable
 * buffer (outputs). Returns 0, or -1 with a Python exception that names `name`. */
int pf_py_tensor(PyObject *obj, const char *name, int writable, pf_tensor *out, pf_py_keep *keep);
/* As pf_py_tensor, but None gives an absent tensor (data NULL, ndim 0). */
int pf_py_opt_tensor(PyObject *obj, const char *name, int writable, pf_tensor *out, pf_py_keep *keep);
void pf_py_keep_release(pf_py_keep *keep);

/* ---- scalars ---- */

/* A stream argument (None or an int cudaStream_t) into keep->stream, and whether one was given
 * into keep->stream_given (read it before viewing arrays). Returns 0 or -1. */
int pf_py_stream(PyObject *obj, pf_py_keep *keep);
/* A kernel hint by name ("auto", "sm80", "8x8", ...; pagedflash.h) into *kernel.
 * Returns 0, or -1 with ValueError (TypeError for a non-str). */
int pf_py_kernel(PyObject *module, PyObject *name, int32_t *kernel);
/* A Python int into int64 / int32 (TypeError for a non-int, ValueError out of range). */
int pf_py_int64(PyObject *obj, const char *name, int64_t *out);
int pf_py_int32(PyObject *obj, const char *name, int32_t *out);
int pf_py_uint64(PyObject *obj, const char *name, uint64_t *out);
/* A number into float (TypeError otherwise), a truth value into 0/1, window (left, right)
 * into two int32 (None: (-1, -1); ValueError for anything but a pair of ints). */
int pf_py_float(PyObject *obj, const char *name, float *out);
int pf_py_bool(PyObject *obj, const char *name, int32_t *out);
int pf_py_window(PyObject *obj, int32_t *left, int32_t *right);
/* A cache's scale for write_kv_cache (None: absent): a per-(token, head) scale is written by the
 * call, so it is viewed writable unless the object reports ndim <= 1 (a per-tensor scale, read). */
int pf_py_scale(PyObject *obj, const char *name, pf_tensor *out, pf_py_keep *keep);
/* kv_cache_dtype (None or "auto": the caches' own dtype; "fp8" = "fp8_e4m3" = "float8_e4m3fn",
 * "fp8_e5m2" = "float8_e5m2", "int8", "float16", "bfloat16", "float32"): the dtype k_cache and
 * v_cache (viewed already) hold. A compressed one may be given raw bytes (uint8 or int8 arrays,
 * as vLLM allocates float8 caches), which are reinterpreted; otherwise the caches must be of
 * that dtype. Returns 0, or -1 with ValueError (unknown name) or TypeError. */
int pf_py_kv_cache_dtype(PyObject *obj, pf_tensor *k_cache, pf_tensor *v_cache);
/* A dropout seed: any int, taken modulo 2**64 (the Philox key is 64 bits; -1 is 2**64 - 1). */
int pf_py_seed(PyObject *obj, uint64_t *out);
/* softmax_scale: None gives pf_default_softmax_scale of q's last dimension (q converted
 * already; 1 when q has none), a number is used as given (TypeError otherwise). */
int pf_py_softmax_scale(PyObject *obj, const pf_tensor *q, float *out);
/* Positional argument count of a METH_FASTCALL method `fn` within [lo, hi] (TypeError). */
int pf_py_nargs(const char *fn, Py_ssize_t nargs, Py_ssize_t lo, Py_ssize_t hi);

/* ---- integer lists ---- */

/* A grow-only buffer for converted arguments, owned by the caller (e.g. one per
 * BlockPool object: the scheduler converts lists every step). */
typedef struct pf_py_stage {
    void *ptr;
    size_t bytes;
} pf_py_stage;
void *pf_py_stage_get(pf_py_stage *stage, size_t bytes); /* NULL with MemoryError */
void pf_py_stage_free(pf_py_stage *stage);

/* A sequence of ints or a 1-d integer NumPy array as int64 [*n] / int32 [*n] (values
 * range-checked). *data points into the array (then *hold keeps a reference to release)
 * or into `stage`. */
int pf_py_int64_list(PyObject *obj, const char *name, pf_py_stage *stage, const int64_t **data, Py_ssize_t *n,
                     PyObject **hold);
int pf_py_int32_list(PyObject *obj, const char *name, pf_py_stage *stage, const int32_t **data, Py_ssize_t *n,
                     PyObject **hold);

/* A caller-given NumPy output: `nd`-d, `dtype` (int32 or int64), C-contiguous, aligned,
 * writable, with `rows` rows (-1 = any). Returns 0 or -1 with an exception naming it. */
int pf_py_out_array(PyObject *out, const char *name, int nd, pf_dtype dtype, Py_ssize_t rows);
/* A new NumPy array of NumPy type number `npy_type` (NPY_INT32, ...) and shape dims[nd]. */
PyObject *pf_py_new_array(int nd, const Py_ssize_t *dims, int npy_type);

/* ---- the end of a binding ---- */

/* The end of a binding whose arguments were all converted: release the imports (deleters
 * run), then return None, or raise the exception for a failed status. */
PyObject *pf_py_finish(PyObject *module, pf_status status, pf_py_keep *keep);
/* The end of a binding whose argument conversion failed (a converter returned -1): release
 * the imports and return NULL with the converter's exception -- or, if a producer's code
 * cleared it on the way out, a ValueError saying so: success is decided by return codes,
 * never by whether an exception happens to be pending. */
PyObject *pf_py_fail(pf_py_keep *keep);
/* pf_py_finish for a binding that returns its results: 0, or -1 with the exception. */
int pf_py_done(PyObject *module, pf_status status, pf_py_keep *keep);
/* A tuple of n items, stealing the references (released also when it fails). */
PyObject *pf_py_tuple(Py_ssize_t n, PyObject *const *items);

/* Run `call` (a pf_status expression) with the GIL released, storing its status. */
/* clang-format off */
#define PF_PY_CALL(status, call) \
    do {                         \
        Py_BEGIN_ALLOW_THREADS   \
        (status) = (call);       \
        Py_END_ALLOW_THREADS     \
    } while (0)
/* clang-format on */

#endif /* PF_PY_CONVERT_H */
