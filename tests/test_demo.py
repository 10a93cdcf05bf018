"""`python -m pagedflash` (the demo) and `python -m pagedflash info` run and report, and import
torch only where a GPU is visible to a CUDA build (torch's import costs ~2 s)."""

import subprocess
import sys

import pytest

import pagedflash


def run(*args):
    return subprocess.run([sys.executable, "-m", "pagedflash", *args], capture_output=True, text=True, timeout=300)


SMALL = ("--seqlen", "129", "--heads", "4", "--kv-heads", "2", "--head-dim", "40")


def on_gpu():
    info = pagedflash.build_info()
    return info["cuda"] and info["cuda_devices"] > 0


@pytest.mark.parametrize("dtype", ["auto", "float16", "float32"])
def test_demo_small(dtype):
    r = run(*SMALL, "--dtype", dtype)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "check: PASS" in r.stdout and "max |out - ref|" in r.stdout and "GFLOP/s" in r.stdout
    want = dtype if dtype != "auto" else ("float16" if on_gpu() else "float32")  # float32 on the CPU
    assert f"causal True, {want}\n" in r.stdout


def test_info():
    r = run("info")
    assert r.returncode == 0, r.stderr
    assert "CPU backend : built" in r.stdout
    info = pagedflash.build_info()
    assert ("CUDA backend: built" in r.stdout) == info["cuda"]
    if not info["cuda"]:  # says why, as the build recorded it
        assert f"CUDA backend: not built ({info['cuda_note']})" in r.stdout
    assert info["backends"][0] == "cpu" and info["num_threads"] >= 1


def imports_torch(*args):
    """Whether `python -m pagedflash <args>` imports torch (-X importtime lists every import)."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "pagedflash", *args], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return any(line.rstrip().endswith("| torch") for line in r.stderr.splitlines())


@pytest.mark.skipif(on_gpu(), reason="a GPU is visible: info names it through torch")
@pytest.mark.parametrize("args", [("info",), SMALL])
def test_no_torch_without_a_gpu(args):
    assert not imports_torch(*args)


# A build with CUDA on a machine without a GPU (CI's), wherever these tests run: build_info
# says so, and neither command may import torch.
CUDA_BUILT_NO_GPU = """
import sys
import pagedflash
real = pagedflash.build_info
pagedflash.build_info = lambda: dict(real(), cuda=True, cuda_archs="90", cuda_note="", cuda_devices=0)
from pagedflash.__main__ import main
assert main(sys.argv[1:]) == 0
print("torch imported:", "torch" in sys.modules)
"""


@pytest.mark.parametrize("args", [["info"], list(SMALL)])
def test_no_torch_for_a_cuda_build_without_a_gpu(args):
    r = subprocess.run([sys.executable, "-c", CUDA_BUILT_NO_GPU, *args], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "CUDA backend: built for sm_90; 0 device(s) visible" in r.stdout
    assert "torch imported: False" in r.stdout
