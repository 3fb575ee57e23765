"""Synthetic per-layer features with a known structure (the calibration tests' data)."""

from __future__ import annotations

import numpy as np
from adainfer.calibration.features import LayerFeatures

LLAMA_LIKE = {
    "model_type": "llama",
    "num_hidden_layers": 12,
    "vocab_size": 1000,
    "hidden_size": 64,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "intermediate_size": 128,
}


def synthetic_features(
    n: int = 200, n_layers: int = 12, seed: int = 0, prior: float = 1.5, settle_noise: float = 0.6
) -> LayerFeatures:
    """Two-label features where each row's answer settles at a random layer.

    Before its settle layer a row's label margin is noise around a label prior (+``prior`` toward
    label 1: a biased model); from it on the margin grows toward the row's final answer. The final
    answer equals the gold label for ~80% of rows.
    """
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    final = np.where(rng.random(n) < 0.8, labels, 1 - labels)
    settle = rng.integers(n_layers // 3, n_layers, n)  # 0-based layer index where it settles
    sign = np.where(final == 1, 1.0, -1.0)
    j = np.arange(n_layers)[None, :]
    grown = np.clip(j - settle[:, None] + 1, 0, None) * 1.2
    margin = prior + rng.normal(0, settle_noise, (n, n_layers)) + sign[:, None] * grown
    margin[:, -1] = sign * (2.0 + rng.random(n) * 3)  # a decisive final answer
    z = np.stack([-margin / 2, margin / 2], axis=-1).astype(np.float32)
    return LayerFeatures(
        label_logits=z,
        labels=labels.astype(np.int64),
        label_token_ids=np.array([11, 22], dtype=np.int64),
        prompt_lengths=rng.integers(50, 80, n).astype(np.int64),
        meta={
            "model_type": "llama",
            "num_hidden_layers": n_layers,
            "vocab_size": 1000,
            "hidden_size": 64,
            "config": {**LLAMA_LIKE, "num_hidden_layers": n_layers},
        },
    )
