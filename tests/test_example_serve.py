"""examples/serve_paged.py, run small: a tiny random-weight transformer served through
BlockManager + write_kv_cache + paged_attn (chunked prefill, prefix sharing, parallel
sampling with copy-on-write, preemption by swap-out/swap-in) must reproduce, step by
step, the logits and tokens of the same model run with contiguous per-request caches.
The checker itself is tested too: a serving loop that skips the copy-on-write copies
or the swap-in copies must make the script fail."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pagedflash

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "serve_paged.py"


def run_example(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    # the pagedflash under test (installed or an in-place build), not necessarily ./python
    pkg_parent = str(Path(pagedflash.__file__).resolve().parent.parent)
    paths = [pkg_parent] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return subprocess.run([sys.executable, str(EXAMPLE), *args], env=env, capture_output=True, text=True, timeout=300)


def number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the log:\n{text}"
    return float(m.group(1))


@pytest.mark.parametrize(
    "args", [("--small",), ("--small", "--seed", "3", "--num-splits", "3")], ids=["seed0", "seed3_splits3"]
)
def test_serve_paged_small(args):
    res = run_example(*args)
    log = res.stdout
    assert res.returncode == 0, log + res.stderr
    assert "FAIL" not in log
    assert "OK: every step's logits and every token match the contiguous run" in log
    assert number(r"copy-on-write copies: (\d+)", log) > 0
    assert number(r"swap out: (\d+) \(", log) >= 1 and number(r"swap out: \d+ \((\d+) blocks", log) > 0
    assert number(r"swap in: (\d+) \(", log) >= 1 and number(r"swap in: \d+ \((\d+) blocks", log) > 0
    assert number(r"prefix cache hits: (\d+) of", log) > 0
    assert re.search(r"admit req\d .*prefix cache hit: \d+ tokens\) prefill \[[1-9]\d*:", log), log
    assert number(r"max \|diff\| = ([0-9.e+-]+)", log) <= 1e-4
    assert "generated tokens identical" in log
    assert number(r"packed with cu_seqlens_q\), query tokens computed: (\d+)", log) == number(
        r"logits: (\d+) positions compared", log
    )
    assert 0 < number(r"ratio ([0-9.]+) \(", log) < 1


@pytest.mark.parametrize("fmt", ["fp8", "fp8_e5m2", "int8"])
def test_serve_paged_compressed_cache(fmt):
    """The same serving run from a compressed cache: logits match a contiguous run holding the same
    dequantized values (tokens teacher-forced), memory reported in bytes, 4x (int8 with its scales:
    3.56x) smaller than float32."""
    res = run_example("--small", "--seed", "3", "--kv-cache-dtype", fmt)
    log = res.stdout
    assert res.returncode == 0, log + res.stderr
    assert "FAIL" not in log and "OK: every step's logits match the contiguous run holding the same" in log
    assert number(r"max \|diff\| = ([0-9.e+-]+) \(tolerance", log) <= 2e-2
    assert number(r"against a float32 cache \(same tokens\): max \|logits diff\| = ([0-9.e+-]+)", log) < 2.0
    assert number(r"; ([0-9.]+)x less than float32", log) == (3.56 if fmt == "int8" else 4.0)
    blocks, block_bytes, peak = (
        number(r"paged peak (\d+) blocks", log),
        number(r"blocks x (\d+) B", log),
        number(r"= (\d+) B \(", log),
    )
    assert blocks * block_bytes == peak > 0


def test_checker_catches_scales_left_behind(monkeypatch, capsys):
    """int8 caches whose per-(token, head) scales copy-on-write forgets: the copied blocks read
    the NaN scales of a fresh block, and the run fails (its NaN reaches the next layer's keys,
    which write_kv_cache refuses to quantize, or the logits)."""
    example = load_example()
    real = example.pf.copy_blocks
    monkeypatch.setattr(example.pf, "copy_blocks", lambda k, v, m, **kw: real(k, v, m))
    try:
        status = example.main(["--small", "--quiet", "--kv-cache-dtype", "int8"])
    except ValueError as e:
        assert "is nan; a compressed cache (int8) holds finite values only" in str(e)
    else:
        assert status == 1 and "FAILED" in capsys.readouterr().out


def load_example():
    spec = importlib.util.spec_from_file_location("serve_paged", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    try:
        spec.loader.exec_module(mod)
    finally:
        del sys.modules[spec.name]
    return mod


def test_checker_catches_missing_copy_on_write(monkeypatch, capsys):
    example = load_example()
    monkeypatch.setattr(example.pf, "copy_blocks", lambda *a, **k: None)
    assert example.main(["--small", "--quiet"]) == 1
    log = capsys.readouterr().out
    assert "FAILED" in log and "copy-on-write copies: 0" not in log


def test_checker_catches_missing_swap_in(monkeypatch, capsys):
    example = load_example()
    real = example.pf.swap_blocks

    def swap_out_only(src, dst, mapping, **kw):  # host -> device copies dropped
        if src.shape[0] == example.make_scenario(True, 0).num_blocks:
            real(src, dst, mapping, **kw)

    monkeypatch.setattr(example.pf, "swap_blocks", swap_out_only)
    assert example.main(["--small", "--quiet"]) == 1
    assert "FAILED" in capsys.readouterr().out
