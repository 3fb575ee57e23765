"""The console script: `adainfer info` and `adainfer demo`."""

import json
import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "adainfer.app.cli", *args], capture_output=True, text=True, timeout=900
    )


def test_info_json_reports_versions_and_backends():
    out = _run("info", "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    import torch

    assert info["torch"] == torch.__version__
    assert info["native_ext"] is not None
    from adainfer_kernels import _native

    expected = "native" if _native.has_op("compact_rows") else "torch"
    assert info["ops"]["cpu"]["compaction"]["name"] == expected
    assert info["ops"]["cpu"]["exit_head"]["name"] == "cpu"
    # one row per LM-head dtype: the CPU kernel that dtype runs here, and why
    from adainfer_kernels.backend import exit_head_cpu_kernel

    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        row = info["ops"]["cpu"][f"exit_head[{label}]"]
        assert row == vars(exit_head_cpu_kernel(dtype)) and row["reason"], label
    from adainfer.models import FAMILIES

    assert [f["model_type"] for f in info["model_families"]] == sorted(FAMILIES)
    assert {"llama", "opt", "qwen2", "qwen3", "mistral", "gemma", "gemma2", "phi3"} <= set(FAMILIES)


def test_info_table():
    out = _run("info")
    assert out.returncode == 0, out.stderr
    assert "backend of each op" in out.stdout and "exit_head" in out.stdout
    assert "exit_head[bf16]" in out.stdout and "exit_head[fp16]" in out.stdout  # not eaten as rich markup
    assert "supported model families" in out.stdout and "Qwen3ForCausalLM" in out.stdout


def test_unknown_subcommand_is_a_usage_error():
    out = _run("frobnicate")
    assert out.returncode == 2
    assert "invalid choice" in out.stderr
