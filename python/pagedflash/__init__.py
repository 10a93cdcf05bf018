"""pagedflash: exact softmax attention for training and serving.

FlashAttention forward/backward, flash decoding and paged attention over a
block-allocated KV cache, with a pure C core (always built, CPU backend) and
CUDA kernels (built when nvcc is present). Tensors come from NumPy, torch,
CuPy, JAX or any DLPack producer and results go back to the caller's library.

    import pagedflash
    out = pagedflash.flash_attn(q, k, v, causal=True)

``import pagedflash`` never imports torch; ``pagedflash.torch`` does.
"""
from __future__ import annotations

from . import _C
from ._C import CudaError, OutOfBlocks, Tensor
from .api import flash_attn, flash_attn_varlen, get_num_threads, set_num_threads

__version__ = _C.build_info()["version"]

__all__ = [
    "CudaError",
    "OutOfBlocks",
    "Tensor",
    "build_info",
    "flash_attn",
    "flash_attn_varlen",
    "get_num_threads",
    "set_num_threads",
]


def build_info() -> dict:
    """What was built and what this machine offers.

    Keys: version; cuda (the CUDA backend was compiled in); cuda_archs (compute
    capabilities compiled); cuda_devices (GPUs the driver reports now, 0 without a
    driver); cpu_count; num_threads (the CPU backend's thread count); backends.
    """
    info = dict(_C.build_info())
    info["cuda"] = bool(info["cuda"])
    info["num_threads"] = get_num_threads()
    info["backends"] = ["cpu"] + (["cuda"] if info["cuda"] and info["cuda_devices"] > 0 else [])
    return info

# serving operations (paged attention, flash decoding, merge, KV-cache ops)
from .paged import copy_blocks, merge_attn_states, paged_attn, swap_blocks, write_kv_cache  # noqa: E402

__all__ += ["copy_blocks", "merge_attn_states", "paged_attn", "swap_blocks", "write_kv_cache"]
