"""Interop: NumPy in -> NumPy out, torch in -> torch out, any other DLPack / array
interface producer -> pagedflash.Tensor, all without copying inputs."""

import ctypes
import gc

import numpy as np
import pytest

import pagedflash
from conftest import assert_close, naive_attention_lowp, randn, torch
from pagedflash import reference


def make(rng, b=1, sq=13, sk=17, h=4, hk=2, d=32):
    """float32 NumPy q, k, v from the suite's case builder (tests/conftest.py)."""
    return (
        randn(rng, (b, sq, h, d), "float32"),
        randn(rng, (b, sk, hk, d), "float32"),
        randn(rng, (b, sk, hk, d), "float32"),
    )


class DLPackOnly:
    """A producer that exposes only the DLPack protocol (like CuPy/JAX arrays do)."""

    def __init__(self, a, legacy=False):
        self._a = a
        self._legacy = legacy
        self.shape = a.shape

    def __dlpack__(self, stream=None, max_version=None, **kw):
        if self._legacy:
            if max_version is not None:
                raise TypeError("old producer: no max_version")
            return self._a.__dlpack__(stream=stream)
        return self._a.__dlpack__(stream=stream, max_version=max_version)

    def __dlpack_device__(self):
        return self._a.__dlpack_device__()


class ArrayInterfaceOnly:
    def __init__(self, a):
        self._a = a
        self.__array_interface__ = a.__array_interface__


def test_numpy_in_numpy_out(rng):
    q, k, v = make(rng)
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
    assert type(out) is np.ndarray and out.dtype == np.float32
    assert type(lse) is np.ndarray and lse.dtype == np.float32
    assert_close(out, reference.attention(q, k, v), dtype="float32")


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.filterwarnings("ignore:pagedflash.flash_attn. q, k or v requires grad")  # tests/test_torch.py
def test_torch_in_torch_out(rng, dtype):
    q, k, v = (torch.from_numpy(x).to(getattr(torch, dtype)) for x in make(rng))
    q.requires_grad_(True)  # viewed through the DLPack C exchange API: no detach() needed, no error
    out, lse = pagedflash.flash_attn(q, k, v, causal=True, return_lse=True)
    assert isinstance(out, torch.Tensor) and out.dtype == q.dtype and out.device == q.device
    assert isinstance(lse, torch.Tensor) and lse.dtype == torch.float32
    assert not out.requires_grad  # the functional API is not differentiable (pagedflash.torch is)
    naive = None if dtype == "float32" else naive_attention_lowp(q, k, v, causal=True)
    assert_close(out, reference.attention(q, k, v, causal=True), naive, dtype=dtype)
    # with an explicit stream the tensors go through __dlpack__(stream=), which torch refuses for a
    # tensor that requires grad: the binding exports a detached view; same result, bit for bit
    again = pagedflash.flash_attn(q, k, v, causal=True, stream=0)
    assert torch.equal(again, out)


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_torch_exchange_api_used():
    """torch publishes the DLPack C exchange API; the binding finds it (else every torch call would
    take the slower general path through Python)."""
    assert pagedflash._C.has_exchange_api(torch.empty(1))
    assert not pagedflash._C.has_exchange_api(np.empty(1))


@pytest.mark.parametrize("legacy", [False, True])
def test_dlpack_producer_gets_pagedflash_tensor(rng, legacy):
    q, k, v = make(rng)
    out = pagedflash.flash_attn(DLPackOnly(q, legacy), DLPackOnly(k, legacy), DLPackOnly(v, legacy))
    assert isinstance(out, pagedflash.Tensor)
    assert out.shape == q.shape and out.dtype == "float32" and out.device == "cpu"
    assert out.__dlpack_device__() == (1, 0)
    view = np.from_dlpack(out)
    assert view.ctypes.data == out.data_ptr, "np.from_dlpack must not copy"
    assert_close(view, reference.attention(q, k, v), dtype="float32")
    ai = np.asarray(out)  # through __array_interface__
    assert ai.ctypes.data == out.data_ptr
    del out
    gc.collect()
    assert np.isfinite(view).all()  # the capsule keeps the memory alive


def test_array_interface_producer(rng):
    q, k, v = make(rng)
    out = pagedflash.flash_attn(*(ArrayInterfaceOnly(x) for x in (q, k, v)))
    assert isinstance(out, pagedflash.Tensor)
    assert_close(np.asarray(out), reference.attention(q, k, v), dtype="float32")


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_pagedflash_tensor_to_torch_zero_copy(rng):
    q, k, v = make(rng)
    out = pagedflash.flash_attn(DLPackOnly(q), DLPackOnly(k), DLPackOnly(v))
    t = torch.from_dlpack(out)
    assert t.data_ptr() == out.data_ptr and t.dtype == torch.float32
    assert_close(t, reference.attention(q, k, v), dtype="float32")


@pytest.mark.skipif(torch is None, reason="needs torch")
def test_pagedflash_tensor_bfloat16_to_torch(rng):
    q, k, v = (torch.from_numpy(x).bfloat16() for x in make(rng))
    out = pagedflash.flash_attn(*(DLPackOnly(x) for x in (q, k, v)))
    assert out.dtype == "bfloat16"
    t = torch.from_dlpack(out)
    assert t.dtype == torch.bfloat16 and t.data_ptr() == out.data_ptr
    assert torch.equal(t, pagedflash.flash_attn(q, k, v))


def test_empty_tensor_roundtrip():
    t = pagedflash._C.empty((3, 0, 2), "float16")
    a = np.from_dlpack(t)
    assert a.shape == (3, 0, 2) and a.dtype == np.float16


def test_inputs_are_not_copied(rng):
    """A non-contiguous but last-dim-contiguous NumPy view is read in place: writing the
    base array between two calls changes the result."""
    q, k, v = make(rng)
    base = np.ascontiguousarray(np.concatenate([k, k], axis=2))
    kv = base[:, :, ::2]
    a = pagedflash.flash_attn(q, kv, v)
    base[...] = rng.standard_normal(base.shape)
    b = pagedflash.flash_attn(q, kv, v)
    assert not np.array_equal(a, b)
    assert_close(b, reference.attention(q, kv, v), dtype="float32")


# ---- a hand-built DLPack capsule: byte_offset, strides, and the deleter called once ----


class _DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", _DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", _DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


class _DLVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class _DLManagedVersioned(ctypes.Structure):
    pass


_DELETER = ctypes.CFUNCTYPE(None, ctypes.POINTER(_DLManagedVersioned))
_DLManagedVersioned._fields_ = [
    ("version", _DLVersion),
    ("manager_ctx", ctypes.c_void_p),
    ("deleter", _DELETER),
    ("flags", ctypes.c_uint64),
    ("dl_tensor", _DLTensor),
]


class HandMadeProducer:
    """Exports `base[offset_elems:]` viewed as `shape` with `strides` (elements) through a
    versioned capsule whose data pointer is the base and whose byte_offset is non-zero."""

    def __init__(self, base, offset_elems, shape, strides, readonly=False):
        self.base = base
        self.deleted = 0
        self.exported = 0
        self._shape = (ctypes.c_int64 * len(shape))(*shape)
        self._strides = None if strides is None else (ctypes.c_int64 * len(shape))(*strides)
        self._deleter = _DELETER(self._on_delete)
        m = _DLManagedVersioned()
        m.version = _DLVersion(1, 0)
        m.deleter = self._deleter
        m.flags = 1 if readonly else 0
        m.dl_tensor = _DLTensor(
            base.ctypes.data,
            _DLDevice(1, 0),
            len(shape),
            _DLDataType(2, 32, 1),
            self._shape,
            self._strides,
            offset_elems * 4,
        )
        self._m = m

    def _on_delete(self, ptr):
        self.deleted += 1

    def __dlpack_device__(self):
        return (1, 0)

    def __dlpack__(self, stream=None, max_version=None, **kw):
        self.exported += 1
        new = ctypes.pythonapi.PyCapsule_New
        new.restype = ctypes.py_object
        new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
        return new(ctypes.addressof(self._m), b"dltensor_versioned", None)


def test_dlpack_byte_offset_strides_and_deleter(rng):
    b, s, h, d = 1, 9, 2, 16
    base = rng.standard_normal(1000).astype(np.float32)
    off = 37
    # q: [b, s, h, d] with a padded token stride of 40 elements
    shape, strides = (b, s, h, d), (s * 40, 40, d, 1)
    prod = HandMadeProducer(base, off, shape, strides)
    q_np = np.lib.stride_tricks.as_strided(base[off:], shape, [x * 4 for x in strides])
    k = rng.standard_normal((b, 11, h, d)).astype(np.float32)
    out = np.full((b, s, h, d), np.nan, np.float32)
    pagedflash.flash_attn(prod, k, k, out=out)
    assert_close(out, reference.attention(q_np, k, k), dtype="float32")
    assert prod.exported >= 1 and prod.deleted == prod.exported, "each capsule's deleter runs exactly once"


def test_dlpack_null_strides_compact(rng):
    base = rng.standard_normal(64 * 4 + 8).astype(np.float32)
    prod = HandMadeProducer(base, 8, (1, 4, 2, 32), None)
    k = rng.standard_normal((1, 5, 2, 32)).astype(np.float32)
    out = pagedflash.flash_attn(prod, k, k)
    q_np = base[8 : 8 + 256].reshape(1, 4, 2, 32)
    assert_close(out, reference.attention(q_np, k, k), dtype="float32")
    assert prod.exported >= 1 and prod.deleted == prod.exported


def test_dlpack_readonly_output_refused(rng):
    q, k, v = make(rng, d=16)
    base = np.full(q.size, 7.0, np.float32)
    prod = HandMadeProducer(base, 0, q.shape, None, readonly=True)
    with pytest.raises(ValueError, match="out: the array is read-only"):
        pagedflash.flash_attn(q, k, v, out=prod)
    assert np.all(base == 7.0)
    assert prod.exported >= 1 and prod.deleted == prod.exported
