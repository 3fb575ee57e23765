"""adainfer: the AdaInfer algorithm and its Hugging Face integration.

AdaInfer (Fan et al., "Not All Layers of LLMs Are Necessary During Inference", IJCAI 2025) stops
each input at the layer where a small classifier over logit-lens features (top-1 probability and
the top-1/top-2 gap) says its answer is settled. The ops live in ``adainfer_kernels``.

Everything a user needs is one import away::

    import adainfer

    loaded = adainfer.load_model("bundled")                  # or a HF folder / .gguf file
    task = adainfer.load_task("tweet-sentiment")             # or a CSV/TSV/JSONL file, lmeval:NAME
    clf = adainfer.calibrate(loaded.model, loaded.tokenizer, task, budget=0.01)
    clf.save("classifier.json"); clf = adainfer.load_classifier("classifier.json")
    result = adainfer.classify(loaded.model, loaded.tokenizer, ["what a day!"], clf, prompt=task)

    with adainfer.patched(loaded.model, clf) as handle:      # any forward / generate, with exits
        loaded.model.generate(**batch); handle.last_stats.exit_layers

Subpackages (one wing each; docs/architecture.md has the map and the glossary):
    adainfer.runtime      the patch, the layer loop, exit policies, config, wall clock
    adainfer.models       the registry of model families, one module per family
    adainfer.calibration  features, label bias, probes, the stop classifier, fitting, metrics
    adainfer.app          the CLI, the demo pipeline, tasks, model loading, plots, lm-eval
"""

from __future__ import annotations

import importlib

from adainfer.models import lens_head, supported_model_types
from adainfer.runtime.config import AdaInferConfig
from adainfer.runtime.patch import AdaInferHandle, apply, handle_of, patched, remove
from adainfer.runtime.policy import ClassifierPolicy, ForcedExits, NeverExit, StopRulePolicy
from adainfer.runtime.stats import ExitStats
from adainfer_kernels.head import ExitSignals, ReadoutHead, StopRule

__version__ = "0.1.0"

# Calibration (scikit-learn, the tasks) and the application (model loading, datasets) are imported on
# first use, so that `import adainfer` stays light for a user who only patches a model.
_LAZY = {
    "StopClassifier": ("adainfer.calibration.classifier", "StopClassifier"),
    "ClassifierFileError": ("adainfer.calibration.classifier", "ClassifierFileError"),
    "calibrate": ("adainfer.app.workflow", "calibrate"),
    "evaluate": ("adainfer.app.workflow", "evaluate"),
    "classify": ("adainfer.app.classify", "classify"),
    "Classification": ("adainfer.app.classify", "Classification"),
    "load_model": ("adainfer.app.loading", "load_model"),
    "load_bundled": ("adainfer.app.loading", "load_bundled"),
    "load_task": ("adainfer.app.tasks", "load_task"),
    "ClassificationTask": ("adainfer.app.tasks", "ClassificationTask"),
}


def load_classifier(path):
    """A ``StopClassifier`` saved by ``adainfer calibrate`` / ``StopClassifier.save``: the JSON file
    (and its probe weights beside it), validated field by field; or a folder holding
    ``classifier.json``. Call ``clf.check_compatible(model)`` (``apply`` does) before use."""
    from pathlib import Path

    from adainfer.calibration.classifier import StopClassifier

    path = Path(path)
    return StopClassifier.load(path / "classifier.json" if path.is_dir() else path)


def __getattr__(name: str):
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'adainfer' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [  # noqa: RUF022 (grouped by what a user does, not sorted)
    # patch a model
    "AdaInferConfig",
    "AdaInferHandle",
    "ExitStats",
    "apply",
    "handle_of",
    "patched",
    "remove",
    "supported_model_types",
    # the stop classifier: fit, save / load, evaluate
    "ClassifierFileError",
    "StopClassifier",
    "calibrate",
    "evaluate",
    "load_classifier",
    # answer texts
    "Classification",
    "classify",
    # models and tasks
    "ClassificationTask",
    "load_bundled",
    "load_model",
    "load_task",
    # exit policies and the exit head's data (custom rules, tests, benchmarks)
    "ClassifierPolicy",
    "ExitSignals",
    "ForcedExits",
    "NeverExit",
    "ReadoutHead",
    "StopRule",
    "StopRulePolicy",
    "lens_head",
    "__version__",
]
