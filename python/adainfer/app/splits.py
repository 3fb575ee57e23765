"""Balanced, disjoint, seeded splits of a labelled corpus, and the fixed demonstrations.

Each class's texts are shuffled with the seed and cut into a demonstration pool and the
``calibration`` / ``heldout`` / ``test`` splits (``SPLITS``), each with the same number of examples
per class; the demonstrations are drawn from the pool only, so no demonstration is ever evaluated.
"""

from __future__ import annotations

import random
import re
import warnings
from collections.abc import Sequence

from adainfer.app.tasks import Example
from adainfer.calibration.choices import SPLITS

__all__ = ["REST", "SPLITS", "balanced_splits", "draw_demonstrations", "group_by_class"]

# A split size that means "the examples the other splits and the demonstration pool leave", shared
# evenly among the splits sized so, each up to ``max_rest``: what ``adainfer calibrate`` gives its
# calibration and held-out splits by default. Both gain from rows: the probes fitted on calibration
# agree with the full model earlier (research/stop_rule.md: 300 -> 900 rows, 29% -> 41% of the
# layers saved on tweets), and more held-out rows let the confidence bound spend more of the budget.
REST = None
MAX_REST = 1200  # past ~1,200 rows the 90% bound at a 1% budget gains little (0.58% -> 0.65% at 2,000)


def _clean_text(text: str, max_chars: int) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text[:max_chars].rstrip()


def balanced_splits(
    by_class: Sequence[Sequence[str]],
    sizes: dict[str, int],
    n_demo_pool: int,
    seed: int,
    allow_shrink: bool = False,
    max_rest: int | None = MAX_REST,
) -> tuple[list[list[str]], dict[str, tuple[Example, ...]]]:
    """Partition each class's (deduplicated) texts into a demo pool and balanced splits.

    Args:
        by_class: texts of each class.
        sizes: total examples wanted per split (split evenly over the classes); a split sized
            ``REST`` (None) takes what the others leave, shared evenly with the other ``REST``
            splits, up to ``max_rest`` examples each.
        n_demo_pool: demonstration candidates kept per class, disjoint from every split.
        seed: shuffling seed.
        allow_shrink: when a class is too small, scale every split down (with a warning) instead
            of raising.
        max_rest: the largest size of a ``REST`` split (None: no cap).

    Returns:
        (demo pool per class, splits), each split shuffled, with ``sizes[s] // n_classes`` examples
        per class.
    """
    k = len(by_class)
    rng = random.Random(seed)
    have = min(len(texts) for texts in by_class)
    rest = [s for s, n in sizes.items() if n is REST]
    for s, n in sizes.items():
        if n is REST:
            continue
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"split {s!r} must have a whole number of examples >= 0, got {n!r}")
        if 0 < n < k:
            raise ValueError(
                f"split {s!r} of {n} examples is too small for {k} classes (the splits are balanced): use at least {k}"
            )
    if n_demo_pool < 0:
        raise ValueError(f"n_demo_pool must be >= 0, got {n_demo_pool}")
    if rest:
        left = (have - n_demo_pool - sum((n // k) for n in sizes.values() if n is not REST)) // len(rest)
        per_class_rest = max(0, left if max_rest is None else min(left, max_rest // k))
        if per_class_rest < 1:
            raise ValueError(
                f"no examples are left for split {' / '.join(map(repr, rest))}: the smallest class has {have}, the "
                f"other splits and {n_demo_pool} demonstration candidates take them all (use smaller splits)"
            )
        sizes = {s: (per_class_rest * k if n is REST else n) for s, n in sizes.items()}
    per_class = {s: n // k for s, n in sizes.items()}
    need = n_demo_pool + sum(per_class.values())
    if have < need:
        if not allow_shrink:
            raise ValueError(f"the smallest class has {have} examples; the splits need {need} per class")
        scale = (have - n_demo_pool) / max(1, sum(per_class.values()))
        per_class = {s: int(n * scale) for s, n in per_class.items()}
        if have <= n_demo_pool or min(per_class.values()) < 1:
            raise ValueError(
                f"the smallest class has only {have} examples: too few for {n_demo_pool} demonstration "
                f"candidates and splits of {sizes} examples (use smaller --n-calibration / --n-heldout / --n-test)"
            )
        warnings.warn(f"the smallest class has {have} examples: splits shrunk to {per_class} per class", stacklevel=2)
    pools: list[list[str]] = []
    splits: dict[str, list[Example]] = {s: [] for s in sizes}
    for label, texts in enumerate(by_class):
        texts = list(texts)
        rng.shuffle(texts)
        pools.append(texts[:n_demo_pool])
        start = n_demo_pool
        for s in sizes:
            splits[s] += [Example(t, label) for t in texts[start : start + per_class[s]]]
            start += per_class[s]
    for s in splits:
        rng.shuffle(splits[s])
    return pools, {s: tuple(v) for s, v in splits.items()}


def draw_demonstrations(pools: Sequence[Sequence[str]], k: int, seed: int) -> tuple[Example, ...]:
    """k demonstrations, balanced over the classes (counts differ by at most 1), in seeded order."""
    n_classes = len(pools)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"the number of demonstrations must be an integer >= 0, got {k!r}")
    rng = random.Random(seed + 1)
    counts = [k // n_classes + (1 if c < k % n_classes else 0) for c in rng.sample(range(n_classes), n_classes)]
    demos = []
    for label, (pool, n) in enumerate(zip(pools, counts, strict=True)):
        if n > len(pool):
            raise ValueError(f"{k} demonstrations need {n} of class {label}; the pool has {len(pool)}")
        demos += [Example(t, label) for t in rng.sample(list(pool), n)]
    rng.shuffle(demos)
    return tuple(demos)


def group_by_class(texts: Sequence[str], labels: Sequence[str], label_names: Sequence[str], max_chars: int):
    """Group cleaned, deduplicated texts by label (first occurrence wins; blank texts dropped)."""
    groups: list[list[str]] = [[] for _ in label_names]
    index = {name: i for i, name in enumerate(label_names)}
    seen: set[str] = set()
    for text, label in zip(texts, labels, strict=True):
        if text is None or label is None or label not in index:
            continue
        text = _clean_text(str(text), max_chars)
        key = text.lower()
        if not text or key in seen:
            continue
        seen.add(key)
        groups[index[label]].append(text)
    return groups
