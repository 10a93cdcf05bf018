"""Hand-built array producers for the robustness and fuzz tests.

`Crafted` is a DLPack producer whose capsule is built with ctypes from fields the test
chooses as they are: a NULL or negative shape, an ndim out of range, strides that overflow,
a NULL, misaligned or offset data pointer, any dtype code and device, the versioned
("dltensor_versioned") or the legacy ("dltensor") capsule. Every export gets its own
DLManagedTensor(Versioned), and its deleter counts the calls (`exported`, `deleted`), so a
test can assert that each capsule was deleted exactly once, whether the consumer took it
(and then must call the deleter) or left it (then the capsule's destructor does). Other
deleters: "clear" / "nomemory" are CPython's PyErr_Clear / PyErr_NoMemory themselves (a
C deleter that clears, or sets, the Python error state), "null" a NULL deleter.

The capsule destructor is Python code (a ctypes callback): a consumer that destroys an unconsumed
capsule while an exception is pending (NumPy's from_dlpack after refusing one) has that exception
cleared by ctypes; pagedflash's own consumer fetches the error first, so its calls are unaffected.

`Interface` is an `__array_interface__` (or `__cuda_array_interface__`) producer whose
dict is given as is, e.g. a NULL (0) data pointer with a nonzero size.
"""

from __future__ import annotations

import ctypes
from typing import Any, Optional

import numpy as np

# ---- the DLPack ABI (dmlc/dlpack v1.0 and the legacy struct) ----


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.c_void_p),
        ("strides", ctypes.c_void_p),
        ("byte_offset", ctypes.c_uint64),
    ]


class DLManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", DLTensor), ("manager_ctx", ctypes.c_void_p), ("deleter", ctypes.c_void_p)]


class DLPackVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_uint32), ("minor", ctypes.c_uint32)]


class DLManagedTensorVersioned(ctypes.Structure):
    _fields_ = [
        ("version", DLPackVersion),
        ("manager_ctx", ctypes.c_void_p),
        ("deleter", ctypes.c_void_p),
        ("flags", ctypes.c_uint64),
        ("dl_tensor", DLTensor),
    ]


READ_ONLY = 1  # DLPACK_FLAG_BITMASK_READ_ONLY

# (code, bits, lanes); kDLInt 0, kDLUInt 1, kDLFloat 2, kDLBfloat 4, kDLComplex 5, kDLBool 6
DL_DTYPES = {
    "float32": (2, 32, 1),
    "float16": (2, 16, 1),
    "bfloat16": (4, 16, 1),
    "float64": (2, 64, 1),
    "int32": (0, 32, 1),
    "int64": (0, 64, 1),
    "uint8": (1, 8, 1),
    "int8": (0, 8, 1),
    "bool": (6, 8, 1),
    "complex64": (5, 64, 1),
    "float32x2": (2, 32, 2),
}
ITEMSIZE = {name: bits // 8 * lanes for name, (_, bits, lanes) in DL_DTYPES.items()}

_py = ctypes.pythonapi
_py.PyCapsule_New.restype = ctypes.py_object
_py.PyCapsule_New.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
_py.PyCapsule_GetName.restype = ctypes.c_char_p
_py.PyCapsule_GetName.argtypes = [ctypes.c_void_p]
_py.PyCapsule_GetPointer.restype = ctypes.c_void_p
_py.PyCapsule_GetPointer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]

_DELETER = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_CALL_C_DELETER = ctypes.PYFUNCTYPE(None, ctypes.c_void_p)  # keeps the GIL (the CPython ones need it)

# CPython functions without parameters used as deleters: the extra argument a deleter gets is
# ignored by the C calling convention.
C_DELETERS = {
    "clear": ctypes.cast(_py.PyErr_Clear, ctypes.c_void_p).value,
    "nomemory": ctypes.cast(_py.PyErr_NoMemory, ctypes.c_void_p).value,
}


class _Export:
    """One capsule's DLManagedTensor and what it points to, alive until its deleter runs."""

    __slots__ = ("producer", "managed", "shape", "strides", "deleter")

    def __init__(self, producer, managed, shape, strides, deleter):
        self.producer, self.managed, self.shape, self.strides, self.deleter = producer, managed, shape, strides, deleter


_LIVE: dict[int, _Export] = {}  # address of a DLManagedTensor(Versioned) -> its export
stray_deletes = [0]  # deleter calls for an export that was deleted already (or unknown)


def _on_delete(address):
    exp = _LIVE.pop(address, None)
    if exp is None:
        stray_deletes[0] += 1
    else:
        exp.producer.deleted += 1


_COUNTING_DELETER = _DELETER(_on_delete)
_COUNTING_DELETER_ADDRESS = ctypes.cast(_COUNTING_DELETER, ctypes.c_void_p).value


def _capsule_destructor(capsule):
    """A capsule the consumer did not take (its name unchanged): run its deleter."""
    name = _py.PyCapsule_GetName(capsule)
    if name not in (b"dltensor", b"dltensor_versioned"):
        return
    address = _py.PyCapsule_GetPointer(capsule, name)
    exp = _LIVE.get(address)
    if exp is None:
        stray_deletes[0] += 1
    elif exp.deleter == "count":
        _on_delete(address)
    elif exp.deleter != "null":
        _LIVE.pop(address, None)
        _CALL_C_DELETER(C_DELETERS[exp.deleter])(address)


_CAPSULE_DESTRUCTOR = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_capsule_destructor)
_CAPSULE_DESTRUCTOR_ADDRESS = ctypes.cast(_CAPSULE_DESTRUCTOR, ctypes.c_void_p).value


def _int64_array(values):
    return (ctypes.c_int64 * max(1, len(values)))(*[int(v) for v in values])


class Crafted:
    """A DLPack producer whose every export reports exactly the given fields.

    base: a NumPy array owning the memory (kept alive); data: the data pointer (default
    base's address; 0 = NULL); shape: the dims (default base's shape when neither shape nor
    ndim is given, else None = a NULL shape pointer); ndim: the
    reported rank (default len(shape)); strides in elements (None = NULL, compact);
    dtype: a key of DL_DTYPES or a (code, bits, lanes) tuple; device: (type, id) (1 = CPU,
    2 = CUDA, 3 = CUDA host); versioned: the "dltensor_versioned" capsule (version major
    `major`, flags READ_ONLY when readonly) or the legacy "dltensor" one; deleter: "count",
    "clear", "nomemory" or "null" (see the module docstring); legacy_protocol: __dlpack__
    takes no max_version (a producer that predates it).
    """

    def __init__(
        self,
        base: Optional[np.ndarray] = None,
        *,
        shape: Optional[tuple] = None,
        ndim: Optional[int] = None,
        strides: Optional[tuple] = None,
        dtype: Any = "float32",
        data: Optional[int] = None,
        byte_offset: int = 0,
        device: tuple = (1, 0),
        versioned: bool = True,
        major: int = 1,
        readonly: bool = False,
        deleter: str = "count",
        legacy_protocol: bool = False,
    ):
        if shape is None and base is not None and ndim is None:
            shape = base.shape
        self.base = base
        self.shape = None if shape is None else tuple(int(x) for x in shape)
        self.ndim = len(self.shape) if ndim is None else int(ndim)
        self.strides = None if strides is None else tuple(int(x) for x in strides)
        self.dtype = DL_DTYPES[dtype] if isinstance(dtype, str) else tuple(dtype)
        if data is None:
            data = 0 if base is None else base.ctypes.data
        self.data = int(data)
        self.byte_offset = int(byte_offset)
        self.device = tuple(device)
        self.versioned = versioned
        self.major = major
        self.readonly = readonly
        self.deleter = deleter
        self.legacy_protocol = legacy_protocol
        self.exported = 0
        self.deleted = 0

    def __repr__(self):
        return (
            f"Crafted(shape={self.shape}, ndim={self.ndim}, strides={self.strides}, dtype={self.dtype}, "
            f"data={'NULL' if not self.data else 'base+' + str(self.data - self._base_address())}, "
            f"byte_offset={self.byte_offset}, device={self.device}, "
            f"{'versioned v' + str(self.major) if self.versioned else 'legacy'}, readonly={self.readonly}, "
            f"deleter={self.deleter})"
        )

    def _base_address(self) -> int:
        return 0 if self.base is None else self.base.ctypes.data

    def __dlpack_device__(self):
        return self.device

    def __dlpack__(self, stream=None, max_version=None, dl_device=None, copy=None, **unknown):
        if self.legacy_protocol and max_version is not None:
            raise TypeError("__dlpack__() got an unexpected keyword argument 'max_version'")
        shape = None if self.shape is None else _int64_array(self.shape)
        strides = None if self.strides is None else _int64_array(self.strides)
        t = DLTensor()
        t.data = self.data or None
        t.device = DLDevice(*self.device)
        t.ndim = self.ndim
        t.dtype = DLDataType(*self.dtype)
        t.shape = None if shape is None else ctypes.addressof(shape)
        t.strides = None if strides is None else ctypes.addressof(strides)
        t.byte_offset = self.byte_offset % 2**64
        if self.deleter == "count":
            address = _COUNTING_DELETER_ADDRESS
        elif self.deleter == "null":
            address = None
        else:
            address = C_DELETERS[self.deleter]
        if self.versioned:
            m = DLManagedTensorVersioned()
            m.version = DLPackVersion(self.major, 0)
            m.flags = READ_ONLY if self.readonly else 0
            name = b"dltensor_versioned"
        else:
            m = DLManagedTensor()
            name = b"dltensor"
        m.dl_tensor = t
        m.deleter = address
        _LIVE[ctypes.addressof(m)] = _Export(self, m, shape, strides, self.deleter)
        self.exported += 1
        return _py.PyCapsule_New(ctypes.addressof(m), name, _CAPSULE_DESTRUCTOR_ADDRESS)

    def balanced(self) -> bool:
        """Every export deleted exactly once (counting deleter only)."""
        return self.deleted == self.exported


def honest(a: np.ndarray, **kw) -> Crafted:
    """A truthful DLPack export of NumPy array `a` (its shape, strides, dtype and memory)."""
    name = "bfloat16" if a.dtype.name == "bfloat16" else a.dtype.name
    return Crafted(a, shape=a.shape, strides=tuple(s // a.itemsize for s in a.strides), dtype=name, **kw)


class Interface:
    """An array-interface producer: `__array_interface__` (or, with cuda=True,
    `__cuda_array_interface__`) is `iface` exactly as given; `base` keeps memory alive."""

    def __init__(self, iface: dict, base: Optional[np.ndarray] = None, cuda: bool = False):
        self.base = base
        if cuda:
            self.__cuda_array_interface__ = iface
        else:
            self.__array_interface__ = iface

    def __repr__(self):
        iface = getattr(self, "__array_interface__", None) or getattr(self, "__cuda_array_interface__", None)
        shown = dict(iface or {})
        if isinstance(shown.get("data"), tuple) and self.base is not None and shown["data"][0]:
            shown["data"] = (f"base+{shown['data'][0] - self.base.ctypes.data}", shown["data"][1])
        return f"Interface({shown})"


def interface_of(a: np.ndarray, **overrides) -> Interface:
    """An Interface that reports `a` truthfully, with some fields overridden (e.g. data=(0, False))."""
    iface = dict(a.__array_interface__)
    iface.update(overrides)
    return Interface(iface, base=a)
