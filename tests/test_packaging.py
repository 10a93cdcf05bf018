"""Packaging: the sdist holds every file the build needs, the version is stated in one place,
and the build decides what to compile the way README's "Install" section says.

The sdist test builds one from a copy of the tracked files (so build outputs in the checkout
cannot hide a missing rule in MANIFEST.in) and compares its file list with `git ls-files`; it
skips outside a git checkout (an unpacked sdist, an installed copy).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import runpy
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import pagedflash

ROOT = Path(__file__).resolve().parent.parent

# Tracked paths the sdist leaves out on purpose (MANIFEST.in says why): benchmark results, plots
# and kernel experiments, developer and GPU-machine scripts, CI and lint configuration.
EXCLUDED = ("benchmarks/", "scripts/", ".ci/", ".clang-format", ".gitignore")
# What setuptools writes into every sdist besides the tracked files.
GENERATED = ("PKG-INFO", "setup.cfg", "python/pagedflash.egg-info/")
# The build's own inputs, named so a failure says which one went missing.
BUILD_INPUTS = ("csrc/", "cuda/", "python/pagedflash/", "setup.py", "pyproject.toml", "README.md", "LICENSE")


def header_version() -> str:
    text = (ROOT / "csrc" / "include" / "pagedflash.h").read_text()
    parts = [re.search(rf"#define PF_VERSION_{p} (\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    assert all(parts), "PF_VERSION_MAJOR/MINOR/PATCH must be defined in pagedflash.h"
    return ".".join(m.group(1) for m in parts)


def tracked_files() -> list[str]:
    if shutil.which("git") is None or not (ROOT / "setup.py").exists():
        pytest.skip("needs git and a source checkout")
    r = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0 or not r.stdout:
        pytest.skip("not a git checkout: nothing to compare the sdist with")
    # a file deleted in the working tree but not yet in the index is on its way out
    return sorted(f for f in r.stdout.split("\0") if f and (ROOT / f).is_file())


def starts(path: str, prefixes) -> bool:
    return any(path == p or (p.endswith("/") and path.startswith(p)) for p in prefixes)


@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    """(archive path, files in it relative to its top folder, tracked files)"""
    files = tracked_files()
    pytest.importorskip("setuptools", minversion="77")  # pyproject's license-files (the test extra has it)
    src = tmp_path_factory.mktemp("tree")
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    dist = src / "dist"
    r = subprocess.run(
        [sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)],
        cwd=src,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    (archive,) = dist.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
    top = {n.split("/", 1)[0] for n in names}
    assert len(top) == 1, f"an sdist has one top folder, not {sorted(top)}"
    return archive, sorted(n.split("/", 1)[1] for n in names), files


def test_sdist_holds_every_tracked_file_but_the_excluded(sdist):
    archive, names, tracked = sdist
    shipped = {n for n in names if not starts(n, GENERATED)}
    wanted = {f for f in tracked if not starts(f, EXCLUDED)}
    assert not wanted - shipped, f"{archive.name} lacks (add them to MANIFEST.in): {sorted(wanted - shipped)}"
    assert not shipped - wanted, (
        f"{archive.name} holds files that are not tracked or are excluded: {sorted(shipped - wanted)}"
    )
    # every exclusion names something that exists, so the list above stays honest
    for prefix in EXCLUDED:
        assert any(starts(f, [prefix]) for f in tracked), f"EXCLUDED names {prefix}, which git does not track"


def test_sdist_holds_the_build_inputs(sdist):
    _, names, tracked = sdist
    for prefix in BUILD_INPUTS:
        need = [f for f in tracked if starts(f, [prefix])]
        assert need, f"{prefix} is not tracked"
        missing = sorted(set(need) - set(names))
        assert not missing, f"the sdist lacks build inputs under {prefix}: {missing}"
    # the sources whose absence made an sdist build import-fail with an undefined symbol
    kinds = {Path(n).suffix for n in names if n.startswith("cuda/")}
    assert {".cu", ".cuh", ".h", ".inc", ".py"} <= kinds, kinds
    assert "cuda/cuda_backend.cu" in names


def test_sdist_metadata(sdist):
    archive, _, _ = sdist
    assert archive.name == f"pagedflash-{header_version()}.tar.gz"
    with tarfile.open(archive) as tar:
        pkg_info = tar.extractfile(f"pagedflash-{header_version()}/PKG-INFO").read().decode()
    assert f"\nVersion: {header_version()}\n" in pkg_info
    license_expr = re.search(r'^license = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    assert license_expr, "pyproject.toml states the license as an SPDX expression"
    assert f"\nLicense-Expression: {license_expr.group(1)}\n" in pkg_info
    assert "\nLicense-File: LICENSE\n" in pkg_info


def test_license_matches_pyproject():
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("needs the source tree")
    declared = re.search(r'^license = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M)
    text = (ROOT / "LICENSE").read_text()
    assert declared and declared.group(1) == "BSD-3-Clause"
    assert text.startswith("BSD 3-Clause License") and "pagedflash authors" in text
    assert "Neither the name of the copyright holder" in text  # the third clause


def load_setup_py() -> dict:
    """setup.py's functions, without running setup()."""
    setuptools = pytest.importorskip("setuptools")
    if not (ROOT / "setup.py").exists():
        pytest.skip("needs the source tree")
    saved = setuptools.setup
    setuptools.setup = lambda **kwargs: None
    try:
        return runpy.run_path(str(ROOT / "setup.py"), run_name="pagedflash_setup")
    finally:
        setuptools.setup = saved


def test_one_version():
    """PF_VERSION_* in pagedflash.h is the version; setup.py (hence the wheel and sdist metadata),
    the extension's build_info and pagedflash.__version__ derive it, pyproject states none."""
    version = header_version()
    assert load_setup_py()["VERSION"] == version
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'^dynamic = \["version"\]', pyproject, re.M)
    assert not re.search(r"^version\s*=", pyproject, re.M), "pyproject.toml must not state a version"
    assert pagedflash.__version__ == pagedflash.build_info()["version"] == version, "a stale build? rebuild _C"
    try:
        dist = importlib.metadata.distribution("pagedflash")
    except importlib.metadata.PackageNotFoundError:
        return  # an in-place build, never installed
    if Path(str(dist.locate_file("pagedflash/__init__.py"))).resolve() == Path(pagedflash.__file__).resolve():
        assert dist.version == version  # the installed metadata of the pagedflash under test


def fail_if_asked():
    raise AssertionError("the GPU query should not run here")


@pytest.mark.parametrize(
    "mode, nvcc, archs_env, gpus, want",
    [
        # auto (the default): CUDA only where it can run, for the GPUs present
        (None, None, None, [], (None, "nvcc not found")),
        ("auto", "/cuda/bin/nvcc", None, [], (None, "PAGEDFLASH_CUDA=1")),
        ("auto", "/cuda/bin/nvcc", "90", [], (None, "PAGEDFLASH_CUDA=1")),  # archs alone do not force it
        ("auto", "/cuda/bin/nvcc", None, ["86"], ["86"]),
        ("AUTO", "/cuda/bin/nvcc", None, ["80", "90"], ["80", "90"]),
        ("auto", "/cuda/bin/nvcc", "8.0, 90", ["86"], ["80", "90"]),  # PAGEDFLASH_CUDA_ARCHS wins
        # 1: always (CI compiles on a machine without a GPU)
        ("1", "/cuda/bin/nvcc", "90", [], ["90"]),
        ("1", "/cuda/bin/nvcc", None, [], ["80", "90"]),
        ("on", "/cuda/bin/nvcc", None, ["90"], ["90"]),
        # 0: never, and no GPU query
        ("0", "/cuda/bin/nvcc", "90", fail_if_asked, (None, "PAGEDFLASH_CUDA=0")),
        ("off", None, None, fail_if_asked, (None, "PAGEDFLASH_CUDA=0")),
    ],
)
def test_cuda_plan(mode, nvcc, archs_env, gpus, want):
    plan = load_setup_py()["cuda_plan"]
    archs, why = plan(mode, nvcc, archs_env, gpus if callable(gpus) else lambda: gpus)
    if isinstance(want, list):
        assert (archs, why) == (want, None)
    else:
        assert archs is None and want[1] in why


@pytest.mark.parametrize("mode", ["1", "maybe"])
def test_cuda_plan_refuses(mode):
    with pytest.raises(RuntimeError, match="PAGEDFLASH_CUDA"):
        load_setup_py()["cuda_plan"](mode, None, None, list)


def fake_tool(folder: Path, name: str, output: str, status: int) -> None:
    tool = folder / name
    tool.write_text(f"#!/bin/sh\nprintf '{output}'\nexit {status}\n")
    tool.chmod(0o755)


@pytest.mark.parametrize(
    "smi, query, want",
    [
        (("9.0\\n9.0\\n8.6\\n", 0), None, ["86", "90"]),  # nvidia-smi, one line a GPU
        (("", 9), ("90,80", 0), ["80", "90"]),  # no driver for nvidia-smi: CUDA's device query
        (None, ("89", 0), ["89"]),  # no nvidia-smi at all
        (("", 9), ("", 1), []),  # no GPU: both fail (as on the CI machine)
        (("[N/A]\\n", 0), None, []),  # an old driver without compute_cap
        (None, None, []),
    ],
)
def test_visible_gpu_archs(tmp_path, monkeypatch, smi, query, want):
    visible = load_setup_py()["visible_gpu_archs"]
    if smi:
        fake_tool(tmp_path, "nvidia-smi", *smi)
    if query:
        fake_tool(tmp_path, "__nvcc_device_query", *query)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert visible(str(tmp_path / "nvcc")) == want


def test_build_says_why_cuda_is_out():
    info = pagedflash.build_info()
    if info["cuda"]:
        assert info["cuda_note"] == "" and info["cuda_archs"]
    else:
        assert info["cuda_note"], "a build without CUDA records why (setup.py's PF_CUDA_NOTE)"


def test_import_from_an_unbuilt_tree_says_what_to_do(tmp_path):
    """PYTHONPATH=python in a checkout that was pip-installed, not built in place, finds a
    pagedflash without _C: the error says how to get one."""
    pkg = tmp_path / "pagedflash"
    shutil.copytree(Path(pagedflash.__file__).parent, pkg, ignore=shutil.ignore_patterns("_C.*", "__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", "import pagedflash"], env=env, capture_output=True, text=True)
    assert r.returncode != 0
    assert "pagedflash._C, the compiled extension, is not in" in r.stderr and "build_ext --inplace" in r.stderr
