"""Which implementation each op uses, and why (docs/architecture.md, "Backends").

CUDA tensors -> Triton kernels and the C++ CUDA ops; CPU tensors -> the fused CPU paths and the C++
CPU ops. ``ADAINFER_BACKEND=reference`` forces the plain-PyTorch specs everywhere (debugging).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from adainfer_kernels import _native

_FORCE_VALUES = ("auto", "reference")


@dataclass(frozen=True)
class Choice:
    """A backend chosen for one op on one device, with the reason (shown by ``adainfer info``)."""

    name: str
    reason: str


def forced() -> str | None:
    """The backend forced by ``ADAINFER_BACKEND`` (None for automatic choice)."""
    value = os.environ.get("ADAINFER_BACKEND", "auto").strip().lower() or "auto"
    if value not in _FORCE_VALUES:
        raise ValueError(f"ADAINFER_BACKEND={value!r} is not valid (use one of: {', '.join(_FORCE_VALUES)})")
    return None if value == "auto" else value


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def exit_head_backend(device: torch.device | str) -> Choice:
    """Backend of ``exit_head`` for tensors on ``device``."""
    device = torch.device(device)
    if forced() == "reference":
        return Choice("reference", "ADAINFER_BACKEND=reference")
    if device.type == "cuda":
        if triton_available():
            return Choice("triton", "CUDA tensors and triton is installed")
        return Choice("reference", "CUDA tensors but triton is not installed (pip install triton)")
    if device.type == "cpu":
        if _native.has_op("exit_head_cpu"):
            return Choice("cpu", "CPU tensors: _C op (norm, GEMM tiles, fused top-2/sum-exp); kernel per dtype below")
        return Choice("cpu", "CPU tensors: torch fallback (vocabulary chunks over a cached W^T, no [R, V] buffer)")
    return Choice("reference", f"no fused path for device type {device.type!r}")


# The native op's kernels that the automatic choice takes (``scalar`` runs anywhere, but slower
# than the torch fallback's BLAS GEMMs: only ``impl="native"`` forces it).
FAST_CPU_KERNELS = ("brgemm", "avx512bf16", "avx512")
_TORCH_FALLBACK = "torch fallback: chunked torch GEMMs over a cached fp32 W^T (2x W's bytes for bf16/fp16)"
_KERNEL_WHY = {
    ("brgemm", torch.float32): "_C op: oneDNN brgemm (AVX-512 fp32 FMA) over W^T packed once in 64-column panels",
    ("brgemm", torch.bfloat16): "_C op: oneDNN bf16 brgemm (AMX) over W^T packed once in VNNI panels, fp32 sums",
    ("avx512bf16", torch.bfloat16): (
        "_C op: W read as stored (bf16, row-major, no copy), vdpbf16ps tiles with fp32 accumulation; "
        "oneDNN's bf16 brgemm needs AMX, which this CPU lacks"
    ),
    ("avx512", torch.bfloat16): (
        "_C op: W read as stored (bf16, no copy), widened to fp32 in registers, fp32 FMA; "
        "this CPU has neither AMX nor AVX512-BF16"
    ),
    ("avx512", torch.float16): "_C op: W read as stored (fp16, no copy), vcvtph2ps to fp32 in registers, fp32 FMA",
}


def exit_head_cpu_kernel(dtype: torch.dtype) -> Choice:
    """What the CPU exit head runs for an LM head of ``dtype`` (fp32, bf16, fp16) here, and why.

    ``name`` is the native op's kernel (``brgemm``, ``avx512bf16``, ``avx512``) or ``torch`` for the
    chunked torch fallback; ``adainfer info`` prints one row per dtype.
    """
    if not _native.has_op("exit_head_cpu"):
        return Choice("torch", f"{_TORCH_FALLBACK}; adainfer_kernels._C unavailable: {_native.error()}")
    name = str(torch.ops.adainfer.exit_head_cpu_kernel(dtype))
    if name in FAST_CPU_KERNELS:
        return Choice(name, _KERNEL_WHY.get((name, dtype), "_C op"))
    if name == "scalar":
        return Choice("torch", f"{_TORCH_FALLBACK}; no AVX-512 here, and the _C op's portable kernel is slower")
    return Choice("torch", f"{_TORCH_FALLBACK}; oneDNN has no brgemm for {dtype} on this CPU/torch build")


def compaction_backend(device: torch.device | str) -> Choice:
    """Backend of the compaction ops (``compact_rows`` and friends) for tensors on ``device``."""
    device = torch.device(device)
    if forced() == "reference":
        return Choice("reference", "ADAINFER_BACKEND=reference")
    if _native.load() is None:
        return Choice("torch", f"adainfer_kernels._C unavailable: {_native.error()}")
    info = _native.build_info() or {}
    if device.type == "cuda" and not info.get("with_cuda", False):
        return Choice("torch", "_C was built without CUDA (torch was a CPU build at install time)")
    if not _native.has_op("compact_rows"):
        return Choice("torch", "_C does not register adainfer::compact_rows")
    return Choice("native", f"adainfer_kernels._C ({device.type} kernels)")


def info() -> dict:
    """Versions, devices and the backend of every op: what ``adainfer info`` prints."""
    triton_version = None
    if triton_available():
        import triton

        triton_version = triton.__version__
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cpu_kernels = {}
    if forced() != "reference":
        cpu_kernels = {
            f"exit_head[{label}]": vars(exit_head_cpu_kernel(dt))
            for label, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16))
        }
    return {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "triton": triton_version,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "native_ext": _native.build_info(),
        "native_ext_error": _native.error(),
        "cpu_threads": torch.get_num_threads(),
        "forced_backend": forced(),
        "ops": {
            dev: {
                "exit_head": vars(exit_head_backend(dev)),
                **(cpu_kernels if dev == "cpu" else {}),
                "compaction": vars(compaction_backend(dev)),
            }
            for dev in devices
        },
    }
