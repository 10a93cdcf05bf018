/*
 * error.c - status strings, the thread-local last-error message, dtype helpers
 * and the common tensor checks whose messages every validator shares.
 */
#include <stdarg.h>
#include <stdio.h>

#include "pf_internal.h"

#if defined(_MSC_VER)
#define PF_THREAD_LOCAL __declspec(thread)
#else
#define PF_THREAD_LOCAL _Thread_local
#endif

static PF_THREAD_LOCAL char pf_error_message[1024];

const char *pf_status_string(pf_status status) {
    switch (status) {
        case PF_STATUS_OK: return "PF_STATUS_OK";
        case PF_STATUS_INVALID_VALUE: return "PF_STATUS_INVALID_VALUE";
        case PF_STATUS_INVALID_TYPE: return "PF_STATUS_INVALID_TYPE";
        case PF_STATUS_NOT_SUPPORTED: return "PF_STATUS_NOT_SUPPORTED";
        case PF_STATUS_OUT_OF_BLOCKS: return "PF_STATUS_OUT_OF_BLOCKS";
        case PF_STATUS_CUDA_ERROR: return "PF_STATUS_CUDA_ERROR";
        case PF_STATUS_OUT_OF_MEMORY: return "PF_STATUS_OUT_OF_MEMORY";
        case PF_STATUS_INTERNAL: return "PF_STATUS_INTERNAL";
    }
    return "PF_STATUS_UNKNOWN";
}

const char *pf_last_error(void) { return pf_error_message; }

void pf_clear_error(void) { pf_error_message[0] = '\0'; }

pf_status pf_set_error(pf_status status, const char *file, int line, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(pf_error_message, sizeof pf_error_message, fmt, ap);
    va_end(ap);
    if (n >= 0 && (size_t)n < sizeof pf_error_message) {
        /* the call site, for whoever debugs a report */
        const char *base = file;
        for (const char *p = file; *p; p++)
            if (*p == '/' || *p == '\\') base = p + 1;
        snprintf(pf_error_message + n, sizeof pf_error_message - (size_t)n, " [%s:%d]", base, line);
    }
    return status;
}

size_t pf_dtype_size(pf_dtype dtype) {
    switch (dtype) {
        case PF_DTYPE_F32: return 4;
        case PF_DTYPE_F16: return 2;
        case PF_DTYPE_BF16: return 2;
        case PF_DTYPE_I32: return 4;
        case PF_DTYPE_I64: return 8;
        case PF_DTYPE_U8: return 1;
        case PF_DTYPE_F64: return 8;
        case PF_DTYPE_INVALID: return 0;
    }
    return 0;
}

const char *pf_dtype_name(pf_dtype dtype) {
    switch (dtype) {
        case PF_DTYPE_F32: return "float32";
        case PF_DTYPE_F16: return "float16";
        case PF_DTYPE_BF16: return "bfloat16";
        case PF_DTYPE_I32: return "int32";
        case PF_DTYPE_I64: return "int64";
        case PF_DTYPE_U8: return "uint8";
        case PF_DTYPE_F64: return "float64";
        case PF_DTYPE_INVALID: return "invalid";
    }
    return "invalid";
}

const char *pf_shape_str(const pf_tensor *t, char *buf, size_t len) {
    size_t pos = 0;
    pos += (size_t)snprintf(buf + pos, len - pos, "[");
    for (int i = 0; i < t->ndim && pos < len; i++)
        pos += (size_t)snprintf(buf + pos, len - pos, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (pos < len) snprintf(buf + pos, len - pos, "]");
    return buf;
}

pf_status pf_check_rank(const pf_tensor *t, const char *name, int ndim) {
    char s[128];
    PF_CHECK_VALUE(t->ndim == ndim, "%s: expected a %d-d tensor, got %d-d with shape %s", name,
                   ndim, (int)t->ndim, pf_shape_str(t, s, sizeof s));
    return PF_STATUS_OK;
}

pf_status pf_check_dim(const pf_tensor *t, const char *name, int dim, int64_t expected,
                       const char *what) {
    char s[128];
    PF_CHECK_VALUE(t->shape[dim] == expected, "%s: expected dimension %d (%s) to be %lld, got %lld (shape %s)",
                   name, dim, what, (long long)expected, (long long)t->shape[dim],
                   pf_shape_str(t, s, sizeof s));
    return PF_STATUS_OK;
}

pf_status pf_check_dtype(const pf_tensor *t, const char *name, pf_dtype expected) {
    PF_CHECK_TYPE(t->dtype == expected, "%s: expected dtype %s, got %s", name,
                  pf_dtype_name(expected), pf_dtype_name(t->dtype));
    return PF_STATUS_OK;
}

pf_status pf_check_float_dtype(const pf_tensor *t, const char *name) {
    PF_CHECK_TYPE(t->dtype == PF_DTYPE_F32 || t->dtype == PF_DTYPE_F16 || t->dtype == PF_DTYPE_BF16,
                  "%s: expected dtype float16, bfloat16 or float32, got %s", name,
                  pf_dtype_name(t->dtype));
    return PF_STATUS_OK;
}

pf_status pf_check_last_contiguous(const pf_tensor *t, const char *name) {
    if (t->ndim == 0 || pf_tensor_numel(t) == 0) return PF_STATUS_OK;
    int last = t->ndim - 1;
    PF_CHECK_VALUE(t->shape[last] <= 1 || t->strides[last] == 1,
                   "%s: the last dimension must be contiguous (stride 1), got stride %lld",
                   name, (long long)t->strides[last]);
    return PF_STATUS_OK;
}

pf_status pf_check_nonneg_strides(const pf_tensor *t, const char *name) {
    for (int i = 0; i < t->ndim; i++)
        PF_CHECK_VALUE(t->strides[i] >= 0 || t->shape[i] <= 1,
                       "%s: negative strides are not supported (dimension %d has stride %lld)", name,
                       i, (long long)t->strides[i]);
    return PF_STATUS_OK;
}

int pf_tensor_on_host(const pf_tensor *t) {
    return t->device == PF_DEVICE_CPU || t->device == PF_DEVICE_CUDA_HOST;
}

pf_status pf_check_same_device(const pf_tensor *t, const char *name, const pf_tensor *ref,
                               const char *ref_name) {
    int a = t->device == PF_DEVICE_CUDA, b = ref->device == PF_DEVICE_CUDA;
    PF_CHECK_VALUE(a == b && (!a || t->device_id == ref->device_id),
                   "%s: expected the same device as %s (%s:%d), got %s:%d", name, ref_name,
                   b ? "cuda" : "cpu", (int)ref->device_id, a ? "cuda" : "cpu", (int)t->device_id);
    return PF_STATUS_OK;
}

pf_status pf_check_same_shape(const pf_tensor *t, const char *name, const pf_tensor *ref,
                              const char *ref_name) {
    char a[128], b[128];
    int same = t->ndim == ref->ndim;
    for (int i = 0; same && i < t->ndim; i++) same = t->shape[i] == ref->shape[i];
    PF_CHECK_VALUE(same, "%s: expected the shape of %s %s, got %s", name, ref_name,
                   pf_shape_str(ref, a, sizeof a), pf_shape_str(t, b, sizeof b));
    return PF_STATUS_OK;
}

pf_status pf_check_present(const pf_tensor *t, const char *name) {
    PF_CHECK_VALUE(pf_tensor_present(t) || (t->ndim > 0 && pf_tensor_numel(t) == 0),
                   "%s: missing (NULL data)", name);
    return PF_STATUS_OK;
}

pf_status pf_check_float_like(const pf_tensor *t, const char *name, const pf_tensor *ref,
                              const char *ref_name) {
    PF_TRY(pf_check_present(t, name));
    PF_TRY(pf_check_float_dtype(t, name));
    PF_CHECK_TYPE(t->dtype == ref->dtype, "%s: expected dtype %s (the dtype of %s), got %s", name,
                  pf_dtype_name(ref->dtype), ref_name, pf_dtype_name(t->dtype));
    PF_TRY(pf_check_last_contiguous(t, name));
    PF_TRY(pf_check_same_device(t, name, ref, ref_name));
    return PF_STATUS_OK;
}

pf_status pf_check_mask_options(int32_t window_left, int32_t window_right, float softcap,
                                float softmax_scale) {
    PF_CHECK_VALUE(window_left >= -1, "window: left must be >= -1 (-1 = unbounded), got %d",
                   (int)window_left);
    PF_CHECK_VALUE(window_right >= -1, "window: right must be >= -1 (-1 = unbounded), got %d",
                   (int)window_right);
    PF_CHECK_VALUE(softcap >= 0.0f && softcap < __builtin_inff(),
                   "softcap: must be a finite number >= 0 (0 = off), got %g", (double)softcap);
    PF_CHECK_VALUE(softmax_scale == softmax_scale && softmax_scale > -__builtin_inff() &&
                       softmax_scale < __builtin_inff(),
                   "softmax_scale: must be finite, got %g", (double)softmax_scale);
    return PF_STATUS_OK;
}

pf_status pf_check_alibi(const pf_tensor *a, int64_t num_heads, int64_t batch, const pf_tensor *q) {
    if (!pf_tensor_present(a) && a->ndim == 0) return PF_STATUS_OK;
    char s[128];
    PF_TRY(pf_check_dtype(a, "alibi_slopes", PF_DTYPE_F32));
    PF_CHECK_VALUE((a->ndim == 1 && a->shape[0] == num_heads) ||
                       (a->ndim == 2 && a->shape[0] == batch && a->shape[1] == num_heads),
                   "alibi_slopes: expected shape [%lld] or [%lld, %lld] (num_heads or batch x "
                   "num_heads), got %s",
                   (long long)num_heads, (long long)batch, (long long)num_heads,
                   pf_shape_str(a, s, sizeof s));
    PF_TRY(pf_check_same_device(a, "alibi_slopes", q, "q"));
    return PF_STATUS_OK;
}
