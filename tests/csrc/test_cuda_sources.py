"""The CUDA sources of ``_C`` compile with this machine's nvcc, although torch here is a CPU wheel.

Nothing CUDA can be built into the extension or run on these machines (no CUDA torch, no GPU), so
this is the CI check that the ``.cu`` files listed in ``csrc/sources.txt`` are at least valid CUDA
C++ against the installed torch headers, with the flags a CUDA build of ``setup.py`` would use.

What is checked, per ``.cu`` file: a full ``nvcc -c`` (CUDA front end, host compiler, device code
generation with ptxas: sm_80 and sm_90 for the kernels, sm_90 for the glue), and that no kernel
spills registers.
``csrc/compaction_kernels.cu`` includes no torch header, so its check is complete up to linking.
``csrc/compaction_cuda.cu`` (the ATen glue) includes ``c10/cuda`` headers; the CPU wheel ships
them but not the CMake-generated ``c10/cuda/impl/cuda_cmake_macros.h`` they include, so a
one-line stand-in is supplied for that header only (the real one only defines
``C10_CUDA_BUILD_SHARED_LIBS``). ``ATen/cuda/CUDAContext.h`` is avoided on purpose: it needs
cuSPARSE/cuBLAS headers that this toolkit lacks.

Not checked: linking against ``libtorch_cuda``/``libc10_cuda`` (absent from the CPU wheel) and any
execution; those need a CUDA torch (``bench/gpu_check.sh``-style run on a lent GPU).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension as cpp_extension

ROOT = Path(__file__).resolve().parents[2]
NVCC = shutil.which("nvcc")
CU_SOURCES = [
    line.strip()
    for line in (ROOT / "csrc" / "sources.txt").read_text().splitlines()
    if line.strip().endswith(".cu") and not line.lstrip().startswith("#")
]
ARCHS = ("80", "90")
# Files whose kernels matter: device code for every target. The glue has no kernels, and each extra
# target re-runs the device front end over all the torch headers it includes (~30 s), so one target.
KERNEL_SOURCES = {"csrc/compaction_kernels.cu"}


def archs_for(source: str) -> tuple[str, ...]:
    return ARCHS if source in KERNEL_SOURCES else ARCHS[-1:]


def nvcc_command(source: str, out: Path, shim: Path) -> list[str]:
    includes = [str(ROOT / "csrc"), *cpp_extension.include_paths()]
    cxx11_abi = int(torch.compiled_with_cxx11_abi())
    return [
        NVCC,
        "-c",
        str(ROOT / source),
        "-o",
        str(out),
        "-std=c++17",
        "-O3",
        "--use_fast_math",
        "-Xcompiler",
        "-fPIC",
        "-Xptxas",
        "-v",
        # torch's own headers use a C++20 bit-field initialiser that nvcc reports under C++17.
        "-diag-suppress",
        "3306",
        "-Xcompiler",
        "-Wno-c++20-extensions",
        f"-D_GLIBCXX_USE_CXX11_ABI={cxx11_abi}",
        "-DADAINFER_WITH_CUDA=1",
        "-DTORCH_EXTENSION_NAME=_C",
        *getattr(cpp_extension, "COMMON_NVCC_FLAGS", []),
        *[f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs_for(source)],
        f"-I{shim}",
        *[f"-I{p}" for p in includes],
    ]


@pytest.fixture(scope="module")
def shim(tmp_path_factory) -> Path:
    """Include directory standing in for the headers a CPU wheel lacks (searched first)."""
    root = tmp_path_factory.mktemp("cuda_shim")
    torch_include = Path(cpp_extension.include_paths()[0])
    generated = Path("c10/cuda/impl/cuda_cmake_macros.h")
    if not (torch_include / generated).exists():
        (root / generated).parent.mkdir(parents=True)
        (root / generated).write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return root


def test_sources_list_names_cuda_files():
    assert "csrc/compaction_kernels.cu" in CU_SOURCES and "csrc/compaction_cuda.cu" in CU_SOURCES, CU_SOURCES


@pytest.mark.skipif(NVCC is None, reason="nvcc not found on PATH: the CUDA sources are not compile-checked")
@pytest.mark.parametrize("source", CU_SOURCES)
def test_cuda_source_compiles_without_spills(source, shim, tmp_path):
    out = tmp_path / (Path(source).stem + ".o")
    proc = subprocess.run(nvcc_command(source, out, shim), capture_output=True, text=True, timeout=900)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"nvcc failed on {source}:\n{log[-6000:]}"
    assert out.stat().st_size > 0
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    assert all(int(s) == 0 and int(lo) == 0 for s, lo in spills), f"{source} spills registers:\n{log[-4000:]}"
    if source in KERNEL_SOURCES:
        # Device code really was generated for each target: every kernel went through ptxas.
        for kernel in ("keep_index_kernel", "copy_rows_kernel", "check_distinct_rows_kernel"):
            for arch in ARCHS:
                assert re.search(rf"Compiling entry function '\w*{kernel}\w*' for 'sm_{arch}'", log), (kernel, arch)
