"""``model.generate`` on a patched model, one decoding set-up at a time (the fuzz in
test_fuzz_generate.py draws them at random): every set-up the unpatched model runs also runs patched,
with the same tokens where no row exits; the set-ups the exits cannot serve are refused before the
first forward; rows that finish early (fed the pad token, no mask) are legal input."""

from __future__ import annotations

import inspect

import adainfer
import pytest
import torch
from adainfer import AdaInferConfig, ForcedExits, NeverExit
from generation import Recorder, StopOnToken
from tiny_models import left_padded_batch, tiny_llama, tiny_model
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, StoppingCriteriaList

# transformers 5.24 renamed generate's `past_key_values=` to `cache=` (the old name warns).
_CACHE_KWARG = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _eos_prone_llama() -> LlamaForCausalLM:
    """The model of the bug report: eos (2) likely, so rows finish at different steps."""
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=0,
        eos_token_id=2,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight[2] += 5.0
    return model


@pytest.mark.parametrize("pad", [0, 2], ids=["pad-0", "pad-is-eos"])
@pytest.mark.parametrize(
    "decoding",
    [dict(do_sample=False), dict(do_sample=True, top_k=10), dict(do_sample=False, num_beams=2)],
    ids=["greedy", "sample", "beam"],
)
@pytest.mark.parametrize("mask", [True, False], ids=["ones-mask", "no-mask"])
@torch.inference_mode()
def test_rows_that_finish_first_in_an_unpadded_batch(pad, decoding, mask):
    """Hugging Face drops the all-ones mask and feeds finished rows the pad token: a legal call, which
    runs patched and gives the unpatched tokens when no row exits."""
    model = _eos_prone_llama()
    ids = torch.randint(3, 97, (3, 4), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, **({"attention_mask": torch.ones_like(ids)} if mask else {})}
    kw = dict(max_new_tokens=5, pad_token_id=pad, eos_token_id=2, **decoding)
    torch.manual_seed(3)
    ref = model.generate(**batch, **kw)
    if not decoding.get("num_beams"):
        assert bool((ref[:, -1] == pad).any()), "the set-up must have a row that finished first"
    for config in (AdaInferConfig(enabled=False), AdaInferConfig()):
        with adainfer.patched(model, NeverExit([1, 2]), config):
            torch.manual_seed(3)
            assert torch.equal(model.generate(**batch, **kw), ref)
    with adainfer.patched(model, ForcedExits([1, 3, 2] * kw.get("num_beams", 1))) as handle:
        out = model.generate(**batch, **kw)
    assert out.shape[0] == 3 and len(handle.history) >= 1


GENERATE_SETUPS = {
    "greedy": dict(do_sample=False),
    "sample": dict(do_sample=True, top_k=20, temperature=1.3),
    "beam": dict(do_sample=False, num_beams=3),
    "beam-sample": dict(do_sample=True, num_beams=2),
    "beam-returns": dict(do_sample=False, num_beams=3, num_return_sequences=2),
    "sample-returns": dict(do_sample=True, num_return_sequences=2),
    "min-new-tokens": dict(do_sample=False, min_new_tokens=5),
    "stopping-criteria": dict(do_sample=False),  # + a per-row criterion (below)
    "static-cache": dict(do_sample=False, cache_implementation="static"),
    "no-cache": dict(do_sample=False, use_cache=False),
    "own-cache": dict(do_sample=False),  # + past_key_values=DynamicCache() (below)
    "streamer": dict(do_sample=False),  # + a streamer (below)
    "logits-processors": dict(
        do_sample=True, typical_p=0.9, repetition_penalty=1.3, no_repeat_ngram_size=2, bad_words_ids=[[5]]
    ),
    "guidance": dict(do_sample=False, guidance_scale=1.5),  # a second, unconditional forward per step
    "inputs-embeds": dict(do_sample=False),  # the prompt as embeddings (below)
}


def _setup_kwargs(name: str, model, stop_token: int) -> dict:
    kw = dict(GENERATE_SETUPS[name], max_new_tokens=6, pad_token_id=model.config.pad_token_id)
    if name == "stopping-criteria":
        kw["stopping_criteria"] = StoppingCriteriaList([StopOnToken(stop_token)])
    if name == "own-cache":
        kw[_CACHE_KWARG] = DynamicCache()
    if name == "streamer":
        kw["streamer"] = Recorder()
    return kw


@pytest.mark.parametrize("family", ["llama", "opt-pre-ln", "qwen3", "gemma2"])
@pytest.mark.parametrize("setup", list(GENERATE_SETUPS))
@torch.inference_mode()
def test_every_decoding_setup_runs_patched(family, setup):
    """Exits off and checks that stop no row: the unpatched tokens (and streamed chunks), bit for bit.
    Forced exits: the set-up runs, and every step stops each row where forced."""
    model = tiny_model(family, "eager" if family == "gemma2" else "sdpa")
    batch = left_padded_batch(3, 7, pad_id=model.config.pad_token_id)
    greedy = model.generate(**batch, max_new_tokens=3, do_sample=False)
    stop_token = int(greedy[1, -2])  # row 1 stops early, the others go on
    model.generation_config.eos_token_id = int(greedy[0, -1])  # an eos the model emits: rows finish apart

    def run(**extra):
        kw = _setup_kwargs(setup, model, stop_token)
        prompt = batch
        if setup == "inputs-embeds":
            prompt = {"inputs_embeds": model.get_input_embeddings()(batch["input_ids"]), **batch}
            del prompt["input_ids"]
        torch.manual_seed(11)
        out = model.generate(**prompt, **kw, **extra)
        return out, kw.get("streamer")

    ref, ref_stream = run()
    layers = model.config.num_hidden_layers
    for config in (AdaInferConfig(enabled=False), AdaInferConfig(mode="compact"), AdaInferConfig(mode="mask")):
        with adainfer.patched(model, NeverExit(range(1, layers)), config):
            out, stream = run()
        assert torch.equal(out, ref), f"{setup} {config.mode} enabled={config.enabled}"
        if ref_stream is not None:
            assert ref_stream.ended and stream.same_as(ref_stream), f"{setup}: the streamer saw other chunks"
    rows = 3 * max(GENERATE_SETUPS[setup].get("num_beams", 1), GENERATE_SETUPS[setup].get("num_return_sequences", 1))
    exits = ([1, 3, 2, 4] * rows)[:rows]
    with adainfer.patched(model, ForcedExits(exits)) as handle:
        out, _ = run()
    assert out.shape[0] == ref.shape[0]
    assert handle.history and all(s.exit_layers.tolist() == exits for s in handle.history)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(prompt_lookup_num_tokens=2), "prompt_lookup_num_tokens"),
        (dict(prefill_chunk_size=3), "prefill_chunk_size"),
        (dict(output_hidden_states=True, return_dict_in_generate=True), "output_hidden_states"),
        (dict(output_attentions=True, return_dict_in_generate=True), "output_attentions"),
    ],
)
@torch.inference_mode()
def test_setups_the_exits_cannot_serve_are_refused_before_the_first_token(kwargs, name):
    """Assisted decoding verifies several tokens per forward and a chunked prefill ends forwards
    mid-prompt: a token's exit would not be decided on its own position. Refused up front (no forward
    ran); with exits off the call runs as unpatched."""
    model = tiny_llama()
    batch = left_padded_batch(1, 9)
    ref = model.generate(**batch, max_new_tokens=4, do_sample=False, **kwargs)
    with adainfer.patched(model, NeverExit([1, 2])) as handle:
        with pytest.raises(ValueError, match=rf"{name}.* not supported while AdaInfer exits are enabled"):
            model.generate(**batch, max_new_tokens=4, do_sample=False, **kwargs)
        assert not handle.history, "refused before the first forward"
        handle.enabled = False
        out = model.generate(**batch, max_new_tokens=4, do_sample=False, **kwargs)
    ref_seq = ref if isinstance(ref, torch.Tensor) else ref.sequences
    out_seq = out if isinstance(out, torch.Tensor) else out.sequences
    assert torch.equal(out_seq, ref_seq)


@torch.inference_mode()
def test_an_assistant_model_is_refused():
    model, assistant = tiny_llama(), tiny_llama(layers=2, seed=1)
    batch = left_padded_batch(1, 9)
    with adainfer.patched(model, NeverExit([1])) as handle:
        with pytest.raises(ValueError, match="assistant_model"):
            model.generate(**batch, max_new_tokens=3, do_sample=False, assistant_model=assistant)
        assert not handle.history


@torch.inference_mode()
def test_a_decode_loop_of_ones_own_feeds_finished_rows_the_pad_token():
    """Outside generate, a step that continues a cached sequence may end in the pad token without a
    mask (a finished row): only a fresh forward can hide padding at its end, and only it is refused."""
    model = tiny_llama()
    pad = model.config.pad_token_id
    ids = torch.randint(3, 300, (2, 5), generator=torch.Generator().manual_seed(0))
    with adainfer.patched(model, NeverExit([1, 2])) as handle:
        out = model(input_ids=ids, use_cache=True)
        cache = out.get("cache", out.get("past_key_values"))
        step = torch.tensor([[7], [pad]])  # row 1 has finished
        model(input_ids=step, **{"cache" if "cache" in out else "past_key_values": cache})
        assert handle.last_stats.exit_layers.tolist() == [4, 4]
        with pytest.raises(ValueError, match="end in the pad token"):
            model(input_ids=torch.cat([ids, step], dim=1))  # a fresh forward: refused as before


@torch.inference_mode()
def test_stop_strings_run_patched(request):
    """``stop_strings`` (with the bundled tokenizer): the unpatched tokens with checks that stop no
    row; forced exits run."""
    from adainfer.app.loading import bundled_model_dir

    try:
        bundled_model_dir()
    except FileNotFoundError:  # the compat venv (make test-compat) has no bundled model
        pytest.skip("needs the bundled model's tokenizer (make setup installs it)")
    tokenizer = request.getfixturevalue("bundled").tokenizer
    model = tiny_llama()
    batch = left_padded_batch(3, 7, pad_id=model.config.pad_token_id)
    greedy = model.generate(**batch, max_new_tokens=4, do_sample=False)
    stop = tokenizer.decode(greedy[1, -2:-1])  # row 1 stops after its 3rd token
    kw = dict(max_new_tokens=6, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    ref = model.generate(**batch, **kw)
    ended_early = ref.shape[1] < 7 + 6 or bool((ref[:, -1] == model.config.pad_token_id).any())
    assert ended_early, "the stop string must end a row before max_new_tokens"
    with adainfer.patched(model, NeverExit([1, 2, 3])):
        assert torch.equal(model.generate(**batch, **kw), ref)
    with adainfer.patched(model, ForcedExits([1, 2, 4])) as handle:
        model.generate(**batch, **kw)
    assert all(s.exit_layers.tolist() == [1, 2, 4] for s in handle.history)
