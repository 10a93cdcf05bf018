"""`python -m pagedflash` (the demo) and `python -m pagedflash info` run and report."""

import subprocess
import sys

import pagedflash


def run(*args):
    return subprocess.run([sys.executable, "-m", "pagedflash", *args], capture_output=True, text=True, timeout=300)


def test_demo_small():
    r = run("--seqlen", "129", "--heads", "4", "--kv-heads", "2", "--head-dim", "40")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: PASS" in r.stdout and "max |out - ref|" in r.stdout and "GFLOP/s" in r.stdout


def test_info():
    r = run("info")
    assert r.returncode == 0, r.stderr
    assert "CPU backend : built" in r.stdout
    info = pagedflash.build_info()
    assert ("CUDA backend: built" in r.stdout) == info["cuda"]
    assert info["backends"][0] == "cpu" and info["num_threads"] >= 1
