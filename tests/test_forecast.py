"""Calibrated forecasting: exact at full rank, a branch-level first-order forecast at rank 0,
plain ICC while only one full call exists, and stable over long runs; order 2: exact on quadratic
trajectories, a branch-level second-order forecast at rank 0, first order while two full calls exist."""

from functools import partial

import numpy as np
import pytest
import torch

from calicache import ForecastConfig, ICCConfig, count_macs, load_config, sample
from calicache.cache.methods.forecast import newton_weights, second_order
from conftest import rel, run_cached, tiny_model

STEPS = 9


run = partial(run_cached, steps=STEPS, cfg_scale=2.0)


@pytest.mark.parametrize("order", [1, 2])
def test_full_rank_equals_no_cache(order):
    m = tiny_model()
    ref = sample(m, 4, STEPS, cfg_scale=2.0)
    for period in (2, 3):
        out = run(m, ForecastConfig(period=period, rank="full", order=order))
        assert rel(out, ref) < 1e-5
    assert rel(run(m, ForecastConfig(period=3, rank=0, order=order)), ref) > 1e-3  # it really forecasts


def test_second_order_is_exact_on_quadratics():
    g = torch.Generator().manual_seed(0)
    c0, c1, c2 = (torch.randn(5, 7, generator=g, dtype=torch.float64) for _ in range(3))

    def q(t):
        return c0 + c1 * t + c2 * t * t

    # even and uneven call spacing, and timesteps (decreasing positions)
    for (f0, f1, f2), s in [((0, 1, 2), 3), ((0, 3, 5), 7), ((0, 3, 5), 6), ((999, 946, 894), 789)]:
        a, b = (torch.tensor(v, dtype=torch.float64) for v in newton_weights([f0, f1, f2], s, 1.0))
        assert torch.allclose(second_order(q(f2), q(f1), q(f0), a, b), q(s), rtol=1e-9, atol=1e-9)
    # the weight scales the increment over the last full value
    a, b = (torch.tensor(v, dtype=torch.float64) for v in newton_weights([0, 3, 5], 7, 0.5))
    assert torch.allclose(second_order(q(5), q(3), q(0), a, b), q(5) + 0.5 * (q(7) - q(5)), rtol=1e-9, atol=1e-9)
    # two full positions: the first-order weight k = w (s - f1) / (f1 - f0), no second term
    assert newton_weights([2, 5], 7, 0.7) == pytest.approx((0.7 * 2 / 3, 0.0))


def _manual_branch_forecast(model, period, weight, order=1):
    """Rank 0, written independently: forward hooks replace cached branch outputs by y1 + k (y1 - y0),
    or (order 2) by y2 + w (P(s) - y2) with P the Lagrange quadratic through the last three."""
    state = {"call": -1}
    hist = {}

    def count(_m, _args):
        state["call"] += 1

    def branch_hook(name):
        def hook(_m, _args, out):
            s = state["call"]
            if s % period == 0:
                hist[name] = (hist.get(name, []) + [(s, out)])[-(order + 1):]
                return out
            h = hist[name]
            if len(h) == 1:
                return h[0][1]
            if len(h) == 3:
                ps = [f for f, _ in h]
                basis = [np.prod([(s - q) / (p - q) for q in ps if q != p]) for p in ps]
                poly = sum(float(c) * y for c, (_, y) in zip(basis, h))
                return h[2][1] + weight * (poly - h[2][1])
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


@pytest.mark.parametrize("period, weight", [(2, 1.0), (3, 0.6)])
def test_rank_zero_order_two_is_branch_lagrange_forecast(period, weight):
    m = tiny_model()
    expected = _manual_branch_forecast(m, period, weight, order=2)
    out = run(m, ForecastConfig(period=period, rank=0, weight=weight, order=2))
    err = rel(out, expected)
    assert err < 1e-6
    first = run(m, ForecastConfig(period=period, rank=0, weight=weight))
    assert rel(out, first) > max(10 * err, 5e-7)  # not order 1 (1.3e-6 at p3 here, rounding ~1e-8)


def test_order_two_with_two_full_calls_is_first_order():
    gather = np.zeros((STEPS, 4), dtype=bool)
    gather[[0, 3]] = True
    m = tiny_model()
    for rank in (0, 5):
        a = run(m, ForecastConfig(schedule=gather, rank=rank, order=2, weight=0.8))
        b = run(m, ForecastConfig(schedule=gather, rank=rank, order=1, weight=0.8))
        assert rel(a, b) < 1e-6


def test_order_is_checked_saved_and_counted(tmp_path):
    for bad in (0, 3, True, 1.5):
        with pytest.raises(ValueError, match="order must be 1"):
            ForecastConfig(order=bad)
    c = ForecastConfig(period=3, rank=4, order=2, weight=0.5)
    c.save(tmp_path / "c.json")
    assert load_config(tmp_path / "c.json") == c
    m = tiny_model()
    one, two = (count_macs(m, ForecastConfig(period=3, rank=4, order=o), STEPS)["total"] for o in (1, 2))
    # order 2 adds one element-wise pass per cached call over each calibrated linear's output columns and
    # rank columns (q, k, v: three blocks of rank 4 in qkv), one MAC per element, per token
    tokens = (8 // 2) ** 2
    linears = [(name, mod) for blk in m.blocks for name, mod in [*blk.attn.named_children(), *blk.mlp.named_children()]
               if isinstance(mod, torch.nn.Linear)]
    per_call = sum(tokens * (mod.out_features + 4 * (3 if name == "qkv" else 1)) for name, mod in linears)
    cached_calls = sum(1 for t in range(STEPS) if t % 3)
    assert len(linears) == 8 and two - one == cached_calls * per_call


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
