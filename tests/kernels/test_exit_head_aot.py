"""AOT gate of the exit-head kernels: every launch configuration compiles for sm_80 and sm_90a
(no GPU needed) without register spills. The registers / shared memory table is printed (-s)."""

import itertools
from concurrent.futures import ThreadPoolExecutor

import torch

from adainfer_kernels.aot import ARCHS, compile_kernels
from adainfer_kernels.exit_head_aot import aot_configs, aot_specs
from adainfer_kernels.exit_head_triton import VARIANTS, pick_config

SHARED_LIMIT = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024}  # dynamic shared memory per block


def test_aot_configs_cover_every_config_the_launcher_can_pick():
    launchable = {
        (dtype, pick_config(n_rows, dtype, variant, aligned))
        for dtype, n_rows, variant, aligned in itertools.product(
            (torch.float32, torch.float16, torch.bfloat16), range(1, 300), (None, *VARIANTS), (True, False)
        )
    }
    assert launchable == set(aot_configs(all_dtypes=True))
    assert set(aot_configs()) <= launchable


def test_every_exit_head_kernel_compiles_without_spills():
    specs = aot_specs()
    # Two compiler subprocesses (the machine has two cores); ~1.6 s per kernel and arch when cold.
    with ThreadPoolExecutor(2) as pool:
        reports = [r for part in pool.map(compile_kernels, (specs[0::2], specs[1::2])) for r in part]
    assert len(reports) == len(specs) * len(ARCHS)
    print()
    for r in reports:
        print(r.summary())
    spilled = [r.summary() for r in reports if r.spills]
    assert not spilled, "register spills:\n" + "\n".join(spilled)
    too_big = [r.summary() for r in reports if r.shared_bytes > SHARED_LIMIT[r.arch]]
    assert not too_big, "shared memory over the limit:\n" + "\n".join(too_big)
