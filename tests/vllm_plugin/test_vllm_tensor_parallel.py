"""Tensor parallel through vLLM on this CPU: three ranks (SmolLM2's 9 attention heads split by 3;
2 does not divide them), each a process bound to a core. Every rank takes rank 0's decision; the
probe's weights are replicated, a label lens gathers its K label rows onto every rank, and the
full-vocabulary lens merges the ranks' exit-head partials (``adainfer_kernels.exit_partials``).
Answers, exit layers and generated tokens must be the single-process HF runtime's."""

from __future__ import annotations

import gc
import os

import pytest

pytest.importorskip("vllm", reason="vLLM runs in its own venv: make test-vllm")

from adainfer.vllm import engine_args
from adainfer.vllm.report import take_exit_layers
from vllm import LLM, SamplingParams

TP = 3


@pytest.fixture(autouse=True)
def _bind_ranks(monkeypatch):
    # vLLM's CPU workers bind their threads per NUMA node and refuse more ranks than nodes: give
    # each rank one of this machine's cores (round-robin), as its error message advises.
    cores = sorted(os.sched_getaffinity(0))
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "|".join(str(cores[r % len(cores)]) for r in range(TP)))


def _with_tp(ref: dict, classifier: str):
    llm = LLM(model=ref["model_dir"], dtype="float32", max_model_len=2048, seed=0, tensor_parallel_size=TP,
              **engine_args(classifier), enable_prefix_caching=False)  # fmt: skip
    return llm


def _stop(llm) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.mark.parametrize("which", ["probe", "label_lens"])
def test_tensor_parallel_answers_equal_the_hf_runtime(ref, which):
    if which == "probe":
        classifier, n = ref["classifier"], 16
        want = list(zip(ref["hf_answer_token"][:n], ref["hf_exit_layers"][:n], strict=True))
    else:
        part = ref["label_lens"]
        classifier, n = part["classifier"], part["n"]
        want = list(zip(part["hf_answer_token"], part["hf_exit_layers"], strict=True))
    llm = _with_tp(ref, classifier)
    try:
        params = SamplingParams(max_tokens=1, temperature=0.0, allowed_token_ids=ref["label_token_ids"])
        outs = llm.generate(ref["prompts"][:n], params, use_tqdm=False)
        exits = take_exit_layers(llm)
    finally:
        _stop(llm)
    got = [(o.outputs[0].token_ids[0], exits[o.request_id][0]) for o in outs]
    assert got == want
    assert any(k < ref["num_layers"] for _, k in got)


def test_tensor_parallel_full_vocabulary_lens_merges_the_shards_partials(ref):
    lens = ref["lens"]
    llm = _with_tp(ref, lens["classifier"])
    try:
        params = SamplingParams(max_tokens=lens["max_new_tokens"], temperature=0.0)
        for i, prompt in enumerate(lens["prompts"]):
            out = llm.generate([prompt], params, use_tqdm=False)[0]
            exits = take_exit_layers(llm)[out.request_id]
            assert list(out.outputs[0].token_ids) == lens["hf_generated"][i], i
            assert exits == lens["hf_generated_exits"][i], i
    finally:
        _stop(llm)
