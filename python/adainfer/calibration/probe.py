"""Probe readouts: per-layer linear probes of the last token's hidden state.

On small models the logit lens carries little information before the last third of the layers
(the final norm and LM head were trained for the last layer only), while a linear probe of the
hidden state already separates the answer early. For each checked layer k < L a multinomial
logistic regression (scikit-learn) is fitted on standardised hidden states to predict the target
answer (the full model's corrected answer, or the gold label), and the standardisation is folded
into its weights, so that on *raw* hidden states h (d,)

    z_k(h) = W_k h + b_k        (K,) label logits,   W_k = A_k / s_k,   b_k = c_k - A_k (m_k / s_k)

for the fitted (A_k, c_k) on (h - m_k) / s_k. The runtime decodes them with the same fused exit
head as the lens (a ``ReadoutHead`` with the (K, d) weight, no norm, subset = all K rows, logit bias
b_k): top prob and gap of softmax(z_k) are the paper's features over a better lens.

The stop classifier over these features must not be fitted on the probes' own training rows
(a probe is over-confident there): ``cross_fitted_logits`` gives every calibration example the
logits of probes fitted without it (k-fold), and the threshold is chosen on the held-out split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_C = 0.05  # inverse L2 strength; chosen on the probe curve (research/probe_curve.md)
DEFAULT_FOLDS = 5
_ABSENT = -30.0  # logit of a label the fitting data never showed


@dataclass(frozen=True)
class ProbeHeads:
    """Per-layer linear probes on raw hidden states, for layers 1..L-1.

    Attributes:
        weight: (L-1, K, d) float32; layer k's probe is weight[k - 1].
        bias: (L-1, K) float32.
        c: the inverse regularisation strength used.
        n_fit: examples the probes were fitted on.
    """

    weight: np.ndarray
    bias: np.ndarray
    c: float = DEFAULT_C
    n_fit: int = 0

    @property
    def n_layers(self) -> int:
        """L - 1: the layers that have a probe."""
        return self.weight.shape[0]

    @property
    def n_labels(self) -> int:
        return self.weight.shape[1]

    @property
    def hidden_size(self) -> int:
        return self.weight.shape[2]

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes + self.bias.nbytes)

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        """(N, L-1, K) float64 probe logits of raw hidden states (N, L-1, d)."""
        h = np.asarray(hidden, dtype=np.float64)
        return np.einsum("nld,lkd->nlk", h, self.weight.astype(np.float64)) + self.bias[None].astype(np.float64)


def _fit_one(x: np.ndarray, y: np.ndarray, n_labels: int, c: float) -> tuple[np.ndarray, np.ndarray]:
    """(W (K, d), b (K,)) of one layer's probe on raw features x (n, d), standardisation folded in."""
    from sklearn.linear_model import LogisticRegression

    d = x.shape[1]
    w = np.zeros((n_labels, d), dtype=np.float64)
    b = np.full(n_labels, _ABSENT, dtype=np.float64)
    classes = np.unique(y)
    if classes.size == 1:  # one answer everywhere: a constant probe
        b[classes[0]] = 0.0
        return w, b
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    model = LogisticRegression(C=c, max_iter=2000)
    model.fit(z, y)
    coef, icpt = model.coef_, model.intercept_
    if classes.size == 2:  # sklearn's binary form: one logit for classes[1] vs classes[0]
        coef = np.stack([-coef[0] / 2, coef[0] / 2])
        icpt = np.array([-icpt[0] / 2, icpt[0] / 2])
    a = coef / scale[None, :]
    w[classes] = a
    b[classes] = icpt - a @ mean
    return w, b


def fit_probes(hidden: np.ndarray, target: np.ndarray, n_labels: int, c: float = DEFAULT_C) -> ProbeHeads:
    """Fit one probe per layer on ``hidden`` (N, L-1, d) to predict ``target`` (N,) in 0..K-1."""
    hidden = np.asarray(hidden, dtype=np.float64)
    target = np.asarray(target, dtype=np.int64)
    if hidden.ndim != 3 or target.shape != (hidden.shape[0],):
        raise ValueError(f"hidden must be (N, L-1, d) and target (N,); got {hidden.shape} and {target.shape}")
    if target.min() < 0 or target.max() >= n_labels:
        raise ValueError(f"targets must lie in 0..{n_labels - 1}")
    from threadpoolctl import threadpool_limits  # with scikit-learn: fitting only, never the runtime's imports

    n, n_layers, d = hidden.shape
    weight = np.zeros((n_layers, n_labels, d), dtype=np.float32)
    bias = np.zeros((n_layers, n_labels), dtype=np.float32)
    # One BLAS thread: each fit's products are small ((n, d) x (d, K)), and threads cost more than they
    # give (600 rows, 5 labels, 8 layers on this 2-core CPU: 6.5 s with the default threads, 1.4 s with one).
    with threadpool_limits(limits=1, user_api="blas"):
        for j in range(n_layers):
            w, b = _fit_one(hidden[:, j], target, n_labels, c)
            weight[j], bias[j] = w, b
    return ProbeHeads(weight=weight, bias=bias, c=float(c), n_fit=int(n))


def cross_fitted_logits(
    hidden: np.ndarray,
    target: np.ndarray,
    n_labels: int,
    c: float = DEFAULT_C,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
) -> np.ndarray:
    """(N, L-1, K) probe logits of each example from probes fitted on the other folds."""
    n = hidden.shape[0]
    folds = max(2, min(folds, n))
    order = np.random.default_rng(seed).permutation(n)
    out = np.zeros((n, hidden.shape[1], n_labels), dtype=np.float64)
    for f in range(folds):
        test = order[f::folds]
        train = np.setdiff1d(order, test)
        probes = fit_probes(hidden[train], target[train], n_labels, c)
        out[test] = probes.logits(hidden[test])
    return out


def signals_from_logits(z: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top_prob, gap, answer) of (..., K) logits, with the exit head's tie rule (lower index)."""
    z = np.asarray(z, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=-1, keepdims=True)
    answer = p.argmax(axis=-1)
    top = np.take_along_axis(p, answer[..., None], axis=-1)[..., 0]
    if p.shape[-1] > 1:
        rest = p.copy()
        np.put_along_axis(rest, answer[..., None], -np.inf, axis=-1)
        second = rest.max(axis=-1)
    else:
        second = np.zeros_like(top)
    return top.astype(np.float32), (top - second).astype(np.float32), answer.astype(np.int64)
