/*
 * validate.h - the core's parameter checks (csrc/core/validate_*.c): every
 * entry point runs its pf_*_validate before any backend does, so a failed call
 * writes nothing. The shared checks below produce the standard messages;
 * validate_common.c implements them. Core-internal: no backend includes this.
 */
#ifndef PF_VALIDATE_H
#define PF_VALIDATE_H

#include "backend.h"
#include "pf_error.h"

/* Render a shape as "[2, 3, 4]" into buf (for messages). */
const char *pf_shape_str(const pf_tensor *t, char *buf, size_t len);

/* Any tensor argument: ndim in [0, PF_MAX_DIMS], no negative dimension, an element count
 * int64 holds, non-NULL data when it has elements. (pf_check_present and pf_check_rank
 * run it first.) */
pf_status pf_check_tensor(const pf_tensor *t, const char *name);
/* An output must not share memory with an input (or with another output written in the same
 * call: out and lse): their byte spans (first to last element, strides of any sign) are
 * disjoint, or they live in different memories. Interleaved views whose spans overlap count as
 * overlapping. Absent or empty tensors pass. */
pf_status pf_check_disjoint(const pf_tensor *out, const char *out_name, const pf_tensor *in, const char *in_name);
/* Every output against every input (pf_check_disjoint). */
typedef struct pf_named_tensor {
    const pf_tensor *t;
    const char *name;
} pf_named_tensor;
pf_status pf_check_outputs_disjoint(const pf_named_tensor *outs, int n_out, const pf_named_tensor *ins, int n_in);
#define PF_COUNT(a) ((int)(sizeof(a) / sizeof((a)[0])))
/* The very same view: data, dtype, shape and strides (in-place operations allow exactly this). */
int pf_tensor_same_view(const pf_tensor *a, const pf_tensor *b);

/* Shape, dtype and device checks that produce the standard messages. */
pf_status pf_check_rank(const pf_tensor *t, const char *name, int ndim);
pf_status pf_check_dim(const pf_tensor *t, const char *name, int dim, int64_t expected, const char *what);
pf_status pf_check_dtype(const pf_tensor *t, const char *name, pf_dtype expected);
pf_status pf_check_float_dtype(const pf_tensor *t, const char *name);
pf_status pf_check_last_contiguous(const pf_tensor *t, const char *name);
pf_status pf_check_same_device(const pf_tensor *t, const char *name, const pf_tensor *ref, const char *ref_name);
/* A required argument: non-NULL data (an empty tensor may carry a placeholder). */
pf_status pf_check_present(const pf_tensor *t, const char *name);
/* Same rank and shape as `ref`. */
pf_status pf_check_same_shape(const pf_tensor *t, const char *name, const pf_tensor *ref, const char *ref_name);
/* Present, float16/bfloat16/float32 with `ref`'s dtype and device, last dim contiguous. */
pf_status pf_check_float_like(const pf_tensor *t, const char *name, const pf_tensor *ref, const char *ref_name);
/* window (left, right >= -1), softcap (finite, >= 0), softmax_scale (finite). */
pf_status pf_check_mask_options(int32_t window_left, int32_t window_right, float softcap, float softmax_scale);
/* alibi_slopes, when given: f32 [num_heads] or [batch, num_heads] on q's device. */
pf_status pf_check_alibi(const pf_tensor *a, int64_t num_heads, int64_t batch, const pf_tensor *q);
/* The tensor is host-readable (CPU or page-locked host memory). */
int pf_tensor_on_host(const pf_tensor *t);
/* Strides must be non-negative (no aliasing trickery on outputs). */
pf_status pf_check_nonneg_strides(const pf_tensor *t, const char *name);

/* The backend that runs a call whose work lives on `t`'s device (named `name` in
 * the message): PF_STATUS_NOT_SUPPORTED when this build has none. */
pf_status pf_check_backend(const pf_tensor *t, const char *name, const pf_backend **backend);

/* merge_attn_states (validate_paged.c): a validated lse_a / lse_b / lse, in either layout it
 * takes, as the view the backends index (backend.h): [..., num_heads] over out's leading
 * dimensions. An absent lse stays absent. */
void pf_merge_lse_view(const pf_tensor *lse, const pf_tensor *out, pf_tensor *view);

/* The operations a kernel hint may name. */
typedef enum pf_hint_op { PF_HINT_FLASH, PF_HINT_PAGED } pf_hint_op;
/* `kernel` is PF_KERNEL_AUTO or a hint of the operation `op` (INVALID_VALUE otherwise). */
pf_status pf_check_kernel_hint(int32_t kernel, pf_hint_op op, const char *op_name);

#endif /* PF_VALIDATE_H */
