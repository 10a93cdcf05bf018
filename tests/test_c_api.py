"""Build tests/c/test_c_api.c against the C sources alone (no Python, no CUDA) and run it:
the C API stands on its own."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="needs a C compiler")
def test_c_api(tmp_path):
    cc = shutil.which("cc") or shutil.which("gcc")
    sources = sorted(str(p) for d in ("csrc/core", "csrc/cpu") for p in (ROOT / d).glob("*.c"))
    exe = tmp_path / "test_c_api"
    cmd = [
        cc,
        "-std=c11",
        "-O2",
        "-pthread",
        "-Wall",
        "-Werror",
        "-Wno-unused-function",
        "-Wno-psabi",
        "-march=native",
        "-I",
        str(ROOT / "csrc/include"),
        "-I",
        str(ROOT / "csrc/core"),
        "-I",
        str(ROOT / "csrc/cpu"),
        str(ROOT / "tests/c/test_c_api.c"),
        *sources,
        "-o",
        str(exe),
        "-lm",
    ]
    build = subprocess.run(cmd, capture_output=True, text=True)
    assert build.returncode == 0, f"build failed:\n{' '.join(cmd)}\n{build.stderr}"
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "0 checks failed" in run.stdout
