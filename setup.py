"""Build pagedflash._C: the C11 core, CPU backend and CPython extension, plus the
CUDA backend when nvcc is found.

Environment switches
  PAGEDFLASH_CUDA=auto|0|1    build the CUDA backend (auto: when nvcc is found)
  PAGEDFLASH_CUDA_ARCHS=90    compute capabilities, comma separated
                              (default: the GPUs present, else 80,90)
  PAGEDFLASH_HEADDIMS=64,128  head dims instantiated by the CUDA kernels (quick builds)
  PAGEDFLASH_NATIVE=1|0       compile the CPU backend for this machine's ISA (-march=native)
  MAX_JOBS=N                  parallel nvcc processes (default: CPU count)
  PAGEDFLASH_CUDA_OBJ_DIR=dir where CUDA objects go (default: under build_temp); an object
                              is reused when the hash of its source, the CUDA/C headers,
                              the flags and nvcc matches (objects built on one machine can
                              travel to another with the same nvcc)
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


def read_version():
    """The version lives in one place: PF_VERSION_* in csrc/include/pagedflash.h."""
    text = (ROOT / "csrc" / "include" / "pagedflash.h").read_text()
    return ".".join(
        re.search(rf"#define PF_VERSION_{part} (\d+)", text).group(1) for part in ("MAJOR", "MINOR", "PATCH")
    )


VERSION = read_version()


def log(msg):
    print(f"pagedflash build: {msg}", file=sys.stderr, flush=True)


def find_nvcc():
    env = os.environ.get("PAGEDFLASH_CUDA", "auto").lower()
    if env in ("0", "off", "false", "no"):
        return None, "disabled by PAGEDFLASH_CUDA=0"
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.exists(c):
            return os.path.realpath(c), None
    if env in ("1", "on", "true", "yes"):
        raise RuntimeError("PAGEDFLASH_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
    return None, "nvcc not found"


def cuda_archs():
    env = os.environ.get("PAGEDFLASH_CUDA_ARCHS")
    if env:
        return [a.strip().replace(".", "") for a in env.split(",") if a.strip()]
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        caps = sorted({l.strip().replace(".", "") for l in out.stdout.splitlines() if l.strip()})
        if out.returncode == 0 and caps:
            return caps
    except (OSError, subprocess.SubprocessError):
        pass
    return ["80", "90"]


def cuda_home(nvcc):
    """The toolkit root, asked of nvcc itself (nvcc may be a wrapper script)."""
    import tempfile

    try:
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "probe.cu"
            src.write_text("")
            r = subprocess.run(
                [nvcc, "--dryrun", "-c", str(src), "-o", str(Path(tmp) / "probe.o")],
                capture_output=True,
                text=True,
                timeout=60,
            )
        for line in (r.stdout + r.stderr).splitlines():
            if "TOP=" in line:
                return Path(line.split("TOP=", 1)[1].strip()).resolve()
    except (OSError, subprocess.SubprocessError):
        pass
    return Path(nvcc).resolve().parent.parent


def cuda_lib_dir(nvcc):
    home = cuda_home(nvcc)
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib", "targets/sbsa-linux/lib"):
        if (home / sub / "libcudart_static.a").exists():
            return str(home / sub)
    raise RuntimeError(f"libcudart_static.a not found under {home}")


def gencode_flags(archs):
    flags = []
    for a in archs:
        # sm_90a unlocks wgmma/setmaxnreg; kernels that need it check __CUDA_ARCH_FEAT_SM90_ALL
        real = f"{a}a" if a == "90" else a
        flags.append(f"-gencode=arch=compute_{real},code=sm_{real}")
    return flags


class BuildExt(build_ext):
    def build_extensions(self):
        ext = self.extensions[0]
        nvcc, why = find_nvcc()
        if nvcc is None:
            log(f"CUDA backend: off ({why}); building the CPU backend only")
        else:
            self.build_cuda(ext, nvcc)
        super().build_extensions()

    def build_cuda(self, ext, nvcc):
        archs = cuda_archs()
        sources = sorted((ROOT / "cuda").rglob("*.cu"))
        headdims = os.environ.get("PAGEDFLASH_HEADDIMS")
        kept_dims = []
        if headdims:
            kept_dims = [h.strip() for h in headdims.split(",") if h.strip()]
            keep = {f"hdim{h}" for h in kept_dims}
            sources = [s for s in sources if "_hdim" not in s.name or any(k + "_" in s.name for k in keep)]
        out_dir = Path(os.environ.get("PAGEDFLASH_CUDA_OBJ_DIR") or (Path(self.build_temp) / "cuda"))
        out_dir.mkdir(parents=True, exist_ok=True)
        flags = [
            "-O3",
            "-std=c++17",
            "--use_fast_math",
            "-Xcompiler",
            "-fPIC",
            "-Xptxas",
            "-O3",
            "-DPF_WITH_CUDA",
            f'-DPF_CUDA_ARCHS_STR="{",".join(archs)}"',
            "-I" + str(ROOT / "csrc" / "include"),
            "-I" + str(ROOT / "csrc" / "core"),
            "-I" + str(ROOT / "cuda"),
            "--expt-relaxed-constexpr",
        ]
        if headdims:
            flags.append("-DPF_HEADDIMS_TRIMMED")
            flags += [f"-DPF_HDIM{h}" for h in kept_dims]
        flags += gencode_flags(archs)
        flags += os.environ.get("PAGEDFLASH_NVCC_FLAGS", "").split()

        # Any header change rebuilds every object (simple and safe).
        common = hashlib.sha256()
        headers = [h for pattern in ("*.cuh", "*.h", "*.inc") for h in (ROOT / "cuda").rglob(pattern)]
        headers += sorted((ROOT / "csrc" / "include").glob("*.h")) + sorted((ROOT / "csrc" / "core").glob("*.h"))
        for hdr in sorted(headers):
            common.update(str(hdr.relative_to(ROOT)).encode() + b"\0" + hdr.read_bytes())
        common.update("\0".join(flags).replace(str(ROOT), "<root>").encode())
        try:
            common.update(subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.encode())
        except OSError:
            pass

        def compile_one(src):
            stem = "_".join(src.relative_to(ROOT / "cuda").with_suffix("").parts)
            obj = out_dir / (stem + ".o")
            stamp = out_dir / (stem + ".sha256")
            h = common.copy()
            h.update(src.read_bytes())
            digest = h.hexdigest()
            if obj.exists() and stamp.exists() and stamp.read_text() == digest:
                return str(obj)
            cmd = [nvcc, "-c", str(src), "-o", str(obj)] + flags
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src.name}:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}")
            stamp.write_text(digest)
            return str(obj)

        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        log(f"CUDA backend: on ({nvcc}); archs {','.join(archs)}; {len(sources)} files, {jobs} jobs")
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            objects = list(pool.map(compile_one, sources))
        ext.extra_objects += objects
        ext.define_macros.append(("PF_WITH_CUDA", "1"))
        ext.include_dirs.append(str(ROOT / "cuda"))
        ext.library_dirs.append(cuda_lib_dir(nvcc))
        ext.libraries += ["cudart_static", "rt", "dl", "pthread", "stdc++"]


def c_sources():
    files = []
    for d in ("csrc/core", "csrc/cpu", "csrc/py"):
        files += sorted(str(p.relative_to(ROOT)) for p in (ROOT / d).glob("*.c"))
    return files


native = os.environ.get("PAGEDFLASH_NATIVE", "1") != "0"
cflags = [
    "-std=c11",
    "-O3",
    "-fno-strict-aliasing",
    "-pthread",
    "-Wall",
    "-Wno-unused-function",
    "-Wno-psabi",
    "-fvisibility=hidden",
    "-ffp-contract=fast",
]
if native:
    cflags.append("-march=native")

ext = Extension(
    "pagedflash._C",
    sources=c_sources(),
    # headers as dependencies: a header-only change must rebuild the extension
    depends=sorted(str(p.relative_to(ROOT)) for d in ("csrc", "cuda") for p in (ROOT / d).rglob("*.h")),
    include_dirs=["csrc/include", "csrc/core", "csrc/cpu", numpy.get_include()],
    extra_compile_args=cflags,
    extra_link_args=["-pthread"],
)

setup(version=VERSION, ext_modules=[ext], cmdclass={"build_ext": BuildExt})
