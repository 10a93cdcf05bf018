"""Which array library a call came from, and how to allocate its results there.

NumPy in -> NumPy out; torch in -> torch out (allocated by torch on the input's
device, on torch's current stream); anything else -> ``pagedflash.Tensor``,
which exports itself through DLPack and the array interfaces (CuPy inputs run on
CuPy's current stream; other producers on ``stream=`` or the legacy default stream). Frameworks are
never imported here: a torch tensor is recognised by its type's module.
"""

from __future__ import annotations

import numpy as np

from . import _C

_KDLCUDA = 2  # DLPack's device type of CUDA memory

# the dtypes results are allocated in (the float ones for outputs like q, uint8 for masks)
_RESULT_DTYPES = ("float32", "float16", "bfloat16", "uint8")


def is_torch(x) -> bool:
    return type(x).__module__.partition(".")[0] == "torch"


class _Numpy:
    name = "numpy"

    @staticmethod
    def prepare(x):
        """Copy only when the last dimension is strided (the C core needs it contiguous)."""
        if x.ndim and x.shape[-1] > 1 and x.strides[-1] != x.itemsize:
            return np.ascontiguousarray(x)
        return x

    @staticmethod
    def empty(shape, dtype, like):
        if dtype == "bfloat16":
            return np.empty(shape, dtype=like.dtype)  # ml_dtypes.bfloat16 input
        return np.empty(shape, dtype=np.dtype(dtype))

    @staticmethod
    def stream(like, stream):
        return stream


class _Torch:
    name = "torch"

    @staticmethod
    def prepare(x):
        x = x.detach()
        if x.dim() and x.shape[-1] > 1 and x.stride(-1) != 1:
            x = x.contiguous()
        return x

    @staticmethod
    def empty(shape, dtype, like):
        import torch

        return torch.empty(tuple(shape), dtype=getattr(torch, dtype), device=like.device)

    @staticmethod
    def stream(like, stream):
        if stream is not None or like.device.type != "cuda":
            return stream
        import torch

        return torch.cuda.current_stream(like.device).cuda_stream


class _Foreign:
    name = "pagedflash"

    @staticmethod
    def prepare(x):
        return x

    @staticmethod
    def empty(shape, dtype, like):
        if hasattr(like, "__dlpack_device__"):  # the device without exporting the array
            device_type, device_id = like.__dlpack_device__()
            device = "cuda" if int(device_type) == _KDLCUDA else "cpu"
        else:  # array interfaces only: the import layer knows the device of a CUDA pointer
            _, _, device, device_id = _C.describe(like)
        return _C.empty(tuple(shape), dtype, device, int(device_id) if device == "cuda" else 0)

    @staticmethod
    def stream(like, stream):
        return stream


class _CuPy(_Foreign):
    """CuPy arrays: results are pagedflash.Tensor (DLPack), work goes on CuPy's current stream."""

    name = "cupy"

    @staticmethod
    def stream(like, stream):
        if stream is not None:
            return stream
        import cupy

        return cupy.cuda.get_current_stream().ptr or None


def prepare(x):
    """x ready for the C core, in its own library (see each library's prepare)."""
    return library_of(x).prepare(x)


def allocate(lib, shape, dtype, like, name):
    """A result of `shape` and `dtype` in `lib`, on `like`'s device. A dtype no result can have
    (an input of another dtype, e.g. a torch bool tensor as q) is a TypeError naming `name`;
    the C core then reports the input itself."""
    if dtype not in _RESULT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16 or float32, got {dtype}")
    return lib.empty(shape, dtype, like)


def library_of(x):
    if isinstance(x, np.ndarray):
        return _Numpy
    if is_torch(x):
        return _Torch
    if type(x).__module__.partition(".")[0] == "cupy":
        return _CuPy
    return _Foreign


def describe(x, name: str = "array"):
    """(shape, dtype name, device kind, device id) of any array pagedflash accepts; an error
    names the argument `name`."""
    if isinstance(x, np.ndarray) and x.dtype.kind in "fiu":
        return x.shape, x.dtype.name, "cpu", 0
    if is_torch(x):
        dev = x.device
        return tuple(x.shape), str(x.dtype).rpartition(".")[2], dev.type, dev.index or 0
    return _C.describe(x, name)
