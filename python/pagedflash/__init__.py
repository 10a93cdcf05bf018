"""pagedflash: exact softmax attention for training and serving.

FlashAttention forward/backward, flash decoding and paged attention over a
block-allocated KV cache, with a pure C core (always built, CPU backend) and
CUDA kernels (built when nvcc is present). Tensors come from NumPy, torch,
CuPy, JAX or any DLPack producer and results go back to the caller's library.

    import pagedflash
    out = pagedflash.flash_attn(q, k, v, causal=True)
    out = pagedflash.flash_attn_func(q, k, v, causal=True)   # flash-attn 2.x's signature

``import pagedflash`` never imports torch; ``pagedflash.torch`` does.
"""

from __future__ import annotations

try:
    from . import _C
except ImportError as e:
    import glob
    import os

    if glob.glob(os.path.join(__path__[0], "_C.*")):
        raise  # there, but it does not load
    # e.g. PYTHONPATH=python in a source tree that was installed, not built in place
    raise ImportError(
        f"pagedflash._C, the compiled extension, is not in {__path__[0]}: build it there "
        "(python setup.py build_ext --inplace) or import the installed pagedflash (drop PYTHONPATH)"
    ) from e
from ._C import CudaError, OutOfBlocks, Tensor
from .api import (
    dropout_mask,
    flash_attn,
    flash_attn_backward,
    flash_attn_varlen,
    flash_attn_varlen_backward,
    get_num_threads,
    set_num_threads,
)
from .block_manager import AllocStatus, BlockManager, BlockStats
from .flash_compat import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from .paged import copy_blocks, kv_cache_bytes, merge_attn_states, paged_attn, swap_blocks, write_kv_cache

__version__ = _C.build_info()["version"]

__all__ = [
    # training
    "flash_attn",
    "flash_attn_varlen",
    "flash_attn_backward",
    "flash_attn_varlen_backward",
    "dropout_mask",
    # serving
    "paged_attn",
    "merge_attn_states",
    "write_kv_cache",
    "copy_blocks",
    "swap_blocks",
    "kv_cache_bytes",
    "BlockManager",
    "AllocStatus",
    "BlockStats",
    # FlashAttention 2.x entry points (flash_compat.py)
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_with_kvcache",
    # types, errors, configuration
    "Tensor",
    "OutOfBlocks",
    "CudaError",
    "build_info",
    "get_num_threads",
    "set_num_threads",
]


def build_info() -> dict:
    """What was built and what this machine offers.

    Keys: version; cuda (the CUDA backend was compiled in); cuda_archs (compute
    capabilities compiled); cuda_note (why the build left CUDA out; "" when it is in);
    cuda_devices (GPUs the driver reports now, 0 without a driver); cpu_count; num_threads
    (the CPU backend's thread count); backends.
    """
    info = dict(_C.build_info())
    info["cuda"] = bool(info["cuda"])
    info["num_threads"] = get_num_threads()
    info["backends"] = ["cpu"] + (["cuda"] if info["cuda"] and info["cuda_devices"] > 0 else [])
    return info
