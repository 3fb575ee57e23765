"""adainfer_kernels: the device layer of adainfer-kernels (ops on tensors).

Imports torch only; Triton is imported lazily by the kernels that need it (``exit_head`` imports
``exit_head_triton`` on its first CUDA call), and the compiled extension ``_C`` is optional (a
warning and pure-PyTorch fallbacks when it is missing). This package never imports
``transformers`` or ``adainfer`` (a test enforces it).
"""

from adainfer_kernels import _native
from adainfer_kernels.backend import info
from adainfer_kernels.exit_head import exit_head
from adainfer_kernels.exit_partials import ExitPartials, exit_head_partials, merge_exit_partials
from adainfer_kernels.head import ALWAYS_STOP, NEVER_STOP, ExitSignals, ReadoutHead, StopRule

__version__ = "0.1.0"

_native.load()

__all__ = [
    "ALWAYS_STOP",
    "NEVER_STOP",
    "ExitPartials",
    "ExitSignals",
    "ReadoutHead",
    "StopRule",
    "__version__",
    "exit_head",
    "exit_head_partials",
    "info",
    "merge_exit_partials",
]
