"""adainfer: the AdaInfer algorithm and its Hugging Face integration.

AdaInfer (Fan et al., "Not All Layers of LLMs Are Necessary During Inference", IJCAI 2025) stops
each input at the layer where a small classifier over logit-lens features (top-1 probability and
the top-1/top-2 gap) says its answer is settled. The ops live in ``adainfer_kernels``.

    handle = adainfer.apply(model, classifier)   # a *ForCausalLM of a supported family
    model.generate(**batch); handle.last_stats.exit_layers
    handle.remove()

Subpackages (one wing each; docs/architecture.md has the map):
    adainfer.runtime    the patch, the layer loop, exit policies, config, wall clock
    adainfer.models     the registry of model families, one module per family
    adainfer.calibration  features, label bias, the stop classifier, fitting, metrics, evaluation
    adainfer.app        the CLI, the demo pipeline, tasks, model loading, plots
"""

from adainfer.runtime.config import AdaInferConfig
from adainfer.runtime.loop import ExitStats
from adainfer.runtime.patch import AdaInferHandle, apply, handle_of, patched, remove
from adainfer.runtime.policy import ClassifierPolicy, ForcedExits, NeverExit, StopRulePolicy

__version__ = "0.1.0"

# The high-level classification API lives in the application wing (it needs the calibrated
# classifier and prompt building): imported on first use, so `import adainfer` stays light.
_LAZY = {"classify": "adainfer.app.classify", "Classification": "adainfer.app.classify"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'adainfer' has no attribute {name!r}")


__all__ = [
    "AdaInferConfig",
    "AdaInferHandle",
    "Classification",
    "ClassifierPolicy",
    "ExitStats",
    "ForcedExits",
    "NeverExit",
    "StopRulePolicy",
    "__version__",
    "apply",
    "classify",
    "handle_of",
    "patched",
    "remove",
]
