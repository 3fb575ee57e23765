"""Early-exit arithmetic on per-layer arrays: exit simulation, oracle, FLOPs, binomial bounds.

Conventions: arrays are (N, L) with layer axis index j = layer k - 1; exit layers are 1-based
(k = L means the row ran the whole model). The runtime stops a row at the first *checked* layer
whose score is > 0, and every row stops at layer L.
"""

from __future__ import annotations

import numpy as np


def simulate_exits(scores: np.ndarray, checked: np.ndarray) -> np.ndarray:
    """Exit layer of each row: the first checked layer k < L with ``score[k] > 0``, else L.

    Args:
        scores: (N, L) decision values with the threshold already folded in (stop iff > 0).
            NaN never stops.
        checked: (L,) bool, which layers are checked (layer L is ignored: it always stops).

    Returns:
        (N,) int64 exit layers in 1..L.
    """
    scores = np.asarray(scores)
    n_layers = scores.shape[1]
    checked = np.asarray(checked, dtype=bool)
    if checked.shape != (n_layers,):
        raise ValueError(f"checked has shape {checked.shape}; expected ({n_layers},)")
    stop = (scores > 0) & checked[None, :]
    stop[:, -1] = True
    return stop.argmax(axis=1).astype(np.int64) + 1


def take_at_exit(values: np.ndarray, exits: np.ndarray) -> np.ndarray:
    """(N,) ``values[i, exits[i] - 1]`` of an (N, L) array."""
    return np.take_along_axis(np.asarray(values), (np.asarray(exits) - 1)[:, None], axis=1)[:, 0]


def oracle_exit_layers(pred: np.ndarray) -> np.ndarray:
    """Earliest layer from which each row's prediction equals its final one and stays equal.

    Args:
        pred: (N, L) per-layer predictions (any integer ids).

    Returns:
        (N,) int64 layers e in 1..L with ``pred[i, k-1] == pred[i, L-1]`` for every k >= e.
    """
    pred = np.asarray(pred)
    differs = pred != pred[:, -1:]
    n_layers = pred.shape[1]
    # index of the last differing layer (0-based), -1 when none differs
    last = np.where(differs.any(axis=1), n_layers - 1 - differs[:, ::-1].argmax(axis=1), -1)
    return (last + 2).astype(np.int64)


def pruning_ratio(exits: np.ndarray, n_layers: int) -> float:
    """The paper's layer pruning ratio: 1 - mean(layers run) / L."""
    return float(1.0 - np.mean(exits) / n_layers)


def clopper_pearson_upper(k: int | np.ndarray, n: int, confidence: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a binomial rate after k events in n trials.

    P(rate <= bound) >= confidence; with k = n the bound is 1.
    """
    from scipy.stats import beta

    k = np.asarray(k, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        bound = beta.ppf(confidence, k + 1, n - k)
    return np.where(k >= n, 1.0, bound)


# --------------------------------------------------------------------------------------------
# FLOPs (multiply-add = 2 FLOPs)


def _cfg(config, *names, default=None):
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def layer_flops(config, seq_len: int | np.ndarray) -> np.ndarray:
    """FLOPs of one decoder layer over a whole prompt of ``seq_len`` tokens (prefill, causal).

    Projections per token: q and o (2 d * d_attn), k and v (2 d * d_kv), the MLP (Llama's gated
    MLP: 3 d * d_ff; OPT: 2 d * d_ff); attention: QK^T and AV over t + 1 keys for token t, i.e.
    2 * d_attn * T (T + 1) / 2 multiply-adds per product. Norms and activations are O(d) and left out.
    """
    d = int(config.hidden_size)
    heads = int(_cfg(config, "num_attention_heads"))
    head_dim = int(_cfg(config, "head_dim", default=d // heads))
    kv_heads = int(_cfg(config, "num_key_value_heads", default=heads))
    d_attn, d_kv = heads * head_dim, kv_heads * head_dim
    d_ff = int(_cfg(config, "intermediate_size", "ffn_dim"))
    mlp_mats = 3 if config.model_type == "llama" else 2
    per_token_macs = 2 * d * d_attn + 2 * d * d_kv + mlp_mats * d * d_ff
    t = np.asarray(seq_len, dtype=np.float64)
    attn_macs = 2 * d_attn * t * (t + 1) / 2
    return 2.0 * (per_token_macs * t + attn_macs)


def check_flops(config, n_candidates: int) -> float:
    """FLOPs of one exit check on one row: the norm (~4 d) plus a d x K (or d x V) product and the
    softmax statistics over the K candidates (~3 K)."""
    d = int(config.hidden_size)
    return float(4 * d + 2 * d * n_candidates + 3 * n_candidates)


def head_flops(config) -> float:
    """The model's own final norm + LM head on the last token (run for every row in both cases)."""
    return check_flops(config, int(config.vocab_size))
