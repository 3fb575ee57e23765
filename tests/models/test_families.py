"""Every registered model family on tiny random configs. All of them, Llama and OPT (pre-LN, and post-LN
with project_out) included: the exit head decodes like the model, exits off are bit-identical (logits;
greedy, sampled and beam generation) and undo is exact. The families beyond Llama and OPT (whose other
checks live in tests/runtime/test_patch.py): forced exits equal the logit lens of that layer, a row's
result independent of its batch-mates, generation with state-propagated K/V, compact == mask."""

from __future__ import annotations

import adainfer
import pytest
import torch
from adainfer import AdaInferConfig, ForcedExits, NeverExit
from adainfer.models import FAMILIES, lens_head, supported_model_types
from tiny_models import (
    EAGER_ONLY,
    FAMILY_CONFIGS,
    TINY_MODELS,
    assert_rows_generate_as_alone,
    decode_hidden,
    left_padded_batch,
    run_configs,
    tiny_family,
    tiny_model,
)

from adainfer_kernels.reference import head_logits_ref

NAMES = list(FAMILY_CONFIGS)
# Llama and OPT (pre-LN 125m-style; post-LN 350m-style: project_in/out, word_embed_proj_dim != hidden_size,
# no final layer norm) beside the other families, for the checks every family gets here.
ALL = list(TINY_MODELS)
ATTN = {name: ("eager",) if name in EAGER_ONLY else ("sdpa", "eager") for name in ALL}
GEN = {"max_new_tokens": 6, "do_sample": False}
GEN_MODES = {
    "greedy": dict(GEN),
    "sample": dict(max_new_tokens=6, do_sample=True, top_k=20, temperature=1.3),
    "beam": dict(max_new_tokens=6, do_sample=False, num_beams=3),
}


def _attn(name: str) -> str:
    return ATTN[name][0]


def _generate(model, batch, mode: str, **kw):
    torch.manual_seed(1234)  # the same sampling draws for every run of a mode
    return model.generate(**batch, **GEN_MODES[mode], **kw)


def test_registry_lists_every_tested_family():
    assert set(NAMES) | {"llama", "opt"} == set(supported_model_types()) == set(FAMILIES)


def _batch(model, batch: int, length: int) -> dict:
    return left_padded_batch(batch, length, pad_id=model.config.pad_token_id)


@pytest.mark.parametrize("name", ALL)
@torch.inference_mode()
def test_exit_head_decodes_like_the_model(name):
    """The family's exit head (norm numerics, soft-capping, OPT's project_out) reproduces the model's own logits."""
    model = tiny_model(name, _attn(name))
    if name == "opt-post-ln":
        assert model.config.word_embed_proj_dim != model.config.hidden_size
        assert model.model.decoder.project_out is not None and model.model.decoder.final_layer_norm is None
    batch = _batch(model, 3, 7)
    layers = model.model.decoder.layers if model.config.model_type == "opt" else model.model.layers
    seen = {}
    hook = layers[-1].register_forward_hook(lambda mod, args, out: seen.setdefault("raw", out))
    try:
        logits = model(**batch).logits[:, -1]
    finally:
        hook.remove()
    raw = seen["raw"][0] if isinstance(seen["raw"], tuple) else seen["raw"]  # the last layer's raw output
    got = head_logits_ref(raw[:, -1], lens_head(model), upcast=True)
    torch.testing.assert_close(got, logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(decode_hidden(model, raw[:, -1]), logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "attn", "dtype"),
    [(n, a, torch.float32) for n in ALL for a in ATTN[n]] + [(n, ATTN[n][0], torch.bfloat16) for n in ALL],
)
@torch.inference_mode()
def test_exits_off_and_never_exit_are_bit_identical_and_undo_is_exact(name, attn, dtype):
    model = tiny_model(name, attn, dtype)
    batch = _batch(model, 4, 9)
    ref_logits = model(**batch).logits
    ref = {mode: _generate(model, batch, mode) for mode in GEN_MODES}
    layers = range(1, model.config.num_hidden_layers)
    for config in (AdaInferConfig(enabled=False), AdaInferConfig()):
        with adainfer.patched(model, NeverExit(layers), config) as handle:
            assert torch.equal(model(**batch).logits, ref_logits), f"{name}/{attn}/{dtype} enabled={config.enabled}"
            for mode in GEN_MODES:
                assert torch.equal(_generate(model, batch, mode), ref[mode]), f"{mode} enabled={config.enabled}"
            if config.enabled:
                assert handle.last_stats.exit_layers.tolist() == [model.config.num_hidden_layers] * (
                    handle.last_stats.batch_size
                )
    assert torch.equal(model(**batch).logits, ref_logits), "undo must restore the original bit for bit"
    assert torch.equal(_generate(model, batch, "greedy"), ref["greedy"])


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("mode", ["compact", "mask"])
@torch.inference_mode()
def test_forced_exit_logits_equal_the_logit_lens_of_that_layer(name, mode):
    model = tiny_family(name, _attn(name))
    batch = left_padded_batch(4, 9)
    hidden = model(**batch, output_hidden_states=True).hidden_states  # L+1, the last one already normed
    ref_logits = model(**batch).logits
    exits = [2, 4, 1, 3]  # row 1 never exits (4 == L)
    with adainfer.patched(model, ForcedExits(exits), AdaInferConfig(mode=mode)) as handle:
        logits = model(**batch).logits
        assert handle.last_stats.exit_layers.tolist() == exits
    for row, k in enumerate(exits):
        if k < model.config.num_hidden_layers:
            torch.testing.assert_close(logits[row, -1], decode_hidden(model, hidden[k][row, -1]), rtol=1e-5, atol=1e-5)
        else:
            torch.testing.assert_close(logits[row], ref_logits[row], rtol=1e-5, atol=1e-5)
            assert torch.equal(logits[row].argmax(-1), ref_logits[row].argmax(-1))


@pytest.mark.parametrize("name", NAMES)
@torch.inference_mode()
def test_a_row_generates_what_it_generates_alone(name):
    """Forced exits are batch-invariant: each row of a batch equals that row run alone (batch 1)."""
    assert_rows_generate_as_alone(tiny_family(name, _attn(name)))


@pytest.mark.parametrize("name", NAMES)
@torch.inference_mode()
def test_generation_with_state_propagated_kv_and_compact_equals_mask(name):
    model = tiny_family(name, _attn(name))
    batch = left_padded_batch(4, 9)
    ref = model.generate(**batch, **GEN)
    exits = [2, 4, 1, 3]
    runs = {}
    for mode, config in run_configs().items():
        with adainfer.patched(model, ForcedExits(exits), config) as handle:
            out = model.generate(**batch, **GEN, return_dict_in_generate=True, output_scores=True)
            assert len(handle.history) == GEN["max_new_tokens"]
            assert all(s.exit_layers.tolist() == exits for s in handle.history)
        cache = out.get("cache", out.get("past_key_values"))
        assert len(cache.layers) == model.config.num_hidden_layers
        # Every cache layer holds all 4 rows (sliding layers may hold fewer positions than full ones).
        assert {layer.keys.shape[0] for layer in cache.layers} == {4}
        runs[mode] = out
    assert torch.equal(runs["compact"].sequences[1], ref[1]), "the row that never exits is the unpatched model's"
    for mode in ("compact", "compact-routed"):
        assert torch.equal(runs[mode].sequences, runs["mask"].sequences), mode
        for a, b in zip(runs[mode].scores, runs["mask"].scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
@torch.inference_mode()
def test_every_row_stopping_early_still_fills_every_cache_layer(name):
    model = tiny_family(name, _attn(name))
    batch = left_padded_batch(4, 9)
    with adainfer.patched(model, ForcedExits([1, 1, 2, 1]), AdaInferConfig(decode_compact_rows=1)) as handle:
        out = model.generate(**batch, **GEN, return_dict_in_generate=True)
        assert handle.last_stats.layer_rows == 4 + 1  # layer 1 for all rows, layer 2 for one
    with adainfer.patched(model, ForcedExits([1, 1, 2, 1]), AdaInferConfig(mode="mask")):
        masked = model.generate(**batch, **GEN, return_dict_in_generate=True)
    cache = out.get("cache", out.get("past_key_values"))
    masked_cache = masked.get("cache", masked.get("past_key_values"))
    for a, b in zip(cache.layers, masked_cache.layers, strict=True):
        assert a.keys.shape == b.keys.shape
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(out.sequences, masked.sequences)
