"""Builds fastmlp's C++ (and, when possible, CUDA) extension `fastmlp._C`.

Install with `pip install --no-build-isolation -e .` into an environment that
already has the torch you will run with: the extension is compiled against that
torch's headers and ABI. (Without --no-build-isolation pip would download a
second, possibly different torch into a throwaway build environment.)

Environment knobs:
  FASTMLP_CUDA=0|1        force the CUDA part off / on (1 fails clearly if impossible).
                          Default: on when torch is a CUDA build and nvcc is found.
  CUDA_HOME               CUDA toolkit root; else found from `nvcc` on PATH.
  TORCH_CUDA_ARCH_LIST    e.g. "9.0"; else the local GPU's, else DEFAULT_CUDA_ARCHS.
  MAX_JOBS                parallel compile jobs (ninja).
"""

from __future__ import annotations

import glob
import os
import platform
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# Used when TORCH_CUDA_ARCH_LIST is unset and no GPU is visible: Ampere, Ada,
# Hopper, plus PTX so that newer GPUs can JIT-compile the Hopper code.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


# nvcc flags of the CUDA kernels; scripts/cuda_resources.py compiles with the
# same ones to report registers, shared memory and spills.
NVCC_FLAGS = ("-O3", "--expt-relaxed-constexpr", "-lineinfo")


def x86_64_flags() -> list[str]:
    """The CPU kernels' x86-64 flags, shared with CMakeLists.txt (csrc/x86_64_flags.txt)."""
    with open(os.path.join(ROOT, "csrc", "x86_64_flags.txt"), encoding="utf-8") as f:
        return [line.strip() for line in f if line.startswith("-")]


def _fail(message: str) -> None:
    sys.stderr.write(f"\nfastmlp build error: {message}\n\n")
    raise SystemExit(1)


def _looks_like_cuda_home(path: str | None) -> bool:
    return (
        bool(path)
        and os.path.isfile(os.path.join(path, "bin", "nvcc"))
        and (os.path.isfile(os.path.join(path, "include", "cuda_runtime.h")))
    )


def find_cuda_home() -> str | None:
    """CUDA_HOME if set, else the toolkit that `nvcc` on PATH belongs to.

    `nvcc` may be a symlink (resolved) or a wrapper script that execs the real
    one (as /usr/local/bin/nvcc does on some machines); both are followed.
    """
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            home = os.environ[var]
            if not _looks_like_cuda_home(home):
                _fail(f"{var}={home} has no bin/nvcc and include/cuda_runtime.h")
            return home
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if _looks_like_cuda_home(home):
        return home
    try:  # a small wrapper script: `exec /usr/local/cuda-13.0/bin/nvcc "$@"`
        with open(real, encoding="utf-8", errors="replace") as f:
            text = f.read(4096)
        match = re.search(r"(/\S+)/bin/nvcc\b", text)
        if match and _looks_like_cuda_home(match.group(1)):
            return match.group(1)
    except OSError:
        pass
    return None


def nvidia_pip_dirs() -> tuple[list[str], list[str]]:
    """Include and library folders of the `nvidia` pip packages (cuBLAS headers live there)."""
    includes, libs = [], []
    for base in sys.path:
        for sub in ("cu13", "cu12", "cublas"):
            root = os.path.join(base, "nvidia", sub)
            if os.path.isdir(os.path.join(root, "include")):
                includes.append(os.path.join(root, "include"))
            if os.path.isdir(os.path.join(root, "lib")):
                libs.append(os.path.join(root, "lib"))
    return includes, libs


def cublaslt_library(library_dirs: list[str]) -> str:
    """The linker name of cuBLASLt: `cublasLt` where a plain libcublasLt.so exists
    (the toolkit's lib64), else the versioned file the pip package ships
    (`:libcublasLt.so.13`), which has no unversioned symlink."""
    cuda_home = os.environ.get("CUDA_HOME", "")
    for d in [os.path.join(cuda_home, "lib64"), *library_dirs]:
        if os.path.exists(os.path.join(d, "libcublasLt.so")):
            return "cublasLt"
    for d in library_dirs:
        versioned = sorted(glob.glob(os.path.join(d, "libcublasLt.so.*")))
        if versioned:
            return ":" + os.path.basename(versioned[0])
    return "cublasLt"


def want_cuda(torch_cuda_version: str | None, cuda_home: str | None) -> bool:
    forced = os.environ.get("FASTMLP_CUDA", "").strip()
    if forced not in ("", "0", "1"):
        _fail(f"FASTMLP_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        return False
    possible = torch_cuda_version is not None and cuda_home is not None
    if forced == "1" and not possible:
        why = (
            "the installed torch is a CPU-only build"
            if torch_cuda_version is None
            else "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
        )
        _fail(f"FASTMLP_CUDA=1 but the CUDA extension cannot be built: {why}.")
    return possible


# csrc/cuda files that are host code with no CUDA dependency, built in every build:
# the CUDA engine rule, so that the rule and its report are tested without a GPU.
CUDA_FREE_SOURCES = ("csrc/cuda/engine_rule.cpp",)


def kernel_sources(with_cuda: bool) -> list[str]:
    """The extension's sources, relative to the repository root, from every folder of
    csrc/. csrc/cuda holds the CUDA backend: .cu files for nvcc and ATen-only .cpp files
    for the host compiler, built only with CUDA (a CPU build must not register CUDA
    kernels), but for CUDA_FREE_SOURCES, built in every build."""

    def found(pattern: str) -> list[str]:
        return [os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/{pattern}", recursive=True)]

    every = found("csrc/**/*.cpp") + found("csrc/cuda/**/*.cu")
    cpu = [p for p in every if not p.startswith("csrc/cuda/") or p in CUDA_FREE_SOURCES]
    return sorted(every if with_cuda else cpu)


def build_extensions():
    cuda_home = find_cuda_home()
    if cuda_home is not None:
        # torch.utils.cpp_extension reads CUDA_HOME when it is imported.
        os.environ["CUDA_HOME"] = cuda_home
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _fail(
            "torch must be installed first, and the build must see it: "
            "pip install torch, then pip install --no-build-isolation -e ."
        )

    with_cuda = want_cuda(torch.version.cuda, cuda_home)
    sources = kernel_sources(with_cuda)
    cxx_flags = ["-O3", "-fopenmp"]  # the C++ standard is the one torch asks for
    if platform.machine().lower() in ("x86_64", "amd64"):
        cxx_flags += x86_64_flags()
    extra = {"cxx": cxx_flags}
    include_dirs = [os.path.join(ROOT, "csrc")]
    library_dirs: list[str] = []
    libraries: list[str] = []
    define_macros: list[tuple[str, str | None]] = []
    extension = cpp_extension.CppExtension
    if with_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                os.environ["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        nv_includes, nv_libs = nvidia_pip_dirs()
        include_dirs += nv_includes
        library_dirs += nv_libs
        libraries += [cublaslt_library(library_dirs)]
        define_macros.append(("FASTMLP_WITH_CUDA", None))
        extra["nvcc"] = list(NVCC_FLAGS)
        extension = cpp_extension.CUDAExtension
        print(
            f"fastmlp: building CPU + CUDA kernels (CUDA_HOME={cuda_home}, "
            f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']})"
        )
    else:
        print("fastmlp: building CPU kernels only")

    ext = extension(
        name="fastmlp._C",
        sources=sources,
        include_dirs=include_dirs,
        library_dirs=library_dirs,
        libraries=libraries,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"] + [f"-Wl,-rpath,{d}" for d in library_dirs],
        py_limited_api=False,
    )
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # also how pip's build backend runs this file
    ext_modules, cmdclass = build_extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
