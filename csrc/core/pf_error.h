/*
 * pf_error.h - how every part of pagedflash reports a failure: the thread-local
 * last-error message and the macros that set it and return a status, plus the
 * two tensor-view accessors everyone needs. The one core header a backend may
 * include (beside backend.h); valid C and C++ (CUDA).
 *
 *   PF_CHECK(cond, status, fmt, ...)   return `status` with a message unless cond
 *   PF_CHECK_VALUE / PF_CHECK_TYPE     the same with INVALID_VALUE / INVALID_TYPE
 *   PF_TRY(expr)                       propagate a failing pf_status
 *
 * Messages name the argument, what was expected and what was given; the file
 * and line of the check are appended (" [validate_attn.c:42]").
 */
#ifndef PF_ERROR_H
#define PF_ERROR_H

#include <stdint.h>

#include "pagedflash.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Record a message for the calling thread and return `status`. */
pf_status pf_set_error(pf_status status, const char *file, int line, const char *fmt, ...)
#if defined(__GNUC__)
    __attribute__((format(printf, 4, 5)))
#endif
    ;

/* Return `status` with a message unless `cond` holds. */
#define PF_CHECK(cond, status, ...)                                                  \
    do {                                                                             \
        if (!(cond)) return pf_set_error((status), __FILE__, __LINE__, __VA_ARGS__); \
    } while (0)

#define PF_CHECK_VALUE(cond, ...) PF_CHECK(cond, PF_STATUS_INVALID_VALUE, __VA_ARGS__)
#define PF_CHECK_TYPE(cond, ...) PF_CHECK(cond, PF_STATUS_INVALID_TYPE, __VA_ARGS__)

/* Propagate a failing status. */
#define PF_TRY(expr)                                               \
    do {                                                           \
        pf_status pf_try_status_ = (expr);                         \
        if (pf_try_status_ != PF_STATUS_OK) return pf_try_status_; \
    } while (0)

/* An optional tensor argument was given (data != NULL). */
static inline int pf_tensor_present(const pf_tensor *t) { return t->data != NULL; }

static inline int64_t pf_tensor_numel(const pf_tensor *t) {
    int64_t n = 1;
    for (int i = 0; i < t->ndim; i++) n *= t->shape[i];
    return n;
}

#ifdef __cplusplus
}
#endif

#endif /* PF_ERROR_H */
