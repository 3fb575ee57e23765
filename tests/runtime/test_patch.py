"""The AdaInfer patch on tiny random Llama and OPT models: bit-identity without exits, the exact
semantics of forced exits (forward and generate), undo, and every refused input."""

from __future__ import annotations

import adainfer
import pytest
import torch
from adainfer import AdaInferConfig, ForcedExits, NeverExit
from tiny_models import (
    assert_rows_generate_as_alone,
    decode_hidden,
    left_padded_batch,
    run_configs,
    tiny_llama,
    tiny_opt,
)

MODELS = {
    "llama": lambda attn, dtype=torch.float32: tiny_llama(attn, dtype),
    "opt-pre-ln": lambda attn, dtype=torch.float32: tiny_opt(False, attn, dtype),
    "opt-post-ln": lambda attn, dtype=torch.float32: tiny_opt(True, attn, dtype),
}
ATTN = ("sdpa", "eager")
GEN = {"max_new_tokens": 6, "do_sample": False}


def _batch(model, batch=4, length=9):
    return left_padded_batch(batch, length, pad_id=model.config.pad_token_id)


# fp32 for every model and attention kind; bf16/fp16 for every model with sdpa and for llama with eager.
IDENTITY_CASES = [(n, a, torch.float32) for n in MODELS for a in ATTN] + [
    (n, a, dt)
    for dt in (torch.bfloat16, torch.float16)
    for n, a in [*((n, "sdpa") for n in MODELS), ("llama", "eager")]
]


@pytest.mark.parametrize(("name", "attn", "dtype"), IDENTITY_CASES)
@torch.inference_mode()
def test_exits_disabled_and_never_exit_are_bit_identical(name, attn, dtype):
    model = MODELS[name](attn, dtype)
    batch = _batch(model)
    ref_logits = model(**batch).logits
    ref_tokens = model.generate(**batch, **GEN)
    layers = range(1, model.config.num_hidden_layers)
    for config in (AdaInferConfig(enabled=False), AdaInferConfig()):
        with adainfer.patched(model, NeverExit(layers), config) as handle:
            logits = model(**batch).logits
            tokens = model.generate(**batch, **GEN)
            assert torch.equal(logits, ref_logits), f"{name}/{attn}/{dtype} enabled={config.enabled}"
            assert torch.equal(tokens, ref_tokens)
            if config.enabled:
                stats = handle.last_stats
                assert stats.exit_layers.tolist() == [model.config.num_hidden_layers] * 4
                assert stats.rows_checked == 4 * len(layers)
    assert torch.equal(model(**batch).logits, ref_logits), "undo must restore the original bit for bit"


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mode", ["compact", "mask"])
@torch.inference_mode()
def test_forced_exit_logits_equal_the_logit_lens_of_that_layer(name, mode):
    model = MODELS[name]("sdpa")
    batch = _batch(model)
    hidden = model(**batch, output_hidden_states=True).hidden_states  # L+1, the last one already normed
    ref_logits = model(**batch).logits
    exits = [2, 4, 1, 3]  # row 1 never exits (4 == L)
    with adainfer.patched(model, ForcedExits(exits), AdaInferConfig(mode=mode)) as handle:
        logits = model(**batch).logits
        assert handle.last_stats.exit_layers.tolist() == exits
    for row, k in enumerate(exits):
        if k < model.config.num_hidden_layers:
            expected = decode_hidden(model, hidden[k][row, -1])
            # Same operations on the same values; only the GEMM batch differs (a row vs the batch).
            torch.testing.assert_close(logits[row, -1], expected, rtol=1e-5, atol=1e-5)
        else:
            # A row that never exits ran its later layers in a smaller batch: results may differ in
            # the last bits of fp32 GEMMs (blocking depends on the row count), nothing more.
            torch.testing.assert_close(logits[row], ref_logits[row], rtol=1e-5, atol=1e-5)
            assert torch.equal(logits[row].argmax(-1), ref_logits[row].argmax(-1))


@pytest.mark.parametrize("name", list(MODELS))
@torch.inference_mode()
def test_generate_with_mixed_exits_keeps_every_cache_layer_consistent(name):
    model = MODELS[name]("sdpa")
    batch = _batch(model)
    ref = model.generate(**batch, **GEN)
    exits = [2, 4, 1, 3]
    layers = model.config.num_hidden_layers
    runs = {}
    for mode, config in run_configs().items():
        with adainfer.patched(model, ForcedExits(exits), config) as handle:
            out = model.generate(**batch, **GEN, return_dict_in_generate=True, output_scores=True)
            steps = len(handle.history)
            assert steps == GEN["max_new_tokens"], "one forward per generated token"
            assert all(s.exit_layers.tolist() == exits for s in handle.history)
        cache = out.get("cache", out.get("past_key_values"))
        total = batch["input_ids"].shape[1] + GEN["max_new_tokens"] - 1
        shapes = {tuple(layer.keys.shape) for layer in cache.layers}
        assert len(cache.layers) == layers
        assert len(shapes) == 1, f"cache layers disagree: {shapes}"
        (shape,) = shapes
        assert shape[0] == 4 and shape[2] == total
        runs[mode] = out
    # The row that never exits produces the unpatched model's tokens exactly.
    assert torch.equal(runs["compact"].sequences[1], ref[1])
    # Compaction (rows leave the batch, K/V by state propagation) and mask mode (rows stay, frozen)
    # are two implementations of the same semantics.
    for mode in ("compact", "compact-routed"):
        assert torch.equal(runs[mode].sequences, runs["mask"].sequences), mode
        for a, b in zip(runs[mode].scores, runs["mask"].scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("exits", [[2, 4, 1, 3], [1, 1, 2, 1]])
@torch.inference_mode()
def test_generate_with_a_static_cache(exits):
    """A preallocated cache (``cache_implementation="static"``): every way of running the exits
    gives the same tokens, and the row that never exits is the unpatched model's."""
    model = tiny_llama("sdpa")
    batch = _batch(model)
    static = {**GEN, "cache_implementation": "static"}
    ref = model.generate(**batch, **static)
    runs = {}
    for mode, config in run_configs().items():
        with adainfer.patched(model, ForcedExits(exits), config) as handle:
            runs[mode] = model.generate(**batch, **static, return_dict_in_generate=True, output_scores=True)
            assert all(s.exit_layers.tolist() == exits for s in handle.history)
    for mode in ("compact", "compact-routed"):
        assert torch.equal(runs[mode].sequences, runs["mask"].sequences), mode
        for a, b in zip(runs[mode].scores, runs["mask"].scores, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    never = [r for r, k in enumerate(exits) if k >= model.config.num_hidden_layers]
    for r in never:
        assert torch.equal(runs["compact"].sequences[r], ref[r])


@torch.inference_mode()
def test_state_propagation_matches_running_the_row_alone():
    """A row that exits at layer k in a batch generates what it generates alone (batch 1)."""
    assert_rows_generate_as_alone(tiny_llama("sdpa"))


@torch.inference_mode()
def test_every_row_exiting_early_still_fills_all_cache_layers():
    model = tiny_llama("eager")
    batch = _batch(model)
    with adainfer.patched(model, ForcedExits([1, 1, 2, 1]), AdaInferConfig(decode_compact_rows=1)) as handle:
        out = model.generate(**batch, **GEN, return_dict_in_generate=True)
        assert handle.last_stats.layer_rows == 4 + 1  # layer 1 for all rows, layer 2 for one
    cache = out.get("cache", out.get("past_key_values"))
    assert {tuple(layer.keys.shape) for layer in cache.layers} == {(4, 2, 9 + 5, 16)}


@torch.inference_mode()
def test_compaction_runs_fewer_rows_and_mask_mode_does_not():
    model = tiny_llama("sdpa")
    batch = _batch(model)
    exits = [1, 4, 2, 1]
    for mode, expected in (("compact", 4 + 2 + 1 + 1), ("mask", 16)):
        with adainfer.patched(model, ForcedExits(exits), AdaInferConfig(mode=mode)) as handle:
            model(**batch)
            assert handle.last_stats.layer_rows == expected, mode
            assert handle.last_stats.layers_saved_fraction == pytest.approx(1 - (1 + 4 + 2 + 1) / 16)


@torch.inference_mode()
def test_batch_sizes_one_and_many():
    model = tiny_llama("sdpa")
    for b in (1, 37):
        batch = _batch(model, batch=b)
        ref = model(**batch).logits
        exits = [(r % 4) + 1 for r in range(b)]
        with adainfer.patched(model, ForcedExits(exits)) as handle:
            logits = model(**batch).logits
        assert handle.last_stats.exit_layers.tolist() == exits
        never = [r for r in range(b) if exits[r] == 4]
        torch.testing.assert_close(logits[never], ref[never], rtol=1e-5, atol=1e-5)


def test_remove_and_patching_twice():
    model = tiny_llama()
    inner_forward = model.model.forward
    handle = adainfer.apply(model, NeverExit([1, 2]))
    with pytest.raises(ValueError, match="already patched"):
        adainfer.apply(model, NeverExit([1]))
    assert adainfer.handle_of(model) is handle
    adainfer.remove(model)
    assert adainfer.handle_of(model) is None
    assert type(model.model.layers) is torch.nn.ModuleList and "forward" not in model.model.__dict__
    assert model.model.forward.__func__ is inner_forward.__func__
    with pytest.raises(RuntimeError, match="not installed"):
        handle.remove()
    with pytest.raises(ValueError, match="not patched"):
        adainfer.remove(model)


def test_layer_list_is_untouched_outside_a_forward():
    model = tiny_llama()
    with adainfer.patched(model, NeverExit([1])):
        assert len(model.model.layers) == 4
        assert [type(m).__name__ for m in model.model.layers] == ["LlamaDecoderLayer"] * 4
        assert len(model.model.layers[:2]) == 2
        assert sorted(model.state_dict()) == sorted(tiny_llama().state_dict())


# -- refused inputs -------------------------------------------------------------------------------
def test_unsupported_model_type_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100))
    with pytest.raises(ValueError, match="model_type 'gpt2' is not supported") as err:
        adainfer.apply(model, NeverExit([1]))
    from adainfer.models import FAMILIES

    assert all(t in str(err.value) for t in FAMILIES), "the error names every supported family"


def test_unsupported_attention_is_refused():
    model = tiny_llama("eager")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attention implementation 'flex_attention' is not supported"):
        adainfer.apply(model, NeverExit([1]))


@torch.inference_mode()
def test_output_flags_and_right_padding_are_refused():
    model = tiny_llama()
    batch = _batch(model)
    with adainfer.patched(model, NeverExit([1])) as handle:
        with pytest.raises(ValueError, match="output_hidden_states=True is not supported"):
            model(**batch, output_hidden_states=True)
        with pytest.raises(ValueError, match="output_attentions=True is not supported"):
            model(**batch, output_attentions=True)
        right = {k: v.flip(1) for k, v in batch.items()}
        with pytest.raises(ValueError, match="use left padding"):
            model(**right)
        handle.enabled = False  # the documented escape hatch
        assert len(model(**batch, output_hidden_states=True).hidden_states) == 5


@pytest.mark.parametrize("name", ["llama", "opt-pre-ln"])
@torch.inference_mode()
def test_rows_ending_in_the_pad_token_without_a_mask_are_refused(name):
    """Right padding without an attention mask (what lm-eval's HFLM sends) would put the exit decision
    on a pad token silently; with the mask, or without pad tokens at the end, the call runs."""
    model = MODELS[name]("sdpa")
    pad = model.config.pad_token_id
    ids = _batch(model)["input_ids"].flip(1)  # right-padded: rows 1.. end in the pad token
    with adainfer.patched(model, NeverExit([1])) as handle:
        with pytest.raises(ValueError, match=r"row\(s\) \[1, 2, 3\] end in the pad token .* no attention_mask"):
            model(input_ids=ids)
        with pytest.raises(ValueError, match="end in the pad token"):
            model(ids)  # positional
        model(input_ids=ids[:1])  # row 0 has no padding
        assert handle.last_stats.exit_layers.tolist() == [4]
        model(input_ids=ids, attention_mask=torch.ones_like(ids))  # the caller says the pad tokens are real input
        assert (ids[:, -1] == pad).sum() == 3
        handle.enabled = False  # exits off: the original code path, nothing checked
        model(input_ids=ids)


def test_bad_config_and_policy_are_refused():
    model = tiny_llama()
    with pytest.raises(ValueError, match="mode 'fast' is not valid"):
        AdaInferConfig(mode="fast")
    with pytest.raises(ValueError, match="counted from 1"):
        AdaInferConfig(min_layer=0)
    with pytest.raises(ValueError, match="not below the model's 4 layers"):
        adainfer.apply(model, NeverExit([1]), AdaInferConfig(layers=[2, 4]))
    with pytest.raises(TypeError, match="expected a StopClassifier"):
        adainfer.apply(model, object())
    assert adainfer.handle_of(model) is None


def test_forced_exits_for_too_few_rows_is_an_error():
    model = tiny_llama()
    with adainfer.patched(model, ForcedExits([1, 2])), pytest.raises(ValueError, match="covers 2 rows"):
        model(**_batch(model))


def test_unsupported_transformers_version_is_refused(monkeypatch):
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.46.0")
    with pytest.raises(RuntimeError, match=r"transformers 4.46.0 is not supported"):
        adainfer.apply(tiny_llama(), NeverExit([1]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@torch.inference_mode()
def test_low_precision_forced_exits_compact_equals_mask(dtype):
    """bf16/fp16: the two implementations of the exit semantics agree (forward and generate)."""
    model = tiny_llama("sdpa", dtype)
    batch = _batch(model)
    exits = [2, 4, 1, 3]
    outs = {}
    for mode in ("compact", "mask"):
        with adainfer.patched(model, ForcedExits(exits), AdaInferConfig(mode=mode)) as handle:
            logits = model(**batch).logits
            assert logits.dtype == dtype and handle.last_stats.exit_layers.tolist() == exits
            tokens = model.generate(**batch, **GEN)
        outs[mode] = (logits, tokens)
    torch.testing.assert_close(outs["compact"][0], outs["mask"][0], rtol=2e-2, atol=2e-2)
    # Greedy tokens could only differ where rounding flips a near-tie; none occurs for this input.
    assert torch.equal(outs["compact"][1], outs["mask"][1])


# -- configuration edges ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"layers": [1.7]}, TypeError, r"checked layers must be an integer, got float \(1.7\)"),
        ({"layers": [1, True]}, TypeError, "checked layers must be an integer, got True"),
        ({"layers": "12"}, TypeError, "layers must be a sequence of integers"),
        ({"layers": []}, ValueError, r"layers=\[\] checks no layer"),
        ({"min_layer": 1.5}, TypeError, "min_layer must be an integer"),
        ({"interval": 2.0}, TypeError, "interval must be an integer"),
        ({"history": 0}, ValueError, "history must be >= 1"),
        ({"history": 10.0}, TypeError, "history must be an integer"),
        ({"enabled": "no"}, TypeError, "enabled must be True or False"),
        ({"decode_compact_rows": 0}, ValueError, r"decode_compact_rows must be >= 1 \(1 always compacts\)"),
        ({"decode_compact_rows": 2.5}, TypeError, "decode_compact_rows must be an integer"),
    ],
)
def test_config_refuses_non_integer_and_empty_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        AdaInferConfig(**kwargs)


def test_decode_compaction_threshold_per_device():
    from adainfer.runtime.config import DECODE_COMPACT_ROWS

    assert AdaInferConfig().compact_rows_for(torch.device("cpu")) == DECODE_COMPACT_ROWS["cpu"]
    assert AdaInferConfig().compact_rows_for(torch.device("cuda", 0)) == DECODE_COMPACT_ROWS["cuda"]
    assert AdaInferConfig().compact_rows_for(torch.device("meta")) == 1  # unknown: always compact
    assert AdaInferConfig(decode_compact_rows=5).compact_rows_for(torch.device("cpu")) == 5


@torch.inference_mode()
def test_decode_layers_run_frozen_until_enough_rows_finish():
    """Prefill always compacts; a decode step runs a layer on the whole batch (finished rows frozen)
    while fewer than ``decode_compact_rows`` rows have finished, and compacts after that."""
    model = tiny_llama("sdpa")
    batch = _batch(model)
    exits = [1, 2, 2, 4]  # finished before layer 2: 1 row, before 3 and 4: 3 rows
    with adainfer.patched(model, ForcedExits(exits), AdaInferConfig(decode_compact_rows=2)) as handle:
        model.generate(**batch, max_new_tokens=2, do_sample=False)
        prefill, decode = handle.history
    assert prefill.layer_rows == sum(exits)
    assert decode.layer_rows == 4 + 4 + 1 + 1  # layer 2 runs all 4 rows (1 finished < 2), then compact


def test_config_layers_are_integers_read_once():
    import numpy as np

    assert AdaInferConfig(layers=np.array([3, 1])).layers == (1, 3)
    assert AdaInferConfig(layers=torch.tensor([2, 1, 2])).checked_layers(4) == frozenset({1, 2})
    # a generator is read once, in __post_init__: the config still checks its layers afterwards
    assert AdaInferConfig(layers=(k for k in (1, 2))).checked_layers(4) == frozenset({1, 2})


@pytest.mark.parametrize("min_layer", [4, 9])
def test_min_layer_beyond_the_model_is_refused_when_applied(min_layer):
    model = tiny_llama()  # 4 layers: 1..3 can be checked
    config = AdaInferConfig(min_layer=min_layer)
    with pytest.raises(ValueError, match=f"min_layer {min_layer} checks no layer of a 4-layer model"):
        adainfer.apply(model, NeverExit([1, 2, 3]), config)
    assert adainfer.handle_of(model) is None
    assert AdaInferConfig(min_layer=3).checked_layers(4) == frozenset({3})


@torch.inference_mode()
def test_forced_exits_for_too_many_rows_is_an_error_at_the_first_forward():
    model = tiny_llama()
    batch = _batch(model)  # 4 rows
    with adainfer.patched(model, ForcedExits([1, 2, 3, 1, 2, 3])) as handle:
        with pytest.raises(ValueError, match="ForcedExits covers 6 rows but the batch has 4"):
            model(**batch)
        with pytest.raises(ValueError, match="covers 6 rows"):
            model.generate(**batch, **GEN)
    # exit layers that never trigger a check (4 == L) are still one per row
    with adainfer.patched(model, ForcedExits([4] * 5)), pytest.raises(ValueError, match="covers 5 rows"):
        model(**batch)
    assert not handle.history


@pytest.mark.parametrize(
    ("exits", "error", "match"),
    [
        ([1.7, 2.0], TypeError, "exit_layers must be integers"),
        ([0, 2], ValueError, r"counted from 1 .*got \[0\]"),
        ([[1, 2]], ValueError, "must be 1-D"),
    ],
)
def test_forced_exits_refuses_bad_layers(exits, error, match):
    with pytest.raises(error, match=match):
        ForcedExits(exits)


@torch.inference_mode()
def test_history_is_bounded_and_reads_as_a_sequence():
    model = tiny_llama()
    batch = _batch(model)
    with adainfer.patched(model, ForcedExits([1, 2, 3, 4])) as handle:
        assert handle.history.maxlen == 1024 == AdaInferConfig().history
    with adainfer.patched(model, ForcedExits([1, 2, 3, 4]), AdaInferConfig(history=3)) as handle:
        for _ in range(5):
            model(**batch)
        assert len(handle.history) == 3
        assert handle.last_stats is handle.history[-1]
        assert [s.exit_layers.tolist() for s in handle.history] == [[1, 2, 3, 4]] * 3
        model.generate(**batch, **GEN)  # 6 steps: the last 3 are kept
        assert len(handle.history) == 3
        handle.reset_stats()
        assert len(handle.history) == 0 and handle.last_stats is None
