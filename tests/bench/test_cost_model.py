"""The arithmetic of bench/cost_model.py (the ideal that bench_generate.py reports against)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from cost_model import StepCosts, active_rows


def test_active_rows_per_layer():
    # rows stop after layers 1, 3, 4 (never) and 2 of a 4-layer model
    assert active_rows([1, 3, 9, 2], 4) == [4, 3, 2, 1]


def _costs() -> StepCosts:
    return StepCosts(t=10, new=1, layer={1: 1.0, 4: 2.0, 8: 4.0}, fill={1: 0.1, 4: 0.4, 8: 0.8}, head={8: 3.0})


def test_costs_interpolate_between_measured_row_counts():
    c = _costs()
    assert c.layer_s(0) == 0.0
    assert c.layer_s(4) == 2.0
    assert c.layer_s(6) == pytest.approx(3.0)
    assert c.fill_s(2) == pytest.approx(0.2)
    assert c.check_s(3) == 0.0  # no check measured: the policy reads no signals


def test_a_layer_costs_the_cheaper_of_compacting_and_running_frozen():
    c = _costs()
    # 4 of 8 rows active: compact 2.0 + fill(4) 0.4 = 2.4 < layer(8) 4.0; none active: fill(8) only
    assert c.layers_ideal_s([8, 4, 0], 8) == pytest.approx(4.0 + 2.4 + 0.8)
    assert c.layers_ideal_s([7], 8) == pytest.approx(min(4.0, 3.5 + 0.1))
    flat = StepCosts(t=10, new=1, layer={4: 4.0, 8: 4.0}, fill={4: 0.5, 8: 1.0})
    assert flat.layers_ideal_s([4], 8) == 4.0, "a flat layer cost: running the finished rows frozen is the ideal"


def test_kappa_reproduces_the_full_step():
    c = _costs()
    full = 3.0 + 1.1 * 2 * 4.0  # head + kappa x L x layer(B), L = 2
    assert c.kappa(full, 8, 2) == pytest.approx(1.1)
