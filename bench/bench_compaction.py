"""Benchmark of one compaction event: the C++ op against torch per-tensor indexing, and against one
SmolLM2-135M decoder layer on the same rows (the cost the event must stay small against).

Bundle (the batch-leading layer state of a Llama model): hidden [B,T,d] fp32, attention mask
(4-D bool [B,1,T,T] when T > 1, as sdpa gets it; 2-D int64 [B,T] when T == 1), position ids
[B,T] int64, cos and sin [B,T,64] fp32. A fraction ``keep`` of the rows (chosen at random) stays.

Providers:
  native        torch.ops.adainfer.compact_rows: one index computation, one memcpy gather per tensor
  wrapper       adainfer_kernels.compaction.compact_rows (the Python API the runtime calls; native
                op plus argument checks and broadcast handling)
  bool_index    torch boolean indexing per tensor: t[keep] (+ row_map[keep], row_map[~keep])
  index_select  one nonzero, then t.index_select(0, kept) per tensor (the torch fallback)
  layer         transformers LlamaDecoderLayer (hidden 576, intermediate 1536, 9 heads, 3 KV heads,
                head_dim 64, sdpa, random weights) on the B rows before the event. For T == 1 it
                runs without a KV cache, which under-states a decode layer, so the % is an upper
                bound there. Only for d == 576 (the layer's width).

Targets: native >= 1.5x faster than bool_index; native <= 2% of the layer.

Run: ``make bench`` (pytest-benchmark over the default cases, plus the report below, recorded under
build/bench), or ``python bench/bench_compaction.py [--full]`` (appended to
bench/results/bench_compaction.csv); ``ADAINFER_BENCH_FULL=1`` selects the full grid
(B in {8,64,256} x T in {1,128,512} x d in {576,4096} x keep in {0.9,0.5,0.1}; combos whose tensors
would exceed ~2 GB are skipped and listed); ``ADAINFER_BENCH_THREADS=N`` / ``--threads N`` sets torch's
CPU threads, ``ADAINFER_BENCH_DEVICE=cuda`` / ``--device cuda`` runs on a GPU (the 2 GB cap still
applies). Timing: ``harness.interleaved`` (round-robin, synchronised), as many rounds as fit a
2-second budget per case.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import append_rows, interleaved, reps_for_budget

from adainfer_kernels import _native, compaction

MEMORY_CAP_BYTES = 2 * 1024**3
HEAD_DIM = 64
LAYER_HIDDEN = 576
LAYER_HEADS = 9


@dataclass(frozen=True)
class Case:
    batch: int
    seq: int
    hidden: int
    keep: float

    def __str__(self) -> str:
        return f"B{self.batch}-T{self.seq}-d{self.hidden}-keep{self.keep}"

    @property
    def mask_kind(self) -> str:
        return "4d" if self.seq > 1 else "2d"

    def bundle_bytes(self) -> int:
        b, t, d = self.batch, self.seq, self.hidden
        mask = b * t * t if self.seq > 1 else b * t * 8
        return b * t * d * 4 + mask + b * t * 8 + 2 * b * t * HEAD_DIM * 4

    def peak_bytes(self) -> int:
        # Inputs plus the largest output any provider holds at once (one compacted copy).
        return int(self.bundle_bytes() * (1 + self.keep))

    def layer_bytes(self) -> int:
        # sdpa's math path on CPU materialises fp32 scores [B, heads, T, T]; plus activations.
        return self.batch * LAYER_HEADS * self.seq * self.seq * 4 + 12 * self.batch * self.seq * LAYER_HIDDEN * 4


DEFAULT_CASES = [
    Case(8, 1, 576, 0.5),
    Case(64, 1, 576, 0.5),
    Case(256, 1, 576, 0.5),
    Case(8, 128, 576, 0.5),
    Case(64, 128, 576, 0.9),
    Case(64, 128, 576, 0.5),
    Case(64, 128, 576, 0.1),
    Case(8, 512, 576, 0.5),
    Case(64, 128, 4096, 0.5),
]
FULL_CASES = [
    Case(b, t, d, k) for b, t, d, k in itertools.product((8, 64, 256), (1, 128, 512), (576, 4096), (0.9, 0.5, 0.1))
]


def make_inputs(
    case: Case, seed: int = 0, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    b, t, d = case.batch, case.seq, case.hidden
    n_kept = round(case.keep * b)
    keep = torch.zeros(b, dtype=torch.bool)
    keep[torch.randperm(b, generator=gen)[:n_kept]] = True
    row_map = torch.arange(b)
    hidden = torch.randn(b, t, d, generator=gen)
    if case.mask_kind == "4d":
        mask = torch.ones(t, t, dtype=torch.bool).tril().expand(b, 1, t, t).contiguous()
    else:
        mask = torch.ones(b, t, dtype=torch.int64)
    position_ids = torch.arange(t).expand(b, t).contiguous()
    cos = torch.randn(b, t, HEAD_DIM, generator=gen)
    sin = torch.randn(b, t, HEAD_DIM, generator=gen)
    tensors = [x.to(device) for x in (hidden, mask, position_ids, cos, sin)]
    return keep.to(device), row_map.to(device), tensors


def native(keep: torch.Tensor, row_map: torch.Tensor, tensors: list[torch.Tensor]):
    return torch.ops.adainfer.compact_rows(keep, row_map, tensors)


def wrapper(keep: torch.Tensor, row_map: torch.Tensor, tensors: list[torch.Tensor]):
    return compaction.compact_rows(keep, row_map, tensors)


def bool_index(keep: torch.Tensor, row_map: torch.Tensor, tensors: list[torch.Tensor]):
    return [t[keep] for t in tensors], row_map[keep], row_map[~keep]


def index_select(keep: torch.Tensor, row_map: torch.Tensor, tensors: list[torch.Tensor]):
    kept = torch.nonzero(keep).squeeze(1)
    finished = torch.nonzero(~keep).squeeze(1)
    return [t.index_select(0, kept) for t in tensors], row_map.index_select(0, kept), row_map.index_select(0, finished)


PROVIDERS: dict[str, Callable] = {
    "native": native,
    "wrapper": wrapper,
    "bool_index": bool_index,
    "index_select": index_select,
}


def available_providers() -> list[str]:
    if _native.has_op("compact_rows"):
        return list(PROVIDERS)
    return [p for p in PROVIDERS if p != "native"]  # the wrapper then measures the torch fallback


def check_agreement(keep: torch.Tensor, row_map: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    """Every provider returns the same rows (a benchmark of a wrong result is worthless)."""
    want, want_rows, want_finished = bool_index(keep, row_map, tensors)
    for name in available_providers():
        out = PROVIDERS[name](keep, row_map, tensors)
        got, rows = (out.tensors, out.row_map) if name == "wrapper" else (out[0], out[1])
        finished = out.finished_rows if name == "wrapper" else out[-1]
        assert torch.equal(rows, want_rows) and torch.equal(finished, want_finished), name
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True)), name


def build_layer():
    """One SmolLM2-135M decoder layer with random weights (timing only). Imports transformers
    here: the bench may, adainfer_kernels may not."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = LlamaConfig(
        hidden_size=LAYER_HIDDEN,
        intermediate_size=1536,
        num_attention_heads=LAYER_HEADS,
        num_key_value_heads=3,
        head_dim=HEAD_DIM,
        num_hidden_layers=1,
        attn_implementation="sdpa",
    )
    return LlamaDecoderLayer(config, layer_idx=0).eval()


def budget_time(fns: dict[str, Callable[[], object]], budget_s: float, min_reps: int, max_reps: int, device: str):
    """``harness.interleaved`` with as many rounds as fit ``budget_s`` (the probe calls are the warm-up)."""
    reps = reps_for_budget(fns, budget_s, min_reps, max_reps, device)
    return interleaved(fns, reps, warmup=0, device=device)


def measure(case: Case, layer=None, device: str = "cpu") -> dict[str, object]:
    """Times every provider (and the layer) on one case; returns one summary row."""
    keep, row_map, tensors = make_inputs(case, device=device)
    check_agreement(keep, row_map, tensors)
    row: dict[str, object] = {
        "case": str(case),
        "batch": case.batch,
        "seq": case.seq,
        "hidden": case.hidden,
        "keep": case.keep,
        "mask": case.mask_kind,
        "bundle_mb": round(case.bundle_bytes() / 2**20, 1),
    }
    with torch.inference_mode():
        fns = {name: (lambda fn=PROVIDERS[name]: fn(keep, row_map, tensors)) for name in available_providers()}
        for name, t in budget_time(fns, budget_s=2.0, min_reps=7, max_reps=300, device=device).items():
            row.update(t.columns(provider=name))
        if layer is not None and case.hidden == LAYER_HIDDEN:
            if case.layer_bytes() > MEMORY_CAP_BYTES:
                row["layer_note"] = f"layer skipped: ~{case.layer_bytes() / 2**30:.1f} GB > cap"
            else:
                hidden, mask, position_ids, cos, sin = tensors
                attn_mask = mask if case.mask_kind == "4d" else None

                def run_layer():
                    return layer(
                        hidden, attention_mask=attn_mask, position_ids=position_ids, position_embeddings=(cos, sin)
                    )

                t = budget_time({"layer": run_layer}, 2.0, min_reps=3, max_reps=30, device=device)["layer"]
                row.update(t.columns(provider="layer"))
    base = "native" if "native_ms" in row else "wrapper"
    row["speedup_vs_bool_index"] = row["bool_index_ms"] / row[f"{base}_ms"]
    row["speedup_vs_index_select"] = row["index_select_ms"] / row[f"{base}_ms"]
    row["wrapper_speedup_vs_bool_index"] = row["bool_index_ms"] / row["wrapper_ms"]
    if "layer_ms" in row:
        row["native_pct_of_layer"] = 100 * row[f"{base}_ms"] / row["layer_ms"]
        row["wrapper_pct_of_layer"] = 100 * row["wrapper_ms"] / row["layer_ms"]
        row["bool_index_pct_of_layer"] = 100 * row["bool_index_ms"] / row["layer_ms"]
    return row


def format_table(rows: list[dict[str, object]]) -> str:
    header = (
        f"{'case':<26} {'native':>9} {'wrapper':>9} {'bool_idx':>9} {'idx_sel':>9} {'x bool':>7} {'x idxsel':>8} "
        f"{'layer':>10} {'% layer':>8} {'wrap %':>7}"
    )
    lines = [header, "-" * len(header)]

    def ms(v: object) -> str:
        return f"{v:9.3f}" if isinstance(v, float) else f"{'-':>9}"

    for r in rows:
        layer = f"{r['layer_ms']:10.2f}" if "layer_ms" in r else f"{'-':>10}"
        pct = f"{r['native_pct_of_layer']:7.2f}%" if "native_pct_of_layer" in r else f"{'-':>8}"
        wpct = f"{r['wrapper_pct_of_layer']:6.2f}%" if "wrapper_pct_of_layer" in r else f"{'-':>7}"
        lines.append(
            f"{r['case']:<26} {ms(r.get('native_ms'))} {ms(r.get('wrapper_ms'))} {ms(r.get('bool_index_ms'))} "
            f"{ms(r.get('index_select_ms'))} {r['speedup_vs_bool_index']:6.2f}x {r['speedup_vs_index_select']:7.2f}x "
            f"{layer} {pct} {wpct}" + (f"  ({r['layer_note']})" if "layer_note" in r else "")
        )
    return "\n".join(lines)


def run_report(
    cases: list[Case], with_layer: bool = True, record: bool | None = True, device: str = "cpu"
) -> list[dict[str, object]]:
    """Times every case, prints the table (ms, medians) and appends the rows to bench_compaction.csv
    (``record``: bench/results, else build/bench; ``None``: no CSV)."""
    layer = build_layer().to(device) if with_layer else None
    rows, skipped = [], []
    for case in cases:
        if case.peak_bytes() > MEMORY_CAP_BYTES:
            skipped.append(f"{case} (~{case.peak_bytes() / 2**30:.1f} GB)")
            continue
        rows.append(measure(case, layer, device))
        print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    where = f"{torch.get_num_threads()} CPU threads" if device == "cpu" else torch.cuda.get_device_name(device)
    print(f"compaction event, median ms, {where}; 'x bool' = bool_index / native")
    print(format_table(rows))
    if skipped:
        print(f"skipped (over the {MEMORY_CAP_BYTES / 2**30:.0f} GB memory cap): " + ", ".join(skipped))
    if rows:
        ratios = [r["speedup_vs_bool_index"] for r in rows]
        pcts = [r["native_pct_of_layer"] for r in rows if "native_pct_of_layer" in r]
        print(
            f"targets: >= 1.5x vs bool_index -> min {min(ratios):.2f}x, max {max(ratios):.2f}x "
            f"({sum(x >= 1.5 for x in ratios)}/{len(ratios)} cases met)"
        )
        if pcts:
            print(
                f"         <= 2% of one layer -> max {max(pcts):.2f}% "
                f"({sum(p <= 2 for p in pcts)}/{len(pcts)} cases met)"
            )
    if record is not None and rows:
        path = append_rows("bench_compaction", rows, record=record)
        print(f"recorded {len(rows)} rows in {path}")
    return rows


def set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(threads)


def selected_device() -> str:
    return os.environ.get("ADAINFER_BENCH_DEVICE", "cpu")


def selected_cases() -> list[Case]:
    return FULL_CASES if os.environ.get("ADAINFER_BENCH_FULL", "0") == "1" else DEFAULT_CASES


# ---- pytest-benchmark entry points (make bench) ----


@pytest.mark.parametrize("case", [c for c in DEFAULT_CASES if c.peak_bytes() <= MEMORY_CAP_BYTES], ids=str)
@pytest.mark.parametrize("provider", list(PROVIDERS))
def test_compaction(benchmark, provider, case):
    if provider not in available_providers():
        pytest.skip(f"adainfer_kernels._C has no compaction ops: {_native.error()}")
    keep, row_map, tensors = make_inputs(case, device=selected_device())
    benchmark.group = str(case)
    benchmark.extra_info.update(bundle_mb=round(case.bundle_bytes() / 2**20, 1), threads=torch.get_num_threads())
    with torch.inference_mode():
        benchmark(PROVIDERS[provider], keep, row_map, tensors)


def test_compaction_report(capsys):
    """The side-by-side table with the decoder layer and the targets, written under build/bench."""
    set_threads(int(os.environ.get("ADAINFER_BENCH_THREADS", "0")))
    with capsys.disabled():
        rows = run_report(selected_cases(), device=selected_device(), record=False)
    assert rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--full", action="store_true", help="the full grid (B x T x d x keep)")
    parser.add_argument("--no-layer", action="store_true", help="skip the decoder-layer comparison")
    parser.add_argument("--no-record", action="store_true", help="write no CSV")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("ADAINFER_BENCH_THREADS", "0")),
                        help="torch CPU threads (default: torch's choice)")  # fmt: skip
    parser.add_argument("--device", default=selected_device(), help="cpu or cuda (ADAINFER_BENCH_DEVICE)")
    args = parser.parse_args()
    set_threads(args.threads)
    run_report(
        FULL_CASES if args.full else selected_cases(),
        with_layer=not args.no_layer,
        record=None if args.no_record else True,
        device=args.device,
    )
