"""The caching engine: exactness identities, run boundaries, removal, bad input."""

from functools import partial

import numpy as np
import pytest
import torch

from calicache import (
    CacheSchedule,
    FORAConfig,
    ForecastConfig,
    GOCConfig,
    ICCConfig,
    NoCacheConfig,
    apply_cache,
    remove_cache,
    sample,
)
from calicache.diffusion.guidance import guided_model_fn
from calicache.diffusion.samplers import ddim
from calicache.diffusion.schedule import Schedule
from conftest import rel, run_cached, tiny_model

STEPS = 8


run = partial(run_cached, steps=STEPS, cfg_scale=2.0)


@pytest.fixture(scope="module")
def ref():
    return run(tiny_model())


def test_all_full_schedule_is_bit_exact(ref):
    m = tiny_model()
    assert torch.equal(run(m, FORAConfig(period=1)), ref)
    gather = np.ones((STEPS, 4), dtype=bool)
    assert torch.equal(run(m, ICCConfig(schedule=gather, rank=3)), ref)
    assert torch.equal(run(m, NoCacheConfig()), ref)


def test_fora_really_caches(ref):
    assert rel(run(tiny_model(), FORAConfig(period=2)), ref) > 1e-3


def test_icc_full_rank_equals_no_cache(ref):
    assert rel(run(tiny_model(), ICCConfig(period=2, rank="full")), ref) < 1e-5
    assert rel(run(tiny_model(), ICCConfig(period=3, rank="full"), cfg_scale=1.0),
               run(tiny_model(), cfg_scale=1.0)) < 1e-5


def test_icc_rank_zero_equals_fora():
    m = tiny_model()
    assert torch.equal(run(m, ICCConfig(period=2, rank=0)), run(m, FORAConfig(period=2)))


def test_icc_error_falls_with_rank(ref):
    errs = [rel(run(tiny_model(), ICCConfig(period=2, rank=r)), ref) for r in (0, 8, 32)]
    assert errs[0] > errs[1] > errs[2]


def test_remove_cache_restores_forward_exactly():
    m = tiny_model()
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 3]), torch.tensor([0, 1, 2])
    before = m(x, t, y)
    apply_cache(m, ICCConfig(period=2, rank=4))
    m(x, t, y)
    remove_cache(m)
    assert not any("forward" in mod.__dict__ for mod in m.modules())
    assert not hasattr(m, "_calicache_engine")
    assert torch.equal(m(x, t, y), before)


def test_runs_in_a_row_and_other_step_counts_equal_fresh_runs():
    cfg = FORAConfig(period=2)
    m = apply_cache(tiny_model(), cfg)
    a, b = sample(m, 4, STEPS, cfg_scale=2.0), sample(m, 4, STEPS, cfg_scale=2.0)
    c = sample(m, 3, 5, cfg_scale=1.0, batch_size=2)  # other steps, batch size, no doubled batch
    assert torch.equal(a, b)
    fresh = apply_cache(tiny_model(), cfg)
    assert torch.equal(c, sample(fresh, 3, 5, cfg_scale=1.0, batch_size=2))


def test_outside_loop_starts_runs_from_timesteps():
    """A bare module driven by someone else's loop: a run starts when the timestep goes up."""
    cfg = ICCConfig(period=2, rank=4)
    expected = run(tiny_model(), cfg)
    m = apply_cache(tiny_model(), cfg)
    y = torch.arange(4) % 4
    fn = guided_model_fn(m, y, 4, 2.0)
    from calicache.sampling import sample_generator

    x = torch.stack([torch.randn((1, 8, 8), generator=sample_generator(0, i)) for i in range(4)])
    with torch.inference_mode():
        for _ in range(2):  # two loops in a row, no explicit boundary
            out = ddim(fn, x.clone(), Schedule.create(STEPS, "adm"))
            assert torch.equal(out, expected)


def test_failed_run_then_good_run():
    cfg = FORAConfig(period=2)
    expected = run(tiny_model(), cfg)
    m = apply_cache(tiny_model(), cfg)
    bad = torch.full((4, 1, 8, 8), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        sample(m, 4, STEPS, cfg_scale=2.0, noise=bad)
    # a failure in the middle of a run (the 4th call raises), in a module calicache does not hook
    calls = {"n": 0}
    orig = m.blocks[0].adaLN_modulation.forward

    def flaky(x):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return orig(x)

    m.blocks[0].adaLN_modulation.forward = flaky
    with pytest.raises(RuntimeError, match="boom"):
        sample(m, 4, STEPS, cfg_scale=2.0)
    del m.blocks[0].adaLN_modulation.forward
    assert torch.equal(sample(m, 4, STEPS, cfg_scale=2.0), expected)


def test_nan_input_to_bare_module():
    m = apply_cache(tiny_model(), FORAConfig(period=2))
    with pytest.raises(ValueError, match="NaN"):
        m(torch.full((1, 1, 8, 8), float("nan")), torch.tensor([10]), torch.tensor([0]))


def test_wrong_schedule_length_fails_before_work():
    gather = np.ones((STEPS + 2, 4), dtype=bool)
    m = apply_cache(tiny_model(), FORAConfig(schedule=gather))
    called = {"n": 0}
    m.register_forward_pre_hook(lambda *a: called.__setitem__("n", called["n"] + 1))
    with pytest.raises(ValueError, match="calls"):
        sample(m, 2, STEPS)
    assert called["n"] == 0


def test_schedule_running_out_in_outside_loop():
    m = apply_cache(tiny_model(), FORAConfig(schedule=np.ones((2, 4), dtype=bool)))
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([0])
    m(x, torch.tensor([900]), y)
    m(x, torch.tensor([800]), y)
    with pytest.raises(ValueError, match="schedule covers 2 calls"):
        m(x, torch.tensor([700]), y)


@pytest.mark.parametrize("cls, kwargs, match", [
    (ICCConfig, dict(rank=-1), "rank"),
    (ICCConfig, dict(rank="half"), "rank"),
    (FORAConfig, dict(period=0), "period"),
    (FORAConfig, dict(period=2, schedule=np.ones((3, 4))), "not both"),
    (ICCConfig, dict(svd="cd"), "factor file"),
    (ICCConfig, dict(svd="svd"), "unknown svd"),
    (FORAConfig, dict(schedule=np.zeros((3, 4))), "call 0"),
    (FORAConfig, dict(cache_dtype="float8"), "cache_dtype"),
    (NoCacheConfig, dict(period=2), "FORAConfig"),
    (GOCConfig, dict(steps=[0]), "steps"),
    (GOCConfig, dict(weight=float("nan")), "weight"),
    (ForecastConfig, dict(units="seconds"), "units"),
])
def test_bad_config(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(**kwargs)


def test_schedule_with_wrong_layer_count():
    with pytest.raises(ValueError, match="layers"):
        apply_cache(tiny_model(), FORAConfig(schedule=np.ones((STEPS, 3), dtype=bool)))


def test_apply_twice_is_an_error():
    m = apply_cache(tiny_model(), FORAConfig())
    with pytest.raises(ValueError, match="remove_cache"):
        apply_cache(m, FORAConfig())


def test_cache_dtype_and_stats(ref):
    m = apply_cache(tiny_model(), ICCConfig(period=2, rank=4, cache_dtype="bfloat16"))
    out = sample(m, 4, STEPS, cfg_scale=2.0)
    half = m._calicache_engine.stats()
    remove_cache(m)
    m = apply_cache(tiny_model(), ICCConfig(period=2, rank=4))
    sample(m, 4, STEPS, cfg_scale=2.0)
    full = m._calicache_engine.stats()
    assert half["cache_bytes"] * 2 == full["cache_bytes"] > 0
    assert half["cached_ratio"] == 0.5 and half["calls"] == STEPS
    assert rel(out, ref) < 0.05


def test_schedule_file_roundtrip(tmp_path):
    g = np.ones((STEPS, 4), dtype=bool)
    g[1::2, 1] = False
    CacheSchedule.from_matrix(g).save(tmp_path / "s.json")
    np.savez(tmp_path / "s.npz", gather=g)
    a = run(tiny_model(), FORAConfig(schedule=str(tmp_path / "s.json")))
    b = run(tiny_model(), FORAConfig(schedule=str(tmp_path / "s.npz")))
    assert torch.equal(a, b)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="unreadable"):
        FORAConfig(schedule=str(tmp_path / "bad.json"))
