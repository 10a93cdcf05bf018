"""Regression tests of the robustness findings of issue 13 (and of what tests/test_fuzz.py found
since): each asserts the exact exception type, a message naming the argument, and that every
output and cache passed in is bitwise unchanged after the failed call; each failed in its
finding's way before the fix (a crash, another exception type, a wrong or unwritten result).

Tests whose old behaviour was a segmentation fault run their body in a forked child
(`isolated`), so a regression fails that test, naming the signal, instead of ending the run.
Producers that report arbitrary fields come from tests/producers.py (ctypes-built DLPack
capsules with a deleter that counts its calls, and array interfaces given as is).
"""

from __future__ import annotations

import functools
import os
import signal
import sys
import traceback
import tracemalloc

import numpy as np
import pytest

import pagedflash
from conftest import assert_close, check_grads, check_lse, naive_attention_lowp, poison_like, randn, torch
from pagedflash import _C, reference

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from producers import Crafted, honest, interface_of, stray_deletes  # noqa: E402

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def isolated(test):
    """Run the test body in a forked child process: a crash there fails this test, naming the
    signal, and the rest of the session goes on."""

    @functools.wraps(test)
    def wrapper(*args, **kwargs):
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run, report, leave without running pytest's exit handlers
            os.close(r)
            code = 0
            try:
                test(*args, **kwargs)
                report = b""
            except BaseException:  # noqa: BLE001 - every failure goes to the parent
                report = traceback.format_exc().encode()
                code = 1
            view = memoryview(report)
            while view:
                view = view[os.write(w, view) :]
            os._exit(code)
        os.close(w)
        chunks = []
        while chunk := os.read(r, 65536):
            chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            pytest.fail(f"the call crashed the process ({signal.Signals(os.WTERMSIG(status)).name})")
        report = b"".join(chunks).decode("utf-8", "replace")
        if report or os.WEXITSTATUS(status):
            pytest.fail(f"in the isolated child:\n{report}", pytrace=False)

    return wrapper


def qkv(rng, b=2, sq=5, sk=7, h=4, hk=2, d=16, dtype="float32", lib=None):
    return (
        randn(rng, (b, sq, h, d), dtype, lib=lib),
        randn(rng, (b, sk, hk, d), dtype, lib=lib),
        randn(rng, (b, sk, hk, d), dtype, lib=lib),
    )


def snapshot(*arrays):
    """The bytes of each array (NumPy or torch), for a bitwise, NaN-aware comparison."""
    out = []
    for a in arrays:
        if torch is not None and isinstance(a, torch.Tensor):
            a = a.detach().reshape(-1).contiguous().view(torch.uint8).numpy()
        out.append(np.array(a, copy=True).tobytes())
    return out


def unchanged(before, *arrays):
    assert snapshot(*arrays) == before, "a failed call modified an output, a cache or an input"


def raises_unchanged(exc, match, fn, *watched):
    """fn() raises exc matching `match` (a regex, searched) and leaves every watched array
    bitwise as it was."""
    before = snapshot(*watched)
    with pytest.raises(exc, match=match) as info:
        fn()
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value).__name__}"
    unchanged(before, *watched)
    return info.value


def cache(rng, nb=6, bs=4, hk=2, d=8, dtype="float32"):
    return randn(rng, (nb, bs, hk, d), dtype)


def balanced(*producers):
    for p in producers:
        assert p.exported >= 1, "the producer was never asked to export"
        assert p.deleted == p.exported, f"deleter ran {p.deleted} times for {p.exported} exports: {p!r}"


# ---------------------------------------------------------------------------
# 1. producer-reported fields are checked before use
# ---------------------------------------------------------------------------


@isolated
@pytest.mark.parametrize("versioned", [True, False], ids=["dltensor_versioned", "dltensor"])
@pytest.mark.parametrize("where", ["q", "k", "out"])
def test_dlpack_null_shape(rng, versioned, where):
    """A DLPack tensor whose shape is NULL (ndim 4): ValueError naming it (was a segfault: the
    shape was read through the NULL pointer); the deleter runs exactly once."""
    q, k, v = qkv(rng)
    out = poison_like(q)
    args = {"q": q, "k": k, "out": out}
    base = args[where].copy()
    args[where] = bad = Crafted(base, shape=None, ndim=4, versioned=versioned)
    raises_unchanged(
        ValueError,
        rf"^{where}: the producer reported a NULL shape for 4 dimensions",
        lambda: pagedflash.flash_attn(args["q"], args["k"], v, out=args["out"]),
        out,
        base,
    )
    balanced(bad)


@isolated
@pytest.mark.parametrize("where", ["q", "k", "v", "out"])
def test_array_interface_null_data(rng, where):
    """An __array_interface__ whose data pointer is 0 with a nonzero size: ValueError naming it
    (an input was read as garbage, an output written through NULL)."""
    q, k, v = qkv(rng)
    out = poison_like(q)
    arrays = {"q": q, "k": k, "v": v, "out": out}
    arrays[where] = interface_of(np.ascontiguousarray(arrays[where]), data=(0, False))
    given_out = arrays["out"]
    raises_unchanged(
        ValueError,
        rf"^{where}: the producer reported a NULL data pointer for \d+ elements",
        lambda: pagedflash.flash_attn(arrays["q"], arrays["k"], arrays["v"], out=given_out),
        out,
        q,
        k,
        v,
    )


@isolated
@pytest.mark.parametrize("versioned", [True, False], ids=["dltensor_versioned", "dltensor"])
def test_dlpack_null_data_output(rng, versioned):
    """A DLPack output with NULL data and elements: ValueError (it was written through)."""
    q, k, v = qkv(rng)
    bad = Crafted(poison_like(q), data=0, versioned=versioned)
    raises_unchanged(
        ValueError,
        r"^out: the producer reported a NULL data pointer for 640 elements",
        lambda: pagedflash.flash_attn(q, k, v, out=bad),
        q,
    )
    balanced(bad)


BAD_FIELDS = {
    # field overrides of a [2, 5, 4, 16] float32 export, and the message they must give
    "negative_dim": (dict(shape=(2, -5, 4, 16)), r"dimension 1 is negative \(-5\)"),
    "misaligned_data": ("misalign", r"its data pointer 0x[0-9a-f]+ is not aligned to its 4-byte elements"),
    "byte_offset_wraps": (dict(byte_offset=2**64 - 16), r"byte_offset 18446744073709551600 overflows the data pointer"),
    "stride_overflow": (dict(strides=(320, 2**62, 16, 1)), r"its strides reach beyond what int64 addresses"),
    "stride_int64_min": (dict(strides=(320, -(2**63), 16, 1)), r"its strides reach beyond what int64 addresses"),
    "ndim_negative": (dict(ndim=-1), r"at most 8 dimensions are supported, got -1"),
    "ndim_too_large": (dict(ndim=9), r"at most 8 dimensions are supported, got 9"),
    "ndim_int32_max": (dict(ndim=2**31 - 1), r"at most 8 dimensions are supported, got 2147483647"),
}


@isolated
@pytest.mark.parametrize("versioned", [True, False], ids=["dltensor_versioned", "dltensor"])
@pytest.mark.parametrize("field", list(BAD_FIELDS))
@pytest.mark.parametrize("where", ["q", "out"])
def test_dlpack_bad_fields(rng, field, versioned, where):
    """Negative dims, misaligned data, a byte_offset that wraps the pointer, strides whose
    extent overflows int64, ndim out of [0, 8]: ValueError naming the argument, nothing written,
    the deleter called once."""
    q, k, v = qkv(rng)
    out = poison_like(q)
    base = (q if where == "q" else out).copy()
    override, message = BAD_FIELDS[field]
    if override == "misalign":
        override = dict(data=base.ctypes.data + 2)
    bad = Crafted(base, versioned=versioned, **{"shape": base.shape, **override})
    call_q, call_out = (bad, out) if where == "q" else (q, bad)
    raises_unchanged(
        ValueError, rf"^{where}: {message}", lambda: pagedflash.flash_attn(call_q, k, v, out=call_out), out, base
    )
    balanced(bad)


@isolated
def test_uint8_stride_int64_max(rng):
    """A uint8 cache whose block stride is INT64_MAX: its extent (INT64_MAX + 1) x 1 byte overflows;
    found by the fuzz test: `reach + 1` overflowed (undefined) and the check passed for 1-byte
    elements, so copy_blocks read 2**63 bytes past the data (a segfault)."""
    base = rng.integers(0, 255, 8, dtype=np.uint8)
    bad = Crafted(base, shape=(2, 4), strides=(2**63 - 1, 1), dtype="uint8")
    before = base.copy()
    with pytest.raises(ValueError, match=r"^caches\[0\]: its strides reach beyond what int64 addresses"):
        pagedflash.copy_blocks([bad], [], [[0, 1]])
    assert np.array_equal(base, before)
    balanced(bad)


def test_every_export_deleted_once_on_every_path(rng):
    """Consumed capsules (the call went through or failed after the import) and capsules left
    unconsumed (the version check refused them) are deleted exactly once."""
    q, k, v = qkv(rng)
    good = honest(q)
    ok = pagedflash.flash_attn(good, k, v)
    assert_close(ok, reference.attention(q, k, v), dtype="float32")
    refused = Crafted(q.copy(), shape=q.shape, major=2)
    with pytest.raises(TypeError, match=r"^q: DLPack major version 2 is not supported \(expected 1\)"):
        pagedflash.flash_attn(refused, k, v)
    legacy_old = Crafted(q.copy(), shape=q.shape, versioned=False, legacy_protocol=True)
    assert_close(pagedflash.flash_attn(legacy_old, k, v), reference.attention(q, k, v), dtype="float32")
    wrong = Crafted(k[:1].copy())
    with pytest.raises(ValueError, match=r"^k: expected dimension 0 \(batch"):
        pagedflash.flash_attn(q, wrong, v[:1])
    balanced(good, refused, legacy_old, wrong)
    assert stray_deletes[0] == 0, "a deleter ran for a capsule deleted already"


# ---------------------------------------------------------------------------
# 2. copy_blocks / swap_blocks: negative dimensions, ids out of range
# ---------------------------------------------------------------------------


COPY_BAD_IDS = [((-1, 0), "src"), ((0, -1), "dst"), ((6, 0), "src"), ((0, 6), "dst"), ((-(2**63), 0), "src")]
COPY_BAD_IDS += [((0, 2**62), "dst")]


@isolated
def test_copy_blocks_negative_dims_and_bad_ids(rng):
    """copy_blocks with a cache reporting a negative dimension did a memmove of negative size (a
    crash); a mapping with a negative or out-of-range id: ValueError naming it, and no pair
    applied, not even the valid ones before it."""
    for shape in [(-1, 4, 2, 8), (6, -4, 2, 8), (6, 4, 2, -8)]:
        good, base = cache(rng), cache(rng)
        bad = Crafted(base, shape=shape)
        dim = [i for i, n in enumerate(shape) if n < 0][0]
        raises_unchanged(
            ValueError,
            rf"^caches\[1\]: dimension {dim} is negative \({shape[dim]}\)",
            lambda good=good, bad=bad: pagedflash.copy_blocks([good], [bad], [[0, 1]]),
            good,
            base,
        )
        balanced(bad)
    kc, vc = cache(rng), cache(rng)
    for pair, which in COPY_BAD_IDS:
        col = 0 if which == "src" else 1
        raises_unchanged(
            ValueError,
            rf"^block_mapping: block_mapping\[1, {col}\] = {pair[col]} \({which}\) is out of range \[0, 6\)",
            lambda pair=pair: pagedflash.copy_blocks([kc], [vc], np.array([[1, 2], pair], np.int64)),
            kc,
            vc,
        )


@isolated
def test_swap_blocks_negative_dims_and_bad_ids(rng):
    """swap_blocks with a negative dimension on either side (a crash), or ids out of range."""
    for side in ("src", "dst"):
        src, dst = cache(rng, nb=4), cache(rng, nb=3)
        base = (src if side == "src" else dst).copy()
        bad = Crafted(base, shape=(base.shape[0], base.shape[1], -2, base.shape[3]))
        args = (bad, dst) if side == "src" else (src, bad)
        raises_unchanged(
            ValueError,
            rf"^{side}: dimension 2 is negative \(-2\)",
            lambda args=args: pagedflash.swap_blocks(*args, np.array([[0, 1]], np.int64)),
            src,
            dst,
            base,
        )
        balanced(bad)
    src, dst = cache(rng, nb=4), cache(rng, nb=3)
    for pair, which, bound in [((-1, 0), "src", 4), ((0, -1), "dst", 3), ((4, 0), "src", 4), ((0, 3), "dst", 3)]:
        col = 0 if which == "src" else 1
        raises_unchanged(
            ValueError,
            rf"^block_mapping: block_mapping\[1, {col}\] = {pair[col]} \({which}\) is out of range \[0, {bound}\)",
            lambda pair=pair: pagedflash.swap_blocks(src, dst, [[1, 2], list(pair)]),
            src,
            dst,
        )


def test_block_mapping_list_beyond_int64(rng):
    """A block id beyond int64 in a Python list (found by the fuzz test: OverflowError from NumPy)."""
    kc = cache(rng)
    raises_unchanged(
        ValueError,
        r"^block_mapping: a block id does not fit in int64",
        lambda: pagedflash.copy_blocks([kc], [], [[2**64, 0]]),
        kc,
    )
    raises_unchanged(
        ValueError,
        r"^block_mapping: expected \(src, dst\) pairs of ints",
        lambda: pagedflash.copy_blocks([kc], [], [["a", 1]]),
        kc,
    )


# ---------------------------------------------------------------------------
# 3. mixed libraries: TypeError or ValueError, never AttributeError
# ---------------------------------------------------------------------------


def _mixed_flash_attn(rng):
    q, k, v = qkv(rng)
    out = torch.full(q.shape, float("nan"))
    res = pagedflash.flash_attn(q, torch.from_numpy(k), honest(v), out=out)
    assert res is out
    assert_close(out, reference.attention(q, k, v), dtype="float32")
    # lse is allocated in q's library; a list where an array must be: TypeError naming it
    with pytest.raises(TypeError, match=r"^k: expected an array"):
        pagedflash.flash_attn(q, k.tolist(), torch.from_numpy(v), out=out)


def _mixed_varlen(rng):
    q, k, v = (randn(rng, s, "float32") for s in ((9, 4, 16), (11, 2, 16), (11, 2, 16)))
    cq, ck = np.array([0, 4, 9], np.int32), np.array([0, 5, 11], np.int32)
    out = poison_like(torch.from_numpy(q))
    pagedflash.flash_attn_varlen(torch.from_numpy(q), k, torch.from_numpy(v), torch.from_numpy(cq), ck, 5, 6, out=out)
    assert_close(out, reference.attention_varlen(q, k, v, cq, ck), dtype="float32")
    before = snapshot(out)
    with pytest.raises(TypeError, match=r"^cu_seqlens_k: expected an array"):
        pagedflash.flash_attn_varlen(q, torch.from_numpy(k), v, cq, ck.tolist(), 5, 6, out=out)
    unchanged(before, out)


def _mixed_backward(rng):
    q, k, v = qkv(rng)
    dout = randn(rng, q.shape, "float32")
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
    dq = torch.full(q.shape, float("nan"))
    grads = pagedflash.flash_attn_backward(torch.from_numpy(dout), q, torch.from_numpy(k), v, honest(out), lse, dq=dq)
    assert grads[0] is dq and isinstance(grads[1], np.ndarray)
    check_grads(grads, dout, q, k, v, "float32")
    before = snapshot(dq)
    with pytest.raises(TypeError, match=r"^lse: expected an array"):
        pagedflash.flash_attn_backward(dout, torch.from_numpy(q), k, v, out, lse.tolist(), dq=dq)
    with pytest.raises(TypeError, match=r"^out: expected an array"):
        pagedflash.flash_attn_backward(dout, q, k, v, out.tolist(), torch.from_numpy(lse), dq=dq)
    unchanged(before, dq)


def _mixed_dropout_mask(rng):
    q, k, _ = qkv(rng)
    ref = pagedflash.dropout_mask(q, k, dropout_p=0.3, seed=5)
    mixed = pagedflash.dropout_mask(torch.from_numpy(q), honest(k), dropout_p=0.3, seed=5)
    assert isinstance(mixed, torch.Tensor) and np.array_equal(mixed.numpy(), ref)
    with pytest.raises(TypeError, match=r"^k: expected an array"):
        pagedflash.dropout_mask(q, k.tolist(), dropout_p=0.3, seed=5)


def _mixed_paged_attn(rng):
    kc, vc = cache(rng, nb=6, bs=4), cache(rng, nb=6, bs=4)
    bt = np.array([[3, 1, 0], [5, 2, 4]], np.int32)
    sl = np.array([9, 12], np.int32)
    q = randn(rng, (2, 4, 8), "float32")
    out = torch.full(q.shape, float("nan"))
    pagedflash.paged_attn(q, torch.from_numpy(kc), honest(vc), torch.from_numpy(bt), sl, out=out)
    assert_close(out, reference.paged_attention(q, kc, vc, bt, sl), dtype="float32")
    before = snapshot(out)
    with pytest.raises(TypeError, match=r"^seq_lens: expected an array"):
        pagedflash.paged_attn(torch.from_numpy(q), kc, vc, bt, sl.tolist(), out=out)
    unchanged(before, out)


@needs_torch
@pytest.mark.parametrize("fn", ["flash_attn", "varlen", "backward", "dropout_mask", "paged_attn"])
def test_mixed_libraries(rng, fn):
    """Arguments from different libraries (q NumPy, k torch, v a DLPack producer, out a torch
    tensor, ...) are fine: each is prepared by its own library (flash_attn, varlen, backward and
    dropout_mask prepared all of them with q's library: AttributeError); a list where an array
    must be is a TypeError naming it, with the given outputs untouched. (paged_attn did this
    right already; it is kept here as the guard of the same rule.)"""
    globals()["_mixed_" + fn](rng)


# ---------------------------------------------------------------------------
# 4. huge integers (and non-finite numbers): ValueError / TypeError naming the option
# ---------------------------------------------------------------------------

HUGE = [2**31, 2**63, 2**64, -(2**63) - 1]
# per option, the huge values out of its range (an int32 window, int64 lengths, a uint64 offset)
OUT_OF_RANGE = {
    "window_left": HUGE,
    "window_right": HUGE,
    "max_seqlen_q": [2**63, 2**64, -(2**63) - 1],
    "max_seqlen_k": [2**63, 2**64, -(2**63) - 1],
    "offset": [2**64, -(2**63) - 1, -1],
}


@pytest.mark.parametrize(
    "option,value",
    [(o, v) for o, vs in OUT_OF_RANGE.items() for v in vs],
    ids=lambda x: f"{x:#x}" if type(x) is int else x,
)
def test_huge_ints_flash(rng, option, value):
    """Integers beyond an option's C type raised OverflowError; now ValueError naming it."""
    q, k, v = (randn(rng, s, "float32") for s in ((9, 4, 16), (11, 2, 16), (11, 2, 16)))
    cq, ck = np.array([0, 4, 9], np.int32), np.array([0, 5, 11], np.int32)
    kw = {"max_seqlen_q": 5, "max_seqlen_k": 6}
    name = option
    if option.startswith("window"):
        kw["window"] = (value, -1) if option == "window_left" else (-1, value)
        name = "window"
    else:
        kw[option] = value
    out = poison_like(q)
    args = (q, k, v, cq, ck, kw.pop("max_seqlen_q"), kw.pop("max_seqlen_k"))
    raises_unchanged(ValueError, rf"^{name}: ", lambda: pagedflash.flash_attn_varlen(*args, out=out, **kw), out)


@pytest.mark.parametrize("value", HUGE, ids=lambda v: f"{v:#x}")
def test_huge_num_splits(rng, value):
    kc = cache(rng)
    q = randn(rng, (1, 4, 8), "float32")
    out = poison_like(q)
    raises_unchanged(
        ValueError,
        r"^num_splits: ",
        lambda: pagedflash.paged_attn(
            q, kc, kc, np.array([[0, 1]], np.int32), np.array([5], np.int32), num_splits=value, out=out
        ),
        out,
    )


@pytest.mark.parametrize(
    "option,value",
    [
        ("window", (float("inf"), 0)),
        ("softmax_scale", 2**2000),
        ("softcap", 2**2000),
        ("dropout_p", 2**2000),
        ("seed", float("inf")),
        ("offset", float("-inf")),
        ("offset", 2**64),
        ("stream", 2**64),
        ("stream", -(2**63) - 1),
    ],
)
def test_non_finite_and_huge_options(rng, option, value):
    """Found by the fuzz test: int(inf) and float(2**2000) raised OverflowError (an
    ArithmeticError), a stream beyond a pointer OverflowError; now ValueError naming the option."""
    q, k, v = qkv(rng)
    out = poison_like(q)
    raises_unchanged(
        expected_type(option, value),
        rf"^{option}: ",
        lambda: pagedflash.flash_attn(q, k, v, out=out, **{option: value}),
        out,
    )


def expected_type(option, value):
    """A float where an int is expected (window, seed, offset, num_splits) is a TypeError (not an
    int); a number out of range a ValueError."""
    floats = value if isinstance(value, tuple) else (value,)
    if option in ("window", "seed", "offset", "num_splits") and any(isinstance(x, float) for x in floats):
        return TypeError
    return ValueError


@pytest.mark.parametrize(
    "option,value", [("num_splits", float("inf")), ("softcap", -(2**2000)), ("window", (0, float("inf")))]
)
def test_non_finite_options_paged(rng, option, value):
    kc = cache(rng)
    q = randn(rng, (1, 4, 8), "float32")
    out = poison_like(q)
    bt, sl = np.array([[0, 1]], np.int32), np.array([5], np.int32)
    raises_unchanged(
        expected_type(option, value),
        rf"^{option}: ",
        lambda: pagedflash.paged_attn(q, kc, kc, bt, sl, out=out, **{option: value}),
        out,
    )


def test_huge_seed_is_taken_modulo_2_64(rng):
    """A seed is any int, used modulo 2**64 (the Philox key is 64 bits): 2**64 + 5 is seed 5."""
    q, k, _ = qkv(rng)
    ref = pagedflash.dropout_mask(q, k, dropout_p=0.4, seed=5)
    assert np.array_equal(pagedflash.dropout_mask(q, k, dropout_p=0.4, seed=2**64 + 5), ref)
    assert np.array_equal(pagedflash.dropout_mask(q, k, dropout_p=0.4, seed=-(2**64) + 5), ref)
    with pytest.raises(ValueError, match=r"^offset: "):
        pagedflash.dropout_mask(q, k, dropout_p=0.4, seed=5, offset=2**64)


@pytest.mark.parametrize("value", [2**31, 2**63, 2**64, -(2**63) - 1, -1])
def test_set_num_threads_huge_keeps_setting(rng, value):
    """set_num_threads(2**31) raised OverflowError and broke every later call; now ValueError
    naming num_threads, the previous setting kept, later calls working."""
    before = pagedflash.get_num_threads()
    pagedflash.set_num_threads(3)
    try:
        with pytest.raises(ValueError, match=r"^num_threads: must be in \[0, 2\*\*31 - 1\]"):
            pagedflash.set_num_threads(value)
        assert pagedflash.get_num_threads() == 3
        q, k, v = qkv(rng)
        assert_close(pagedflash.flash_attn(q, k, v), reference.attention(q, k, v), dtype="float32")
        with pytest.raises(TypeError, match=r"^num_threads: expected an int, got float"):
            pagedflash.set_num_threads(1.5)
        assert pagedflash.get_num_threads() == 3
    finally:
        pagedflash.set_num_threads(0 if before == _C.build_info()["cpu_count"] else before)


def test_block_manager_huge_counts():
    """BlockManager counts beyond their range: ValueError naming them, the manager unchanged.
    allocate(seq_id, n) with n beyond int64 and a watermark beyond float's range raised
    OverflowError (the constructor's counts were already checked)."""
    for args, kwargs, match in [
        ((2**31, 4), {}, r"^num_blocks: expected < 2\*\*31"),
        ((8, 2**63), {}, r"^block_size: expected < 2\*\*31"),
        ((8, 4), {"num_cpu_blocks": 2**64}, r"^num_cpu_blocks: expected < 2\*\*31"),
        ((-(2**63) - 1, 4), {}, r"^num_blocks: expected >= 1"),
        ((8, 4), {"watermark": 2**2000}, r"^watermark: expected a fraction in \[0, 1\)"),
    ]:
        with pytest.raises(ValueError, match=match):
            pagedflash.BlockManager(*args, **kwargs)
    bm = pagedflash.BlockManager(8, 4, num_cpu_blocks=4)
    bm.allocate(0, 5)
    before = bm.snapshot()
    for call, match in [
        (lambda: bm.allocate(1, 2**64), r"^num_tokens: 18446744073709551616 does not fit in int64"),
        (lambda: bm.allocate(1, -(2**63) - 1), r"^num_tokens: -9223372036854775809 does not fit in int64"),
        (lambda: bm.allocate(1, 2**31), r"num_tokens must be in \[0, 2\^31\)"),
        (lambda: bm.append_slots(0, 2**63), r"^num_new_tokens: "),
        (lambda: bm.append_slots_batch([0], [2**40]), r"^num_new_tokens\[0\]: "),
        (lambda: bm.block_tables([0], max_blocks=2**63), r"^max_blocks: "),
        (lambda: bm.block_tables([0], pad=2**63), r"^pad: "),
        (lambda: bm.slot_mapping([0], 2**63), r"^num_new_tokens: "),
        (lambda: bm.fork(0, 2**64), r"^child_id: "),
        (lambda: bm.free(-(2**63) - 1), r"^seq_id: "),
        (lambda: bm.swap_out([2**64]), r"^seq_ids\[0\]: "),
        (lambda: bm.can_allocate(2**63), r"^num_tokens: "),
    ]:
        with pytest.raises(ValueError, match=match):
            call()
        assert bm.snapshot() == before
    bm.check()


def test_block_manager_allocates_nothing_huge_for_a_failing_call():
    """slot_mapping(ids, 2**31 - 1) allocated its int64 result (32 GiB for two ids) before the
    core refused the count, block_tables(ids, max_blocks=2**31 - 1) an [n, 2**31 - 1] table before
    the core refused an unknown id (MemoryError; found by the fuzz test)."""
    bm = pagedflash.BlockManager(8, 4)
    bm.allocate(0, 5)
    before = bm.snapshot()
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=r"^slot_mapping: num_new_tokens for seq_id 0 must be in \[0, 5\]"):
            bm.slot_mapping([0, 0], 2**31 - 1)
        with pytest.raises(ValueError, match=r"^block_tables: unknown seq_id 7"):
            bm.block_tables([0, 7], max_blocks=2**31 - 1)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated by calls that fail"
    assert bm.snapshot() == before
    assert bm.slot_mapping([0, 0], 2).tolist() == [3, 4, 3, 4]


def test_block_pool_out_of_memory_message():
    """The out-of-memory message read block_size from the pool it had just freed (a use after
    free, found by the fuzz test: it printed garbage token counts)."""
    with pytest.raises(MemoryError, match=r"out of host memory for 1073741824 blocks of 1048576 tokens"):
        pagedflash.BlockManager(2**30, 2**20)


# ---------------------------------------------------------------------------
# 5. dtypes, Tensor.__dlpack__, dropout_mask's allocation, 0-d inputs
# ---------------------------------------------------------------------------


@needs_torch
@pytest.mark.parametrize("dtype", ["bool", "int8", "complex64"])
def test_torch_unsupported_dtypes(rng, dtype):
    """torch bool / int8 / complex64 inputs raised KeyError (no result of that dtype); now
    TypeError naming q (or the first argument a result is allocated like). int8 is a dtype the
    library views (KV caches), so it is refused where a float array is needed, with that message."""
    tdt = getattr(torch, dtype)
    q, k, v = (torch.from_numpy(x).to(tdt) for x in qkv(rng))
    bad = (
        rf"expected dtype float16, bfloat16 or float32, got {dtype}"
        if dtype == "int8"
        else rf"unsupported dtype {dtype}; expected float16, bfloat16 or float32"
    )
    with pytest.raises(TypeError, match=rf"^q: {bad}"):
        pagedflash.flash_attn(q, k, v)
    kc = torch.from_numpy(cache(rng)).to(tdt)
    with pytest.raises(TypeError, match=rf"^q: {bad}"):
        pagedflash.paged_attn(q[:, 0], kc, kc, np.array([[0], [1]], np.int32), np.array([1, 1], np.int32))
    with pytest.raises(TypeError, match=rf"^out_a: {bad}"):
        pagedflash.merge_attn_states(q[0], torch.zeros(4, 5), q[0], torch.zeros(4, 5))
    # the first array viewed (int8 is viewed: q, the first a result is allocated like)
    with pytest.raises(TypeError, match=rf"^{'q' if dtype == 'int8' else 'dout'}: {bad}"):
        pagedflash.flash_attn_backward(q, q, k, v, q, torch.zeros(2, 4, 5))
    # given outputs of the right dtype: the C core names the input
    out = torch.full(q.shape, float("nan"))
    raises_unchanged(
        TypeError,
        rf"^q: {bad}",
        lambda: pagedflash.flash_attn(q, k, v, out=out),
        out,
    )


@pytest.mark.parametrize("dl_device", ["cpu", 1, (1,), ("cpu", 0), (1, 2**40)])
def test_tensor_dlpack_bad_dl_device(dl_device):
    """Tensor.__dlpack__(dl_device="cpu") raised SystemError; a malformed dl_device is a TypeError."""
    t = _C.empty((2, 3), "float32", "cpu", 0)
    with pytest.raises(TypeError, match=r"^dl_device: expected a \(device_type, device_id\) tuple of ints"):
        t.__dlpack__(dl_device=dl_device)


def test_tensor_dlpack_max_version_beyond_long():
    """A consumer announcing a major version beyond C long (2**64) gets a versioned capsule (it
    raised OverflowError; found by the fuzz test)."""
    t = _C.empty((2, 3), "float32", "cpu", 0)
    assert "dltensor_versioned" in repr(t.__dlpack__(max_version=(2**64, 0)))
    assert '"dltensor"' in repr(t.__dlpack__(max_version=(-(2**64), 0)))


@pytest.mark.parametrize(
    "shape", [(2**62, 2**62), (2**61, 8), (2**31, 2**31, 4)], ids=["2^124", "2^64-elements-x4", "2^64"]
)
def test_tensor_empty_byte_size_overflow(shape):
    """_C.empty (how pagedflash.Tensor results are made) wrapped the byte size around int64 and
    returned a Tensor with a huge shape over a tiny allocation (found by the fuzz test)."""
    with pytest.raises(ValueError, match=r"^shape: too many elements"):
        _C.empty(shape, "float32", "cpu", 0)
    with pytest.raises(ValueError, match=r"^device_id: 1099511627776 does not fit in int32"):
        _C.empty((2,), "float32", "cpu", 2**40)
    assert _C.empty((0, 2**62, 2**62), "float32").shape == (0, 2**62, 2**62)  # empty: nothing to hold


def test_dropout_mask_bad_cu_seqlens_allocates_nothing_huge(rng):
    """cu_seqlens [0, 2**40] (int64) was read as the longest sequence and a 64 GiB mask was
    allocated before any check; now the C core's message, and no large allocation."""
    q, k = randn(rng, (5, 4, 16), "float32"), randn(rng, (7, 2, 16), "float32")
    cq = np.array([0, 2**40], np.int64)
    ck = np.array([0, 7], np.int32)
    tracemalloc.start()
    try:
        with pytest.raises(TypeError, match=r"^cu_seqlens_q: expected dtype int32, got int64"):
            pagedflash.dropout_mask(q, k, dropout_p=0.1, seed=1, cu_seqlens_q=cq, cu_seqlens_k=ck)
        with pytest.raises(ValueError, match=r"^cu_seqlens_q: the last entry must equal the number of packed tokens 5"):
            pagedflash.dropout_mask(
                q, k, dropout_p=0.1, seed=1, cu_seqlens_q=np.array([0, 2**31 - 1], np.int32), cu_seqlens_k=ck
            )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated by a call that fails"


@pytest.mark.parametrize("option", ["max_seqlen_q", "max_seqlen_k"])
def test_dropout_mask_huge_max_seqlen(rng, option):
    """A packed dropout mask is sized by max_seqlen_q/k: 2**40 allocated terabytes (MemoryError;
    2**31, gigabytes filled for a minute; found by the fuzz test). A length beyond the packed
    tokens is inconsistent: ValueError naming it, nothing large allocated."""
    q, k = randn(rng, (5, 4, 16), "float32"), randn(rng, (7, 2, 16), "float32")
    cq, ck = np.array([0, 2, 5], np.int32), np.array([0, 3, 7], np.int32)
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match=rf"^{option}: 1099511627776 exceeds the \d packed tokens"):
            pagedflash.dropout_mask(q, k, dropout_p=0.1, seed=1, cu_seqlens_q=cq, cu_seqlens_k=ck, **{option: 2**40})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, f"{peak} bytes allocated by a call that fails"
    ok = pagedflash.dropout_mask(q, k, dropout_p=0.1, seed=1, cu_seqlens_q=cq, cu_seqlens_k=ck, **{option: 5})
    assert ok.shape[2 if option == "max_seqlen_q" else 3] == 5


@isolated
@pytest.mark.parametrize("lie", ["shape_null", "data_null", "cuda_device", "bfloat16"])
def test_dropout_mask_cu_seqlens_from_a_lying_producer(rng, lie):
    """dropout_mask read cu_seqlens through np.from_dlpack before the C core checked it (found by
    the fuzz test): a NULL shape (or data) segfaulted inside NumPy, a tensor on another device
    raised NumPy's RuntimeError; now the C core's ValueError / TypeError naming it."""
    q, k = randn(rng, (5, 4, 16), "float32"), randn(rng, (7, 2, 16), "float32")
    base = np.array([0, 5], np.int32)
    bad, exc, match = {
        "shape_null": (Crafted(base, shape=None, ndim=1, dtype="int32"), ValueError, r"NULL shape"),
        "data_null": (Crafted(base, data=0, dtype="int32"), ValueError, r"NULL data pointer"),
        "cuda_device": (Crafted(base, dtype="int32", device=(2, 0)), ValueError, r"expected the same device as q"),
        "bfloat16": (Crafted(np.array([0, 5], np.uint16), dtype="bfloat16"), TypeError, r"expected dtype int32"),
    }[lie]
    with pytest.raises(exc, match=rf"^cu_seqlens_q: (the producer reported a )?{match}") as info:
        pagedflash.dropout_mask(q, k, dropout_p=0.1, seed=1, cu_seqlens_q=bad, cu_seqlens_k=np.array([0, 7], np.int32))
    assert type(info.value) is exc
    balanced(bad)


ZERO_D = [
    (
        "flash_attn",
        lambda z: pagedflash.flash_attn(z, z, z, return_lse=True),
        r"^q: expected a 4-d \(or packed 3-d\) tensor, got a scalar",
    ),
    (
        "flash_attn_varlen",
        lambda z: pagedflash.flash_attn_varlen(
            z, z, z, np.array([0, 1], np.int32), np.array([0, 1], np.int32), 1, 1, return_lse=True
        ),
        r"^q: expected a 4-d \(or packed 3-d\) tensor, got a scalar",
    ),
    ("flash_attn_backward", lambda z: pagedflash.flash_attn_backward(z, z, z, z, z, z), r"^q: expected a 4-d"),
    ("dropout_mask", lambda z: pagedflash.dropout_mask(z, z, dropout_p=0.1, seed=1), r"^q: expected a 4-d"),
    (
        "dropout_mask_cu_seqlens",
        lambda z: pagedflash.dropout_mask(
            np.ones((3, 2, 8), np.float32),
            np.ones((3, 2, 8), np.float32),
            dropout_p=0.1,
            seed=1,
            cu_seqlens_q=z,
            cu_seqlens_k=z,
        ),
        r"^cu_seqlens_q: expected a 1-d tensor, got 0-d",
    ),
    (
        "paged_attn",
        lambda z: pagedflash.paged_attn(z, z, z, z, z, return_lse=True),
        r"^q: expected \[batch, num_heads, head_dim\]",
    ),
    (
        "merge_attn_states",
        lambda z: pagedflash.merge_attn_states(z, z, z, z),
        r"^out_a: expected \[\.\.\., num_heads, head_dim\] \(>= 2-d\)",
    ),
    (
        "write_kv_cache",
        lambda z: pagedflash.write_kv_cache(z, z, z, z, np.array(1, np.int64)),
        r"^k_cache: expected a 4-d tensor, got 0-d",
    ),
    (
        "copy_blocks",
        lambda z: pagedflash.copy_blocks([z], [z], np.zeros((1, 2), np.int64)),
        r"^caches\[0\]: expected \[num_blocks, \.\.\.\] \(>= 1-d\)",
    ),
    (
        "swap_blocks",
        lambda z: pagedflash.swap_blocks(z, z, np.zeros((1, 2), np.int64)),
        r"^src: expected \[num_blocks, \.\.\.\] \(>= 1-d\)",
    ),
]


@pytest.mark.parametrize("lib", ["numpy", pytest.param("torch", marks=needs_torch), "pagedflash"])
def test_zero_d_inputs(rng, lib):
    """0-d inputs raised IndexError (paged_attn(..., return_lse=True) sized lse from q.shape[-2]);
    now ValueError naming the argument, for every operation."""
    z = np.array(rng.standard_normal(), np.float32)
    if lib == "torch":
        z = torch.from_numpy(z)
    elif lib == "pagedflash":
        t = _C.empty((), "float32", "cpu", 0)
        np.asarray(t)[...] = z
        z = t
    for name, call, match in ZERO_D:
        before = snapshot(np.asarray(z) if lib == "pagedflash" else z)
        with pytest.raises(ValueError, match=match) as info:
            call(z)
        assert type(info.value) is ValueError, f"{name}: {type(info.value).__name__}"
        unchanged(before, np.asarray(z) if lib == "pagedflash" else z)


# ---------------------------------------------------------------------------
# 6. softmax_scale: 0.0 is a zero scale, None the default
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_softmax_scale_zero_is_uniform(rng, dtype):
    """softmax_scale=0.0 silently became 1/sqrt(d); it is a zero scale: uniform attention."""
    q, k, v = qkv(rng, dtype=dtype, sq=6, sk=9)
    out = poison_like(q)
    pagedflash.flash_attn(q, k, v, softmax_scale=0.0, out=out)
    ref = reference.attention(q, k, v, softmax_scale=0.0)
    rep = q.shape[2] // k.shape[2]
    uniform = np.repeat(np.asarray(v, np.float64).mean(axis=1, keepdims=True), rep, axis=2)
    assert np.allclose(ref, np.broadcast_to(uniform, ref.shape))  # the reference is uniform attention
    lowp = dtype != "float32"
    assert_close(out, ref, naive_attention_lowp(q, k, v, softmax_scale=0.0) if lowp else None, dtype=dtype)
    default = pagedflash.flash_attn(q, k, v, softmax_scale=None)
    assert_close(default, reference.attention(q, k, v), naive_attention_lowp(q, k, v) if lowp else None, dtype=dtype)
    assert not np.allclose(np.asarray(default, np.float64), ref), "None is the default scale, not zero"
    explicit = pagedflash.flash_attn(q, k, v, softmax_scale=1.0 / np.sqrt(q.shape[-1]))
    assert np.array_equal(explicit, default), "None is exactly 1/sqrt(head_dim)"


def test_softmax_scale_zero_paged(rng):
    kc, vc = cache(rng, nb=6, bs=4), cache(rng, nb=6, bs=4)
    bt = np.array([[3, 1, 0], [5, 2, 4]], np.int32)
    sl = np.array([9, 12], np.int32)
    q = randn(rng, (2, 4, 8), "float32")
    out = pagedflash.paged_attn(q, kc, vc, bt, sl, softmax_scale=0.0)
    assert_close(out, reference.paged_attention(q, kc, vc, bt, sl, softmax_scale=0.0), dtype="float32")
    assert_close(
        pagedflash.paged_attn(q, kc, vc, bt, sl), reference.paged_attention(q, kc, vc, bt, sl), dtype="float32"
    )


# ---------------------------------------------------------------------------
# 7. an output overlapping an input
# ---------------------------------------------------------------------------


def test_out_overlapping_input(rng):
    """out=k (or q, or a view of v) returned wrong values; now ValueError, nothing written."""
    q, k, v = qkv(rng, sq=7, sk=7, h=2, hk=2)
    for out, name in ((k, "k"), (q, "q"), (v.view(), "v")):
        raises_unchanged(
            ValueError,
            rf"^out: overlaps {name} in memory; an output may not share memory",
            lambda out=out: pagedflash.flash_attn(q, k, v, out=out),
            q,
            k,
            v,
        )
    # lse inside out's memory
    buf = np.full(q.size + 2 * 2 * 7, np.nan, np.float32)
    out = buf[: q.size].reshape(q.shape)
    lse = buf[q.size - 4 : q.size - 4 + 28].reshape(2, 2, 7)
    raises_unchanged(ValueError, r"^lse: overlaps out in memory", lambda: flash_fwd_c(q, k, v, out, lse), buf)


def flash_fwd_c(q, k, v, out, lse):
    """_C.flash_fwd with given out and lse and the default options (the public API allocates lse)."""
    return _C.flash_fwd(q, k, v, out, lse, None, None, 0, 0, None, False, (-1, -1), 0.0, None, 0.0, None, 0, False,
                        None, "auto")  # fmt: skip


def test_gradient_overlapping_input(rng):
    q, k, v = qkv(rng)
    dout = randn(rng, q.shape, "float32")
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
    raises_unchanged(
        ValueError,
        r"^dq: overlaps dout in memory",
        lambda: pagedflash.flash_attn_backward(dout, q, k, v, out, lse, dq=dout),
        dout,
        q,
        k,
        v,
        out,
        lse,
    )
    raises_unchanged(
        ValueError,
        r"^dk: overlaps k in memory",
        lambda: pagedflash.flash_attn_backward(dout, q, k, v, out, lse, dk=k),
        dout,
        q,
        k,
        v,
        out,
        lse,
    )


def test_paged_out_overlapping_cache(rng):
    kc = cache(rng, nb=6, bs=4, hk=2, d=8)
    q = randn(rng, (2, 4, 8), "float32")
    out = kc.reshape(-1)[: q.size].reshape(q.shape)  # the first blocks of the cache, viewed as q
    raises_unchanged(
        ValueError,
        r"^out: overlaps k_cache in memory",
        lambda: pagedflash.paged_attn(
            q,
            kc,
            randn(rng, kc.shape, "float32"),
            np.array([[0, 1], [2, 3]], np.int32),
            np.array([5, 6], np.int32),
            out=out,
        ),
        kc,
    )


def test_paged_lse_overlapping_out(rng):
    """paged_attn's two outputs, out and lse, in one buffer (found while writing these tests:
    only outputs against inputs were checked)."""
    kc = cache(rng, nb=6, bs=4, hk=2, d=8)
    q = randn(rng, (2, 4, 8), "float32")
    buf = np.full(q.size + 8, np.nan, np.float32)
    out, lse = buf[: q.size].reshape(q.shape), buf[q.size - 4 : q.size + 4].reshape(4, 2)
    bt, sl = np.array([[0, 1], [2, 3]], np.int32), np.array([5, 6], np.int32)
    raises_unchanged(
        ValueError,
        r"^lse: overlaps out in memory",
        lambda: _C.paged_attn(q, kc, kc, bt, sl, out, lse, None, None, True, (-1, -1), 0.0, None, 0, None, "auto"),
        buf,
        kc,
    )
    oa, la = randn(rng, (5, 3, 8), "float32"), randn(rng, (3, 5), "float32")
    buf = np.full(oa.size + 15, np.nan, np.float32)
    raises_unchanged(
        ValueError,
        r"^lse: overlaps out in memory",
        lambda: pagedflash.merge_attn_states(
            oa, la, oa.copy(), la.copy(), out=buf[: oa.size].reshape(oa.shape), out_lse=buf[8 : 8 + 15].reshape(3, 5)
        ),
        buf,
        oa,
        la,
    )


def test_merge_in_place_same_view_allowed(rng):
    """merge_attn_states(out=out_a, out_lse=lse_a): the very same view is allowed (and right);
    any other overlap is refused."""
    oa, ob = randn(rng, (5, 3, 8), "float32"), randn(rng, (5, 3, 8), "float32")
    la, lb = randn(rng, (3, 5), "float32"), randn(rng, (3, 5), "float32")
    ref_out, ref_lse = pagedflash.merge_attn_states(oa.copy(), la.copy(), ob, lb)
    out, lse = pagedflash.merge_attn_states(oa, la, ob, lb, out=oa, out_lse=la)
    assert out is oa and lse is la
    assert np.array_equal(oa, ref_out) and np.array_equal(la, ref_lse)
    oa2 = randn(rng, (5, 3, 8), "float32")
    shifted = np.concatenate([oa2.reshape(-1), np.zeros(8, np.float32)])
    raises_unchanged(
        ValueError,
        r"^out: overlaps out_a in memory",
        lambda: pagedflash.merge_attn_states(
            shifted[: oa2.size].reshape(oa2.shape), la, ob, lb, out=shifted[8:].reshape(oa2.shape)
        ),
        shifted,
    )


# ---------------------------------------------------------------------------
# 8. backward with a tiny scale and softcap; 9. automatic splits and thread counts
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scale,softcap", [(1e-30, 1e16), (1e-30, 1e30), (1e-45, 5.0), (0.0, 5.0)])
def test_backward_tiny_scale_softcap(rng, scale, softcap):
    """dk was scale / (scale / softcap) = 0/0 = NaN where scale / softcap underflows float32
    (1e-30 with a large softcap, a denormal scale, zero); now finite and right."""
    q, k, v = qkv(rng, b=1, sq=6, sk=9)
    dout = randn(rng, q.shape, "float32")
    opts = dict(softmax_scale=scale, softcap=softcap, causal=True)
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True, **opts)
    grads = pagedflash.flash_attn_backward(dout, q, k, v, out, lse, **opts)
    assert all(np.isfinite(g).all() for g in grads)
    check_grads(grads, dout, q, k, v, "float32", **opts)


def test_paged_automatic_splits_independent_of_threads(rng):
    """num_splits=0 chose the split count from the thread count: results differed bitwise
    between thread counts, contrary to the README."""
    lens = [1500, 1100]
    bs, hk, d = 16, 2, 32
    need = [(n + bs - 1) // bs for n in lens]
    nb = sum(need) + 3
    perm = rng.permutation(nb)
    bt = np.full((2, max(need)), -1, np.int32)
    bt[0, : need[0]] = perm[: need[0]]
    bt[1, : need[1]] = perm[need[0] : need[0] + need[1]]
    kc, vc = cache(rng, nb=nb, bs=bs, hk=hk, d=d), cache(rng, nb=nb, bs=bs, hk=hk, d=d)
    q = randn(rng, (2, 4, d), "float32")
    sl = np.array(lens, np.int32)
    before = pagedflash.get_num_threads()
    results = {}
    try:
        for n in (1, 2, 3, 7):
            pagedflash.set_num_threads(n)
            results[n] = pagedflash.paged_attn(q, kc, vc, bt, sl, num_splits=0, return_lse=True)
    finally:
        pagedflash.set_num_threads(0 if before == _C.build_info()["cpu_count"] else before)
    for n in (2, 3, 7):
        assert results[n][0].tobytes() == results[1][0].tobytes(), f"out differs bitwise with {n} threads"
        assert results[n][1].tobytes() == results[1][1].tobytes(), f"lse differs bitwise with {n} threads"
    ref_out, ref_lse = reference.paged_attention(q, kc, vc, bt, sl, return_lse=True)
    assert_close(results[1][0], ref_out, dtype="float32")
    check_lse(results[1][1], ref_lse)


# ---------------------------------------------------------------------------
# 10. negative strides on the backward's inputs
# ---------------------------------------------------------------------------


def _reversed_view(x, axis):
    """A view of x's values with a negative stride on `axis` (memory laid out reversed)."""
    flipped = np.ascontiguousarray(np.flip(x, axis))
    return np.flip(flipped, axis)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_backward_negative_strides(rng, axis):
    """dout / out with a negative stride on a non-last dim were refused; they are inputs: the
    same gradients as contiguous copies, bitwise (the CPU backward is deterministic)."""
    q, k, v = qkv(rng, sq=6, sk=9)
    dout = randn(rng, q.shape, "float32")
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True, causal=True)
    ref = pagedflash.flash_attn_backward(dout, q, k, v, out, lse, causal=True)
    rd, ro = _reversed_view(dout, axis), _reversed_view(out, axis)
    assert rd.strides[axis] < 0 and np.array_equal(rd, dout)
    got = pagedflash.flash_attn_backward(rd, q, k, v, ro, _reversed_view(lse, min(axis, 2)), causal=True)
    for g, r in zip(got, ref):
        assert g.tobytes() == r.tobytes()
    check_grads(got, dout, q, k, v, "float32", causal=True)


@needs_torch
def test_backward_negative_strides_dlpack(rng):
    """A DLPack producer exporting dout / out with negative strides (torch has none; a
    hand-built capsule does)."""
    q, k, v = qkv(rng, sq=6, sk=9)
    dout = randn(rng, q.shape, "float32")
    out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
    ref = pagedflash.flash_attn_backward(dout, q, k, v, out, lse)
    views = [_reversed_view(x, 1) for x in (dout, out)]
    prods = [honest(x) for x in views]
    got = pagedflash.flash_attn_backward(prods[0], torch.from_numpy(q), k, v, prods[1], lse)
    for g, r in zip(got, ref):
        assert np.asarray(g).tobytes() == np.asarray(r).tobytes()
    balanced(*prods)


# ---------------------------------------------------------------------------
# 11. a producer whose deleter clears or sets the Python error state
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("deleter", ["clear", "nomemory"])
@pytest.mark.parametrize("versioned", [True, False], ids=["dltensor_versioned", "dltensor"])
def test_deleter_touching_error_state(rng, deleter, versioned):
    """Success was decided by PyErr_Occurred(): a deleter that cleared the pending error made a
    failed call return None with out unwritten. Deleters here are CPython's own PyErr_Clear /
    PyErr_NoMemory (C functions of no parameters: the DLManagedTensor* is ignored)."""
    q, k, v = qkv(rng)
    out = poison_like(q)
    short = Crafted(k[:1].copy(), versioned=versioned, deleter=deleter)
    raises_unchanged(
        ValueError, r"^k: expected dimension 0 \(batch", lambda: pagedflash.flash_attn(q, short, v[:1], out=out), out
    )
    # a call that fails while importing a later argument: its error survives the deleters too
    prod = Crafted(k.copy(), versioned=versioned, deleter=deleter)
    raises_unchanged(TypeError, r"^v: expected an array", lambda: pagedflash.flash_attn(q, prod, "v", out=out), out)
    if deleter == "clear":  # and a call that succeeds returns its result
        pagedflash.flash_attn(q, prod, v, out=out)
        assert_close(out, reference.attention(q, k, v), dtype="float32")
    _deleter_cache_ops(rng, deleter)  # the cache operations' bindings (right already)


def _deleter_cache_ops(rng, deleter):
    kc = cache(rng)
    prod = Crafted(kc.copy(), shape=kc.shape, deleter=deleter)
    dst = cache(rng, nb=2)
    raises_unchanged(
        ValueError,
        r"^block_mapping: block_mapping\[0, 1\] = 5 \(dst\) is out of range \[0, 2\)",
        lambda: pagedflash.swap_blocks(prod, dst, [[0, 5]]),
        dst,
    )
    raises_unchanged(ValueError, r"^block_mapping: ", lambda: pagedflash.copy_blocks([prod], [dst], [[0, 7]]), dst)


def test_result_hook_sees_every_library_result():
    """The tests' poisoning hook (tests/conftest.py nan_outputs) reaches results allocated on the
    C call path: called once per result, with the object the call returns, before the kernel
    writes it; never for arrays the caller passed."""
    rng = np.random.default_rng(5)
    q, k, v = (rng.standard_normal((1, 9, 2, 16)).astype(np.float32) for _ in range(3))
    seen = []
    pagedflash._C._set_result_hook(lambda x: (seen.append(x), x.fill(np.nan)))
    try:
        out, lse = pagedflash.flash_attn(q, k, v, return_lse=True)
        assert [id(x) for x in seen] == [id(out), id(lse)]
        assert np.isfinite(out).all() and np.isfinite(lse).all()  # written after the hook's fill
        seen.clear()
        pagedflash.flash_attn(q, k, v, out=np.empty_like(q))
        assert seen == []
    finally:
        pagedflash._C._set_result_hook(None)
    with pytest.raises(TypeError, match="hook"):
        pagedflash._C._set_result_hook(3)
