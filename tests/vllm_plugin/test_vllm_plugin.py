"""The vLLM plugin (``adainfer.vllm``) on the bundled model, against the Hugging Face runtime.

Runs in ``.venv-vllm`` through ``make test-vllm``, which calibrates a classifier on the bundled task
and writes the HF runtime's answers on its test prompts (``bench/vllm_reference.py``) first; the path
of that reference comes in ``ADAINFER_VLLM_REFERENCE``. Engines start once per module fixture (~25 s
each here) and are shut down before the next one starts.
"""

from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest

vllm = pytest.importorskip("vllm", reason="vLLM runs in its own venv: make test-vllm")

from adainfer.vllm import AdaInferStartupError, engine_args  # noqa: E402
from adainfer.vllm.report import layer_work, take_exit_layers  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

GREEDY = SamplingParams(max_tokens=1, temperature=0.0, logprobs=5)


def _start(ref: dict, **kwargs) -> LLM:
    return LLM(model=ref["model_dir"], dtype="float32", max_model_len=2048, seed=0, **kwargs)


def _stop(llm: LLM) -> None:
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()


@pytest.fixture(scope="module")
def engine(ref):
    """Without prefix caching: every token of an exited request leaves, the HF runtime's semantics
    exactly (generation reads state-propagated K/V for the whole prompt, as HF's ``generate``)."""
    llm = _start(ref, **engine_args(ref["classifier"]), enable_prefix_caching=False)
    yield llm
    _stop(llm)


def _labels(ref: dict) -> SamplingParams:
    """Greedy over the label tokens: a classifier's answer is a label word (exits answer so already;
    a full-depth answer is then the full model's label answer, as the HF runtime's classify reads)."""
    return SamplingParams(max_tokens=1, temperature=0.0, logprobs=5, allowed_token_ids=ref["label_token_ids"])


def _run(llm: LLM, prompts: list[str], params: SamplingParams = GREEDY):
    outs = llm.generate(prompts, params, use_tqdm=False)
    exits = take_exit_layers(llm)
    return outs, [exits.get(o.request_id) for o in outs]


def test_answers_and_exit_layers_equal_the_hf_runtime(engine, ref):
    outs, exits = _run(engine, ref["prompts"], _labels(ref))
    answers = [o.outputs[0].token_ids[0] for o in outs]
    first_exit = [e[0] for e in exits]
    n = len(answers)
    differ = [
        i for i in range(n) if (answers[i], first_exit[i]) != (ref["hf_answer_token"][i], ref["hf_exit_layers"][i])
    ]
    assert len(differ) <= n // 100, (
        f"{len(differ)}/{n} prompts differ from the HF runtime: "
        + "; ".join(f"#{i}: vLLM {answers[i]}@{first_exit[i]} HF {ref['hf_answer_token'][i]}@{ref['hf_exit_layers'][i]}"
                    for i in differ[:5])
    )  # fmt: skip
    assert min(first_exit) < ref["num_layers"], "no prompt exited early: the test would prove nothing"
    assert max(first_exit) == ref["num_layers"], "every prompt exited: full-depth answers were not compared"
    # The exit answer's label log-probabilities are the HF runtime's (fp32 both sides).
    labels = ref["label_token_ids"]
    for i, o in enumerate(outs):
        if first_exit[i] < ref["num_layers"]:
            got = o.outputs[0].logprobs[0]
            for k, tok in enumerate(labels):
                assert math.isclose(got[tok].logprob, ref["hf_label_logprobs"][i][k], abs_tol=2e-4), (i, k)


def test_a_request_answer_does_not_depend_on_its_batch_mates(engine, ref):
    prompts = ref["prompts"][:6]
    together, exits_together = _run(engine, prompts[::-1], _labels(ref))
    alone = [_run(engine, [p], _labels(ref)) for p in prompts]
    for j, (outs, exits) in enumerate(alone):
        i = len(prompts) - 1 - j
        assert outs[0].outputs[0].token_ids == together[i].outputs[0].token_ids
        assert exits[0] == exits_together[i]


def test_decode_steps_read_the_filled_kv_as_the_hf_runtime_does(engine, ref):
    """Greedy generation with exits at every step: the later steps attend over K/V that state
    propagation wrote for the layers earlier tokens skipped; tokens and per-step exit layers must be
    the HF runtime's (``patched(model).generate``), prompt by prompt."""
    params = SamplingParams(max_tokens=ref["max_new_tokens"], temperature=0.0)
    for i, prompt in enumerate(ref["prompts"][: len(ref["hf_generated"])]):
        outs, exits = _run(engine, [prompt], params)
        assert list(outs[0].outputs[0].token_ids) == ref["hf_generated"][i]
        assert exits[0] == ref["hf_generated_exits"][i]


def test_full_vocabulary_generation_reads_the_filled_kv_as_the_hf_runtime_does(ref):
    """A full-vocabulary lens rule on free text: later steps run deeper than earlier tokens exited,
    so they attend over K/V that state propagation filled; tokens and per-step exit layers must be
    the HF runtime's."""
    lens = ref["lens"]
    llm = _start(ref, **engine_args(lens["classifier"]))
    try:
        params = SamplingParams(max_tokens=lens["max_new_tokens"], temperature=0.0)
        deeper = 0
        for i, prompt in enumerate(lens["prompts"]):
            outs, exits = _run(llm, [prompt], params)
            assert list(outs[0].outputs[0].token_ids) == lens["hf_generated"][i], i
            assert exits[0] == lens["hf_generated_exits"][i], i
            deeper += sum(b > a for a, b in zip(exits[0], exits[0][1:], strict=False))
        assert deeper > 0, "no step ran deeper than an earlier one exited: the filled K/V were never read"
    finally:
        _stop(llm)


def test_with_prefix_caching_answers_are_the_hf_runtimes_and_do_not_depend_on_earlier_requests(ref):
    """Prefix caching on (vLLM's default): the shared few-shot prefix is served from the cache, and
    the tokens of blocks that become full keep running every layer when their request exits, so a
    cached block always holds full-depth K/V. First-token answers and exit layers must still be the
    HF runtime's, whether a prompt's prefix blocks were computed by itself or by earlier requests."""
    n = 24
    llm = _start(ref, **engine_args(ref["classifier"]))
    try:
        assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching
        first, exits_first = _run(llm, ref["prompts"][:n], _labels(ref))  # fills the cache (the shared demos)
        again, exits_again = _run(llm, ref["prompts"][:n][::-1], _labels(ref))  # prefix blocks from the cache
        done, dense = layer_work(llm)
    finally:
        _stop(llm)
    for i in range(n):
        want = (ref["hf_answer_token"][i], [ref["hf_exit_layers"][i]])
        assert (first[i].outputs[0].token_ids[0], exits_first[i]) == want, i
        assert (again[n - 1 - i].outputs[0].token_ids[0], exits_again[n - 1 - i]) == want, i
    assert 0 < done < dense


def test_exits_save_decoder_work(engine, ref):
    done, dense = layer_work(engine)
    assert 0 < done < dense


def test_checks_without_stops_leave_vllm_outputs_unchanged(ref):
    """``exits="check"``: the plugin's loop runs every check of the classifier but stops nothing;
    the logits (top-5 log-probabilities) must be plain vLLM's, bit for bit."""
    prompts = ref["prompts"][:8]
    settings = engine_args(None)
    settings.pop("hf_overrides"), settings.pop("additional_config")
    plain = _start(ref, **settings)
    want = [o.outputs[0].logprobs[0] for o in plain.generate(prompts, GREEDY, use_tqdm=False)]
    _stop(plain)
    checked = _start(ref, **engine_args(ref["classifier"], exits="check"))
    got = [o.outputs[0].logprobs[0] for o in checked.generate(prompts, GREEDY, use_tqdm=False)]
    exits = take_exit_layers(checked)
    _stop(checked)
    assert all(e == [ref["num_layers"]] for e in exits.values()) and len(exits) == len(prompts)
    for w, g in zip(want, got, strict=True):
        assert {t: lp.logprob for t, lp in w.items()} == {t: lp.logprob for t, lp in g.items()}


def test_a_classifier_for_another_model_is_refused_at_start_up(ref, tmp_path):
    source = Path(ref["classifier"])
    for f in source.parent.glob(source.stem + "*"):  # the JSON and its probe weights
        (tmp_path / f.name).write_bytes(f.read_bytes())
    wrong = tmp_path / source.name
    data = json.loads(wrong.read_text())
    data["model"]["vocab_size"] = 32000
    wrong.write_text(json.dumps(data))
    with pytest.raises(Exception, match=r"Engine core initialization failed|fitted for"):
        _start(ref, **engine_args(str(wrong)))  # raised in the engine's worker; vLLM re-raises its own
    gc.collect()
    # the worker's message, from the same check
    from adainfer.calibration.classifier import StopClassifier
    from adainfer.vllm.settings import check_classifier
    from transformers import AutoConfig

    with pytest.raises(AdaInferStartupError, match=r"fitted for a 30-layer llama model .* vocab 32000"):
        check_classifier(StopClassifier.load(wrong), AutoConfig.from_pretrained(ref["model_dir"]))
