"""Build adainfer-kernels: two Python packages and the C++ extension ``adainfer_kernels._C``.

The extension's sources are listed once, in ``csrc/sources.txt`` (CMakeLists.txt reads the same
file). C++ sources are always compiled; ``.cu`` sources only when the installed torch is a CUDA
build, so ``pip install .`` on a GPU machine is the GPU build. ``ADAINFER_SKIP_EXT=1`` installs the
pure-Python package (every op then uses its torch fallback).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
SOURCES_FILE = ROOT / "csrc" / "sources.txt"


def read_sources() -> list[str]:
    lines = SOURCES_FILE.read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def extension_modules() -> tuple[list, dict]:
    if os.environ.get("ADAINFER_SKIP_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    sources = read_sources()
    with_cuda = torch.version.cuda is not None and os.environ.get("ADAINFER_NO_CUDA", "0") != "1"
    if not with_cuda:
        sources = [s for s in sources if not s.endswith(".cu")]
    # Release build: optimised, no debug info, stripped at link (the .so shrinks ~50x).
    cxx_flags = ["-O3", "-g0", "-std=c++17", "-fvisibility=hidden"]
    link_flags = ["-s"]
    if sys.platform.startswith("linux"):
        # at::parallel_for is header code: without -fopenmp it silently runs serially. Linking
        # libgomp.so.1 resolves, by soname, to the copy torch has already loaded (one runtime).
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    define_macros = [("ADAINFER_WITH_CUDA", "1")] if with_cuda else []
    common = dict(
        name="adainfer_kernels._C",
        sources=sources,
        include_dirs=[str(ROOT / "csrc")],
        define_macros=define_macros,
        extra_link_args=link_flags,
    )
    if with_cuda:
        ext = CUDAExtension(
            **common,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
        )
    else:
        ext = CppExtension(**common, extra_compile_args={"cxx": cxx_flags})
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
