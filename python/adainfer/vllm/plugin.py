"""The vLLM plugin: registration (entry point ``vllm.general_plugins``) and the model runner hooks.

``register()`` runs in every vLLM process before a model is loaded; it registers the architecture
``AdaInferForCausalLM`` (lazily: vLLM imports ``adainfer.vllm.model`` only when a model asks for
it through ``hf_overrides={"architectures": ["AdaInferForCausalLM"]}``).

``install_step_hooks()`` (called by the model, in the worker that runs it) wraps three methods of
vLLM's model runner so the exit loop can see the step it runs:
- ``GPUModelRunner._build_attention_metadata`` (the CPU runner inherits it): the runner and the
  request count of the step being prepared (``step.CURRENT``);
- ``AttentionGroup.build_metadata``: each group's ``CommonAttentionMetadata`` and builder, so that
  requests that exit can be dropped from the step's metadata by the same builder;
- ``GPUModelRunner._dummy_run``: warm-up / profiling runs (no request), which run dense.
The hooks only observe: they never change what vLLM builds. It also adds the worker method
``report.WORKER_METHOD`` that ``LLM.collective_rpc`` calls to read the exit log.
"""

from __future__ import annotations

import functools

from adainfer.vllm.settings import ARCHITECTURE
from adainfer.vllm.step import CURRENT


def register() -> None:
    """The ``vllm.general_plugins`` entry point: make ``AdaInferForCausalLM`` known to vLLM."""
    from vllm import ModelRegistry

    if ARCHITECTURE not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(ARCHITECTURE, "adainfer.vllm.model:AdaInferForCausalLM")


def install_step_hooks() -> None:
    """Wrap the runner methods above, once per process."""
    if getattr(install_step_hooks, "done", False):
        return
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.utils import AttentionGroup

    build = GPUModelRunner._build_attention_metadata

    @functools.wraps(build)
    def _build_attention_metadata(self, num_tokens, num_reqs, *args, **kwargs):
        if not CURRENT.dummy:
            CURRENT.begin(self, num_reqs)
        try:
            return build(self, num_tokens, num_reqs, *args, **kwargs)
        finally:
            CURRENT.capturing = False

    group_build = AttentionGroup.build_metadata

    @functools.wraps(group_build)
    def build_metadata(self, common_attn_metadata, ubatch_idx: int = 0, *args, **kwargs):
        if CURRENT.capturing:
            from adainfer.vllm.step import GroupBuild

            if args or kwargs:  # extra build arguments (linear-attention groups): not replayable
                CURRENT.builds.clear()
                CURRENT.capturing = False
            else:
                CURRENT.builds.append(GroupBuild(self, common_attn_metadata, ubatch_idx))
        return group_build(self, common_attn_metadata, ubatch_idx, *args, **kwargs)

    dummy = GPUModelRunner._dummy_run

    @functools.wraps(dummy)
    def _dummy_run(self, *args, **kwargs):
        CURRENT.dummy = True
        try:
            return dummy(self, *args, **kwargs)
        finally:
            CURRENT.dummy = False

    from vllm.v1.worker.worker_base import WorkerBase

    from adainfer.vllm.report import WORKER_METHOD, read_worker

    setattr(WorkerBase, WORKER_METHOD, read_worker)
    GPUModelRunner._build_attention_metadata = _build_attention_metadata
    AttentionGroup.build_metadata = build_metadata
    GPUModelRunner._dummy_run = _dummy_run
    install_step_hooks.done = True
