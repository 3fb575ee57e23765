"""The ``adainfer`` command line: ``info``, ``demo``."""

from __future__ import annotations

import argparse
import json
import os
import sys

# Never download at run time: everything the CLI loads is installed locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _print_info(as_json: bool) -> int:
    import adainfer_kernels

    info = adainfer_kernels.info()
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    native = info["native_ext"]
    console.print(
        f"torch {info['torch']} (CUDA {info['torch_cuda'] or 'none'}), "
        f"CUDA available: {info['cuda_available']}" + (f" [{info['gpu']}]" if info["gpu"] else "")
    )
    console.print(
        f"triton {info['triton'] or 'not installed'}" + (" (TRITON_INTERPRET=1)" if info["triton_interpret"] else "")
    )
    if native:
        console.print(
            f"adainfer_kernels._C: loaded (built for torch {native['torch_version']}, "
            f"CUDA kernels: {native['with_cuda']}, {native['compiler']})"
        )
    else:
        console.print(f"adainfer_kernels._C: unavailable ({info['native_ext_error']})")
    console.print(f"CPU threads: {info['cpu_threads']}; forced backend: {info['forced_backend'] or 'none'}")
    table = Table(title="backend of each op")
    for col in ("device", "op", "backend", "why"):
        table.add_column(col)
    for dev, ops in info["ops"].items():
        for op, choice in ops.items():
            table.add_row(dev, op, choice["name"], choice["reason"])
    console.print(table)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from adainfer.models import load_bundled

    print("loading the bundled model (SmolLM2-135M-Instruct, offline) ...", flush=True)
    loaded = load_bundled()
    model = loaded.model
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    print(
        f"{type(model).__name__}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
        f"vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M parameters, attention {cfg._attn_implementation}"
    )
    if args.verbose:
        print(model)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adainfer", description="AdaInfer early exit for HF Llama and OPT")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="versions, the native extension and which backend each op uses")
    p_info.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p_demo = sub.add_parser("demo", help="the main job on the bundled model and data")
    p_demo.add_argument("-v", "--verbose", action="store_true", help="print the whole module tree")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        return _print_info(args.json)
    if args.command == "demo":
        return _demo(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
