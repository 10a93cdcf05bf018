"""swap_blocks on every backend: whole blocks from one cache to another (swap out to / in from
host memory), bit for bit; on the CPU backend host <-> host, on CUDA device <-> pinned or
pageable host memory on a side stream; block-strided views; bad input leaves dst untouched."""

from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from conftest import DTYPES, cases, randn, torch

from .test_write_kv_cache import raw


def host_cache(backend, rng, shape, dtype, pinned=True):
    """A host cache: NumPy / torch CPU on the CPU backend, a (pinned) torch CPU tensor on CUDA."""
    x = randn(rng, shape, dtype, lib="torch" if backend.is_cuda else None)
    return x.pin_memory() if backend.is_cuda and pinned else x


@cases("dtype", cpu=DTYPES, cuda=DTYPES)
def test_swap_out_and_in(backend, rng, dtype):
    dev = backend.randn(rng, (12, 16, 2, 32), dtype)  # the device cache (host memory on the CPU backend)
    host = host_cache(backend, rng, (7, 16, 2, 32), dtype)
    dev0, host0 = raw(dev).copy(), raw(host).copy()
    out_map = np.array([[2, 0], [3, 1], [4, 2], [11, 6]], np.int64)  # swap out: a run of 3 + 1
    side = torch.cuda.Stream() if backend.is_cuda else None
    if side is not None:
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            pagedflash.swap_blocks(dev, host, out_map)
        side.synchronize()
    else:
        pagedflash.swap_blocks(dev, host, out_map)
    exp = host0.copy()
    for a, b in out_map:
        exp[b] = dev0[a]
    np.testing.assert_array_equal(raw(host), exp)
    in_map = np.array([[0, 9], [6, 1]], np.int64)  # swap in: host -> device
    pagedflash.swap_blocks(host, dev, in_map)
    backend.sync()
    exp_dev = dev0.copy()
    for a, b in in_map:
        exp_dev[b] = exp[a]
    np.testing.assert_array_equal(raw(dev), exp_dev)
    if backend.is_cuda:  # pageable host memory works too (the copy is staged by the CUDA runtime)
        pageable = torch.zeros_like(host)
        pagedflash.swap_blocks(dev, pageable, np.array([[8, 3]], np.int64))
        torch.cuda.synchronize()
        np.testing.assert_array_equal(raw(pageable)[3], exp_dev[8])


def test_swap_blocks_strided_view(backend, rng):
    """The k half of a combined [num_blocks, 2, bs, hk, d] cache: strided blocks, contiguous rows."""
    kv = backend.randn(rng, (5, 2, 8, 2, 32), "float16")
    host = (
        torch.zeros((4, 8, 2, 32), dtype=torch.float16).pin_memory()
        if backend.is_cuda
        else np.zeros((4, 8, 2, 32), np.float16)
    )
    pagedflash.swap_blocks(kv[:, 0], host, np.array([[1, 0], [2, 1], [4, 3]], np.int64))
    backend.sync()
    h, k = raw(host), raw(kv)
    assert np.array_equal(h[0], k[1, 0]) and np.array_equal(h[1], k[2, 0]) and np.array_equal(h[3], k[4, 0])
    assert np.all(h[2] == 0)


def test_swap_blocks_bad_input(backend, rng):
    src = backend.randn(rng, (6, 4, 2, 8), "float32")
    dst = host_cache(backend, rng, (3, 4, 2, 8), "float32")
    before = (raw(src).copy(), raw(dst).copy())
    half = (lambda x: x.half()) if backend.is_cuda else (lambda x: x.astype(np.float16))
    for exc, match, args in (
        (ValueError, r"block_mapping\[1, 1\].*dst", (src, dst, np.array([[0, 0], [1, 3]], np.int64))),
        (ValueError, r"block_mapping\[0, 0\].*src", (src, dst, np.array([[6, 0]], np.int64))),
        (TypeError, "dst.*dtype", (src, half(dst), np.array([[0, 0]], np.int64))),
        (ValueError, "dst.*block shape", (src, dst[:, :2], np.array([[0, 0]], np.int64))),
    ):
        with pytest.raises(exc, match=match):
            pagedflash.swap_blocks(*args)
        assert np.array_equal(raw(src), before[0]) and np.array_equal(raw(dst), before[1]), match
