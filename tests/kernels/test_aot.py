"""The AOT gate: Triton kernels compile for sm_80 and sm_90a here (no GPU) with zero spills."""

import os

import pytest
import torch

from adainfer_kernels.aot import ARCHS, KernelSpec, compile_kernels, parse_ptxas_log

HERE = os.path.dirname(os.path.abspath(__file__))

SAMPLE_LOG_WITH_SPILLS = """ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    48 bytes stack frame, 40 bytes spill stores, 36 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 392 bytes cmem[0]
"""


def test_parser_reads_registers_and_spills():
    stats = parse_ptxas_log(SAMPLE_LOG_WITH_SPILLS)
    assert stats == {"registers": 255, "stack_bytes": 48, "spill_stores": 40, "spill_loads": 36}


def test_parser_refuses_unrecognised_output():
    with pytest.raises(ValueError, match="could not parse"):
        parse_ptxas_log("ptxas fatal : something else")


def test_toy_kernel_compiles_for_every_arch_without_spills():
    specs = [
        KernelSpec(
            module="aot_toy",
            kernel="_scaled_copy_kernel",
            signature={"x_ptr": f"*{t}", "y_ptr": f"*{t}", "n": "i32", "scale": "fp32", "BLOCK": "constexpr"},
            constexprs={"BLOCK": 256},
            label=f"scaled_copy[{t}]",
        )
        for t in ("fp32", "bf16")
    ]
    reports = compile_kernels(specs, extra_sys_path=(HERE,))
    assert sorted({r.arch for r in reports}) == sorted(ARCHS)
    assert len(reports) == len(specs) * len(ARCHS)
    for r in reports:
        print(r.summary())
        assert r.registers > 0
        assert r.spills == 0, r.ptxas_log


def test_toy_kernel_runs_under_the_interpreter():
    from aot_toy import scaled_copy

    x = torch.randn(1000)
    torch.testing.assert_close(scaled_copy(x, 3.0), x * 3.0)
