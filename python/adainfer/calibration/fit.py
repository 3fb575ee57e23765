"""Fitting a stop classifier on a task and choosing its threshold under a disagreement budget.

1. Label bias (label mode): b (L, K) from the calibration split (:mod:`adainfer.calibration.labelbias`).
2. Fit (calibration split): one row per (example, layer k < L) with features (p1, g[, k]) of the
   exit head (label tokens + b_k, or the full vocabulary) and target y = [answer at k == target],
   the target being the full model's (equally corrected) answer (``consistency``) or the gold
   label (``gold``, the paper's). See :func:`adainfer.calibration.linear_fit.fit_linear`.
3. Budgeted threshold (held-out split): the early-exit run is simulated exactly from the features:
   a row stops at the first checked layer k in [m, L) with d_ik > t, else at L. Over every first
   checked layer m and every threshold t that changes some row's exit, choose the pair with the
   fewest layers run such that the disagreement with the full model,
       D(m, t) = #{i : answer at exit_i != answer at L},
   satisfies D / n <= budget, or, with ``confidence`` c, the one-sided Clopper-Pearson upper bound
   of the disagreement rate at level c is <= budget. Ties go to fewer checks, then to the larger t.
   When nothing beats "never exit early", the threshold is None. With a confidence, m is chosen on
   the calibration split (step 2's signals) and only t on held-out, by fixed-sequence testing: the
   bound then holds for the whole procedure (``calibrate_auto`` chooses the readout and the rule on
   the calibration split too).

:func:`choose_threshold` sweeps each m exactly in O(E log E) for E prefix-maximum records: as t
falls below a row's record value its exit moves to that record's layer, so sorting the records by
value gives every distinct state once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from adainfer.calibration.choices import AUTO_METHODS, METHODS, READOUTS, TARGETS
from adainfer.calibration.classifier import ModelIdentity, StopClassifier
from adainfer.calibration.features import LayerFeatures, label_signals
from adainfer.calibration.labelbias import estimate_label_bias, resolve_label_bias_estimator
from adainfer.calibration.linear_fit import fit_linear
from adainfer.calibration.metrics import clopper_pearson_upper, oracle_exit_layers
from adainfer.calibration.probe import DEFAULT_C, ProbeHeads, cross_fitted_logits, fit_probes
from adainfer.calibration.probe import signals_from_logits as probe_signals


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen (first checked layer, threshold) and its figures on the split it was chosen on."""

    threshold: float | None
    min_layer: int
    n: int
    n_disagree: int
    mean_exit_layer: float
    upper_bound: float | None

    @property
    def disagreement(self) -> float:
        return self.n_disagree / self.n if self.n else 0.0


def _feasible(n_disagree: np.ndarray, n: int, budget: float, confidence: float | None) -> np.ndarray:
    if confidence is None:
        # integer comparison: no float rounding at the boundary (n_disagree / n <= budget)
        return n_disagree <= np.floor(budget * n + 1e-9)
    return clopper_pearson_upper(n_disagree, n, confidence) <= budget


def choose_threshold(
    decision: np.ndarray,
    pred: np.ndarray,
    budget: float,
    *,
    confidence: float | None = None,
    min_layers: list[int] | range | None = None,
) -> ThresholdChoice:
    """The (m, t) with the fewest layers run whose disagreement with the full model fits the budget.

    Args:
        decision: (N, L) decision values d_ik before the threshold (NaN never stops).
        pred: (N, L) answers per layer; the full model's answer is ``pred[:, -1]``.
        budget: the largest disagreement rate allowed, in [0, 1).
        confidence: if given (e.g. 0.9), certify the rate by its Clopper-Pearson upper bound, walking
            each first layer's thresholds from the safest down and stopping at the first that fails
            (fixed-sequence testing): with one candidate first layer, the chosen rule's true
            disagreement rate is <= budget with probability >= confidence over the draw of ``pred``'s rows.
        min_layers: candidate first checked layers (default 1..L-1).

    Returns:
        ThresholdChoice; ``threshold`` None means never stop early.
    """
    decision = np.asarray(decision, dtype=np.float64)
    pred = np.asarray(pred)
    n, n_layers = decision.shape
    if not 0 <= budget < 1:
        raise ValueError(f"budget must be in [0, 1), got {budget}")
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    disagree_at = (pred != pred[:, -1:]).astype(np.int64)  # (N, L), 0 at layer L
    best = (n * n_layers, -(10**9))  # (layers run, -m) of "never": only a saving replaces it
    choice = ThresholdChoice(None, n_layers, n, 0, float(n_layers), _upper(0, n, confidence))
    candidates = range(1, n_layers) if min_layers is None else min_layers
    for m in candidates:
        if not 1 <= m < n_layers:
            continue
        s = decision[:, m - 1 : n_layers - 1]
        s = np.where(np.isnan(s), -np.inf, s)
        running = np.maximum.accumulate(s, axis=1)
        record = np.ones_like(s, dtype=bool)
        record[:, 1:] = s[:, 1:] > running[:, :-1]
        record &= np.isfinite(s)
        rows, cols = np.nonzero(record)
        if rows.size == 0:
            continue
        vals = s[rows, cols]
        layers = cols + m
        g = np.argsort(-vals, kind="stable")
        vals, rows, layers = vals[g], rows[g], layers[g]
        # the exit before each event: the same row's previous (higher-valued) record, else L
        by_row = np.argsort(rows, kind="stable")
        rr, ll = rows[by_row], layers[by_row]
        first = np.r_[True, rr[1:] != rr[:-1]]
        prev_sorted = np.where(first, n_layers, np.r_[n_layers, ll[:-1]])
        prev = np.empty_like(layers)
        prev[by_row] = prev_sorted
        run = n * n_layers + np.cumsum(layers - prev)
        dis = np.cumsum(disagree_at[rows, layers - 1] - disagree_at[rows, prev - 1])
        ends = np.nonzero(np.r_[vals[1:] != vals[:-1], True])[0]
        feasible = _feasible(dis[ends], n, budget, confidence)
        if confidence is not None:
            # Fixed-sequence testing (Learn then Test): thresholds from the safest down, certified
            # until the first that fails, so the family of tests holds at the confidence level.
            feasible &= np.cumprod(feasible).astype(bool)
        ok = ends[feasible]
        if ok.size == 0:
            continue
        # fewest layers run; ties: larger m (fewer checks), then the first (largest) threshold
        i = ok[np.argmin(run[ok])]
        key = (int(run[i]), -m)
        if key < best:
            best = key
            lower = vals[i + 1] if i + 1 < vals.size else vals[i] - 1.0
            threshold = float(0.5 * (vals[i] + lower)) if np.isfinite(lower) else float(vals[i] - 1.0)
            choice = ThresholdChoice(
                threshold=threshold,
                min_layer=m,
                n=n,
                n_disagree=int(dis[i]),
                mean_exit_layer=float(run[i]) / n,
                upper_bound=_upper(int(dis[i]), n, confidence),
            )
    return choice


def _upper(k: int, n: int, confidence: float | None) -> float | None:
    return None if confidence is None or n == 0 else float(clopper_pearson_upper(k, n, confidence))


# --------------------------------------------------------------------------------------------


def layer_signals(
    features: LayerFeatures,
    vocab_mode: str,
    bias: np.ndarray | None,
    probe: ProbeHeads | None = None,
    probe_logits: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(top_prob, gap, answer), each (N, L), as the runtime's exit head would give them.

    Label mode: over the label tokens with the per-layer bias; answer = label index.
    Full mode: over the whole vocabulary; answer = token id.
    With ``probe`` (or precomputed (N, L-1, K) ``probe_logits``): layers 1..L-1 from the probes,
    layer L from the model's own label logits with the layer-L bias; answer = label index.
    """
    if probe is not None or probe_logits is not None:
        if vocab_mode != "labels":
            raise ValueError("probe readouts answer over the label tokens (vocab_mode 'labels')")
        if probe_logits is None:
            if features.hidden is None:
                raise ValueError("a probe classifier needs features collected with keep_hidden=True")
            probe_logits = probe.logits(features.hidden)
        top, gap, answer = (np.array(a) for a in label_signals(features, bias))
        top[:, :-1], gap[:, :-1], answer[:, :-1] = probe_signals(probe_logits)
        return top, gap, answer
    if vocab_mode == "labels":
        return label_signals(features, bias)
    if vocab_mode == "full":
        if bias is not None:
            raise ValueError("the label-bias correction applies to label mode only")
        if not features.has_vocab:
            raise ValueError("full-vocabulary mode needs features collected with full_vocab=True")
        return features.vocab_top_prob, features.vocab_gap, features.vocab_argmax
    raise ValueError(f"unknown vocab mode {vocab_mode!r}")


def gold_answer(features: LayerFeatures, vocab_mode: str) -> np.ndarray:
    """(N,) the gold answer in the answer space of ``vocab_mode`` (label index or token id)."""
    if (features.labels < 0).any():
        raise ValueError("these features have no gold labels")
    if vocab_mode == "labels":
        return features.labels
    return features.label_token_ids[features.labels]


def identity_of(features: LayerFeatures) -> ModelIdentity:
    m = features.meta
    return ModelIdentity(m["model_type"], m["num_hidden_layers"], m["vocab_size"], m["hidden_size"])


def target_answer(features: LayerFeatures, vocab_mode: str, bias: np.ndarray | None, target: str) -> np.ndarray:
    """(N,) what "settled" means: the full model's (corrected) answer, or the gold label."""
    if target == "consistency":
        return layer_signals(features, vocab_mode, bias)[2][:, -1]
    if target == "gold":
        return gold_answer(features, vocab_mode)
    raise ValueError(f"unknown target {target!r} (targets: {', '.join(TARGETS)})")


def training_rows(
    features: LayerFeatures,
    vocab_mode: str,
    bias: np.ndarray | None,
    target: str,
    use_layer: bool,
    probe_logits: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(x (n, f), y (n,)) over every example and layer k < L (layer L always stops)."""
    top, gap, answer = layer_signals(features, vocab_mode, bias, probe_logits=probe_logits)
    if target == "consistency":
        goal = answer[:, -1]
    elif target == "gold":
        goal = gold_answer(features, vocab_mode)
    else:
        raise ValueError(f"unknown target {target!r} (targets: {', '.join(TARGETS)})")
    n, n_layers = top.shape
    layers = np.broadcast_to(np.arange(1, n_layers + 1, dtype=np.float64), (n, n_layers))
    cols = [top[:, :-1], gap[:, :-1]] + ([layers[:, :-1]] if use_layer else [])
    x = np.stack([c.reshape(-1) for c in cols], axis=1)
    y = (answer[:, :-1] == goal[:, None]).reshape(-1)
    return x, y


# Probes depend on the calibration split, the target answers and C only (not on the budget, the
# confidence or the stop classifier): one fit serves every variant and budget of a run.
_PROBE_FITS: list[tuple[np.ndarray, bytes, float, tuple]] = []


def _fitted_probes(calibration: LayerFeatures, goal: np.ndarray, c: float) -> tuple[ProbeHeads, np.ndarray]:
    key = np.asarray(goal, dtype=np.int64).tobytes()
    for hidden, k, kc, value in _PROBE_FITS:
        if hidden is calibration.hidden and k == key and kc == c:
            return value
    value = (
        fit_probes(calibration.hidden, goal, calibration.n_labels, c),
        cross_fitted_logits(calibration.hidden, goal, calibration.n_labels, c),
    )
    _PROBE_FITS.insert(0, (calibration.hidden, key, c, value))
    del _PROBE_FITS[4:]
    return value


def calibrate(
    calibration: LayerFeatures,
    heldout: LayerFeatures | None,
    *,
    method: str = "svm",
    target: str = "consistency",
    budget: float = 0.01,
    confidence: float | None = None,
    label_bias_estimator: str = "auto",
    content_free: LayerFeatures | None = None,
    vocab_mode: str = "labels",
    use_layer: bool = True,
    min_layers: list[int] | None = None,
    label_words: tuple[str, ...] | None = None,
    info: dict | None = None,
    readout: str = "lens",
    probe_c: float = DEFAULT_C,
) -> StopClassifier:
    """Fit a stop classifier on ``calibration`` and choose its threshold on ``heldout``.

    Args:
        calibration, heldout: features of two disjoint splits of the same task and model. With
            ``heldout`` None the rule is fitted only: no threshold (``info`` has its figures on
            ``calibration``).
        method: ``svm`` | ``logreg`` | ``gap``.
        target: ``consistency`` | ``gold``.
        budget: the largest disagreement rate with the full model allowed on ``heldout``.
        confidence: optional Clopper-Pearson level for the budget (e.g. 0.95).
        label_bias_estimator: label-bias estimator (``auto``, ``none``, ``content-free``, ``mean``,
            ``balanced``); label mode only.
        content_free: features of the content-free prompts (for ``content-free``).
        vocab_mode: ``labels`` | ``full``.
        use_layer: include the layer index as a feature (folded into each layer's bias).
        min_layers: candidate first checked layers (default: all).
        readout: ``lens`` (the model's own decode path) or ``probe`` (per-layer probes fitted on
            ``calibration``'s hidden states; the stop classifier is fitted on cross-fitted probe
            signals, so never on the probes' own training rows; the threshold on ``heldout``).
        probe_c: the probes' inverse L2 strength.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} (methods: {', '.join(METHODS)})")
    label_bias_estimator = resolve_label_bias_estimator(label_bias_estimator, calibration.n_labels)
    if vocab_mode == "full" and label_bias_estimator != "none":
        raise ValueError("the label-bias correction applies to label mode only: use label_bias_estimator='none'")
    if heldout is not None and identity_of(calibration) != identity_of(heldout):
        raise ValueError("calibration and held-out features come from different models")
    bias = estimate_label_bias(label_bias_estimator, calibration, content_free) if vocab_mode == "labels" else None
    use_layer = use_layer and method != "gap"
    probe = probe_cal = None
    if readout == "probe":
        if vocab_mode != "labels":
            raise ValueError("probe readouts answer over the label tokens: use vocab_mode='labels'")
        if calibration.hidden is None or (heldout is not None and heldout.hidden is None):
            raise ValueError("probe readouts need features collected with keep_hidden=True")
        goal = target_answer(calibration, vocab_mode, bias, target)
        probe, probe_cal = _fitted_probes(calibration, goal, probe_c)
    elif readout != "lens":
        raise ValueError(f"unknown exit head {readout!r} (exit heads: lens, probe)")
    x, y = training_rows(calibration, vocab_mode, bias, target, use_layer, probe_logits=probe_cal)
    fit = fit_linear(x, y, method)
    w_layer = float(fit.weights[2]) if use_layer else 0.0
    clf = StopClassifier(
        identity=identity_of(calibration),
        method=method,
        target=target,
        vocab_mode=vocab_mode,
        w_top_prob=float(fit.weights[0]),
        w_gap=float(fit.weights[1]),
        w_layer=w_layer,
        intercept=float(fit.intercept),
        threshold=None,
        min_layer=calibration.n_layers,
        label_token_ids=tuple(int(t) for t in calibration.label_token_ids),
        label_words=label_words,
        label_bias=None if bias is None else tuple(tuple(float(v) for v in row) for row in bias),
        label_bias_estimator=label_bias_estimator if vocab_mode == "labels" else "none",
        readout=readout,
        probe=probe,
    )
    layers = np.arange(1, calibration.n_layers + 1)[None, :]
    # The rule's figures on the fitting split (out-of-fold probe signals for probes): what ``auto``
    # compares, and, with a confidence, where the first checked layer is chosen, so that nothing but
    # the threshold is chosen on the held-out rows that certify it.
    top_c, gap_c, answer_c = layer_signals(calibration, vocab_mode, bias, probe_logits=probe_cal)
    first = choose_threshold(clf.decision(top_c, gap_c, layers), answer_c, budget, min_layers=min_layers)
    if heldout is None:
        return clf.with_threshold(
            None, calibration_n=calibration.n_examples, calibration_mean_exit_layer=first.mean_exit_layer
        )
    if confidence is not None and (min_layers is None or len(min_layers) > 1):
        min_layers = [first.min_layer] if first.threshold is not None else min_layers
    top, gap, answer = layer_signals(heldout, vocab_mode, bias, probe=probe)
    choice = choose_threshold(
        clf.decision(top, gap, layers), answer, budget, confidence=confidence, min_layers=min_layers
    )
    return clf.with_threshold(
        choice.threshold,
        min_layer=choice.min_layer,
        budget=budget,
        confidence=confidence,
        heldout_n=choice.n,
        heldout_disagreement=choice.disagreement,
        heldout_disagreement_upper_bound=choice.upper_bound,
        heldout_mean_exit_layer=choice.mean_exit_layer,
        heldout_oracle_mean_exit_layer=float(oracle_exit_layers(answer).mean()),
        calibration_n=calibration.n_examples,
        calibration_mean_exit_layer=first.mean_exit_layer,
        training_rows=int(y.size),
        training_settled_fraction=float(y.mean()),
        **(info or {}),
    )


def choose_rule(
    calibration: LayerFeatures, readout: str = "auto", method: str = "auto", **kwargs
) -> tuple[str, str, dict | None]:
    """(readout, method, summary): the candidate rule (``auto``: every readout in ``READOUTS`` x every
    method in ``AUTO_METHODS``) that runs the fewest layers on ``calibration`` within the budget
    (out-of-fold probe signals for probes; ties: the lens, which needs no probe file, then the order
    of ``AUTO_METHODS``). Nothing held out is read. ``summary`` (None with one candidate) holds each
    candidate's figures; ``kwargs`` go to ``calibrate``."""
    readouts = READOUTS if readout == "auto" else (readout,)
    methods = AUTO_METHODS if method == "auto" else (method,)
    if len(readouts) * len(methods) == 1:
        return readouts[0], methods[0], None
    layers = {
        (head, m): calibrate(calibration, None, readout=head, method=m, **kwargs).info["calibration_mean_exit_layer"]
        for head in readouts
        for m in methods
    }
    best = min(layers, key=lambda key: (layers[key], readouts.index(key[0]), methods.index(key[1])))
    summary = {
        "chosen": {"readout": best[0], "method": best[1]},
        "by": "mean exit layer on the calibration split (out-of-fold probe signals)",
        "candidates": [
            {"readout": head, "method": m, "calibration_mean_exit_layer": value} for (head, m), value in layers.items()
        ],
    }
    return best[0], best[1], summary


def calibrate_auto(
    calibration: LayerFeatures, heldout: LayerFeatures, readout: str = "auto", method: str = "svm", **kwargs
) -> StopClassifier:
    """``calibrate`` where ``readout`` (``lens`` | ``probe``) and ``method`` may be ``auto``.

    With ``auto``, the rule is chosen by :func:`choose_rule` on ``calibration`` *before* any held-out
    row is looked at; only that rule's threshold is then chosen (certified) on ``heldout``, so a
    confidence level holds for the whole procedure. The candidates' calibration figures are kept in
    ``info["rule_choice"]``.
    """
    head, m, summary = choose_rule(calibration, readout, method, **kwargs)
    clf = calibrate(calibration, heldout, readout=head, method=m, **kwargs)
    return clf if summary is None else clf.with_threshold(clf.threshold, rule_choice=summary)
