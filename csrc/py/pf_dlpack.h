/*
 * pf_dlpack.h - the DLPack ABI (v1.0 and the legacy unversioned struct), as
 * specified at dmlc/dlpack; written out here so the build needs no download.
 */
#ifndef PF_DLPACK_H
#define PF_DLPACK_H

#include <stdint.h>

#define PF_DLPACK_MAJOR 1
#define PF_DLPACK_MINOR 0

enum {
    kDLCPU = 1,
    kDLCUDA = 2,
    kDLCUDAHost = 3,
    kDLCUDAManaged = 13,
};

enum { kDLInt = 0, kDLUInt = 1, kDLFloat = 2, kDLBfloat = 4, kDLBool = 6 };
/* float8 type codes (DLPack 1.1; bits = 8): what torch exports for float8_e4m3fn / float8_e5m2 */
enum { kDLFloat8_e4m3fn = 10, kDLFloat8_e5m2 = 12 };

typedef struct {
    int32_t device_type; /* an enum in the spec: int-sized */
    int32_t device_id;
} DLDevice;

typedef struct {
    uint8_t code;
    uint8_t bits;
    uint16_t lanes;
} DLDataType;

typedef struct {
    void *data;
    DLDevice device;
    int32_t ndim;
    DLDataType dtype;
    int64_t *shape;
    int64_t *strides; /* in elements; NULL = compact row-major */
    uint64_t byte_offset;
} DLTensor;

typedef struct DLManagedTensor {
    DLTensor dl_tensor;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensor *self);
} DLManagedTensor;

typedef struct {
    uint32_t major;
    uint32_t minor;
} DLPackVersion;

#define DLPACK_FLAG_BITMASK_READ_ONLY (1ULL << 0)
#define DLPACK_FLAG_BITMASK_IS_COPIED (1ULL << 1)

typedef struct DLManagedTensorVersioned {
    DLPackVersion version;
    void *manager_ctx;
    void (*deleter)(struct DLManagedTensorVersioned *self);
    uint64_t flags;
    DLTensor dl_tensor;
} DLManagedTensorVersioned;

/* The DLPack C exchange API (dlpack.h 1.2+): a table of C functions a framework publishes on
 * its tensor type as the capsule `type(x).__dlpack_c_exchange_api__` named
 * "dlpack_exchange_api", so a consumer views, allocates and finds the current stream without
 * going through Python. "no_sync": the consumer runs its work on the producer's current
 * stream (current_work_stream) instead of synchronizing. Functions return 0 on success,
 * -1 with a Python exception set. */
typedef struct PFDLPackExchangeAPIHeader {
    DLPackVersion version;
    struct PFDLPackExchangeAPIHeader *prev_api; /* an older table in the chain, or NULL */
} PFDLPackExchangeAPIHeader;

typedef struct PFDLPackExchangeAPI {
    PFDLPackExchangeAPIHeader header;
    /* a new tensor of prototype's dtype, ndim, shape and device; SetError(error_ctx, kind,
     * message) exactly when it fails */
    int (*managed_tensor_allocator)(DLTensor *prototype, DLManagedTensorVersioned **out, void *error_ctx,
                                    void (*SetError)(void *error_ctx, const char *kind, const char *message));
    int (*managed_tensor_from_py_object_no_sync)(void *py_object, DLManagedTensorVersioned **out);
    /* steals `tensor`; *out_py_object a new reference */
    int (*managed_tensor_to_py_object_no_sync)(DLManagedTensorVersioned *tensor, void **out_py_object);
    /* a non-owning view, valid while py_object lives and is not resized */
    int (*dltensor_from_py_object_no_sync)(void *py_object, DLTensor *out);
    int (*current_work_stream)(int32_t device_type, int32_t device_id, void **out_current_stream);
} PFDLPackExchangeAPI;

#endif /* PF_DLPACK_H */
