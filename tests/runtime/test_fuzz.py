"""Property-based fuzz of the AdaInfer patch over random tiny Llama models.

Each example draws a model (2-4 layers, hidden 32-64, grouped K/V heads, sdpa or eager attention,
fp32 or bf16), a left-padded batch, a policy (forced exits in any pattern, or ``NeverExit``), and a
call (one forward, or a short greedy ``generate``), then checks the runtime's contracts
(docs/architecture.md, "Contracts"):

* exactly one output row per input row (logits, sequences, per-row exit layers);
* exits disabled, and checks that stop no row, are bit-identical to the unpatched model;
* forced exits stop each row where forced, in both modes; compact mode runs each row only up to its
  exit layer (``layer_rows``), mask mode runs every row through every layer;
* compact == mask: logits to 1e-4 (fp32), greedy tokens equal (until a near-tie lets them part);
* forced exits are batch-invariant: without padding, a row's logits equal the row run alone (1e-5);
* after ``generate`` the cache holds every row in every layer.

Examples are derandomised (CI sees the same ones each run) and kept small (~1 s each).
"""

from __future__ import annotations

from dataclasses import dataclass

import adainfer
import pytest
import torch
from adainfer import AdaInferConfig, ForcedExits, NeverExit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import run_configs
from transformers import LlamaConfig, LlamaForCausalLM

NEW_TOKENS = 3
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# compact vs mask: the same operations on different row counts (GEMM blocking), so fp32 agrees to
# rounding; bf16 rounds every layer's output to 8 bits of mantissa (the tolerance of test_patch.py).
MODE_TOL = {"fp32": 1e-4, "bf16": 2e-2}
ALONE_TOL = {"fp32": 1e-5, "bf16": 2e-2}
FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Case:
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    vocab: int
    attn: str
    dtype: str
    pads: tuple[int, ...]  # left padding of each row
    length: int
    exits: tuple[int, ...] | None  # forced exit layer per row (== layers: never); None: NeverExit
    op: str  # "forward" | "generate"
    seed: int

    @property
    def batch(self) -> int:
        return len(self.pads)


@st.composite
def cases(draw) -> Case:
    layers = draw(st.integers(2, 4))
    hidden = draw(st.sampled_from([32, 48, 64]))
    heads = draw(st.sampled_from([h for h in (2, 4, 8) if (hidden // h) % 2 == 0]))  # RoPE: even head_dim
    kv_heads = draw(st.sampled_from([k for k in (1, 2, 4, 8) if k <= heads and heads % k == 0]))
    batch = draw(st.integers(1, 4))
    length = draw(st.integers(2, 7))
    pads = tuple(draw(st.lists(st.integers(0, length - 1), min_size=batch, max_size=batch)))
    forced = draw(st.booleans())
    exits = tuple(draw(st.lists(st.integers(1, layers), min_size=batch, max_size=batch))) if forced else None
    return Case(
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        vocab=draw(st.sampled_from([61, 96, 128])),
        attn=draw(st.sampled_from(["sdpa", "eager"])),
        dtype=draw(st.sampled_from(sorted(DTYPES))),
        pads=pads,
        length=length,
        exits=exits,
        op=draw(st.sampled_from(["forward", "generate"])),
        seed=draw(st.integers(0, 2**16)),
    )


def build_model(c: Case) -> LlamaForCausalLM:
    torch.manual_seed(c.seed)
    cfg = LlamaConfig(
        hidden_size=c.hidden,
        intermediate_size=2 * c.hidden,
        num_hidden_layers=c.layers,
        num_attention_heads=c.heads,
        num_key_value_heads=c.kv_heads,
        vocab_size=c.vocab,
        max_position_embeddings=64,
        pad_token_id=0,
        attn_implementation=c.attn,
    )
    model = LlamaForCausalLM(cfg).to(DTYPES[c.dtype]).eval()
    model.generation_config.eos_token_id = None  # every call generates NEW_TOKENS steps
    return model


def build_batch(c: Case, padded: bool = True) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(c.seed + 1)
    ids = torch.randint(1, c.vocab, (c.batch, c.length), generator=g)
    mask = torch.ones_like(ids)
    if padded:
        for r, pad in enumerate(c.pads):
            ids[r, :pad] = 0
            mask[r, :pad] = 0
    return {"input_ids": ids, "attention_mask": mask}


def run(model, batch: dict, op: str):
    """(logits (B, T or steps, V), tokens (B, T + steps) or None, the generate output or None)."""
    if op == "forward":
        return model(**batch).logits, None, None
    out = model.generate(
        **batch,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    return torch.stack(out.logits, dim=1), out.sequences, out


def assert_close_until_near_tie(got, want, tokens_got, tokens_want, prompt_len, tol, what):
    """Logits per step within ``tol`` and greedy tokens equal, row by row, until a step whose top-2
    margin is within 2 * tol: from there on the two runs may legitimately pick different tokens."""
    for r in range(want.shape[0]):
        for t in range(want.shape[1]):
            torch.testing.assert_close(got[r, t], want[r, t], rtol=tol, atol=tol, msg=f"{what}: row {r} step {t}")
            if tokens_want is None:
                continue
            top2 = want[r, t].float().topk(2).values
            if float(top2[0] - top2[1]) <= 2 * tol:
                break  # a near-tie: the next tokens may differ
            assert int(tokens_got[r, prompt_len + t]) == int(tokens_want[r, prompt_len + t]), f"{what}: row {r}"


def check_cache(out, c: Case) -> None:
    cache = out.get("cache")  # transformers >= 5.24; `past_key_values` before (reading it warns after)
    if cache is None:
        cache = out.get("past_key_values")
    total = c.length + NEW_TOKENS - 1  # the last token is generated, never cached
    assert len(cache.layers) == c.layers
    for i, layer in enumerate(cache.layers):
        for name in ("keys", "values"):
            shape = tuple(getattr(layer, name).shape)
            assert shape[0] == c.batch and shape[2] == total, f"cache layer {i} {name} {shape}"


def check_case(c: Case) -> None:
    model = build_model(c)
    batch = build_batch(c)
    steps = 1 if c.op == "forward" else NEW_TOKENS
    ref_logits, ref_tokens, _ = run(model, batch, c.op)
    assert ref_logits.shape[0] == c.batch

    # Exits disabled: the original code runs, bit for bit.
    policy = NeverExit(range(1, c.layers)) if c.exits is None else ForcedExits(list(c.exits))
    with adainfer.patched(model, policy, AdaInferConfig(enabled=False)) as handle:
        logits, tokens, _ = run(model, batch, c.op)
        assert not handle.history
    assert torch.equal(logits, ref_logits), "exits disabled changed the logits"
    if tokens is not None:
        assert torch.equal(tokens, ref_tokens), "exits disabled changed the tokens"

    if c.exits is None:
        # Checks at every layer that stop no row: bit-identical, in both modes.
        for mode in ("compact", "mask"):
            with adainfer.patched(model, policy, AdaInferConfig(mode=mode)) as handle:
                logits, tokens, _ = run(model, batch, c.op)
                assert len(handle.history) == steps
                for stats in handle.history:
                    assert stats.exit_layers.tolist() == [c.layers] * c.batch
                    assert stats.rows_checked == c.batch * (c.layers - 1)
            assert torch.equal(logits, ref_logits), f"NeverExit ({mode}) changed the logits"
            if tokens is not None:
                assert torch.equal(tokens, ref_tokens), f"NeverExit ({mode}) changed the tokens"
        return

    exits = list(c.exits)
    runs = {}
    for mode, config in run_configs().items():
        with adainfer.patched(model, ForcedExits(exits), config) as handle:
            logits, tokens, out = run(model, batch, c.op)
            assert len(handle.history) == steps, "one ExitStats per forward call"
            for step, stats in enumerate(handle.history):
                assert stats.exit_layers.tolist() == exits, mode
                # compact: each row runs its layers up to its exit; mask: every row every layer;
                # routed: decode layers with 1-2 finished rows run them frozen (the whole batch)
                decode = step > 0 or c.length == 1
                want = expected_layer_rows(exits, c.layers, (config.decode_compact_rows or 1) if decode else 1)
                assert stats.layer_rows == (want if config.mode == "compact" else c.batch * c.layers), mode
        assert logits.shape[0] == c.batch and (tokens is None or tokens.shape[0] == c.batch)
        assert torch.isfinite(logits.float()).all()
        if out is not None:
            check_cache(out, c)
        runs[mode] = (logits, tokens)
    for mode in ("compact", "compact-routed"):
        (lc, tc), (lm, tm) = runs[mode], runs["mask"]
        assert_close_until_near_tie(lc, lm, tc, tm, c.length, MODE_TOL[c.dtype], f"{mode} vs mask")

    # Batch invariance: without padding, each row gives what it gives alone.
    full = build_batch(c, padded=False)
    with adainfer.patched(model, ForcedExits(exits)):
        together, tokens_together, _ = run(model, full, c.op)
    for r, k in enumerate(exits):
        single = {key: v[r : r + 1] for key, v in full.items()}
        with adainfer.patched(model, ForcedExits([k])):
            alone, tokens_alone, _ = run(model, single, c.op)
        tok_t = None if tokens_together is None else tokens_together[r : r + 1]
        last_t = together[r : r + 1, -steps:] if c.op == "forward" else together[r : r + 1]
        last_a = alone[:, -steps:] if c.op == "forward" else alone
        assert_close_until_near_tie(last_t, last_a, tok_t, tokens_alone, c.length, ALONE_TOL[c.dtype], f"row {r} alone")


def expected_layer_rows(exits: list[int], layers: int, compact_rows: int) -> int:
    """Rows a compact pass computes, summed over layers: layer l runs the A rows still active, or
    the whole batch when 0 < F < compact_rows rows finished before it (frozen), or none when all did."""
    total = 0
    for layer in range(1, layers + 1):
        active = sum(1 for e in exits if min(e, layers) >= layer)
        finished = len(exits) - active
        if active and 0 < finished < compact_rows:
            total += len(exits)
        else:
            total += active
    return total


@FUZZ
@given(c=cases())
@torch.inference_mode()
def test_fuzz_patch_contracts(c: Case) -> None:
    check_case(c)


@pytest.mark.parametrize(
    "case",
    [
        # hand-picked corners: batch 1, a row that never exits beside rows that exit at layer 1, every
        # row exiting at layer 1 in generate (the remaining layers only fill the cache), MQA (1 K/V head)
        Case(2, 32, 2, 1, 61, "sdpa", "fp32", (0,), 2, (1,), "generate", 0),
        Case(4, 64, 8, 2, 96, "eager", "fp32", (0, 3, 5), 7, (1, 4, 1), "generate", 1),
        Case(3, 48, 4, 4, 128, "sdpa", "bf16", (2, 0, 1, 0), 5, (1, 1, 1, 1), "generate", 2),
        Case(3, 48, 4, 1, 61, "sdpa", "fp32", (1, 0), 4, (2, 3), "forward", 3),
    ],
    ids=["batch-1", "mixed-eager", "all-exit-bf16", "mqa-forward"],
)
@torch.inference_mode()
def test_fuzz_corners(case: Case) -> None:
    check_case(case)
