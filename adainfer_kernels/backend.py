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
            return Choice("cpu", "CPU tensors: _C op (packed W panels, batch-reduce GEMM, fused top-2/sum-exp)")
        return Choice("cpu", "CPU tensors: torch fallback (vocabulary chunks over a cached W^T, no [R, V] buffer)")
    return Choice("reference", f"no fused path for device type {device.type!r}")


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
                "compaction": vars(compaction_backend(dev)),
            }
            for dev in devices
        },
    }
