"""Calibrated forecasting: exact at full rank, a branch-level first-order forecast at rank 0,
plain ICC while only one full call exists, and stable over long runs."""

from functools import partial

import numpy as np
import pytest
import torch

from calicache import ForecastConfig, ICCConfig, sample
from conftest import rel, run_cached, tiny_model

STEPS = 9


run = partial(run_cached, steps=STEPS, cfg_scale=2.0)


def test_full_rank_equals_no_cache():
    m = tiny_model()
    ref = sample(m, 4, STEPS, cfg_scale=2.0)
    for period in (2, 3):
        out = run(m, ForecastConfig(period=period, rank="full"))
        assert rel(out, ref) < 1e-5
    assert rel(run(m, ForecastConfig(period=3, rank=0)), ref) > 1e-3  # it really forecasts


def _manual_branch_forecast(model, period, weight):
    """Rank 0, written independently: forward hooks replace cached branch outputs by y1 + k (y1 - y0)."""
    state = {"call": -1}
    hist = {}

    def count(_m, _args):
        state["call"] += 1

    def branch_hook(name):
        def hook(_m, _args, out):
            s = state["call"]
            if s % period == 0:
                hist[name] = (hist.get(name, []) + [(s, out)])[-2:]
                return out
            h = hist[name]
            if len(h) == 1:
                return h[0][1]
            (f0, y0), (f1, y1) = h
            k = weight * (s - f1) / (f1 - f0)
            return y1 + k * (y1 - y0)

        return hook

    handles = [model.register_forward_pre_hook(count)]
    for i, blk in enumerate(model.blocks):
        handles.append(blk.attn.register_forward_hook(branch_hook(f"{i}.attn")))
        handles.append(blk.mlp.register_forward_hook(branch_hook(f"{i}.mlp")))
    try:
        return sample(model, 4, STEPS, cfg_scale=2.0)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("period, weight", [(2, 1.0), (3, 0.7)])
def test_rank_zero_is_branch_first_order_forecast(period, weight):
    m = tiny_model()
    expected = _manual_branch_forecast(m, period, weight)
    out = run(m, ForecastConfig(period=period, rank=0, weight=weight))
    assert rel(out, expected) < 1e-6


def test_one_full_call_equals_icc():
    gather = np.zeros((STEPS, 4), dtype=bool)
    gather[0] = True
    m = tiny_model()
    a = run(m, ForecastConfig(schedule=gather, rank=5))
    b = run(m, ICCConfig(schedule=gather, rank=5))
    assert torch.equal(a, b)


def test_timestep_units_differ_only_with_uneven_spacing():
    m = tiny_model()
    a = run(m, ForecastConfig(period=2, rank=3))
    b = run(m, ForecastConfig(period=2, rank=3, units="timesteps"))
    assert rel(a, b) > 0  # adm spacing rounds: call and timestep distances differ slightly
    assert rel(a, b) < 1e-2


@pytest.mark.parametrize("period", [2, 3, 4, 5])
def test_long_runs_stay_finite(period):
    out = run(tiny_model(), ForecastConfig(period=period, rank=4), steps=50)
    assert torch.isfinite(out).all()


def test_forecast_beats_icc_on_smooth_trajectories():
    m = tiny_model()
    ref = sample(m, 4, 30, cfg_scale=2.0)
    icc = rel(run(m, ICCConfig(period=2, rank=4), steps=30), ref)
    fc = rel(run(m, ForecastConfig(period=2, rank=4), steps=30), ref)
    assert fc < icc
