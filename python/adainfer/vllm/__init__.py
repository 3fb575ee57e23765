"""AdaInfer inside vLLM: per-request early exit in a serving engine (the ``[vllm]`` extra).

Serve a model with a calibrated classifier (the ``classifier.json`` of ``adainfer calibrate``):

    vllm serve MODEL --enforce-eager \\
        --hf-overrides '{"architectures": ["AdaInferForCausalLM"]}' \\
        --additional-config '{"adainfer": {"classifier": "clf/classifier.json"}}'

or in Python, ``LLM(model=..., **adainfer.vllm.engine_args("clf/classifier.json"))``.
The plugin registers itself through the ``vllm.general_plugins`` entry point (``plugin.register``);
``model.AdaInferForCausalLM`` runs the exits; ``report.take_exit_layers(llm)`` returns each
request's exit layers. Importing this package imports nothing from vLLM.
"""

from adainfer.vllm.settings import ARCHITECTURE, EXITS_MODES, AdaInferStartupError

__all__ = ["ARCHITECTURE", "EXITS_MODES", "AdaInferStartupError", "engine_args"]


def engine_args(classifier: str | None, exits: str = "on") -> dict:
    """The keyword arguments that make ``vllm.LLM`` (or ``EngineArgs``) run AdaInfer.

    ``classifier``: path of a classifier file; ``exits``: "on", "off" (vLLM's own forward) or
    "check" (every check runs, nothing stops)."""
    settings: dict = {"exits": exits}
    if classifier is not None:
        settings["classifier"] = str(classifier)
    return {
        "hf_overrides": {"architectures": [ARCHITECTURE]},
        "additional_config": {"adainfer": settings},
        "enforce_eager": True,  # the layer loop is Python: no CUDA graphs, no torch.compile
    }
