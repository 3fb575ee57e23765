"""Generation benchmark: what early exits realise in prefill and decode, against a cost-model ideal.

On the bundled SmolLM2-135M (30 layers), greedy generation from real prompts (consecutive tweets of
the bundled corpus, cut to exactly the prompt length), side by side in one run (round robin):

    full      the unpatched model
    compact   AdaInfer, finished rows leave the batch (the product)
    mask      AdaInfer, finished rows stay in the batch, frozen (what other systems do)

with exit patterns forced by ``ForcedExits`` (the same at every step):

    all@K       every row stops after layer K
    half@K      even rows stop after layer K, odd rows run every layer
    staggered   row r stops after layer 6 + r (L - 6) / (B - 1): a spread over the depth

and, with ``--classifier PATH``, a calibrated stop classifier on the task's own prompts.

Prefill and decode are timed apart. Decode: generation starts from the prompt's K/V (the unpatched
model's prefill of all but the last prompt token), and a streamer stamps the clock at each emitted
token, so decode time per step = (last stamp - first stamp) / (N - 1). Prefill: one forward pass over
the prompt (cache on, last position's logits). The ideal of each run comes from ``cost_model``
(every part timed on this machine at this batch and context): realised / ideal = ideal time / time.

    python bench/bench_generate.py                      # the CPU grid (the GPU grid: --grid gpu)
    python bench/bench_generate.py --batches 8 32 --prompt-lens 256 --new-tokens 32
    python bench/bench_generate.py --plot bench/results/bench_generate.csv   # plot a CSV
    python bench/bench_generate.py --weights random     # no bundled model: its shape, random weights

Each configuration's runs are timed with ``harness.interleaved`` (round robin, one warm-up each,
median / p20 / p80 of ``--reps``). Rows go to bench/results/bench_generate.csv (with machine,
versions and git sha; ``--quick``, the small grid ``make bench`` runs: build/bench); ``--label``
tags a run (e.g. before / after a change), and the plot draws one line per label and pattern.

``--weights random`` (``auto``: when the bundled model or corpus is not installed, as on a lent GPU
whose working tree cannot carry the 98 MB model) builds SmolLM2-135M's architecture from its config
with random weights and feeds random token ids: the rows say ``weights=random``. Forced exit patterns
make the same layers run whatever the weights, so the timings and the cost-model ratios keep their
meaning; only the tokens generated are noise. ``--classifier`` needs the bundled model.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cost_model import StepCosts, active_rows, measure
from harness import append_rows, dtype_name, interleaved, sync
from inputs import bundled_tweets

# The bundled SmolLM2-135M-Instruct's architecture (its config.json, as transformers reads the GGUF).
SMOLLM2_135M = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
}
GRIDS = {
    # 2 CPU cores: prefill of 128 x 1024 tokens alone would take minutes, so the CPU grid keeps the
    # product batch x prompt small; the GPU grid runs every batch at every prompt length.
    "cpu": {"batches": (1, 8, 32, 128), "prompt_lens": {1: 256, 8: 256, 32: 256, 128: 64}, "new_tokens": 32},
    "gpu": {"batches": (1, 8, 32, 128), "prompt_lens": (64, 256, 1024), "new_tokens": 128},
    "quick": {"batches": (2,), "prompt_lens": (32,), "new_tokens": 4},
}


class StepClock:
    """A ``generate`` streamer that only stamps the clock: once for the prompt, once per new token."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stamps: list[float] = []

    def put(self, value) -> None:
        sync(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def decode_step_s(self) -> float:
        """Mean seconds per step after the first emitted token."""
        if len(self.stamps) < 3:
            raise RuntimeError("need at least 2 new tokens to time decode")
        return (self.stamps[-1] - self.stamps[1]) / (len(self.stamps) - 2)


def random_prompts(vocab_size: int, n: int, tokens: int) -> dict[str, torch.Tensor]:
    """``n`` rows of ``tokens`` random token ids (ids 3.. of the vocabulary: no special token)."""
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, vocab_size, (n, tokens), generator=g)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def random_weights_model(device: str, dtype: torch.dtype):
    """SmolLM2-135M's architecture (``SMOLLM2_135M``) with random weights (seeded), eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(SMOLLM2_135M)
    rope = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
    config = LlamaConfig(**cfg, rope_parameters=rope)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def bundled_available() -> bool:
    """Whether the bundled model and tweet corpus are installed (the real-weights runs need both)."""
    from adainfer.app.loading import bundled_model_dir

    try:
        bundled_model_dir()
        bundled_tweets()
    except (FileNotFoundError, ImportError, ModuleNotFoundError):
        return False
    return True


def real_prompts(tokenizer, n: int, tokens: int) -> dict[str, torch.Tensor]:
    """``n`` rows of exactly ``tokens`` tokens of consecutive tweets of the bundled corpus."""
    tweets = bundled_tweets()
    rows, i = [], 0
    for _ in range(n):
        ids: list[int] = []
        while len(ids) < tokens:
            ids += tokenizer(tweets[i % len(tweets)] + "\n", add_special_tokens=False)["input_ids"]
            i += 1
        rows.append(ids[:tokens])
    input_ids = torch.tensor(rows)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}


def patterns(batch: int, num_layers: int, k: int) -> dict[str, list[int]]:
    span = num_layers - 6
    return {
        f"all@{k}": [k] * batch,
        f"half@{k}": [k if r % 2 == 0 else num_layers for r in range(batch)],
        "staggered": [6 + (r * span) // max(batch - 1, 1) for r in range(batch)],
    }


def _peak_memory(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class Runs:
    """One (batch, prompt) configuration: prompts, the prompt cache, and one callable per run.

    ``tok`` None: random token ids (a random-weights model)."""

    def __init__(self, model, tok, batch: int, prompt_len: int, new_tokens: int, cache: str = "dynamic") -> None:
        self.model, self.tok = model, tok
        self.device = next(model.parameters()).device
        self.batch, self.prompt_len, self.new_tokens = batch, prompt_len, new_tokens
        if tok is None:
            enc = random_prompts(model.config.vocab_size, batch, prompt_len)
            self.pad_token_id = model.config.pad_token_id
        else:
            enc = real_prompts(tok, batch, prompt_len)
            self.pad_token_id = tok.pad_token_id or tok.eos_token_id
        self.enc = {k: v.to(self.device) for k, v in enc.items()}
        kwargs = {}
        if cache == "static":  # preallocated for the whole generation: updates write in place, nothing is copied
            from transformers import StaticCache

            kwargs["past_key_values"] = StaticCache(config=model.config, max_cache_len=prompt_len + new_tokens + 1)
        with torch.inference_mode():
            out = model(
                input_ids=self.enc["input_ids"][:, :-1],
                attention_mask=self.enc["attention_mask"][:, :-1],
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
        self.prompt_cache = out.past_key_values
        self.stats: dict[str, list] = {}
        self.memory: dict[str, float | None] = {}

    def _patched(self, policy, mode: str):
        """The model patched with ``policy`` for one run (nothing for the unpatched model)."""
        import adainfer
        from adainfer import AdaInferConfig

        if policy is None:
            return contextlib.nullcontext(None)
        return adainfer.patched(self.model, policy, AdaInferConfig(mode=mode))

    def decode(self, name: str, policy=None, mode: str = "compact", enc=None, cache=None):
        """A callable: one greedy generation of N tokens from the prompt cache; returns s/step."""
        enc = self.enc if enc is None else enc
        base_cache = self.prompt_cache if cache is None else cache

        @torch.inference_mode()
        def fn() -> float:
            with self._patched(policy, mode) as handle:
                clock = StepClock(self.device)
                _reset_peak(self.device)
                self.model.generate(
                    **enc,
                    past_key_values=copy.deepcopy(base_cache),
                    max_new_tokens=self.new_tokens,
                    min_new_tokens=self.new_tokens,
                    do_sample=False,
                    streamer=clock,
                    pad_token_id=self.pad_token_id,
                )
                self.memory[name] = _peak_memory(self.device)
                if handle is not None:
                    self.stats[name] = list(handle.history)
                return clock.decode_step_s()

        return fn

    def prefill(self, name: str, policy=None, mode: str = "compact"):
        """A callable: one forward pass over the prompts (cache on); returns seconds."""

        @torch.inference_mode()
        def fn() -> float:
            with self._patched(policy, mode):
                sync(self.device)
                t0 = time.perf_counter()
                self.model(**self.enc, use_cache=True, logits_to_keep=1)
                sync(self.device)
                return time.perf_counter() - t0

        return fn


def time_runs(fns: dict, reps: int):
    """``harness.interleaved`` over callables that return their own seconds (one warm-up each)."""
    return interleaved(fns, reps, warmup=1, self_timed=True)


def _seconds(timings) -> dict[str, float]:
    return {k: t.median / 1e3 for k, t in timings.items()}


def ideal_step_s(costs: StepCosts, full_s: float, batch: int, num_layers: int, exit_layers, checked=()) -> float:
    """The cost model's time of one step (see ``cost_model``) given each row's exit layer."""
    kappa = costs.kappa(full_s, batch, num_layers)
    active = active_rows(exit_layers, num_layers)
    return costs.head_s(batch) + kappa * costs.layers_ideal_s(active, batch) + costs.checks_s(checked)


def run_config(model, tok, batch: int, prompt_len: int, args, label: str) -> list[dict]:
    from adainfer import ForcedExits

    num_layers = model.config.num_hidden_layers
    model_columns = {"dtype": dtype_name(next(model.parameters()).dtype), "weights": args.weights}
    runs = Runs(model, tok, batch, prompt_len, args.new_tokens, args.cache)
    pats = patterns(batch, num_layers, args.k)
    if batch == 1:  # one row: half and staggered are the same as all@K or no exit at all
        pats = {n: p for n, p in pats.items() if n.startswith("all@")}
    decode_fns = {"full": runs.decode("full")}
    prefill_fns = {"full": runs.prefill("full")}
    for pname, exits in pats.items():
        for mode in args.modes:
            key = f"{pname}/{mode}"
            decode_fns[key] = runs.decode(key, ForcedExits(exits), mode)
            if args.prefill and mode == "compact":  # mask mode's prefill is the full model's work
                prefill_fns[key] = runs.prefill(key, ForcedExits(exits), mode)
    t0 = time.perf_counter()
    decode_t = time_runs(decode_fns, args.reps)
    prefill_t = time_runs(prefill_fns, args.prefill_reps) if args.prefill else {}
    decode, prefill = _seconds(decode_t), _seconds(prefill_t)
    t_ctx = prompt_len + args.new_tokens // 2
    costs_decode = measure(model, batch, t=t_ctx, new=1)
    costs_prefill = measure(model, batch, t=0, new=prompt_len, reps=3, warmup=1) if args.prefill else None
    elapsed = time.perf_counter() - t0
    rows = []
    for key, step_s in decode.items():
        pname, mode = key.split("/") if "/" in key else (key, "full")
        exits = pats.get(pname, [num_layers] * batch)
        ideal = ideal_step_s(costs_decode, decode["full"], batch, num_layers, exits)
        row = {
            "bench": "generate",
            "label": label,
            "phase": "decode",
            "batch": batch,
            "prompt": prompt_len,
            "new_tokens": args.new_tokens,
            "pattern": pname,
            "provider": mode,
            **model_columns,
            **decode_t[key].columns(digits=3),
            "tokens_per_s": round(batch / step_s, 1),
            "saving": round(1 - step_s / decode["full"], 4),
            "ideal_ms": round(ideal * 1e3, 3),
            "ideal_saving": round(1 - ideal / decode["full"], 4),
            "of_ideal": round(ideal / step_s, 4),
            "layers_saved": round(1 - sum(min(e, num_layers) for e in exits) / (batch * num_layers), 4),
            "peak_mib": runs.memory.get(key),
            "kappa": round(costs_decode.kappa(decode["full"], batch, num_layers), 3),
            "cache": args.cache,
        }
        rows.append(row)
    for key, s in prefill.items():
        pname, mode = key.split("/") if "/" in key else (key, "full")
        exits = pats.get(pname, [num_layers] * batch)
        ideal = ideal_step_s(costs_prefill, prefill["full"], batch, num_layers, exits)
        rows.append(
            {
                "bench": "generate",
                "label": label,
                "phase": "prefill",
                "batch": batch,
                "prompt": prompt_len,
                "new_tokens": 0,
                "pattern": pname,
                "provider": mode,
                **model_columns,
                **prefill_t[key].columns(digits=3),
                "tokens_per_s": round(batch * prompt_len / s, 1),
                "saving": round(1 - s / prefill["full"], 4),
                "ideal_ms": round(ideal * 1e3, 3),
                "ideal_saving": round(1 - ideal / prefill["full"], 4),
                "of_ideal": round(ideal / s, 4),
                "layers_saved": round(1 - sum(min(e, num_layers) for e in exits) / (batch * num_layers), 4),
                "peak_mib": None,
                "kappa": round(costs_prefill.kappa(prefill["full"], batch, num_layers), 3),
            }
        )
    for phase, costs, full_s in (
        ("decode", costs_decode, decode["full"]),
        ("prefill", costs_prefill, prefill.get("full")),
    ):
        if costs is None:
            continue
        kappa = costs.kappa(full_s, batch, num_layers)
        for r in sorted(costs.layer):
            rows.append(
                {
                    "bench": "cost_model",
                    "label": label,
                    "phase": phase,
                    "batch": batch,
                    "prompt": prompt_len,
                    **model_columns,
                    "rows": r,
                    "context": costs.t,
                    "layer_ms": round(costs.layer[r] * 1e3, 4),
                    "fill_ms": round(costs.fill[r] * 1e3, 4),
                    "head_ms": round(costs.head[r] * 1e3, 4),
                    "kappa": round(kappa, 3),
                }
            )
    if args.classifier:
        rows += classifier_rows(model, tok, runs, batch, args, label)
    print(f"\ncost model (decode, t={costs_decode.t}), ms per layer at r rows / per fill of r rows:")
    print(
        "  "
        + "  ".join(
            f"r={r}: {costs_decode.layer[r] * 1e3:.2f}/{costs_decode.fill[r] * 1e3:.2f}"
            for r in sorted(costs_decode.layer)
        )
    )
    weights = " (RANDOM WEIGHTS, random token ids)" if args.weights == "random" else ""
    print(
        f"\nbatch {batch} x {prompt_len} tokens, {args.new_tokens} new ({elapsed:.0f} s, median of {args.reps})"
        + weights
    )
    print(f"{'phase':<8}{'pattern':<11}{'provider':<9}{'ms':>9}{'tok/s':>9}{'saving':>8}{'ideal':>8}{'of ideal':>9}")
    for r in rows:
        if r["bench"] != "generate":
            continue
        print(
            f"{r['phase']:<8}{r['pattern']:<11}{r['provider']:<9}{r['median_ms']:9.2f}{r['tokens_per_s']:9.1f}"
            f"{r['saving']:8.1%}{r['ideal_saving']:8.1%}{r['of_ideal']:9.1%}"
        )
    return rows


def classifier_rows(model, tok, runs: Runs, batch: int, args, label: str) -> list[dict]:
    """Decode with a calibrated classifier on the task's own prompts (left-padded to one length)."""
    from adainfer import ClassifierPolicy
    from adainfer.app.tasks import load_task
    from adainfer.calibration.classifier import StopClassifier
    from adainfer.models import lens_head

    clf = StopClassifier.load(args.classifier)
    stored = clf.info.get("task")
    name = stored.get("task", "tweet-sentiment") if isinstance(stored, dict) else "tweet-sentiment"
    prompts = load_task(name).render(tok).prompts("test")[:batch]
    if len(prompts) < batch:
        raise ValueError(f"the task's test split has {len(prompts)} prompts, fewer than the batch of {batch}")
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True)
    enc = {k: v.to(runs.device) for k, v in enc.items()}
    with torch.inference_mode():
        cache = model(
            input_ids=enc["input_ids"][:, :-1], attention_mask=enc["attention_mask"][:, :-1], use_cache=True
        ).past_key_values
    full_fn = runs.decode("clf_full", enc=enc, cache=cache)
    fn = runs.decode("classifier", ClassifierPolicy(clf), "compact", enc=enc, cache=cache)
    timings = time_runs({"full": full_fn, "compact": fn}, args.reps)
    times = _seconds(timings)
    num_layers = model.config.num_hidden_layers
    policy = ClassifierPolicy(clf)
    head, stop_rule = policy.head_and_rule(min(policy.layers_to_check(num_layers)), lens_head(model))
    t_ctx = enc["input_ids"].shape[1] + args.new_tokens // 2
    costs = measure(model, batch, t=t_ctx, new=1, head=head, stop_rule=stop_rule)
    steps = runs.stats["classifier"][1:]  # the decode steps (the first call is the last prompt token)
    checked = sorted(policy.layers_to_check(num_layers))
    ideal = []
    for st in steps:
        exits = st.exit_layers.tolist()
        active = active_rows(exits, num_layers)
        rows_checked = [active[k - 1] for k in checked if k < num_layers]
        ideal.append(ideal_step_s(costs, times["full"], batch, num_layers, exits, rows_checked))
    ideal_s = statistics.mean(ideal)
    saved = statistics.mean(st.layers_saved_fraction for st in steps)
    return [
        {
            "bench": "generate",
            "label": label,
            "phase": "decode",
            "batch": batch,
            "prompt": enc["input_ids"].shape[1],
            "new_tokens": args.new_tokens,
            "pattern": "classifier",
            "provider": prov,
            "dtype": dtype_name(next(model.parameters()).dtype),
            "weights": args.weights,
            **timings[prov].columns(digits=3),
            "tokens_per_s": round(batch / s, 1),
            "saving": round(1 - s / times["full"], 4),
            "ideal_ms": round((ideal_s if prov == "compact" else s) * 1e3, 3),
            "ideal_saving": round(1 - ideal_s / times["full"], 4) if prov == "compact" else 0.0,
            "of_ideal": round(ideal_s / s, 4) if prov == "compact" else 1.0,
            "layers_saved": round(saved, 4) if prov == "compact" else 0.0,
        }
        for prov, s in times.items()
    ]


def plot(csv_path: Path, out: Path) -> Path:
    """realised / ideal in decode against batch size: one line per (label, pattern), compact only."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with csv_path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("bench") == "generate"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, phase in zip(axes, ("decode", "prefill"), strict=True):
        series: dict[tuple[str, str], dict[int, float]] = {}
        for r in rows:
            if r["phase"] != phase or r["provider"] != "compact":
                continue
            series.setdefault((r["label"], r["pattern"]), {})[int(r["batch"])] = float(r["of_ideal"])
        colors = {}
        for (lab, pat), pts in sorted(series.items(), key=lambda kv: (kv[0][1], kv[0][0] != "before")):
            xs = sorted(pts)
            color = colors.setdefault(pat, f"C{len(colors)}")  # one colour per pattern, one line style per label
            ax.plot(
                xs,
                [pts[x] for x in xs],
                marker="o",
                color=color,
                ls="--" if lab == "before" else "-",
                label=f"{pat} ({lab})",
            )
        ax.axhline(0.85 if phase == "decode" else 0.90, color="grey", lw=0.8, ls=":")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("realised / ideal (ideal time / time)")
        ax.set_title(f"{phase}: compact vs the cost-model ideal")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    return out


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_child(batch: int, prompt_len: int, new_tokens: int, pattern: str, mode: str) -> None:
    """One generation in a fresh process; prints the peak resident memory it added (CPU)."""
    import threading

    from adainfer import ForcedExits
    from adainfer.app.loading import load_bundled

    loaded = load_bundled()
    model, tok = loaded.model, loaded.tokenizer
    runs = Runs(model, tok, batch, prompt_len, new_tokens)
    policy = None if pattern == "full" else ForcedExits(patterns(batch, model.config.num_hidden_layers, 10)[pattern])
    fn = runs.decode(pattern, policy, mode)
    base = _rss_mib()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    fn()
    done.set()
    thread.join()
    print(f"PEAK_MIB {peak[0] - base:.1f} {base:.1f}")


def memory_rows(batch: int, prompt_len: int, new_tokens: int, label: str) -> list[dict]:
    """Peak memory that generation adds, per run, each in its own process (CPU: resident memory
    sampled every millisecond; glibc keeps freed memory, so a shared process would hide peaks)."""
    import subprocess

    rows = []
    runs = [("full", "full")] + [(p, m) for p in ("all@10", "half@10", "staggered") for m in ("compact", "mask")]
    for pattern, mode in runs:
        cmd = [sys.executable, __file__, "--memory-child", str(batch), str(prompt_len), str(new_tokens), pattern, mode]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        added, base = (float(x) for x in next(ln.split()[1:] for ln in out.splitlines() if ln.startswith("PEAK_MIB")))
        rows.append(
            {
                "bench": "memory",
                "label": label,
                "phase": "generate",
                "batch": batch,
                "prompt": prompt_len,
                "new_tokens": new_tokens,
                "pattern": pattern,
                "provider": mode,
                "added_mib": round(added, 1),
                "peak_mib": round(base + added, 1),
            }
        )
    full = rows[0]["peak_mib"]
    for r in rows:
        r["of_full"] = round(r["peak_mib"] / full, 3) if full else None
        print(
            f"memory {r['pattern']:<10}{r['provider']:<8} peak {r['peak_mib']:8.1f} MiB (+{r['added_mib']:.1f})", end=""
        )
        print(f"  {r['of_full']:.3f}x the full model's")
    return rows


def test_bench_generate_quick(tmp_path, monkeypatch):
    """`make bench` runs the quick grid (batch 2 x 32 tokens, 4 new, one repetition; rows to build/bench);
    `python bench/bench_generate.py` the full one."""
    monkeypatch.setenv("ADAINFER_BENCH_DIR", str(tmp_path))
    main(["--quick"])
    import csv

    with (tmp_path / "bench_generate.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["bench"] == "generate"]
    assert {(r["phase"], r["provider"]) for r in rows} >= {
        ("decode", "full"),
        ("decode", "compact"),
        ("prefill", "compact"),
    }
    assert {r["weights"] for r in rows} == {"bundled"} and all(float(r["median_ms"]) > 0 for r in rows)
    assert (tmp_path / "bench_generate.png").exists()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=sorted(GRIDS), default=None, help="a preset grid (default: cpu, or gpu)")
    parser.add_argument(
        "--quick", action="store_true", help="the small grid, 1 repetition (`make bench`); rows to build/bench"
    )
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--prompt-lens", type=int, nargs="+")
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--k", type=int, default=10, help="the exit layer of the all@K and half@K patterns")
    parser.add_argument("--modes", nargs="+", default=["compact", "mask"], choices=["compact", "mask"])
    parser.add_argument("--reps", type=int, default=None, help="repetitions of the decode runs (3)")
    parser.add_argument("--prefill-reps", type=int, default=None, help="repetitions of the prefill runs (2)")
    parser.add_argument("--no-prefill", dest="prefill", action="store_false")
    parser.add_argument("--classifier", help="a calibrated classifier file: adds its decode row")
    parser.add_argument(
        "--cache",
        choices=["dynamic", "static"],
        default="dynamic",
        help="the generation's cache (static: preallocated; the cost model always times DynamicCache parts)",
    )
    parser.add_argument(
        "--weights",
        choices=["bundled", "random", "auto"],
        default="bundled",
        help="the bundled model, or its architecture with random weights (auto: random when it is not installed)",
    )
    parser.add_argument("--label", default="current", help="tags the rows of this run (before / after)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--plot", type=Path, help="only draw the plot of this CSV")
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot next to the CSV")
    parser.add_argument(
        "--memory", type=int, nargs=3, metavar=("BATCH", "PROMPT", "NEW"), help="only measure peak memory (CPU)"
    )
    parser.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.memory_child:
        b, p, n, pattern, mode = args.memory_child
        memory_child(int(b), int(p), int(n), pattern, mode)
        return
    if args.memory:
        print(append_rows("bench_generate", memory_rows(*args.memory, args.label), record=True))
        return
    if args.plot:
        print(plot(args.plot, args.plot.with_suffix(".png")))
        return
    grid = GRIDS["quick" if args.quick else args.grid or ("gpu" if args.device == "cuda" else "cpu")]
    batches = args.batches or grid["batches"]
    args.new_tokens = args.new_tokens or grid["new_tokens"]
    args.reps = args.reps or (1 if args.quick else 3)
    args.prefill_reps = args.prefill_reps or (1 if args.quick else 2)
    if args.weights == "auto":
        args.weights = "bundled" if bundled_available() else "random"
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    if args.weights == "random":
        if args.classifier:
            parser.error("--classifier needs the bundled model (--weights bundled)")
        print("SmolLM2-135M architecture with RANDOM WEIGHTS and random token ids (the bundled model is not used)")
        model, tok = random_weights_model(args.device, dtype), None
    else:
        from adainfer.app.loading import load_bundled

        loaded = load_bundled()
        model, tok = loaded.model.to(device=args.device, dtype=dtype), loaded.tokenizer
    path = None
    for batch in batches:
        lens = args.prompt_lens or (
            grid["prompt_lens"][batch] if isinstance(grid["prompt_lens"], dict) else grid["prompt_lens"]
        )
        for prompt_len in [lens] if isinstance(lens, int) else lens:
            # appended per configuration: a run cut short by a time limit keeps what it measured
            rows = run_config(model, tok, batch, prompt_len, args, args.label)
            path = append_rows("bench_generate", rows, record=not args.quick)
    print(f"\nrows appended to {path}")
    if not args.no_plot:
        print(plot(path, path.with_suffix(".png")))


if __name__ == "__main__":
    main()
