"""AdaInfer inside vLLM against plain vLLM: requests per second on the same prompts, one engine each.

Runs in ``.venv-vllm`` (``make test-vllm`` builds it). Both engines are vLLM on this machine with the
same configuration (fp32, eager, vLLM's default prefix caching, one answer token per prompt); "plain"
is the plugin with ``exits="off"`` (vLLM's own forward, bit for bit), "adainfer" runs the classifier's
exits. The prompts share their few-shot demonstrations, so after the first (untimed) batch vLLM
serves that prefix from its cache and a batch computes mostly each prompt's own suffix, in both
engines. ``--no-prefix-caching`` times both without it.
They are timed interleaved (``harness.interleaved``: one batch of all prompts per engine per round,
the order rotated), so the shared machine's load hits both alike. The ideal speed-up is what the
layers saved allow: (token rows of the dense decoder) / (token rows the exits computed), counted by
the loop itself. Answers and exit layers are compared with the HF runtime's (``bench/vllm_reference.py``).

    .venv/bin/python bench/vllm_reference.py --classifier clf/classifier.json --n 300 --out build/vllm/ref300.json
    VLLM_CPU_KVCACHE_SPACE=2 .venv-vllm/bin/python bench/bench_vllm.py --reference build/vllm/ref300.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness import RESULTS_DIR, append_rows, environment, interleaved


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference", required=True, help="bench/vllm_reference.py's JSON")
    p.add_argument("--reps", type=int, default=5, help="timed batches per engine")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--quick", action="store_true", help="rows to build/bench, not bench/results")
    p.add_argument("--no-prefix-caching", action="store_true", help="both engines without prefix caching")
    args = p.parse_args(argv)

    import vllm
    from adainfer.vllm import engine_args
    from adainfer.vllm.report import layer_work, take_exit_layers
    from vllm import LLM, SamplingParams

    ref = json.loads(Path(args.reference).read_text())
    prompts = ref["prompts"]
    # A classifier answers with a label word: both engines sample among the label tokens only (the
    # exits already answer so; the full model's label answer is then what HF's classify reads).
    params = SamplingParams(max_tokens=1, temperature=0.0, logprobs=2, allowed_token_ids=ref["label_token_ids"])
    caching = not args.no_prefix_caching
    common = {
        "model": ref["model_dir"],
        "dtype": args.dtype,
        "max_model_len": 2048,
        "seed": 0,
        "enable_prefix_caching": caching,
    }
    plain = LLM(**common, **engine_args(None, exits="off"))
    ada = LLM(**common, **engine_args(ref["classifier"]))

    # parity first (one untimed batch through the exits), then the timing
    outs = ada.generate(prompts, params, use_tqdm=False)
    log = take_exit_layers(ada)
    answers = [o.outputs[0].token_ids[0] for o in outs]
    exits = [log[o.request_id][0] for o in outs]
    hf = list(zip(ref["hf_answer_token"], ref["hf_exit_layers"], strict=True))
    same = sum((a, e) == w for a, e, w in zip(answers, exits, hf, strict=True))
    same_answer = sum(a == w[0] for a, w in zip(answers, hf, strict=True))
    full = [o.outputs[0].token_ids[0] for o in plain.generate(prompts, params, use_tqdm=False)]
    gold = ref["gold"]
    acc_full = sum(a == g for a, g in zip(full, gold, strict=True)) / len(gold)
    acc_ada = sum(a == g for a, g in zip(answers, gold, strict=True)) / len(gold)
    done0, dense0 = layer_work(ada)

    timings = interleaved(
        {
            "plain": lambda: plain.generate(prompts, params, use_tqdm=False),
            "adainfer": lambda: ada.generate(prompts, params, use_tqdm=False),
        },
        reps=args.reps,
        warmup=1,
        device="cpu",
    )
    done1, dense1 = layer_work(ada)
    take_exit_layers(ada)
    num_layers = ref["num_layers"]
    saved_requests = 1 - sum(exits) / (len(exits) * num_layers)
    saved_tokens = 1 - (done1 - done0) / (dense1 - dense0)
    ideal = (dense1 - dense0) / (done1 - done0)
    speedup = timings["plain"].median / timings["adainfer"].median
    n = len(prompts)
    row = {
        "bench": "vllm_classify",
        "vllm": vllm.__version__,
        "dtype": args.dtype,
        "prompts": n,
        "prefix_caching": caching,
        **{f"{k}_ms": round(t.median, 1) for k, t in timings.items()},
        **{f"{k}_p20_ms": round(t.p20, 1) for k, t in timings.items()},
        **{f"{k}_p80_ms": round(t.p80, 1) for k, t in timings.items()},
        "plain_req_per_s": round(n / timings["plain"].median * 1e3, 2),
        "adainfer_req_per_s": round(n / timings["adainfer"].median * 1e3, 2),
        "speedup": round(speedup, 3),
        "ideal_speedup": round(ideal, 3),
        "of_ideal": round(speedup / ideal, 3),
        "layers_saved_requests": round(saved_requests, 4),
        "layers_saved_tokens": round(saved_tokens, 4),
        "same_answer_and_exit_as_hf": f"{same}/{n}",
        "same_answer_as_hf": f"{same_answer}/{n}",
        "accuracy_full": round(acc_full, 4),
        "accuracy_adainfer": round(acc_ada, 4),
    }
    path = append_rows("bench_vllm", [row], record=not args.quick)
    env = environment()
    print(
        f"vLLM {vllm.__version__} on {env['device']}, {args.dtype}, prefix caching {'on' if caching else 'off'}, "
        f"{n} prompts of the bundled task per batch"
    )
    for name, label in (("plain", "plain vLLM    "), ("adainfer", "with AdaInfer ")):
        print(f"  {label} {row[name + '_req_per_s']:8.2f} req/s   (median batch {timings[name].median:.0f} ms)")
    print(
        f"  speed-up {speedup:.2f}x; the layers saved allow {ideal:.2f}x ({saved_tokens:.1%} of token-layer rows; "
        f"{saved_requests:.1%} of layers per request): {speedup / ideal:.0%} of the ideal"
    )
    print(f"  answer and exit layer equal to the HF runtime's on {same}/{n} prompts (answer alone {same_answer}/{n})")
    print(f"  accuracy on gold labels: full {acc_full:.1%}, AdaInfer {acc_ada:.1%}")
    print(f"  row appended to {path}")
    if not args.quick:
        print(f"  (record: {RESULTS_DIR})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
