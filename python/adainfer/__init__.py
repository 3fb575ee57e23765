"""adainfer: the AdaInfer algorithm and its Hugging Face integration.

AdaInfer (Fan et al., "Not All Layers of LLMs Are Necessary During Inference", IJCAI 2025) stops
each input at the layer where a small classifier over logit-lens features (top-1 probability and
the top-1/top-2 gap) says its answer is settled. The ops live in ``adainfer_kernels``.

    handle = adainfer.apply(model, classifier)   # LlamaForCausalLM / OPTForCausalLM instance
    model.generate(**batch); handle.last_stats.exit_layers
    handle.remove()
"""

from adainfer.config import AdaInferConfig
from adainfer.patch import AdaInferHandle, apply, handle_of, patched, remove
from adainfer.policy import ClassifierPolicy, ForcedExits, LinearScorePolicy, NeverExit
from adainfer.runtime import ExitStats

__version__ = "0.1.0"

__all__ = [
    "AdaInferConfig",
    "AdaInferHandle",
    "ClassifierPolicy",
    "ExitStats",
    "ForcedExits",
    "LinearScorePolicy",
    "NeverExit",
    "__version__",
    "apply",
    "handle_of",
    "patched",
    "remove",
]
