"""The cached hot path: identities of the rank-space references, no device sync inside a model
call, and torch.compile over a cached model."""

import pytest
import torch

from calicache import apply_cache, config_from_dict, remove_cache, sample
from calicache.cache import get_engine
from conftest import tiny_model

STEPS = 6
METHODS = {
    "none": dict(method="none"),
    "fora": dict(method="fora", period=2),
    "icc": dict(method="icc", period=2, rank=4),
    "forecast": dict(method="forecast", period=2, rank=4),
    "forecast-timesteps": dict(method="forecast", period=3, rank=4, units="timesteps"),
    "goc": dict(method="goc", period=2, steps=[3, 5]),
}


def run(model, config, steps=STEPS):
    apply_cache(model, config_from_dict(config))
    try:
        return sample(model, 2, steps, cfg_scale=2.0)
    finally:
        remove_cache(model)


def rel(a, b):
    return float((a - b).norm() / b.norm())


# -- rank-space references ----------------------------------------------------------------------
def test_cached_linear_is_y_ref_plus_low_rank_increment():
    """y_ref + A (B x - z_ref) == y_ref + A B (x - x_ref), the paper's form, for fused q, k, v."""
    m = apply_cache(tiny_model(), config_from_dict(dict(method="icc", period=2, rank=5)))
    lin = next(c for c in get_engine(m).method.linears if len(c.specs) == 3)
    x, x_ref = torch.randn(2, 7, lin.module.in_features).unbind()
    with torch.no_grad():
        y_ref = lin.module(x_ref)
    lin.last = lin.reference(x_ref, y_ref)
    a = torch.block_diag(*[lin.a_t[i].t() for i in range(3)])  # (3C, 3r)
    expected = y_ref + (x - x_ref) @ lin.b.t() @ a.t()
    assert torch.allclose(lin.cached(x), expected, atol=1e-5)
    assert lin.cache_bytes() == 7 * (15 + lin.module.out_features) * 4  # z (M, 3r) and y (M, 3C): no input


def test_b_pass_is_one_matmul_into_a_transposed_view():
    """B x is computed as (B x^T)^T: the (M, R) result is the transpose of a contiguous (R, M) matmul
    output (no copy made to lay it out row-major), equal to x B^T."""
    m = apply_cache(tiny_model(), config_from_dict(dict(method="icc", period=2, rank=5)))
    for lin in get_engine(m).method.linears:
        x = torch.randn(2, 7, lin.module.in_features)
        z = lin.project(x)
        assert z.shape == (14, lin.rank_total) and z.stride() == (1, 14) and z.t().is_contiguous()
        x2 = x.reshape(14, -1)
        scale = (x2.abs() @ lin.b.abs().t()).max()  # rounding of either summation order is relative to this
        assert ((z - x2 @ lin.b.t()).abs().max() <= 1e-5 * scale)


def test_identities_on_the_rank_space_path():
    m = tiny_model()
    ref = run(m, METHODS["none"])
    all_full = dict(method="icc", schedule={"gather": [[1] * 4] * STEPS}, rank=3)
    assert torch.equal(run(m, all_full), ref)
    assert torch.equal(run(m, {**all_full, "method": "forecast"}), ref)
    for method in ("icc", "forecast"):
        assert rel(run(m, dict(method=method, period=2, rank="full")), ref) < 1e-5
    assert torch.equal(run(m, dict(method="icc", period=2, rank=0)), run(m, METHODS["fora"]))


def test_cache_holds_no_inputs():
    """Per DiT block and token: y of qkv, proj, fc1, fc2 (9C) and z = B x (6r): no input copies."""
    c, r = 32, 3
    m = apply_cache(tiny_model(), config_from_dict(dict(method="icc", period=2, rank=r)))
    sample(m, 2, STEPS, cfg_scale=2.0)
    tokens = 2 * 2 * 16  # 2 samples, doubled by guidance, 16 tokens each
    assert get_engine(m).stats()["cache_bytes"] == 2 * tokens * (9 * c + 6 * r) * 4


# -- no device sync inside a model call --------------------------------------------------------
SYNCS = [(torch.Tensor, "item"), (torch.Tensor, "__bool__"), (torch.Tensor, "__float__"),
         (torch.Tensor, "__int__"), (torch.Tensor, "tolist"), (torch, "equal")]


@pytest.fixture
def sync_detector(monkeypatch):
    """Inside a model call (from the model's pre-hook to its hook) every host read of a tensor raises."""
    inside = {"depth": 0}

    def guard(name, fn):
        def guarded(*args, **kwargs):
            if inside["depth"]:
                raise AssertionError(f"device sync inside a model call: {name}")
            return fn(*args, **kwargs)

        return guarded

    for owner, name in SYNCS:
        monkeypatch.setattr(owner, name, guard(name, getattr(owner, name)))

    def watch(model):
        def enter(*_):
            inside["depth"] += 1

        def leave(*_):
            inside["depth"] -= 1

        model.register_forward_pre_hook(enter)
        model.register_forward_hook(leave)
        return model

    return watch


@pytest.mark.parametrize("name", list(METHODS))
def test_sampling_makes_no_sync_inside_model_calls(name, sync_detector):
    expected = run(tiny_model(), METHODS[name])
    m = sync_detector(tiny_model())
    assert torch.equal(run(m, METHODS[name]), expected)


def test_sync_detector_catches_the_bare_modules_read(sync_detector):
    """Outside an explicit run the engine reads the timestep once per call: the detector sees it."""
    m = sync_detector(apply_cache(tiny_model(), config_from_dict(METHODS["fora"])))
    with pytest.raises(AssertionError, match="tolist"):
        m(torch.randn(1, 1, 8, 8), torch.tensor([10]), torch.tensor([0]))


def test_nan_found_once_per_run_outside_the_model():
    m = tiny_model()
    with torch.no_grad():
        m.final_layer.linear.bias.fill_(float("nan"))
    with pytest.raises(ValueError, match="NaN or infinite values") as e:
        run(m, METHODS["icc"])
    assert "at step 0" in str(e.value.__cause__)  # the per-run check found it; sample() names the likely source
    assert "the model's weights contain NaN" in str(e.value)


def test_a_call_beyond_the_declared_run_is_an_error():
    """The declared last call writes into its references; one more call must not meet them."""
    from calicache.cache import cache_run

    m = apply_cache(tiny_model(), config_from_dict(METHODS["icc"]))
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([0])
    with torch.no_grad(), cache_run(m, 2):
        m(x, torch.tensor([900]), y)
        m(x, torch.tensor([800]), y)
        with pytest.raises(RuntimeError, match="declared with 2 model calls"):
            m(x, torch.tensor([700]), y)


def test_timestep_forecast_needs_timesteps_in_a_bare_run():
    from calicache.cache import cache_run

    m = apply_cache(tiny_model(), config_from_dict(METHODS["forecast-timesteps"]))
    with torch.no_grad(), cache_run(m, 2), pytest.raises(ValueError, match="timesteps"):
        m(torch.randn(1, 1, 8, 8), torch.tensor([10]), torch.tensor([0]))


# -- torch.compile ------------------------------------------------------------------------------
# Graphs per run: one per kind of call. None has one kind; every method two (full, cached): the
# forecast's first cached call (one full call so far) and GOC's calls with and without compensation
# differ only in the values of tensors, and a cached call that consumes its references (period 3:
# the second of two) is traced as one that does not.
GRAPHS = {name: 1 if name == "none" else 2 for name in METHODS}


@pytest.mark.parametrize("name", list(GRAPHS))
def test_compiled_equals_eager(name):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    m = tiny_model(depth=1)
    eager = run(m, METHODS[name])
    apply_cache(m, config_from_dict(METHODS[name]))
    compiled = torch.compile(m, backend="aot_eager")
    a = sample(compiled, 2, STEPS, cfg_scale=2.0)
    graphs = counters["stats"]["unique_graphs"]
    b = sample(compiled, 2, STEPS, cfg_scale=2.0)  # a second run compiles nothing new
    remove_cache(m)
    assert rel(a, eager) < 1e-5 and torch.equal(a, b)
    assert graphs == counters["stats"]["unique_graphs"] <= GRAPHS[name]
