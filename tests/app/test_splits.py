"""Splits: balanced seeded demonstrations and balanced, disjoint, seeded splits."""

from __future__ import annotations

from collections import Counter

import pytest
from adainfer.app.splits import REST, SPLITS, balanced_splits, draw_demonstrations
from adainfer.calibration import choices


def _pools(n=20, k=2):
    return [[f"class{c} text {i}" for i in range(n)] for c in range(k)]


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4, 8])
def test_demonstrations_are_balanced_and_seeded(k):
    demos = draw_demonstrations(_pools(), k, seed=3)
    counts = Counter(d.label for d in demos)
    assert len(demos) == k
    assert max(counts.values(), default=0) - min(counts.get(c, 0) for c in (0, 1)) <= 1
    assert demos == draw_demonstrations(_pools(), k, seed=3)
    assert all(d.text.startswith(f"class{d.label}") for d in demos)
    if k >= 4:
        assert demos != draw_demonstrations(_pools(), k, seed=4)


def test_demonstrations_need_a_big_enough_pool():
    with pytest.raises(ValueError, match="the pool has 1"):
        draw_demonstrations(_pools(n=1), 4, seed=0)


def test_splits_are_balanced_disjoint_and_seeded():
    by_class = [[f"neg {i}" for i in range(100)], [f"pos {i}" for i in range(60)]]
    sizes = {"calibration": 20, "heldout": 30, "test": 40}
    pools, splits = balanced_splits(by_class, sizes, n_demo_pool=8, seed=1)
    seen = set()
    for name, n in sizes.items():
        ex = splits[name]
        assert len(ex) == n and Counter(e.label for e in ex) == {0: n // 2, 1: n // 2}
        texts = {e.text for e in ex}
        assert not texts & seen
        seen |= texts
    assert not seen & {t for p in pools for t in p}  # demonstrations never evaluated
    assert balanced_splits(by_class, sizes, 8, seed=1) == (pools, splits)
    with pytest.raises(ValueError, match="smallest class has 60"):
        balanced_splits(by_class, {"test": 200}, 8, seed=1)
    with pytest.warns(UserWarning, match="shrunk"):
        _, small = balanced_splits(by_class, {"calibration": 100, "test": 100}, 8, seed=1, allow_shrink=True)
    assert len(small["calibration"]) + len(small["test"]) <= 2 * 52


def test_split_sizes_and_demonstrations_must_be_valid():
    by_class = [[f"neg {i}" for i in range(50)], [f"pos {i}" for i in range(50)]]
    with pytest.raises(ValueError, match=r"split 'test' must have a whole number of examples >= 0, got -4"):
        balanced_splits(by_class, {"calibration": 10, "test": -4}, 8, seed=0)
    with pytest.raises(ValueError, match=r"split 'test' of 1 examples is too small for 2 classes"):
        balanced_splits(by_class, {"calibration": 10, "test": 1}, 8, seed=0)
    with pytest.raises(ValueError, match="whole number"):
        balanced_splits(by_class, {"test": 2.5}, 8, seed=0)
    _, empty = balanced_splits(by_class, {"calibration": 10, "test": 0}, 8, seed=0)  # an empty split is allowed
    assert empty["test"] == () and len(empty["calibration"]) == 10
    with pytest.raises(ValueError, match="demonstrations must be an integer >= 0, got -2"):
        draw_demonstrations(_pools(), -2, seed=0)


def test_split_names_are_defined_once_in_calibration_choices():
    assert SPLITS is choices.SPLITS == ("calibration", "heldout", "test")


def test_the_rest_split_takes_what_the_others_leave_up_to_its_cap():
    by_class = [[f"a{i}" for i in range(100)], [f"b{i}" for i in range(80)]]
    sizes = {"calibration": 20, "heldout": REST, "test": 20}
    _, splits = balanced_splits(by_class, sizes, n_demo_pool=8, seed=0, max_rest=None)
    assert {s: len(v) for s, v in splits.items()} == {"calibration": 20, "heldout": 2 * (80 - 8 - 20), "test": 20}
    _, capped = balanced_splits(by_class, sizes, n_demo_pool=8, seed=0, max_rest=50)
    assert len(capped["heldout"]) == 50
    # the rest resolves to a number of examples before the draws: the same sizes given as numbers
    # (what `adainfer eval` rebuilds from a classifier's stored sizes) give the same splits
    resolved = {s: len(v) for s, v in capped.items()}
    assert balanced_splits(by_class, resolved, n_demo_pool=8, seed=0)[1] == capped
    texts = [e.text for v in splits.values() for e in v]
    assert len(texts) == len(set(texts))
    with pytest.raises(ValueError, match="no examples are left for split 'heldout'"):
        balanced_splits(by_class, {"calibration": 80, "heldout": REST, "test": 80}, n_demo_pool=8, seed=0)


def test_rest_splits_share_what_the_others_leave_evenly_each_up_to_the_cap():
    by_class = [[f"a{i}" for i in range(100)], [f"b{i}" for i in range(81)]]
    sizes = {"calibration": REST, "heldout": REST, "test": 20}
    _, splits = balanced_splits(by_class, sizes, n_demo_pool=8, seed=0, max_rest=None)
    share = 2 * ((81 - 8 - 10) // 2)  # 63 left per class: 31 each, the odd one unused
    assert {s: len(v) for s, v in splits.items()} == {"calibration": share, "heldout": share, "test": 20}
    texts = [e.text for v in splits.values() for e in v]
    assert len(texts) == len(set(texts))
    _, capped = balanced_splits(by_class, sizes, n_demo_pool=8, seed=0, max_rest=40)
    assert {s: len(v) for s, v in capped.items()} == {"calibration": 40, "heldout": 40, "test": 20}
    assert balanced_splits(by_class, {s: len(v) for s, v in capped.items()}, n_demo_pool=8, seed=0)[1] == capped
    with pytest.raises(ValueError, match="no examples are left for split 'calibration' / 'heldout'"):
        balanced_splits(by_class, {"calibration": REST, "heldout": REST, "test": 144}, n_demo_pool=8, seed=0)
