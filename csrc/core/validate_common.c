/*
 * validate_common.c - the tensor checks every validator shares, so that every
 * message reads the same ("k: expected dtype float16 (the dtype of q), got
 * float32"), and the lookup of a call's backend with its limits.
 */
#include <stdio.h>
#include <string.h>

#include "validate.h"

const char *pf_shape_str(const pf_tensor *t, char *buf, size_t len) {
    size_t pos = 0;
    pos += (size_t)snprintf(buf + pos, len - pos, "[");
    for (int i = 0; i < t->ndim && i < PF_MAX_DIMS && pos < len; i++)
        pos += (size_t)snprintf(buf + pos, len - pos, i ? ", %lld" : "%lld", (long long)t->shape[i]);
    if (pos < len) snprintf(buf + pos, len - pos, "]");
    return buf;
}

pf_status pf_check_tensor(const pf_tensor *t, const char *name) {
    PF_CHECK_VALUE(t->ndim >= 0 && t->ndim <= PF_MAX_DIMS, "%s: ndim must be in [0, %d], got %d", name, PF_MAX_DIMS,
                   (int)t->ndim);
    int64_t numel = 1;
    for (int i = 0; i < t->ndim; i++) {
        PF_CHECK_VALUE(t->shape[i] >= 0, "%s: dimension %d is negative (%lld)", name, i, (long long)t->shape[i]);
        PF_CHECK_VALUE(!__builtin_mul_overflow(numel, t->shape[i], &numel),
                       "%s: too many elements (the product of its shape overflows int64)", name);
    }
    PF_CHECK_VALUE(numel == 0 || t->data != NULL || t->ndim == 0, "%s: NULL data for %lld elements", name,
                   (long long)numel);
    return PF_STATUS_OK;
}

/* [*lo, *hi): the bytes a tensor's elements occupy; lo == hi for an empty or absent one. */
static void byte_span(const pf_tensor *t, uintptr_t *lo, uintptr_t *hi) {
    *lo = *hi = 0;
    if (!t->data || pf_tensor_numel(t) == 0) return;
    const int64_t es = (int64_t)pf_dtype_size(t->dtype);
    int64_t below = 0, above = 0;
    for (int i = 0; i < t->ndim; i++) {
        const int64_t reach = t->strides[i] * (t->shape[i] - 1);
        if (reach < 0)
            below += reach;
        else
            above += reach;
    }
    *lo = (uintptr_t)t->data + (uintptr_t)(below * es);
    *hi = (uintptr_t)t->data + (uintptr_t)((above + 1) * es);
}

/* Whether two tensors live in one address space: host memory (CPU, page-locked) or one CUDA device. */
static int same_memory(const pf_tensor *a, const pf_tensor *b) {
    if (pf_tensor_on_host(a) || pf_tensor_on_host(b)) return pf_tensor_on_host(a) && pf_tensor_on_host(b);
    return a->device_id == b->device_id;
}

pf_status pf_check_disjoint(const pf_tensor *out, const char *out_name, const pf_tensor *in, const char *in_name) {
    if (!pf_tensor_present(out) || !pf_tensor_present(in) || !same_memory(out, in)) return PF_STATUS_OK;
    uintptr_t olo, ohi, ilo, ihi;
    byte_span(out, &olo, &ohi);
    byte_span(in, &ilo, &ihi);
    PF_CHECK_VALUE(olo == ohi || ilo == ihi || ohi <= ilo || ihi <= olo,
                   "%s: overlaps %s in memory; an output may not share memory with an input or another output",
                   out_name, in_name);
    return PF_STATUS_OK;
}

pf_status pf_check_outputs_disjoint(const pf_named_tensor *outs, int n_out, const pf_named_tensor *ins, int n_in) {
    for (int o = 0; o < n_out; o++)
        for (int i = 0; i < n_in; i++) PF_TRY(pf_check_disjoint(outs[o].t, outs[o].name, ins[i].t, ins[i].name));
    return PF_STATUS_OK;
}

int pf_tensor_same_view(const pf_tensor *a, const pf_tensor *b) {
    if (a->data != b->data || a->ndim != b->ndim || a->dtype != b->dtype || !same_memory(a, b)) return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i] || (a->shape[i] > 1 && a->strides[i] != b->strides[i])) return 0;
    return 1;
}

pf_status pf_check_rank(const pf_tensor *t, const char *name, int ndim) {
    char s[128];
    PF_TRY(pf_check_tensor(t, name));
    PF_CHECK_VALUE(t->ndim == ndim, "%s: expected a %d-d tensor, got %d-d with shape %s", name, ndim, (int)t->ndim,
                   pf_shape_str(t, s, sizeof s));
    return PF_STATUS_OK;
}

pf_status pf_check_dim(const pf_tensor *t, const char *name, int dim, int64_t expected, const char *what) {
    char s[128];
    PF_CHECK_VALUE(t->shape[dim] == expected, "%s: expected dimension %d (%s) to be %lld, got %lld (shape %s)", name,
                   dim, what, (long long)expected, (long long)t->shape[dim], pf_shape_str(t, s, sizeof s));
    return PF_STATUS_OK;
}

pf_status pf_check_dtype(const pf_tensor *t, const char *name, pf_dtype expected) {
    PF_CHECK_TYPE(t->dtype == expected, "%s: expected dtype %s, got %s", name, pf_dtype_name(expected),
                  pf_dtype_name(t->dtype));
    return PF_STATUS_OK;
}

pf_status pf_check_float_dtype(const pf_tensor *t, const char *name) {
    PF_CHECK_TYPE(t->dtype == PF_DTYPE_F32 || t->dtype == PF_DTYPE_F16 || t->dtype == PF_DTYPE_BF16,
                  "%s: expected dtype float16, bfloat16 or float32, got %s", name, pf_dtype_name(t->dtype));
    return PF_STATUS_OK;
}

pf_status pf_check_last_contiguous(const pf_tensor *t, const char *name) {
    if (t->ndim == 0 || pf_tensor_numel(t) == 0) return PF_STATUS_OK;
    int last = t->ndim - 1;
    PF_CHECK_VALUE(t->shape[last] <= 1 || t->strides[last] == 1,
                   "%s: the last dimension must be contiguous (stride 1), got stride %lld", name,
                   (long long)t->strides[last]);
    return PF_STATUS_OK;
}

pf_status pf_check_nonneg_strides(const pf_tensor *t, const char *name) {
    for (int i = 0; i < t->ndim; i++)
        PF_CHECK_VALUE(t->strides[i] >= 0 || t->shape[i] <= 1,
                       "%s: negative strides are not supported (dimension %d has stride %lld)", name, i,
                       (long long)t->strides[i]);
    return PF_STATUS_OK;
}

int pf_tensor_on_host(const pf_tensor *t) { return t->device == PF_DEVICE_CPU || t->device == PF_DEVICE_CUDA_HOST; }

pf_status pf_check_same_device(const pf_tensor *t, const char *name, const pf_tensor *ref, const char *ref_name) {
    int a = t->device == PF_DEVICE_CUDA, b = ref->device == PF_DEVICE_CUDA;
    PF_CHECK_VALUE(a == b && (!a || t->device_id == ref->device_id),
                   "%s: expected the same device as %s (%s:%d), got %s:%d", name, ref_name, b ? "cuda" : "cpu",
                   (int)ref->device_id, a ? "cuda" : "cpu", (int)t->device_id);
    return PF_STATUS_OK;
}

pf_status pf_check_same_shape(const pf_tensor *t, const char *name, const pf_tensor *ref, const char *ref_name) {
    char a[128], b[128];
    int same = t->ndim == ref->ndim;
    for (int i = 0; same && i < t->ndim; i++) same = t->shape[i] == ref->shape[i];
    PF_CHECK_VALUE(same, "%s: expected the shape of %s %s, got %s", name, ref_name, pf_shape_str(ref, a, sizeof a),
                   pf_shape_str(t, b, sizeof b));
    return PF_STATUS_OK;
}

pf_status pf_check_present(const pf_tensor *t, const char *name) {
    PF_TRY(pf_check_tensor(t, name));
    PF_CHECK_VALUE(pf_tensor_present(t) || (t->ndim > 0 && pf_tensor_numel(t) == 0), "%s: missing (NULL data)", name);
    return PF_STATUS_OK;
}

pf_status pf_check_float_like(const pf_tensor *t, const char *name, const pf_tensor *ref, const char *ref_name) {
    PF_TRY(pf_check_present(t, name));
    PF_TRY(pf_check_float_dtype(t, name));
    PF_CHECK_TYPE(t->dtype == ref->dtype, "%s: expected dtype %s (the dtype of %s), got %s", name,
                  pf_dtype_name(ref->dtype), ref_name, pf_dtype_name(t->dtype));
    PF_TRY(pf_check_last_contiguous(t, name));
    PF_TRY(pf_check_same_device(t, name, ref, ref_name));
    return PF_STATUS_OK;
}

pf_status pf_check_mask_options(int32_t window_left, int32_t window_right, float softcap, float softmax_scale) {
    PF_CHECK_VALUE(window_left >= -1, "window: left must be >= -1 (-1 = unbounded), got %d", (int)window_left);
    PF_CHECK_VALUE(window_right >= -1, "window: right must be >= -1 (-1 = unbounded), got %d", (int)window_right);
    PF_CHECK_VALUE(softcap >= 0.0f && softcap < __builtin_inff(),
                   "softcap: must be a finite number >= 0 (0 = off), got %g", (double)softcap);
    PF_CHECK_VALUE(
        softmax_scale == softmax_scale && softmax_scale > -__builtin_inff() && softmax_scale < __builtin_inff(),
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
                   (long long)num_heads, (long long)batch, (long long)num_heads, pf_shape_str(a, s, sizeof s));
    PF_TRY(pf_check_same_device(a, "alibi_slopes", q, "q"));
    return PF_STATUS_OK;
}

pf_status pf_check_backend(const pf_tensor *t, const char *name, const pf_backend **backend) {
    *backend = pf_backend_of(t->device);
    PF_CHECK(*backend != NULL, PF_STATUS_NOT_SUPPORTED,
             "%s: this pagedflash was built without CUDA; tensors on a CUDA device need a build with "
             "nvcc present (PAGEDFLASH_CUDA=1)",
             name);
    return PF_STATUS_OK;
}

pf_status pf_check_kernel_hint(int32_t kernel, pf_hint_op op, const char *op_name) {
    if (kernel == PF_KERNEL_AUTO) return PF_STATUS_OK;
    const int32_t base = kernel & ~PF_KERNEL_PAGED_REGISTERS;
    const int registers = (kernel & PF_KERNEL_PAGED_REGISTERS) != 0;
    int ok;
    if (op == PF_HINT_FLASH)
        ok = !registers && (base == PF_KERNEL_FLASH_SM80 || base == PF_KERNEL_FLASH_SM90);
    else
        ok = ((base == PF_KERNEL_PAGED_SIMPLE || base == PF_KERNEL_FLASH_SM90) && !registers) ||
             (base >= PF_KERNEL_PAGED_1X4 && base <= PF_KERNEL_PAGED_4X8);
    const char *name = pf_kernel_name(kernel);
    PF_CHECK_VALUE(ok, "kernel: %s%s%s (%d) is not a kernel of %s; expected %s", name ? "'" : "",
                   name ? name : "a value", name ? "'" : "", (int)kernel, op_name,
                   op == PF_HINT_FLASH ? "auto, sm80 or sm90"
                                       : "auto, sm90, simple, 1x4, 4x4, 8x8, 1x8, 2x8 or 4x8 (optionally +registers)");
    return PF_STATUS_OK;
}
