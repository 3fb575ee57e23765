"""The ahead-of-time specs of the exit-head Triton kernels: what the AOT gate compiles.

``aot_specs()`` lists every (dtype, launch config) that ``exit_head_triton.pick_config`` can return,
each as an ``aot.KernelSpec`` compiled for sm_80 and sm_90a by ``aot.compile_kernels`` (CI asserts
zero spill bytes: ``tests/kernels/test_exit_head_aot.py``). Kept apart from the kernels so that the
kernel module reads as kernels and launcher only.
"""

from __future__ import annotations

import torch

from adainfer_kernels.aot import KernelSpec
from adainfer_kernels.exit_head_triton import (
    MERGE_BLOCK_D,
    MERGE_BLOCK_R,
    MERGE_BLOCK_S,
    SPLITV_MAX_ROWS,
    TritonConfig,
    pick_config,
)

KERNEL_MODULE = "adainfer_kernels.exit_head_triton"
_TRITON_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def aot_configs(all_dtypes: bool = False) -> list[tuple[torch.dtype, TritonConfig]]:
    """(dtype, config) pairs the AOT gate compiles: every config ``pick_config`` can return for the
    aligned layout (every real model) in each dtype; for the unaligned layout (d not a multiple of
    16) bf16 and fp32 only, unless ``all_dtypes``: fp16 uses bf16's tiles and code but for the
    cast (bf16 rounds with more integer ops, the worst case), and each compile costs ~1.6 s."""
    out = []
    for dtype in _TRITON_DTYPES:
        for aligned in (True, False):
            if not aligned and dtype == torch.float16 and not all_dtypes:
                continue
            seen = set()
            for n_rows in (1, 2, 3, 4, 5, 17, 33, 64, 1000):
                cfg = pick_config(n_rows, dtype, aligned=aligned)
                if cfg not in seen:
                    seen.add(cfg)
                    out.append((dtype, cfg))
    return out


# What Triton's JIT marks as multiples of 16 at launch for real shapes (d, strides multiples of 16;
# torch allocations are 16-byte aligned): the AOT gate compiles the code a real launch gets.
_ALIGNED_ARGS = (
    "h_ptr",
    "w_ptr",
    "nw_ptr",
    "nb_ptr",
    "ids_ptr",
    "logit_bias_ptr",
    "pm_ptr",
    "ps_ptr",
    "pi_ptr",
    "pt_ptr",
    "d",
    "stride_hr",
    "stride_wv",
)


def aot_specs() -> list:
    """``aot.KernelSpec``s of both kernels: every (dtype, config) of ``aot_configs``.

    Each config is compiled with every optional feature on (LayerNorm with bias, subset, subset
    bias, logit soft-capping): the longest code path, meant as the worst case of that config.
    ptxas is not monotone in the code, though (a shorter soft-cap variant once spilled where a
    longer one did not), so the largest tile of each variant (bf16) is also compiled on the two
    real paths that are not that superset: Llama's (RMSNorm, no cap) and Gemma2's (the norm applied
    before the kernel, soft-cap on).
    """
    jobs = [(dtype, cfg, 2, True) for dtype, cfg in aot_configs()]
    for n_rows in (SPLITV_MAX_ROWS, 64):
        cfg = pick_config(n_rows, torch.bfloat16)
        jobs += [(torch.bfloat16, cfg, 1, False), (torch.bfloat16, cfg, 0, True)]
    specs = []
    for dtype, cfg, norm, softcap in jobs:
        t = _TRITON_DTYPES[dtype]
        sig = {
            "h_ptr": f"*{t}",
            "w_ptr": f"*{t}",
            "nw_ptr": f"*{t}",
            "nb_ptr": f"*{t}",
            "ids_ptr": "*i64",
            "logit_bias_ptr": "*fp32",
            "pm_ptr": "*fp32",
            "ps_ptr": "*fp32",
            "pi_ptr": "*i32",
            "pt_ptr": "*fp32",
            "n_rows": "i32",
            "d": "i32",
            "n_cand": "i32",
            "tiles_per_split": "i32",
            "stride_hr": "i32",
            "stride_wv": "i32",
            "eps": "fp32",
            "softcap": "fp32",
        }
        for name in (
            "NORM",
            "HAS_NB",
            "HAS_SUBSET",
            "HAS_LOGIT_BIAS",
            "HAS_SOFTCAP",
            "USE_DOT",
            "DOT_FP32",
            "BLOCK_R",
            "BLOCK_V",
            "BLOCK_D",
        ):
            sig[name] = "constexpr"
        specs.append(
            KernelSpec(
                module=KERNEL_MODULE,
                kernel="_exit_head_kernel",
                signature=sig,
                constexprs={
                    "NORM": norm,
                    "HAS_NB": norm == 2,
                    "HAS_SUBSET": True,
                    "HAS_LOGIT_BIAS": True,
                    "HAS_SOFTCAP": softcap,
                    "USE_DOT": cfg.variant == "rowtile",
                    "DOT_FP32": False,
                    "BLOCK_R": cfg.block_r,
                    "BLOCK_V": cfg.block_v,
                    "BLOCK_D": cfg.block_d,
                },
                num_warps=cfg.num_warps,
                num_stages=cfg.num_stages,
                divisible_by_16=_ALIGNED_ARGS if cfg.aligned else (),
                label=f"exit_head[{cfg.variant} {t} R{cfg.block_r} V{cfg.block_v} D{cfg.block_d} norm{norm}"
                + (" softcap" if softcap else "")
                + ("" if cfg.aligned else " unaligned")
                + "]",
            )
        )
    merge_sig = {
        "pm_ptr": "*fp32",
        "ps_ptr": "*fp32",
        "pi_ptr": "*i32",
        "pt_ptr": "*fp32",
        "chk_ptr": "*bf16",
        "ids_ptr": "*i64",
        "top_ptr": "*fp32",
        "gap_ptr": "*fp32",
        "arg_ptr": "*i64",
        "score_ptr": "*fp32",
        "n_rows": "i32",
        "n_splits": "i32",
        "d_chk": "i32",
        "stride_cr": "i32",
        "rule_w_top_prob": "fp32",
        "rule_w_gap": "fp32",
        "rule_offset": "fp32",
    }
    for name in ("HAS_SUBSET", "HAS_SCORE", "BLOCK_R", "BLOCK_S", "BLOCK_D"):
        merge_sig[name] = "constexpr"
    for t in _TRITON_DTYPES.values():
        specs.append(
            KernelSpec(
                module=KERNEL_MODULE,
                kernel="_exit_head_merge_kernel",
                signature={**merge_sig, "chk_ptr": f"*{t}"},
                constexprs={
                    "HAS_SUBSET": True,
                    "HAS_SCORE": True,
                    "BLOCK_R": MERGE_BLOCK_R,
                    "BLOCK_S": MERGE_BLOCK_S,
                    "BLOCK_D": MERGE_BLOCK_D,
                },
                num_warps=4,
                label=f"exit_head_merge[{t}]",
            )
        )
    return specs
