"""Loads the compiled extension ``adainfer_kernels._C`` once and records why when it cannot.

The package must import and work without the extension (a pure-PyTorch fallback for every op), so
a missing or mismatched ``_C`` is a warning, emitted once, never an ImportError.
"""

from __future__ import annotations

import importlib.util
import warnings
from types import ModuleType

import torch

_module: ModuleType | None = None
_error: str | None = None
_loaded = False


def _torch_base_version() -> str:
    # "2.13.0+cpu" -> "2.13.0"
    return torch.__version__.split("+")[0]


def load() -> ModuleType | None:
    """Return the loaded ``_C`` module, or None (after one warning) when it is unavailable."""
    global _module, _error, _loaded
    if _loaded:
        return _module
    _loaded = True
    try:
        from adainfer_kernels import _C
    except ImportError as exc:
        try:
            missing = importlib.util.find_spec("adainfer_kernels._C") is None
        except ImportError:
            missing = False
        _error = "not built (a pure-Python install, e.g. ADAINFER_SKIP_EXT=1)" if missing else f"not importable ({exc})"
    else:
        built_for = _C.build_info()["torch_version"]
        if built_for != _torch_base_version():
            # An extension compiled against other torch headers can crash the process: refuse it.
            _error = f"built against torch {built_for} but torch {torch.__version__} is installed"
        else:
            _module = _C
    if _module is None:
        warnings.warn(
            f"adainfer_kernels._C is unavailable: {_error}. Using the pure-PyTorch fallbacks; "
            "rebuild with `pip install --no-build-isolation .` to get the native ops.",
            RuntimeWarning,
            stacklevel=2,
        )
    return _module


def error() -> str | None:
    """Why ``_C`` did not load (None when it did, or before :func:`load` ran)."""
    return _error


def build_info() -> dict | None:
    """What the loaded extension was compiled with, or None."""
    mod = load()
    return None if mod is None else dict(mod.build_info())


def has_op(name: str) -> bool:
    """True when ``torch.ops.adainfer.<name>`` is registered by the loaded extension."""
    if load() is None:
        return False
    return hasattr(torch.ops.adainfer, name)
