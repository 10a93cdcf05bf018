"""copy_blocks on every backend: whole blocks of every layer's caches copied pair by pair in
order (copy-on-write), in place, bit for bit; host-resident mappings checked before any copy,
device-resident ones bound-checked by the CUDA kernel."""

from __future__ import annotations

import numpy as np
import pytest

import pagedflash
from conftest import DTYPES, cases, cuda_only, randn, torch

from .test_write_kv_cache import raw


def expected(cache, pairs):
    e = raw(cache).copy()
    for s, t in pairs:
        e[t] = e[s]
    return e


@cases(
    "dtype,device_mapping", cpu=[(dt, False) for dt in DTYPES], cuda=[(dt, m) for dt in DTYPES for m in (False, True)]
)
def test_copy_blocks_layers(backend, rng, dtype, device_mapping):
    layers, nb, bs, hk, d = 3, 12, 16, 2, 24
    ks = [backend.randn(rng, (nb, bs, hk, d), dtype) for _ in range(layers)]
    vs = [backend.randn(rng, (nb, bs, hk, d), dtype) for _ in range(layers)]
    # in order: 1 -> 4, then 4 -> 7 (sees the copy), 2 -> 2 (no-op), 9 -> 0, 11 -> 5
    pairs = np.array([[1, 4], [4, 7], [2, 2], [9, 0], [11, 5]], np.int64)
    expect = [expected(c, pairs) for c in ks + vs]
    pagedflash.copy_blocks(ks, vs, backend.put(pairs) if device_mapping else pairs)
    for c, e in zip(ks + vs, expect):
        np.testing.assert_array_equal(raw(c), e)
    # a list of pairs works too
    pagedflash.copy_blocks(ks, vs, [(0, 3)])
    for c in ks + vs:
        np.testing.assert_array_equal(raw(c)[3], raw(c)[0])


@cuda_only
def test_copy_blocks_mixed_dtypes_across_layers(backend, rng):
    """Caches of different dtypes in one call (bfloat16 keys, float16 values), device mapping."""
    ks = [backend.randn(rng, (12, 16, 2, 64), "bfloat16") for _ in range(3)]
    vs = [backend.randn(rng, (12, 16, 2, 64), "float16") for _ in range(3)]
    pairs = np.array([[0, 5], [5, 7], [3, 3], [9, 0], [11, 2]], dtype=np.int64)
    expect = [expected(c, pairs) for c in ks + vs]
    pagedflash.copy_blocks(ks, vs, backend.put(pairs))
    for c, e in zip(ks + vs, expect):
        np.testing.assert_array_equal(raw(c), e)


def test_copy_blocks_many_caches_and_layouts(backend, rng):
    """More caches than one import batch holds; a non-contiguous (block-strided) cache view whose
    neighbouring rows stay untouched."""
    nb, bs, hk, d = 6, 4, 2, 8
    caches = [backend.randn(rng, (nb, bs, hk, d), "float32") for _ in range(70)]
    big = backend.randn(rng, (nb, bs, hk + 1, d), "float32")
    view = big[:, :, 1:]  # blocks are not contiguous
    head0 = raw(big)[:, :, 0].copy()
    expect = [expected(c, [(2, 5)]) for c in caches + [view]]
    pagedflash.copy_blocks(caches[:35], caches[35:] + [view], np.array([[2, 5]], np.int64))
    for c, e in zip(caches + [view], expect):
        np.testing.assert_array_equal(raw(c), e)
    np.testing.assert_array_equal(raw(big)[:, :, 0], head0)


@cuda_only
def test_copy_blocks_many_pairs_and_bad_device_ids(backend, rng):
    """250 host pairs (more than one launch's worth); a device mapping with ids out of range:
    those pairs are skipped, the others copied."""
    nb = 300
    kc = backend.randn(rng, (nb, 8, 1, 32), "float32")
    pairs = np.stack([rng.permutation(nb)[:250], rng.permutation(nb)[:250]], axis=1).astype(np.int64)
    exp = expected(kc, pairs)
    pagedflash.copy_blocks([kc], [], pairs)
    np.testing.assert_array_equal(raw(kc), exp)
    bad = np.array([[1, 2], [-1, 3], [4, nb + 9], [5, 6]], dtype=np.int64)
    exp = expected(kc, [(1, 2), (5, 6)])
    pagedflash.copy_blocks([kc], [], backend.put(bad))
    np.testing.assert_array_equal(raw(kc), exp)


def test_copy_blocks_bad_input(backend, rng):
    """Host mappings: every id is checked against every cache before any copy."""
    ks = [backend.randn(rng, (8, 4, 2, 8), "float32") for _ in range(2)]
    vs = [backend.randn(rng, (8, 4, 2, 8), "float32"), backend.randn(rng, (5, 4, 2, 8), "float32")]
    before = [raw(c).copy() for c in ks + vs]
    for exc, match, mapping in (
        (ValueError, r"block_mapping\[1, 1\].*caches\[3\]", np.array([[0, 1], [2, 6]], np.int64)),  # 6 >= 5 blocks
        (ValueError, r"block_mapping\[0, 0\]", np.array([[-1, 1]], np.int64)),
        (TypeError, "block_mapping.*int64", np.array([[0, 1]], np.int32)),
        (ValueError, r"block_mapping.*\[n, 2\]", np.array([[0, 1, 2]], np.int64)),
    ):
        with pytest.raises(exc, match=match):
            pagedflash.copy_blocks(ks, vs, mapping)
        assert all(np.array_equal(raw(c), b) for c, b in zip(ks + vs, before)), match


@pytest.mark.skipif(torch is None, reason="needs torch")
@pytest.mark.parametrize("stream", [None, 0])
def test_copy_blocks_many_torch_caches(rng, stream):
    """70 torch caches (more than one import batch holds) through the DLPack C exchange API
    (stream None) and through __dlpack__ with a named stream (0: the legacy default stream, the
    path that exports detached views): every cache copied, one import each."""
    caches = [randn(rng, (5, 4, 2, 8), "float32", lib="torch") for _ in range(70)]
    expect = [expected(c, [(1, 3), (4, 0)]) for c in caches]
    pagedflash.copy_blocks(caches[:35], caches[35:], np.array([[1, 3], [4, 0]], np.int64), stream=stream)
    for c, e in zip(caches, expect):
        np.testing.assert_array_equal(raw(c), e)
