"""Build pagedflash._C: the C11 core, CPU backend and CPython extension, plus the
CUDA backend when nvcc and a GPU are found (or when asked for).

Environment switches
  PAGEDFLASH_CUDA=auto|0|1    build the CUDA backend: auto (the default) when nvcc is found and
                              a GPU is visible, for that GPU's architecture; 1 always (an error
                              without nvcc), for PAGEDFLASH_CUDA_ARCHS; 0 never
  PAGEDFLASH_CUDA_ARCHS=90    compute capabilities, comma separated
                              (default: the visible GPUs', else 80,90)
  PAGEDFLASH_HEADDIMS=64,128  head dims instantiated by the CUDA kernels (quick builds)
  PAGEDFLASH_NATIVE=1|0       compile the CPU backend for this machine's ISA (-march=native)
  MAX_JOBS=N                  parallel nvcc processes (default: CPU count)
  PAGEDFLASH_CUDA_OBJ_DIR=dir where CUDA objects go (default: under build_temp); an object
                              is reused when the hash of its source, the CUDA/C headers,
                              the flags and nvcc matches (objects built on one machine can
                              travel to another with the same nvcc)
The version is PF_VERSION_* in csrc/include/pagedflash.h (read_version); nothing else states it.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
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


DEFAULT_ARCHS = ["80", "90"]


def find_nvcc():
    """nvcc's path, or None."""
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for c in candidates:
        if c and os.path.exists(c):
            return os.path.realpath(c)
    return None


def parse_archs(text):
    """'9.0, 80' -> ['90', '80'] (nvidia-smi writes 9.0; __nvcc_device_query and users write 90)."""
    return [a.strip().replace(".", "") for a in re.split(r"[,\s]+", text or "") if a.strip()]


def visible_gpu_archs(nvcc):
    """The compute capabilities of the GPUs the driver shows, sorted and unique; [] for none.
    Asks nvidia-smi, else CUDA's own __nvcc_device_query (beside nvcc); both fail without a GPU."""
    queries = [["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]]
    query = shutil.which("__nvcc_device_query") or os.path.join(os.path.dirname(nvcc), "__nvcc_device_query")
    queries.append([query])
    for cmd in queries:
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        caps = sorted(set(parse_archs(r.stdout)))
        if r.returncode == 0 and caps and all(c.isdigit() for c in caps):
            return caps
    return []


def cuda_plan(mode, nvcc, archs_env, gpu_archs):
    """What to build: (archs, None) for the CUDA backend, or (None, why) for the CPU backend only.

    mode is PAGEDFLASH_CUDA (auto, 0 or 1), nvcc nvcc's path or None, archs_env
    PAGEDFLASH_CUDA_ARCHS or None, gpu_archs a function giving the visible GPUs' compute
    capabilities (asked only when needed). auto builds CUDA only where it can run: nvcc and a
    GPU, for the GPU's architecture (PAGEDFLASH_CUDA_ARCHS picks others); 1 builds it anyway.
    """
    mode = (mode or "auto").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return None, "disabled by PAGEDFLASH_CUDA=0"
    forced = mode in ("1", "on", "true", "yes")
    if not forced and mode != "auto":
        raise RuntimeError(f"PAGEDFLASH_CUDA={mode}: expected auto, 0 or 1")
    if nvcc is None:
        if forced:
            raise RuntimeError("PAGEDFLASH_CUDA=1 but nvcc was not found (set CUDA_HOME or PATH)")
        return None, "nvcc not found"
    gpus = gpu_archs()
    if not forced and not gpus:
        return None, "nvcc found but no GPU visible; PAGEDFLASH_CUDA=1 builds it anyway"
    return parse_archs(archs_env) or gpus or DEFAULT_ARCHS, None


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


def c_string(text):
    """text as a C string literal, for a -D macro."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class BuildExt(build_ext):
    def build_extensions(self):
        ext = self.extensions[0]
        nvcc = find_nvcc()
        env = os.environ.get
        archs, why = cuda_plan(
            env("PAGEDFLASH_CUDA"), nvcc, env("PAGEDFLASH_CUDA_ARCHS"), lambda: visible_gpu_archs(nvcc)
        )
        if archs is None:
            log(f"CUDA backend: off ({why}); building the CPU backend only")
            # build_info()["cuda_note"]: python -m pagedflash says why, where pip hid this line
            ext.define_macros.append(("PF_CUDA_NOTE", c_string(why)))
        else:
            self.build_cuda(ext, nvcc, archs)
        # distutils relinks only when a source or a dependency is newer than the extension: a
        # rebuilt CUDA object is a dependency, and so is this build's configuration (switching
        # backends in one build folder, e.g. a second `pip install .` with PAGEDFLASH_CUDA=1)
        ext.depends += ext.extra_objects
        config = repr((ext.define_macros, ext.extra_objects, ext.libraries, ext.extra_compile_args))
        stamp = Path(self.build_temp) / "pagedflash_config.txt"
        if not stamp.exists() or stamp.read_text() != config:
            self.force = True
        super().build_extensions()
        stamp.parent.mkdir(parents=True, exist_ok=True)
        stamp.write_text(config)

    def build_cuda(self, ext, nvcc, archs):
        if not (ROOT / "cuda" / "cuda_backend.cu").exists():
            raise RuntimeError(
                f"the CUDA sources are missing from {ROOT / 'cuda'} (an incomplete copy of the source tree?); "
                "PAGEDFLASH_CUDA=0 builds the CPU backend alone"
            )
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
            """(object, whether it was up to date)"""
            stem = "_".join(src.relative_to(ROOT / "cuda").with_suffix("").parts)
            obj = out_dir / (stem + ".o")
            stamp = out_dir / (stem + ".sha256")
            h = common.copy()
            h.update(src.read_bytes())
            digest = h.hexdigest()
            if obj.exists() and stamp.exists() and stamp.read_text() == digest:
                return str(obj), True
            cmd = [nvcc, "-c", str(src), "-o", str(obj)] + flags
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"nvcc failed on {src.name}:\n{' '.join(cmd)}\n{r.stdout}{r.stderr}")
            stamp.write_text(digest)
            return str(obj), False

        jobs = int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
        log(f"CUDA backend: on ({nvcc}); archs {','.join(archs)}; {len(sources)} files, {jobs} jobs")
        t0 = time.perf_counter()
        done = {}
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            pending = {pool.submit(compile_one, src): src for src in sources}
            for future in as_completed(pending):
                src = pending[future]
                done[src], cached = future.result()
                name = src.relative_to(ROOT / "cuda")
                took = f"{time.perf_counter() - t0:.0f} s"
                log(f"CUDA [{len(done)}/{len(sources)}] {name} ({'up to date' if cached else 'compiled'}, {took})")
        objects = [done[src] for src in sources]
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
