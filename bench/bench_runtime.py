"""End-to-end runtime benchmark: what compaction realises of the ideal layer saving.

On the bundled SmolLM2-135M (30 layers), a batch of 32 real prompts of ~200 tokens, with a forced
pattern (half the rows stop at layer 10, the rest run all 30 layers), side by side in one run:

    full      the unpatched model
    compact   AdaInfer with compaction (finished rows leave the batch)
    mask      AdaInfer in mask-only mode (finished rows stay, frozen): what other systems do

ideal saving = 1 - (rows x layers run) / (B x L); realised = 1 - t(provider) / t(full).
Target: compact realises >= 90% of the ideal; mask ~0. Also one exit check's cost as a fraction
of one decoder layer on the same rows (full vocabulary and a 2-token label subset), in prefill
(the prompt) and decode (one token). Timing through ``harness`` (interleaved, warm-up excluded).

    python bench/bench_runtime.py [--quick] [--reps N]

A full run appends its rows to bench/results/runtime.csv; ``--quick`` (batch 8 x 64 tokens, what
``make bench`` runs) writes build/bench/runtime.csv (``harness.output_dir``).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RESULTS_DIR, append_rows, dtype_name, interleaved, time_fn
from inputs import bundled_tweets


def real_prompts(tokenizer, n: int, target_tokens: int) -> list[str]:
    """``n`` prompts of about ``target_tokens`` tokens, made of consecutive tweets of the bundled corpus."""
    tweets = bundled_tweets()
    prompts, i = [], 0
    for _ in range(n):
        text = ""
        while len(tokenizer(text)["input_ids"]) < target_tokens:
            text += tweets[i] + "\n"
            i += 1
        prompts.append(text)
    return prompts


@torch.inference_mode()
def run(quick: bool = False, reps: int = 5) -> list[dict]:
    import adainfer
    from adainfer import AdaInferConfig, ForcedExits
    from adainfer.app.loading import load_bundled
    from adainfer.models import lens_head

    from adainfer_kernels.exit_head import exit_head

    loaded = load_bundled()
    model, tok = loaded.model, loaded.tokenizer
    dtype = dtype_name(next(model.parameters()).dtype)
    batch_size, tokens = (8, 64) if quick else (32, 200)
    prompts = real_prompts(tok, batch_size, tokens)
    batch = tok(prompts, return_tensors="pt", padding=True)
    num_layers = model.config.num_hidden_layers
    exits = [10 if r % 2 == 0 else num_layers for r in range(batch_size)]
    rows_layers = sum(exits)
    ideal = 1 - rows_layers / (batch_size * num_layers)

    def forward():
        return model(**batch, logits_to_keep=1)

    handles = {}
    fns = {"full": forward}
    for mode in ("compact", "mask"):

        def fn(mode=mode):
            h = adainfer.apply(model, ForcedExits(exits), AdaInferConfig(mode=mode))
            try:
                forward()
                handles[mode] = h.last_stats
            finally:
                h.remove()

        fns[mode] = fn
    times = interleaved(fns, reps, warmup=1)
    med = {k: t.median / 1e3 for k, t in times.items()}  # seconds
    rows = []
    print(
        f"\nSmolLM2-135M, batch {batch_size} x {batch['input_ids'].shape[1]} tokens, "
        f"half the rows exit at layer 10; ideal saving {ideal:.1%} (median of {reps}, interleaved)"
    )
    print(f"{'provider':<9} {'median s':>9} {'p20 s':>8} {'p80 s':>8} {'saving':>8} {'of ideal':>9}")
    for name in fns:
        t = times[name]
        saving = 1 - med[name] / med["full"]
        of_ideal = saving / ideal if name != "full" else float("nan")
        print(f"{name:<9} {med[name]:9.3f} {t.p20 / 1e3:8.3f} {t.p80 / 1e3:8.3f} {saving:8.1%} {of_ideal:9.1%}")
        rows.append(
            {
                "bench": "runtime",
                "provider": name,
                "dtype": dtype,
                "batch": batch_size,
                "tokens": batch["input_ids"].shape[1],
                **t.columns(digits=3),
                "saving": round(saving, 4),
                "ideal_saving": round(ideal, 4),
                "fraction_of_ideal": round(of_ideal, 4),
            }
        )
    assert handles["compact"].exit_layers.tolist() == exits

    # One exit check vs one decoder layer on the same rows.
    layer = model.model.layers[15]
    hidden = torch.randn(batch_size, batch["input_ids"].shape[1], model.config.hidden_size)
    pos = torch.arange(hidden.shape[1])[None]
    rope = model.model.rotary_emb(hidden, pos)
    head_full = lens_head(model)
    label_ids = [tok(w, add_special_tokens=False)["input_ids"] for w in (" positive", " negative")]
    assert all(len(ids) == 1 for ids in label_ids), label_ids
    head_labels = lens_head(model, vocab_subset=[ids[0] for ids in label_ids])
    from adainfer_kernels.head import StopRule

    stop_rule = StopRule(1.0, 1.0, -1.0)
    last = hidden[:, -1].contiguous()
    t_prefill = time_fn(lambda: layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=pos), 2, 5)
    t_decode = time_fn(
        lambda: layer(
            hidden[:, -1:],
            attention_mask=None,
            position_embeddings=tuple(t[:, -1:] for t in rope),
            position_ids=pos[:, -1:],
        ),
        3,
        20,
    )
    t_full = time_fn(lambda: exit_head(last, head_full, stop_rule), 3, 20)
    t_labels = time_fn(lambda: exit_head(last, head_labels, stop_rule), 3, 20)
    print(
        f"\none exit check on {batch_size} rows vs one decoder layer "
        f"(prefill {hidden.shape[1]} tokens / decode 1 token):"
    )
    for name, t in (("full vocab", t_full), ("2 label tokens", t_labels)):
        print(
            f"  {name:<15} {t.median:8.3f} ms = "
            f"{t.median / t_prefill.median:7.2%} of a prefill layer "
            f"({t_prefill.median:.2f} ms), {t.median / t_decode.median:7.1%} of a decode layer "
            f"({t_decode.median:.3f} ms)"
        )
        rows.append(
            {
                "bench": "check_cost",
                "provider": name,
                "dtype": dtype,
                "batch": batch_size,
                "tokens": hidden.shape[1],
                **t.columns(digits=4),
                "fraction_of_prefill_layer": round(t.median / t_prefill.median, 4),
                "fraction_of_decode_layer": round(t.median / t_decode.median, 4),
            }
        )
    append_rows("runtime", rows, record=not quick)
    return rows


def test_bench_runtime_quick():
    """`make bench` runs a quick version (rows to build/bench); `python bench/bench_runtime.py` the full one."""
    record = RESULTS_DIR / "runtime.csv"
    before = record.read_bytes() if record.exists() else None
    rows = run(quick=True, reps=3)
    assert {r["provider"] for r in rows} >= {"full", "compact", "mask"}
    assert (record.read_bytes() if record.exists() else None) == before, "a quick run wrote the committed record"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 8 x 64 tokens; rows to build/bench")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    run(args.quick, args.reps)
