/*
 * error.c - status strings, the thread-local last-error message, dtype names
 * and sizes, the names of the kernel hints, and the default softmax scale.
 */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "pf_error.h"

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
        case PF_DTYPE_F8E4M3:
        case PF_DTYPE_F8E5M2:
        case PF_DTYPE_I8: return 1;
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
        case PF_DTYPE_F8E4M3: return "float8_e4m3fn";
        case PF_DTYPE_F8E5M2: return "float8_e5m2";
        case PF_DTYPE_I8: return "int8";
        case PF_DTYPE_INVALID: return "invalid";
    }
    return "invalid";
}

/* ---- kernel hints (pagedflash.h) ---- */

/* clang-format off: one hint per line */
static const struct {
    const char *name;
    int32_t kernel;
} pf_kernel_names[] = {
    {"auto", PF_KERNEL_AUTO},           {"sm80", PF_KERNEL_FLASH_SM80}, {"sm90", PF_KERNEL_FLASH_SM90},
    {"simple", PF_KERNEL_PAGED_SIMPLE}, {"1x4", PF_KERNEL_PAGED_1X4},   {"4x4", PF_KERNEL_PAGED_4X4},
    {"8x8", PF_KERNEL_PAGED_8X8},       {"1x8", PF_KERNEL_PAGED_1X8},   {"2x8", PF_KERNEL_PAGED_2X8},
    {"4x8", PF_KERNEL_PAGED_4X8},
};
/* clang-format on */
#define PF_NUM_KERNEL_NAMES ((int)(sizeof pf_kernel_names / sizeof pf_kernel_names[0]))
static const char pf_registers_suffix[] = "+registers";

pf_status pf_kernel_parse(const char *name, int32_t *kernel) {
    PF_CHECK_VALUE(name != NULL && kernel != NULL, "kernel: NULL name");
    const size_t n = strlen(name), ns = sizeof pf_registers_suffix - 1;
    const int registers = n > ns && strcmp(name + n - ns, pf_registers_suffix) == 0;
    const size_t base = registers ? n - ns : n;
    for (int i = 0; i < PF_NUM_KERNEL_NAMES; i++) {
        const int32_t k = pf_kernel_names[i].kernel;
        if (strlen(pf_kernel_names[i].name) != base || strncmp(name, pf_kernel_names[i].name, base) != 0) continue;
        if (registers && !(k > PF_KERNEL_PAGED_SIMPLE && k <= PF_KERNEL_PAGED_4X8)) break;
        *kernel = k | (registers ? PF_KERNEL_PAGED_REGISTERS : 0);
        return PF_STATUS_OK;
    }
    PF_CHECK_VALUE(0,
                   "kernel: unknown kernel '%s'; expected auto, sm80, sm90 (flash attention), simple, 1x4, "
                   "4x4, 8x8, 1x8, 2x8 or 4x8 (paged attention; the tensor-core shapes also with "
                   "+registers)",
                   name);
}

const char *pf_kernel_name(int32_t kernel) {
    static const char *const registers_names[] = {"1x4+registers", "4x4+registers", "8x8+registers",
                                                  "1x8+registers", "2x8+registers", "4x8+registers"};
    const int32_t base = kernel & ~PF_KERNEL_PAGED_REGISTERS;
    for (int i = 0; i < PF_NUM_KERNEL_NAMES; i++) {
        if (pf_kernel_names[i].kernel != base) continue;
        if (!(kernel & PF_KERNEL_PAGED_REGISTERS)) return pf_kernel_names[i].name;
        if (base > PF_KERNEL_PAGED_SIMPLE && base <= PF_KERNEL_PAGED_4X8)
            return registers_names[base - PF_KERNEL_PAGED_1X4];
        return NULL;
    }
    return NULL;
}

float pf_default_softmax_scale(int64_t head_dim) { return head_dim > 0 ? 1.0f / sqrtf((float)head_dim) : 1.0f; }
