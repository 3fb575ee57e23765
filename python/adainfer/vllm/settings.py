"""The plugin's settings (``additional_config["adainfer"]``) and the start-up refusals.

A model served with ``architectures = ["AdaInferForCausalLM"]`` (``--hf-overrides``) reads

    additional_config = {"adainfer": {"classifier": "clf/classifier.json"}}   # exits on
    additional_config = {"adainfer": {"exits": "off"}}                         # vLLM's own forward
    additional_config = {"adainfer": {"classifier": "...", "exits": "check"}}  # every check runs, none stops

Everything that would make the exits silently not run, or run wrong, is refused here, when the
engine starts (never a silent fall back to the dense path):
- no ``adainfer`` settings, an unknown key or value;
- a model family the vLLM adapter does not drive (``SUPPORTED_MODEL_TYPES``);
- a classifier fitted for another model (layers, vocabulary, hidden size, family);
- CUDA graphs or ``torch.compile`` around the layer loop (they would replay the dense loop);
- pipeline parallel, speculative decoding, data-parallel micro-batching (DBO), multi-modal
  models and decode context parallel: steps whose requests the loop cannot drop;
- an attention backend that writes K/V inside its forward (the K/V fill of skipped layers goes
  through the backend's own ``do_kv_cache_update``).

Prefix caching is not refused: the exit loop keeps the tokens of blocks that become full in a step
running every layer even when their request exits (``model.VllmExitLoop``), so a block vLLM may
hand to a later request always holds the full model's K/V.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXITS_MODES = ("on", "off", "check")
SUPPORTED_MODEL_TYPES = ("llama",)
ARCHITECTURE = "AdaInferForCausalLM"
_KEYS = ("classifier", "exits")


class AdaInferStartupError(ValueError):
    """vLLM was asked for a setting the AdaInfer plugin cannot honour."""


@dataclass(frozen=True)
class PluginSettings:
    """``exits``: "on" (AdaInfer), "off" (vLLM's own forward, bit for bit) or "check" (every check
    runs, no request stops: proves the checks change nothing). ``classifier``: the classifier file."""

    exits: str
    classifier: Path | None

    @classmethod
    def from_additional_config(cls, additional: dict | None) -> PluginSettings:
        raw = (additional or {}).get("adainfer")
        if raw is None:
            raise AdaInferStartupError(
                f"{ARCHITECTURE} needs its settings: pass --additional-config "
                '\'{"adainfer": {"classifier": "PATH/classifier.json"}}\' '
                '(or {"adainfer": {"exits": "off"}} for vLLM\'s own forward)'
            )
        if not isinstance(raw, dict):
            raise AdaInferStartupError(f"additional_config['adainfer'] must be a dict, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(_KEYS))
        if unknown:
            raise AdaInferStartupError(f"unknown adainfer settings {unknown} (known: {list(_KEYS)})")
        exits = raw.get("exits", "on")
        if exits not in EXITS_MODES:
            raise AdaInferStartupError(f"adainfer exits must be one of {EXITS_MODES}, got {exits!r}")
        path = raw.get("classifier")
        if exits != "off" and not path:
            raise AdaInferStartupError(f"adainfer exits={exits!r} needs a classifier file: set adainfer.classifier")
        classifier = None
        if path:
            classifier = Path(path).expanduser()
            if not classifier.is_file():
                raise AdaInferStartupError(f"adainfer classifier file not found: {classifier}")
        return cls(exits=exits, classifier=classifier)


def check_engine(vllm_config, model_type: str) -> None:
    """Refuse, at start-up, an engine configuration under which exits could not run as asked."""
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise AdaInferStartupError(
            f"the AdaInfer vLLM adapter drives {list(SUPPORTED_MODEL_TYPES)} models; this one is {model_type!r}"
        )
    comp = vllm_config.compilation_config
    mode = getattr(comp, "mode", None)
    if mode is not None and int(getattr(mode, "value", mode)) != 0:
        raise AdaInferStartupError(
            "AdaInfer's layer loop must run eagerly: torch.compile would trace the dense loop. "
            "Start vLLM with enforce_eager=True (--enforce-eager)"
        )
    cg = getattr(comp, "cudagraph_mode", None)
    if cg is not None and str(getattr(cg, "name", cg)).upper() != "NONE":
        raise AdaInferStartupError(
            "CUDA graphs would replay the dense layer loop: start vLLM with enforce_eager=True (--enforce-eager)"
        )
    par = vllm_config.parallel_config
    if par.pipeline_parallel_size > 1:
        raise AdaInferStartupError("AdaInfer does not run under pipeline parallel yet (pipeline_parallel_size > 1)")
    if getattr(par, "decode_context_parallel_size", 1) > 1:
        raise AdaInferStartupError("AdaInfer does not run under decode context parallel")
    if getattr(par, "enable_dbo", False):
        raise AdaInferStartupError("AdaInfer does not run with dual-batch overlap (enable_dbo)")
    if vllm_config.speculative_config is not None:
        raise AdaInferStartupError("AdaInfer does not run with speculative decoding (its steps verify drafts)")
    if getattr(vllm_config.model_config, "is_multimodal_model", False):
        raise AdaInferStartupError("AdaInfer's vLLM adapter runs text-only models")


def check_classifier(classifier, hf_config) -> None:
    """Refuse a classifier fitted for another model than ``hf_config`` describes."""
    from adainfer.calibration.classifier import ModelIdentity

    have = ModelIdentity.from_config(hf_config)
    if have != classifier.identity:
        raise AdaInferStartupError(
            f"the classifier was fitted for {classifier.identity.describe()}; vLLM serves {have.describe()}: "
            "calibrate a classifier for this model (`adainfer calibrate`)"
        )


def check_attention(layer_attn) -> None:
    """Refuse an attention backend whose forward writes K/V itself: the K/V fill of the layers a
    request skipped needs the backend's separate ``do_kv_cache_update``."""
    backend = layer_attn.attn_backend
    if getattr(backend, "forward_includes_kv_cache_update", True) or not hasattr(layer_attn.impl, "do_kv_cache_update"):
        raise AdaInferStartupError(
            f"attention backend {backend.get_name()} writes K/V inside its forward: AdaInfer cannot fill the "
            "K/V of the layers an exited request skipped with it; choose another backend"
        )
