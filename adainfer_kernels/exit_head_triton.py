"""The fused exit head as Triton kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

Math, per row r of the hidden states h (R, d) and candidate c (a row of W, or a subset row k):

    x_r      = norm(h_r)                       rms: w * (h_r * rsqrt(mean(h_r^2) + eps)) (HF Llama casts)
                                               layer: (h_r - mu) * rsqrt(var + eps) * w + b; none: h_r
                                               rms_offset (Gemma): (1 + w) * h_r * rsqrt(mean(h_r^2) + eps),
                                               applied before the kernel (see below)
    y_rc     = <x_r, W_c>                      fp32 accumulation, never stored
    z_rc     = y_rc (+ bias_c)                 or, soft-capped (Gemma2): cap * tanh(y_rc / cap) (+ bias_c)
    M_r      = max_c z_rc,  S_r = sum_c exp(z_rc - M_r),  T_r = second largest z_rc (a tie counts twice)
    top_prob = 1 / S_r,     gap = (1 - exp(T_r - M_r)) / S_r,     argmax = lowest c with z_rc == M_r
    score    = w_top_prob * top_prob + w_gap * gap + offset      (the StopRule, optional)

``_exit_head_kernel`` gives each program a block of rows and a contiguous slice of the candidates
("split-V", flash-decoding style). It streams its slice of W tile by tile and keeps, per row, the
online softmax state (running max M, rescaled sum-exp S, first position of the max, second largest
logit T), written as one partial per (split, row). ``_exit_head_merge_kernel`` combines the partials
of each row (max of maxima, rescaled sum of sums, lowest position among the splits holding the max,
second largest over {other splits' maxima, the winning split's second}), checks the row's hidden
state for inf/NaN and writes top_prob, gap, argmax and the linear score.

Two inner products, chosen by the launcher from the number of rows:
- ``splitv`` (R <= 4, decode): no tensor cores; logits by a broadcast multiply-add in fp32 over a
  (rows, V-tile, d-tile) block. With so few rows a 16-row MMA tile would be >= 75% padding and fp32
  weights would need the emulated "ieee" MMA; FMA is exact and the kernel is bound by reading W.
- ``rowtile`` (R > 4): ``tl.dot`` on (16..64 rows) x (V-tile) tiles, bf16/fp16 operands with fp32
  accumulation on tensor cores (fp32 weights: ``input_precision="ieee"``, exact fp32 products).
Both split the vocabulary so that (row blocks x splits) ~ 4 programs per SM keep every SM streaming.

Memory traffic (the argument for the design): W is read exactly once per row block. With R <= 64
there is one row block, so the kernel reads V*d*s bytes of W from HBM (s = 2 for bf16) and writes
16 bytes per (split, row) of partials; the (R, d) hidden states are re-read from L2 with every
V-tile (R/BLOCK_V of the W tile's bytes: 1/128 at R = 1, 1/8 at R = 16), and the merge pass reads
the partials once. The unfused path reads W once but also writes and re-reads the (R, V) fp32
logits 2-3 times (softmax, topk) and launches ~10 kernels. At R = 8 on (4096, 32000)
bf16 that is 262 MB of W against 1 MB of logits, so the fused kernel's floor is the W stream:
262 MB / 4.3 TB/s = 61 us on an H200. At R = 256 the unfused path writes and reads 33 MB of logits
several times and the matmul itself becomes tensor-core bound; the fused kernel reads W four times
(four 64-row blocks, concurrently, so mostly from L2) and never writes logits.

Dtype policy: loads in the input dtype, everything else in fp32. The normed hidden state is rounded
to the input dtype exactly where Hugging Face rounds it (after the normalisation and after the weight
for RMSNorm, after the affine map for LayerNorm), so the LM head sees what the model's LM head sees.
The bf16 rounding is done with integer ops (round to nearest even) because the interpreter's
fp32 -> bf16 cast truncates. eps is a runtime argument (never a constexpr: no recompile per value).

Soft-capping (``HAS_SOFTCAP``; ``softcap`` is a runtime fp32 argument like eps) caps the fp32 logits
of each tile in registers, before the bias, the mask and the statistics: ``cap * tanh(y * (1 / cap))``
with the reciprocal rounded once per program (``div_rn``). That is within an ulp of y / cap and is
what PyTorch's CUDA division by a scalar does for Gemma2's ``logits / cap``; a division per logit
also made ptxas spill registers in the fp32 unaligned rowtile config on sm_90a. tanh is ``_tanh``,
Cephes' single-precision tanhf: an odd polynomial below |y| = 0.625, (1 - e) / (1 + e) with
e = exp(-2|y|) above (nothing overflows); max relative error 2e-7 against fp64, the same code on
the GPU and in the interpreter (which has no tanh of its own). tanh is monotone, so the top-2
order is the uncapped one (up to ties the capped fp32 values create), but the sum-exp needs the
capped values. It costs ~20 FLOPs and one exp per logit against 2d FLOPs for the inner product.

OPT's ``project_out`` and Gemma's RMSNorm (``norm="rms_offset"``: everything in fp32, times
``1 + w``, one rounding at the end) are applied before the kernel by ``head.decode_rows`` (torch
on (R, d), HF's own ops, so bit-identical to HF), and the kernel runs without a norm; the merge
kernel still checks the caller's hidden states for inf/NaN. ``project_out`` is not folded into W:
folding would stream a (V, d) matrix instead of (V, d_out) (2x the bytes for OPT-350m, d = 1024 vs
512) and change the rounding; projecting first reads ``project_out`` once (d*d_out, 2% of W for
OPT-350m) and costs R*d*d_out FLOPs.

References: FlashAttention-2 / flash-decoding (split-K with a merge pass), Liger-Kernel's fused
linear cross-entropy (online softmax over vocabulary tiles), the Triton matmul tutorial.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from adainfer_kernels.head import (
    ExitSignals,
    ReadoutHead,
    StopRule,
    check_exit_head_inputs,
    empty_signals,
    kernel_rows,
)

VARIANTS = ("splitv", "rowtile")
_INT32_MAX = tl.constexpr(2**31 - 1)
_FLT_MAX = tl.constexpr(3.4028234663852886e38)


@triton.jit
def _round_to(x, DTYPE: tl.constexpr):
    """Round fp32 values to DTYPE's grid (nearest even), keeping them in fp32."""
    if DTYPE == tl.bfloat16:  # noqa: SIM300 (DTYPE is a constexpr argument, not a constant)
        # Integer round-to-nearest-even onto the top 16 bits: exact on GPU and in the interpreter
        # (whose fp32 -> bf16 cast truncates).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (((bits >> 16) & 1) + 0x7FFF)) & 0xFFFF0000
        y = bits.to(tl.float32, bitcast=True)
    elif DTYPE == tl.float16:  # noqa: SIM300
        y = x.to(tl.float16).to(tl.float32)
    else:
        y = x
    return y


@triton.jit
def _tanh(y):
    """tanh of fp32 values (Cephes tanhf): odd polynomial for |y| < 0.625, else (1 - e) / (1 + e)
    with e = exp(-2|y|) in (0, 0.29] (no overflow; |y| = inf gives 1)."""
    a = tl.abs(y)
    s = tl.minimum(a, 0.625)  # the polynomial's argument, kept finite where it is not used
    z = s * s
    p = -5.70498872745e-3 * z + 2.06390887954e-2
    p = p * z - 5.37397155531e-2
    p = p * z + 1.33314422036e-1
    p = p * z - 3.33332819422e-1
    small = p * z * s + s
    e = tl.exp(-2.0 * a)
    t = tl.where(a < 0.625, small, (1.0 - e) / (1.0 + e))
    return tl.where(y < 0, -t, t)


@triton.jit
def _load_normed(
    h_ptr, row_off, rmask, kk, kmask, nw_ptr, nb_ptr, mean, rstd, NORM: tl.constexpr, HAS_NB: tl.constexpr
):
    """(BLOCK_R, BLOCK_D) fp32 tile of norm(h), rounded like Hugging Face; 0 outside the masks."""
    DTYPE: tl.constexpr = h_ptr.dtype.element_ty
    m2 = rmask[:, None] & kmask[None, :]
    x = tl.load(h_ptr + row_off[:, None] + kk[None, :], mask=m2, other=0.0).to(tl.float32)
    if NORM == 1:
        # Llama RMSNorm: fp32 statistics, cast to the input dtype, then the weight (in that dtype).
        g = tl.load(nw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
        xn = _round_to(x * rstd[:, None], DTYPE)
        xn = _round_to(xn * g[None, :], DTYPE)
    elif NORM == 2:
        # LayerNorm: fp32 throughout, one rounding at the output (as F.layer_norm does).
        g = tl.load(nw_ptr + kk, mask=kmask, other=0.0).to(tl.float32)
        y = (x - mean[:, None]) * rstd[:, None] * g[None, :]
        if HAS_NB:
            y += tl.load(nb_ptr + kk, mask=kmask, other=0.0).to(tl.float32)[None, :]
        xn = _round_to(y, DTYPE)
    else:
        xn = x
    return tl.where(m2, xn, 0.0)


@triton.jit
def _exit_head_split(
    h_ptr,  # (n_rows, d) hidden states, unit stride along d
    w_ptr,  # (V, d) LM-head weight, unit stride along d
    nw_ptr,  # (d,) norm weight (NORM != 0)
    nb_ptr,  # (d,) LayerNorm bias (HAS_NB)
    ids_ptr,  # (n_cand,) subset row ids (HAS_SUBSET)
    logit_bias_ptr,  # (n_cand,) fp32 logit bias (HAS_LOGIT_BIAS)
    pm_ptr,  # (n_splits, n_rows) fp32 partial max
    ps_ptr,  # (n_splits, n_rows) fp32 partial sum of exp(z - max)
    pi_ptr,  # (n_splits, n_rows) int32 partial first position of the max
    pt_ptr,  # (n_splits, n_rows) fp32 partial second largest logit
    pj_ptr,  # (n_splits, n_rows) int32 partial lowest position of the second (TRACK_SECOND)
    n_rows,
    d,
    n_cand,
    tiles_per_split,
    stride_hr,
    stride_wv,
    eps,
    softcap,  # fp32 final-logit soft-cap (HAS_SOFTCAP)
    NORM: tl.constexpr,  # 0 none, 1 rms, 2 layer
    HAS_NB: tl.constexpr,
    HAS_SUBSET: tl.constexpr,
    HAS_LOGIT_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    USE_DOT: tl.constexpr,  # rowtile (tl.dot) or splitv (broadcast FMA)
    DOT_FP32: tl.constexpr,  # feed tl.dot fp32 operands (the interpreter's bf16 dot is wrong)
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    TRACK_SECOND: tl.constexpr,  # also track and store the second's position (exit_head_partials)
):
    """One program of the split-V pass: a block of rows against a slice of the candidates, written
    as one partial (max, sum-exp, position, second[, second's position]) per (split, row)."""
    pid = tl.program_id(0)
    n_rb = tl.cdiv(n_rows, BLOCK_R)
    # Row blocks vary fastest: programs that read the same W tiles run together (L2 reuse).
    rb = pid % n_rb
    split = pid // n_rb
    rows = rb * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    row_off = rows.to(tl.int64) * stride_hr

    # Norm statistics of this block's rows (R*d elements, read from L2 by every split).
    mean = tl.zeros([BLOCK_R], dtype=tl.float32)
    rstd = tl.full([BLOCK_R], 1.0, dtype=tl.float32)
    if NORM == 1:
        ss = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_D):
            kk = k0 + tl.arange(0, BLOCK_D)
            m2 = rmask[:, None] & (kk < d)[None, :]
            x = tl.load(h_ptr + row_off[:, None] + kk[None, :], mask=m2, other=0.0).to(tl.float32)
            ss += tl.sum(x * x, axis=1)
        rstd = 1.0 / tl.sqrt(ss / d + eps)
    elif NORM == 2:
        sx = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_D):
            kk = k0 + tl.arange(0, BLOCK_D)
            m2 = rmask[:, None] & (kk < d)[None, :]
            sx += tl.sum(tl.load(h_ptr + row_off[:, None] + kk[None, :], mask=m2, other=0.0).to(tl.float32), axis=1)
        mean = sx / d
        # Two-pass variance (the one-pass E[x^2] - E[x]^2 cancels badly for large means).
        sv = tl.zeros([BLOCK_R], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_D):
            kk = k0 + tl.arange(0, BLOCK_D)
            m2 = rmask[:, None] & (kk < d)[None, :]
            x = tl.load(h_ptr + row_off[:, None] + kk[None, :], mask=m2, other=0.0).to(tl.float32)
            xc = tl.where(m2, x - mean[:, None], 0.0)
            sv += tl.sum(xc * xc, axis=1)
        rstd = 1.0 / tl.sqrt(sv / d + eps)

    inv_cap = tl.math.div_rn(1.0, softcap)  # HAS_SOFTCAP: y * (1 / cap), as torch's CUDA y / cap does
    m_run = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    s_run = tl.zeros([BLOCK_R], dtype=tl.float32)
    i_run = tl.zeros([BLOCK_R], dtype=tl.int32)
    t_run = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
    j_run = tl.full([BLOCK_R], -1, dtype=tl.int32)
    tile0 = split * tiles_per_split
    for t in range(0, tiles_per_split):
        cand = (tile0 + t) * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cand < n_cand
        if HAS_SUBSET:  # noqa: SIM108 (a compile-time branch: the load exists only with a subset)
            wrow = tl.load(ids_ptr + cand, mask=cmask, other=0).to(tl.int64)
        else:
            wrow = cand.to(tl.int64)
        w_off = wrow * stride_wv
        acc = tl.zeros([BLOCK_R, BLOCK_V], dtype=tl.float32)
        for k0 in range(0, d, BLOCK_D):
            kk = k0 + tl.arange(0, BLOCK_D)
            kmask = kk < d
            xn = _load_normed(h_ptr, row_off, rmask, kk, kmask, nw_ptr, nb_ptr, mean, rstd, NORM, HAS_NB)
            w = tl.load(w_ptr + w_off[:, None] + kk[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            if USE_DOT:
                if DOT_FP32:
                    acc = tl.dot(xn, tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
                elif w.dtype == tl.float32:
                    acc = tl.dot(xn, tl.trans(w), acc, input_precision="ieee")  # exact fp32 products
                else:
                    # xn holds values of the input dtype's grid: this cast is exact.
                    acc = tl.dot(xn.to(w.dtype), tl.trans(w), acc)
            else:
                acc += tl.sum(xn[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        z = acc
        if HAS_SOFTCAP:
            z = softcap * _tanh(z * inv_cap)
        if HAS_LOGIT_BIAS:
            z += tl.load(logit_bias_ptr + cand, mask=cmask, other=0.0)[None, :]
        z = tl.where(cmask[None, :], z, float("-inf"))

        # This tile's max, first position of the max and second largest (a tie counts twice).
        t_max = tl.max(z, axis=1)
        t_pos = tl.min(tl.where(z == t_max[:, None], cand[None, :], _INT32_MAX), axis=1)
        t_sec = tl.max(tl.where(cand[None, :] == t_pos[:, None], float("-inf"), z), axis=1)
        # Online merge. The tile's positions come after the running ones, so on equal maxima the
        # running position (the lower one) stays and the second largest becomes the max (gap 0).
        new_m = tl.maximum(m_run, t_max)
        safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
        s_run = s_run * tl.exp(m_run - safe_m) + tl.sum(tl.exp(z - safe_m[:, None]), axis=1)
        take = t_max > m_run
        if TRACK_SECOND:
            # The second's lowest position: in the tile, the first position of t_sec other than t_pos;
            # across tiles, on equal values the running (lower) position stays.
            other = cand[None, :] != t_pos[:, None]
            t_spos = tl.min(tl.where(other & (z == t_sec[:, None]), cand[None, :], _INT32_MAX), axis=1)
            j_run = tl.where(take, tl.where(m_run >= t_sec, i_run, t_spos), tl.where(t_max > t_run, t_pos, j_run))
        t_run = tl.where(take, tl.maximum(m_run, t_sec), tl.maximum(t_run, t_max))
        i_run = tl.where(take, t_pos, i_run)
        m_run = new_m

    p_off = split.to(tl.int64) * n_rows + rows
    tl.store(pm_ptr + p_off, m_run, mask=rmask)
    tl.store(ps_ptr + p_off, s_run, mask=rmask)
    tl.store(pi_ptr + p_off, i_run, mask=rmask)
    tl.store(pt_ptr + p_off, t_run, mask=rmask)
    if TRACK_SECOND:
        tl.store(pj_ptr + p_off, j_run, mask=rmask)


@triton.jit(do_not_specialize=["n_rows", "eps", "softcap"])
def _exit_head_kernel(
    h_ptr,
    w_ptr,
    nw_ptr,
    nb_ptr,
    ids_ptr,
    logit_bias_ptr,
    pm_ptr,
    ps_ptr,
    pi_ptr,
    pt_ptr,
    n_rows,
    d,
    n_cand,
    tiles_per_split,
    stride_hr,
    stride_wv,
    eps,
    softcap,
    NORM: tl.constexpr,
    HAS_NB: tl.constexpr,
    HAS_SUBSET: tl.constexpr,
    HAS_LOGIT_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The split-V pass of ``exit_head``: partials (max, sum-exp, position, second); arguments as
    ``_exit_head_split``."""
    _exit_head_split(
        h_ptr, w_ptr, nw_ptr, nb_ptr, ids_ptr, logit_bias_ptr, pm_ptr, ps_ptr, pi_ptr, pt_ptr, pi_ptr,
        n_rows, d, n_cand, tiles_per_split, stride_hr, stride_wv, eps, softcap,
        NORM, HAS_NB, HAS_SUBSET, HAS_LOGIT_BIAS, HAS_SOFTCAP, USE_DOT, DOT_FP32, BLOCK_R, BLOCK_V, BLOCK_D, False,
    )  # fmt: skip


@triton.jit(do_not_specialize=["n_rows", "eps", "softcap"])
def _exit_head_partials_kernel(
    h_ptr,
    w_ptr,
    nw_ptr,
    nb_ptr,
    ids_ptr,
    logit_bias_ptr,
    pm_ptr,
    ps_ptr,
    pi_ptr,
    pt_ptr,
    pj_ptr,
    n_rows,
    d,
    n_cand,
    tiles_per_split,
    stride_hr,
    stride_wv,
    eps,
    softcap,
    NORM: tl.constexpr,
    HAS_NB: tl.constexpr,
    HAS_SUBSET: tl.constexpr,
    HAS_LOGIT_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """The split-V pass of ``exit_head_partials``: ``_exit_head_kernel``'s partials, same numerics,
    plus the second's lowest position per (split, row) in ``pj_ptr``."""
    _exit_head_split(
        h_ptr, w_ptr, nw_ptr, nb_ptr, ids_ptr, logit_bias_ptr, pm_ptr, ps_ptr, pi_ptr, pt_ptr, pj_ptr,
        n_rows, d, n_cand, tiles_per_split, stride_hr, stride_wv, eps, softcap,
        NORM, HAS_NB, HAS_SUBSET, HAS_LOGIT_BIAS, HAS_SOFTCAP, USE_DOT, DOT_FP32, BLOCK_R, BLOCK_V, BLOCK_D, True,
    )  # fmt: skip


@triton.jit(do_not_specialize=["n_rows", "rule_w_top_prob", "rule_w_gap", "rule_offset"])
def _exit_head_merge_kernel(
    pm_ptr,
    ps_ptr,
    pi_ptr,
    pt_ptr,
    chk_ptr,  # (n_rows, d_chk) the caller's hidden states: rows holding inf/NaN get NaN signals
    ids_ptr,  # (n_cand,) subset row ids (HAS_SUBSET)
    top_ptr,  # (n_rows,) fp32
    gap_ptr,  # (n_rows,) fp32
    arg_ptr,  # (n_rows,) int64
    score_ptr,  # (n_rows,) fp32 (HAS_SCORE)
    n_rows,
    n_splits,
    d_chk,
    stride_cr,
    rule_w_top_prob,
    rule_w_gap,
    rule_offset,
    HAS_SUBSET: tl.constexpr,
    HAS_SCORE: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows

    # Elementwise accumulators over (rows, splits) reduced after each loop (a reduction inside the
    # loop trips Triton 3.8's thread-locality pass on sm_80/sm_90a).
    # Pass 1: the row's max over all splits.
    acc_m = tl.full([BLOCK_R, BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        off = sp[None, :].to(tl.int64) * n_rows + rows[:, None]
        msk = rmask[:, None] & (sp < n_splits)[None, :]
        acc_m = tl.maximum(acc_m, tl.load(pm_ptr + off, mask=msk, other=float("-inf")))
    big_m = tl.max(acc_m, axis=1)
    safe_m = tl.where(big_m == float("-inf"), 0.0, big_m)

    # Pass 2: rescaled sum of sums; the lowest position among the splits that hold the max.
    acc_s = tl.zeros([BLOCK_R, BLOCK_S], dtype=tl.float32)
    acc_i = tl.full([BLOCK_R, BLOCK_S], _INT32_MAX, dtype=tl.int32)
    for s0 in range(0, n_splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        off = sp[None, :].to(tl.int64) * n_rows + rows[:, None]
        msk = rmask[:, None] & (sp < n_splits)[None, :]
        m = tl.load(pm_ptr + off, mask=msk, other=float("-inf"))
        s = tl.load(ps_ptr + off, mask=msk, other=0.0)
        i = tl.load(pi_ptr + off, mask=msk, other=_INT32_MAX)
        acc_s += s * tl.exp(m - safe_m[:, None])
        acc_i = tl.minimum(acc_i, tl.where(msk & (m == big_m[:, None]), i, _INT32_MAX))
    big_s = tl.sum(acc_s, axis=1)
    big_i = tl.min(acc_i, axis=1)

    # Pass 3: second largest = max over the winning split's second and every other split's max.
    acc_t = tl.full([BLOCK_R, BLOCK_S], float("-inf"), dtype=tl.float32)
    for s0 in range(0, n_splits, BLOCK_S):
        sp = s0 + tl.arange(0, BLOCK_S)
        off = sp[None, :].to(tl.int64) * n_rows + rows[:, None]
        msk = rmask[:, None] & (sp < n_splits)[None, :]
        m = tl.load(pm_ptr + off, mask=msk, other=float("-inf"))
        i = tl.load(pi_ptr + off, mask=msk, other=_INT32_MAX)
        t = tl.load(pt_ptr + off, mask=msk, other=float("-inf"))
        winner = (m == big_m[:, None]) & (i == big_i[:, None])
        acc_t = tl.maximum(acc_t, tl.where(winner, t, m))
    big_t = tl.max(acc_t, axis=1)

    # Rows whose hidden state holds inf or NaN (|x| <= FLT_MAX is false for both).
    acc_bad = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.int32)
    row_off = rows.to(tl.int64) * stride_cr
    for k0 in range(0, d_chk, BLOCK_D):
        kk = k0 + tl.arange(0, BLOCK_D)
        m2 = rmask[:, None] & (kk < d_chk)[None, :]
        x = tl.load(chk_ptr + row_off[:, None] + kk[None, :], mask=m2, other=0.0).to(tl.float32)
        acc_bad += tl.where(tl.abs(x) <= _FLT_MAX, 0, 1)
    n_bad = tl.sum(acc_bad, axis=1)
    # All candidates at -inf (e.g. a logit bias of -inf everywhere): no distribution, NaN signals.
    undefined = (n_bad > 0) | (big_m == float("-inf"))

    safe_s = tl.where(rmask & (big_s > 0), big_s, 1.0)  # padding rows: no 1/0
    top = 1.0 / safe_s
    gap = top - tl.exp(big_t - safe_m) / safe_s
    top = tl.where(undefined, float("nan"), top)
    gap = tl.where(undefined, float("nan"), gap)
    pos = tl.where(big_i == _INT32_MAX, 0, big_i)
    if HAS_SUBSET:  # noqa: SIM108 (a compile-time branch)
        arg = tl.load(ids_ptr + pos, mask=rmask, other=0).to(tl.int64)
    else:
        arg = pos.to(tl.int64)
    arg = tl.where(n_bad > 0, -1, arg)
    tl.store(top_ptr + rows, top, mask=rmask)
    tl.store(gap_ptr + rows, gap, mask=rmask)
    tl.store(arg_ptr + rows, arg, mask=rmask)
    if HAS_SCORE:
        tl.store(score_ptr + rows, rule_w_top_prob * top + rule_w_gap * gap + rule_offset, mask=rmask)


@dataclass(frozen=True)
class TritonConfig:
    """Launch configuration of ``_exit_head_kernel`` (one helper picks it: ``pick_config``)."""

    variant: str
    block_r: int
    block_v: int
    block_d: int
    num_warps: int
    num_stages: int
    aligned: bool = True


SPLITV_MAX_ROWS = 4


def pick_config(n_rows: int, dtype: torch.dtype, variant: str | None = None, aligned: bool = True) -> TritonConfig:
    """Block sizes for ``n_rows`` rows of ``dtype``: ``splitv`` up to 4 rows, else ``rowtile``.

    ``aligned``: d, the row strides and the base pointers are multiples of 16 (every real model).
    Triton then vectorises the loads; otherwise every element carries its own 64-bit address and
    the tiles must be smaller to stay in registers. Every config returned here compiles for sm_80
    and sm_90a without register spills (tests/kernels/test_exit_head_aot.py).
    """
    if variant is None:
        variant = "splitv" if n_rows <= SPLITV_MAX_ROWS else "rowtile"
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    wide = dtype == torch.float32
    if variant == "splitv":
        block_r = triton.next_power_of_2(max(1, min(n_rows, SPLITV_MAX_ROWS)))
        # The (rows x V-tile x d-tile) fp32 products live in registers.
        if aligned:
            block_v, block_d, warps = {1: (128, 64, 8), 2: (64, 64, 8), 4: (32, 64, 4)}[block_r]
        else:
            block_v, block_d, warps = {1: (32, 32, 4), 2: (32, 32, 4), 4: (16, 32, 4)}[block_r]
        return TritonConfig("splitv", block_r, block_v, block_d, warps, num_stages=3, aligned=aligned)
    block_r = min(64, max(16, triton.next_power_of_2(max(1, n_rows))))
    warps = 8 if block_r == 64 else 4
    if not aligned:
        block_v, block_d = 32, (16 if wide and block_r >= 32 else 32)
    elif wide:  # fp32 tiles are twice the bytes: smaller tiles keep shared memory and registers in check
        block_v, block_d = (32 if block_r == 64 else 64), 32
    else:
        block_v, block_d = 128, 64
    return TritonConfig("rowtile", block_r, block_v, block_d, warps, num_stages=3, aligned=aligned)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=8)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _n_splits(n_row_blocks: int, n_tiles: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split): about 4 programs per SM, never an empty split."""
    if device.type == "cuda" and not _interpreting():
        target = 4 * _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    else:
        target = 4  # the interpreter runs programs one by one: a few splits exercise the merge
    splits = max(1, min(n_tiles, triton.cdiv(target, n_row_blocks)))
    per_split = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, per_split), per_split


def exit_head_triton(
    hidden: torch.Tensor,
    head: ReadoutHead,
    stop_rule: StopRule | None = None,
    *,
    variant: str | None = None,
    n_splits: int | None = None,
    check: bool = True,
) -> ExitSignals:
    """Launch the fused exit head (``_exit_head_kernel`` + ``_exit_head_merge_kernel``).

    Args:
        hidden: (R, d) bf16/fp16/fp32 hidden states (CUDA; CPU tensors under TRITON_INTERPRET=1).
        head, stop_rule: as ``exit_head``.
        variant: force ``"splitv"`` or ``"rowtile"`` (tests); None picks by the number of rows.
        n_splits: force the number of vocabulary splits (tests); None picks ~4 programs per SM.
        check: run ``check_exit_head_inputs`` (``exit_head`` already did).

    Returns:
        ExitSignals with (R,) fields (see ``exit_head``).
    """
    if check:
        check_exit_head_inputs(hidden, head, stop_rule)
    if hidden.shape[0] == 0:
        return empty_signals(hidden.device, stop_rule is not None)
    launch = _prepare(hidden, head, variant, n_splits)
    # Triton launches on the current CUDA device: make it the tensors' device.
    with _on_device(hidden.device):
        return _launch(launch, _launch_split(launch, track_second=False), stop_rule)


def exit_head_triton_partials(
    hidden: torch.Tensor,
    head: ReadoutHead,
    *,
    variant: str | None = None,
    n_splits: int | None = None,
    check: bool = True,
) -> tuple[torch.Tensor, ...]:
    """The split-V pass alone (``_exit_head_partials_kernel``): per-split partials, not merged.

    Same kernel body and numerics as ``exit_head_triton``'s first pass, plus the second's position.

    Args:
        hidden, head, variant, n_splits, check: as ``exit_head_triton``.

    Returns:
        (max, sum, pos, second, second_pos), each (n_splits, R), splits in candidate order: fp32 max
        logit of the split, fp32 sum of exp(z - max) over it, int32 first candidate position of the
        max (0 when every logit of the split is -inf), fp32 second largest logit (a tie counts twice),
        int32 lowest candidate position of the second other than pos (meaningless while second is
        -inf). Rows holding inf/NaN are not flagged here (the caller checks ``hidden``). R = 0 gives
        (0, 0) tensors.
    """
    if check:
        check_exit_head_inputs(hidden, head)
    if hidden.shape[0] == 0:
        f, i = (torch.empty((0, 0), dtype=dt, device=hidden.device) for dt in (torch.float32, torch.int32))
        return f, f.clone(), i, f.clone(), i.clone()
    launch = _prepare(hidden, head, variant, n_splits)
    with _on_device(hidden.device):
        return _launch_split(launch, track_second=True)


@dataclass(frozen=True)
class _Launch:
    """What both kernels are launched with (``_prepare``): x (R, d) rows fed to the LM head, w (V, d),
    chk (R, d_in) the caller's rows (inf/NaN check), 1-D parameters with unit stride."""

    x: torch.Tensor
    w: torch.Tensor
    nw: torch.Tensor | None
    nb: torch.Tensor | None
    ids: torch.Tensor | None
    logit_bias: torch.Tensor | None
    chk: torch.Tensor
    norm_code: int
    cfg: TritonConfig
    n_rb: int
    splits: int
    per_split: int
    eps: float
    softcap: float | None


def _on_device(dev: torch.device) -> contextlib.AbstractContextManager:
    return torch.cuda.device(dev) if dev.type == "cuda" else contextlib.nullcontext()


def _prepare(hidden: torch.Tensor, head: ReadoutHead, variant: str | None, n_splits: int | None) -> _Launch:
    """Rows, weights, launch configuration and split count of one call (R > 0, inputs checked)."""
    n_rows = hidden.shape[0]
    # Gemma's norm, or any norm + project_out: in torch on (R, d) (Hugging Face's ops), then a norm-free kernel.
    x, norm_code = kernel_rows(hidden, head)
    if x.stride(-1) != 1:
        x = x.contiguous()
    w = head.weight if head.weight.stride(-1) == 1 else head.weight.contiguous()
    chk = hidden if hidden.stride(-1) == 1 else hidden.contiguous()
    d = x.shape[1]
    ids = head.vocab_subset
    n_cand = head.n_candidates
    aligned = d % 16 == 0 and all(t.stride(0) % 16 == 0 and t.data_ptr() % 16 == 0 for t in (x, w))
    cfg = pick_config(n_rows, x.dtype, variant, aligned)
    n_rb = triton.cdiv(n_rows, cfg.block_r)
    n_tiles = triton.cdiv(n_cand, cfg.block_v)
    if n_splits is None:
        splits, per_split = _n_splits(n_rb, n_tiles, hidden.device)
    else:
        per_split = triton.cdiv(n_tiles, max(1, min(n_splits, n_tiles)))
        splits = triton.cdiv(n_tiles, per_split)

    # 1-D parameters are read with unit stride.
    return _Launch(
        x=x,
        w=w,
        nw=head.norm_weight.contiguous() if norm_code else None,
        nb=head.norm_bias.contiguous() if (norm_code == 2 and head.norm_bias is not None) else None,
        ids=ids.contiguous() if ids is not None else None,
        logit_bias=head.logit_bias.contiguous() if head.logit_bias is not None else None,
        chk=chk,
        norm_code=norm_code,
        cfg=cfg,
        n_rb=n_rb,
        splits=splits,
        per_split=per_split,
        eps=float(head.eps),
        softcap=head.logit_softcap,
    )


MERGE_BLOCK_R = 16
MERGE_BLOCK_S = 128
MERGE_BLOCK_D = 128


def _launch_split(p: _Launch, track_second: bool) -> tuple[torch.Tensor, ...]:
    """Allocate the (splits, R) partials and launch the split-V pass: ``_exit_head_kernel``, or with
    ``track_second`` ``_exit_head_partials_kernel`` (one more int32 partial: the second's position)."""
    x, w, ids = p.x, p.w, p.ids
    n_rows, d = x.shape
    n_cand = ids.shape[0] if ids is not None else w.shape[0]
    dev = x.device
    part_m = torch.empty((p.splits, n_rows), dtype=torch.float32, device=dev)
    part_s = torch.empty_like(part_m)
    part_t = torch.empty_like(part_m)
    part_i = torch.empty((p.splits, n_rows), dtype=torch.int32, device=dev)
    part_j = torch.empty_like(part_i) if track_second else None
    dummy = x  # never read: the matching constexpr flag is off
    pointers = (
        x,
        w,
        p.nw if p.nw is not None else dummy,
        p.nb if p.nb is not None else dummy,
        ids if ids is not None else dummy,
        p.logit_bias if p.logit_bias is not None else dummy,
        part_m,
        part_s,
        part_i,
        part_t,
        *((part_j,) if track_second else ()),
    )
    kernel = _exit_head_partials_kernel if track_second else _exit_head_kernel
    kernel[(p.n_rb * p.splits,)](
        *pointers,
        n_rows,
        d,
        n_cand,
        p.per_split,
        x.stride(0),
        w.stride(0),
        p.eps,
        float(p.softcap) if p.softcap is not None else 1.0,
        NORM=p.norm_code,
        HAS_NB=p.nb is not None,
        HAS_SUBSET=ids is not None,
        HAS_LOGIT_BIAS=p.logit_bias is not None,
        HAS_SOFTCAP=p.softcap is not None,
        USE_DOT=p.cfg.variant == "rowtile",
        DOT_FP32=_interpreting(),
        BLOCK_R=p.cfg.block_r,
        BLOCK_V=p.cfg.block_v,
        BLOCK_D=p.cfg.block_d,
        num_warps=p.cfg.num_warps,
        num_stages=p.cfg.num_stages,
    )
    return (part_m, part_s, part_i, part_t) + ((part_j,) if track_second else ())


def _launch(p: _Launch, partials: tuple[torch.Tensor, ...], stop_rule: StopRule | None) -> ExitSignals:
    """Allocate the outputs and launch the merge pass over the (splits, R) partials."""
    part_m, part_s, part_i, part_t = partials[:4]
    ids, chk = p.ids, p.chk
    n_rows = p.x.shape[0]
    dev = p.x.device
    top = torch.empty(n_rows, dtype=torch.float32, device=dev)
    gap = torch.empty_like(top)
    arg = torch.empty(n_rows, dtype=torch.int64, device=dev)
    score = torch.empty_like(top) if stop_rule is not None else None
    _exit_head_merge_kernel[(triton.cdiv(n_rows, MERGE_BLOCK_R),)](
        part_m,
        part_s,
        part_i,
        part_t,
        chk,
        ids if ids is not None else part_i,
        top,
        gap,
        arg,
        score if score is not None else top,
        n_rows,
        p.splits,
        chk.shape[1],
        chk.stride(0),
        float(stop_rule.w_top_prob) if stop_rule is not None else 0.0,
        float(stop_rule.w_gap) if stop_rule is not None else 0.0,
        float(stop_rule.offset) if stop_rule is not None else 0.0,
        HAS_SUBSET=ids is not None,
        HAS_SCORE=stop_rule is not None,
        BLOCK_R=MERGE_BLOCK_R,
        BLOCK_S=MERGE_BLOCK_S,
        BLOCK_D=MERGE_BLOCK_D,
        num_warps=4,
    )
    return ExitSignals(top_prob=top, gap=gap, argmax=arg, score=score)
