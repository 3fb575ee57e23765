"""adainfer_kernels: the device layer of adainfer-kernels (ops on tensors).

Imports torch only; Triton is imported lazily by the kernels that need it, and the compiled
extension ``_C`` is optional (a warning and pure-PyTorch fallbacks when it is missing). This
package never imports ``transformers`` or ``adainfer`` (a test enforces it).
"""

from adainfer_kernels import _native
from adainfer_kernels.backend import info

__version__ = "0.1.0"

_native.load()

__all__ = ["__version__", "info"]
