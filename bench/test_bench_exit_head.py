"""pytest-benchmark view of the exit head (``make bench``): (576, 49152), the bundled model's shape.

The full side-by-side table with GB/s, ratios and peak memory is ``python bench/bench_exit_head.py``;
numbers are recorded, never asserted.
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_exit_head import make_case, providers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ["reference", "gemm", "fused"] + (["gemm_t", "fused_torch"] if DEVICE == "cpu" else [])


@pytest.mark.parametrize("provider", NAMES)
@pytest.mark.parametrize("n_rows", [1, 8, 64])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_exit_head(benchmark, dt, n_rows, provider):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dt]
    head = make_case(576, 49152, dtype, DEVICE)
    hidden = torch.randn(n_rows, 576).to(device=DEVICE, dtype=dtype)
    fn = providers(head, hidden)[provider]
    benchmark.group = f"exit_head {dt} (576, 49152) R={n_rows}"
    with torch.inference_mode():
        fn()  # warm-up: packs the fused path's weight, compiles kernels
        if DEVICE == "cuda":
            benchmark(lambda: (fn(), torch.cuda.synchronize()))
        else:
            benchmark(fn)
