"""Developer harness: pf_cuda_flash_bwd through ctypes, for branches where the Python
binding of the backward (pagedflash.flash_attn_backward) has not landed yet.

It links the CUDA objects of an in-place build (PAGEDFLASH_CUDA_OBJ_DIR, default
build/cuda_obj) with the core's error/validation C files into build/libpf_cuda_test.so,
and exposes flash_attn_backward(dout, q, k, v, out, lse, **options) -> (dq, dk, dv)
for torch CUDA tensors on the current stream, after pf_flash_bwd_validate.
tests/test_gpu_attention.py uses it only when PAGEDFLASH_CUDA_TESTLIB=1 and the real
binding is missing. Not part of the package.
"""
from __future__ import annotations

import ctypes
import glob
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_LIB = None


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("dtype", ctypes.c_int), ("device", ctypes.c_int),
                ("device_id", ctypes.c_int32), ("ndim", ctypes.c_int32), ("shape", ctypes.c_int64 * 8),
                ("strides", ctypes.c_int64 * 8)]


class _Params(ctypes.Structure):
    _fields_ = [("q", _Tensor), ("k", _Tensor), ("v", _Tensor), ("out", _Tensor), ("lse", _Tensor),
                ("cu_seqlens_q", _Tensor), ("cu_seqlens_k", _Tensor), ("max_seqlen_q", ctypes.c_int64),
                ("max_seqlen_k", ctypes.c_int64), ("alibi_slopes", _Tensor), ("dout", _Tensor), ("dq", _Tensor),
                ("dk", _Tensor), ("dv", _Tensor), ("softmax_scale", ctypes.c_float), ("causal", ctypes.c_int32),
                ("window_left", ctypes.c_int32), ("window_right", ctypes.c_int32), ("softcap", ctypes.c_float),
                ("dropout_p", ctypes.c_float), ("seed", ctypes.c_uint64), ("offset", ctypes.c_uint64),
                ("deterministic", ctypes.c_int32), ("num_threads", ctypes.c_int32), ("stream", ctypes.c_void_p)]


def _lib():
    global _LIB
    if _LIB is not None:
        return _LIB
    obj_dir = Path(os.environ.get("PAGEDFLASH_CUDA_OBJ_DIR") or ROOT / "build" / "cuda_obj")
    if not obj_dir.is_absolute():
        obj_dir = ROOT / obj_dir
    out = ROOT / "build" / "libpf_cuda_test.so"
    objs = sorted(glob.glob(str(obj_dir / "*.o")))
    homes = [os.environ.get("CUDA_HOME", ""), "/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"))]
    libs = [Path(h) / sub for h in homes if h for sub in ("lib64", "targets/x86_64-linux/lib")]
    cuda_lib = next((d for d in libs if (d / "libcudart_static.a").exists()), Path("/usr/local/cuda/lib64"))
    cmd = ["gcc", "-shared", "-fPIC", "-O2", "-o", str(out), *objs,
           str(ROOT / "csrc/core/error.c"), str(ROOT / "csrc/core/validate_attn.c"),
           "-I" + str(ROOT / "csrc/include"), "-I" + str(ROOT / "csrc/core"), "-DPF_WITH_CUDA",
           "-L" + str(cuda_lib), "-lcudart_static", "-lstdc++", "-lpthread", "-ldl", "-lrt"]
    subprocess.run(cmd, check=True)
    _LIB = ctypes.CDLL(str(out))
    _LIB.pf_cuda_flash_bwd.restype = ctypes.c_int
    _LIB.pf_flash_bwd_validate.restype = ctypes.c_int
    _LIB.pf_last_error.restype = ctypes.c_char_p
    return _LIB


def _view(x):
    import torch

    t = _Tensor()
    if x is None:
        return t
    codes = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.int32: 4}
    t.data = x.data_ptr()
    t.dtype = codes[x.dtype]
    t.device = 2 if x.is_cuda else 1
    t.device_id = x.device.index or 0
    t.ndim = x.dim()
    for i in range(x.dim()):
        t.shape[i] = x.shape[i]
        t.strides[i] = x.stride(i)
    return t


def flash_attn_backward(dout, q, k, v, out, lse, *, causal=False, softmax_scale=None, window=(-1, -1), softcap=0.0,
                        alibi_slopes=None, dropout_p=0.0, seed=0, offset=0, deterministic=False, dq=None, dk=None,
                        dv=None, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=0, max_seqlen_k=0):
    import torch

    lib = _lib()
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    p = _Params()
    p.q, p.k, p.v, p.out, p.lse = _view(q), _view(k), _view(v), _view(out), _view(lse)
    p.cu_seqlens_q, p.cu_seqlens_k = _view(cu_seqlens_q), _view(cu_seqlens_k)
    p.max_seqlen_q, p.max_seqlen_k = max_seqlen_q, max_seqlen_k
    p.alibi_slopes = _view(alibi_slopes)
    p.dout, p.dq, p.dk, p.dv = _view(dout), _view(dq), _view(dk), _view(dv)
    p.softmax_scale = 0.0 if softmax_scale is None else softmax_scale
    p.causal = int(causal)
    p.window_left, p.window_right = window
    p.softcap = softcap
    p.dropout_p = dropout_p
    p.seed = seed & 0xFFFFFFFFFFFFFFFF
    p.offset = offset
    p.deterministic = int(deterministic)
    p.stream = torch.cuda.current_stream(q.device).cuda_stream
    st = lib.pf_flash_bwd_validate(ctypes.byref(p))
    if st == 0:
        st = lib.pf_cuda_flash_bwd(ctypes.byref(p))
    if st != 0:
        raise RuntimeError(f"pf_cuda_flash_bwd status {st}: {lib.pf_last_error().decode()}")
    return dq, dk, dv
