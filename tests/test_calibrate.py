"""ICC calibration: scaled SVD, CA/CD statistics, per-layer ranks under a MACs budget, factor files."""

import numpy as np
import pytest
import torch

import calicache
from calicache import METHODS, FORAConfig, ICCConfig, apply_cache, count_macs, remove_cache, sample
from calicache.adapters import get_adapter
from calicache.cache import get_engine
from calicache.cache.factors import Factors
from calicache.cache.svd import scaled_decomposition, scaled_svd
from calicache.calibration.calibrate import factorize, gather_statistics
from calicache.calibration.ranks import RankCandidate, allocate_ranks, budget_ranks
from calicache.calibration.stats import ChannelStatistics, channel_magnitude, finalise, minmax_normalise
from conftest import rel, tiny_model

STEPS = 10


def fake_data(n: int = 48, size: int = 8, seed: int = 0, classes: int = 4):
    rng = np.random.default_rng(seed)
    # Smooth blobs rather than white noise: nearer to what a trained model sees.
    base = rng.normal(size=(n, size // 2, size // 2))
    img = np.kron(base, np.ones((2, 2)))
    images = np.clip(127.5 + 60 * img, 0, 255).astype(np.uint8)
    return images, rng.integers(0, classes, n)


def specs_of(model):
    return [s for b in get_adapter(model).branches(model) for s in b.linears]


def stats_means(model, kind, seed=0, batch_size=8, num=24):
    st = gather_statistics(model, fake_data(), kind, specs_of(model), num=num, batch_size=batch_size,
                           steps=STEPS, seed=seed)
    return st.means()


# -- scaled SVD ---------------------------------------------------------------------------------
def test_scaled_svd_error_falls_as_rank_rises():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g)
    s_in, s_out = torch.rand(16, generator=g) + 0.1, torch.rand(24, generator=g) + 0.1
    errors = []
    for r in range(17):
        a, b = scaled_svd(w, r, s_in, s_out)
        assert a.shape == (24, r) and b.shape == (r, 16)
        errors.append(float((s_out[:, None] * (w - a @ b) * s_in[None]).norm()))
    assert all(e2 < e1 for e1, e2 in zip(errors, errors[1:]))
    assert errors[-1] < 1e-4 * errors[0]
    with pytest.raises(ValueError, match="outside"):
        scaled_svd(w, 17)


def test_unit_scales_equal_plain_svd():
    w = torch.randn(20, 12, generator=torch.Generator().manual_seed(1))
    for r in (1, 5, 12):
        a0, b0 = scaled_svd(w, r)
        a1, b1 = scaled_svd(w, r, torch.ones(12), torch.ones(20))
        assert torch.allclose(a0 @ b0, a1 @ b1, atol=1e-5)
        # Plain is the Eckart-Young optimum: torch's own truncated SVD.
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        assert torch.allclose(a0 @ b0, u[:, :r] @ torch.diag(s[:r]) @ vh[:r], atol=1e-5)


def test_scaled_svd_in_float64_reproduces_w_under_wide_scales():
    # Scales spanning 1e3 (as CA statistics do): the SVD runs in float64, so unscaling does not
    # amplify float32 rounding; the float32 factors reproduce W to float32 precision.
    g = torch.Generator().manual_seed(2)
    w = torch.randn(96, 64, generator=g)
    s_in = torch.logspace(-3, 0, 64)[torch.randperm(64, generator=g)]
    s_out = torch.logspace(0, 3, 96)[torch.randperm(96, generator=g)]
    a, s, b = scaled_decomposition(w, s_in, s_out)
    assert a.dtype == s.dtype == b.dtype == torch.float32
    assert float((a @ b - w).abs().max()) < 2e-5
    assert float((a.double() @ b.double() - w.double()).abs().max()) < 2e-5


def test_scales_are_validated():
    w = torch.randn(6, 4)
    with pytest.raises(ValueError, match="shapes"):
        scaled_decomposition(w, torch.ones(5))
    with pytest.raises(ValueError, match="finite and positive"):
        scaled_decomposition(w, torch.tensor([1.0, float("nan"), 1.0, 1.0]))


def test_normalisation_as_the_authors():
    m = torch.tensor([[1.0, 3.0, 2.0], [5.0, 5.0, 5.0]])
    n = minmax_normalise(m)
    assert torch.allclose(n[0], torch.tensor([1e-6 / (2 + 1e-6), 1.0, (1 + 1e-6) / (2 + 1e-6)]))
    assert torch.allclose(n[1], torch.ones(3))  # a flat sample weighs every channel equally
    s = finalise(torch.tensor([1.0, 0.25, 0.0], dtype=torch.float64))
    assert torch.allclose(s, torch.tensor([1.0, 0.5, 1e-3]))  # alpha 0.5, clamped at max / 1000


# -- statistics ---------------------------------------------------------------------------------
def test_ca_cd_cf_statistics_finite_positive_deterministic():
    model = tiny_model()
    ca1, ca2 = stats_means(model, "ca"), stats_means(model, "ca")
    cd1, cd2 = stats_means(model, "cd"), stats_means(model, "cd")
    cf1, cf2 = stats_means(model, "cf"), stats_means(model, "cf")
    assert set(ca1) == set(cd1) == set(cf1)
    for key in cf1:
        assert torch.isfinite(cf1[key]).all() and (cf1[key] > 0).all() and (cf1[key] <= 1).all()
        assert torch.equal(cf1[key], cf2[key])
    assert max(rel(cf1[k], cd1[k]) for k in cd1) > 0.05
    # One statistic per (module, side): qkv, proj, fc1, fc2 per block.
    assert {name for name, _ in ca1} == {f"blocks.{i}.{m}" for i in range(2)
                                         for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    for key in ca1:
        for means in (ca1, cd1):
            assert torch.isfinite(means[key]).all() and (means[key] > 0).all() and (means[key] <= 1).all()
        assert torch.equal(ca1[key], ca2[key]) and torch.equal(cd1[key], cd2[key])
    assert max(rel(cd1[k], ca1[k]) for k in ca1) > 0.05
    other = stats_means(model, "cd", seed=1)
    assert any(not torch.equal(other[k], cd1[k]) for k in cd1)


@pytest.mark.parametrize("kind", ["cd", "cf"])
def test_statistics_do_not_depend_on_batching(kind):
    model = tiny_model()
    a, b = stats_means(model, kind, batch_size=24), stats_means(model, kind, batch_size=5)
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("module", ["mlp.fc1", "mlp.fc2", "attn.qkv"])
def test_cf_statistic_is_the_forecast_residual(module):
    """CF records |v_s - (v_f1 + k (v_f1 - v_f0))| per channel, for inputs (fc2's from GELU(fc1)) and outputs."""
    model, k = tiny_model(), 0.7
    seen = []
    linear = model.get_submodule(f"blocks.1.{module}")
    handle = linear.register_forward_hook(lambda m, a, o: seen.append((a[0].detach().clone(), o.detach().clone())))
    stats = ChannelStatistics(model, specs_of(model), "cf", forecast_k=k)
    gen = torch.Generator().manual_seed(0)
    y = torch.tensor([0, 3])
    calls = [torch.randn(2, 1, 8, 8, generator=gen) for _ in range(4)]
    with torch.no_grad(), stats.collect():
        stats.reference()
        model(calls[0], torch.tensor([900, 900]), y)
        stats.idle()
        model(calls[1], torch.tensor([800, 800]), y)
        stats.reference()
        model(calls[2], torch.tensor([700, 700]), y)
        stats.measure()
        model(calls[3], torch.tensor([600, 600]), y)
        stats.end_measure()
    handle.remove()
    (x0, y0), _, (x1, y1), (xs, ys) = seen
    means = stats.means()
    for side, (v0, v1, vs) in (("in", (x0, x1, xs)), ("out", (y0, y1, ys))):
        expect = minmax_normalise(channel_magnitude(vs - (v1 + k * (v1 - v0)))).double().mean(0)
        assert torch.allclose(means[(f"blocks.1.{module}", side)], expect, rtol=1e-5, atol=1e-7), side
    with pytest.raises(RuntimeError, match="CF needs 2"), stats.collect():
        stats.reference()
        model(calls[0], torch.tensor([900, 900]), y)
        stats.measure()
        model(calls[1], torch.tensor([800, 800]), y)


def test_hooks_removed_even_after_an_error():
    model = tiny_model()
    boom = model.blocks[1].mlp.fc2.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        stats_means(model, "cd")
    boom.remove()
    for s in specs_of(model):
        assert not s.module._forward_hooks
    assert not model.training


def test_unlabelled_images_and_scale_sides():
    model = tiny_model()
    images, _ = fake_data()
    f_in = calicache.calibrate(model, (images, None), svd="ca", rank=4, num=16, steps=STEPS, scale="input")
    f_out = calicache.calibrate(model, (images, None), svd="ca", rank=4, num=16, steps=STEPS, scale="output")
    f_both = calicache.calibrate(model, (images, None), svd="ca", rank=4, num=16, steps=STEPS)
    name = "blocks.0.mlp.fc1"
    products = [f.tensors[name][0] @ f.tensors[name][1] for f in (f_in, f_out, f_both)]
    assert rel(products[0], products[1]) > 1e-3 and rel(products[0], products[2]) > 1e-3
    assert f_in.meta["scale"] == "input" and f_out.meta["scale"] == "output"


def test_guided_statistics_cover_both_halves():
    model = tiny_model()
    st = gather_statistics(model, fake_data(), "cd", specs_of(model), num=8, batch_size=4, steps=STEPS, cfg_scale=3.0)
    assert st.count == 16  # conditional and unconditional rows of the doubled batch
    plain = stats_means(model, "cd", num=8, batch_size=4)
    guided = st.means()
    assert all(torch.isfinite(v).all() for v in guided.values())
    assert max(rel(guided[k], plain[k]) for k in plain) > 1e-3


# -- factor files -------------------------------------------------------------------------------
def test_calibrate_is_the_function_and_metadata(tmp_path):
    assert callable(calicache.calibrate) and calicache.calibrate.__name__ == "calibrate"
    model = tiny_model()
    f = calicache.calibrate(model, fake_data(), svd="cd", rank=6, num=16, batch_size=8, steps=STEPS, seed=3)
    path = tmp_path / "f.safetensors"
    f.save(path)
    g = Factors.load(path)
    m = g.meta
    assert m["model_hash"] == calicache.weight_hash(model)
    assert (m["method"], m["svd"], m["scale"], m["num"], m["steps"], m["sampler"], m["spacing"], m["seed"]) == \
        ("icc", "cd", "both", 16, STEPS, "ddim", "adm", 3)
    assert m["data"].startswith("arrays") and set(m["ranks"].values()) == {6}
    for name, (a, b) in f.tensors.items():
        assert torch.equal(a, g.tensors[name][0]) and torch.equal(b, g.tensors[name][1])


def test_truncating_a_file_equals_calibrating_at_the_lower_rank(tmp_path):
    model = tiny_model()
    kw = dict(svd="cd", num=16, batch_size=8, steps=STEPS)
    calicache.calibrate(model, fake_data(), rank=12, **kw).save(tmp_path / "r12.safetensors")
    low = calicache.calibrate(model, fake_data(), rank=5, **kw)
    truncated = Factors.load(tmp_path / "r12.safetensors").select(5)
    for name, (a, b) in low.tensors.items():
        assert torch.allclose(truncated[name][0], a, atol=1e-6) and torch.allclose(truncated[name][1], b, atol=1e-6)


def test_factor_file_errors(tmp_path):
    model = tiny_model()
    path = tmp_path / "f.safetensors"
    calicache.calibrate(model, fake_data(), svd="cd", rank=4, num=8, steps=STEPS).save(path)
    with pytest.raises(ValueError, match="calibrate this model"):
        apply_cache(tiny_model(seed=1), ICCConfig(svd="cd", factors=path))
    with pytest.raises(ValueError, match="higher than the 4 stored"):
        apply_cache(model, ICCConfig(svd="cd", factors=path, rank=5))
    assert get_engine(model) is None
    with pytest.raises(ValueError, match="holds 'cd' factors"):
        apply_cache(model, ICCConfig(svd="ca", factors=path))
    raw = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match="truncated"):
        Factors.load(tmp_path / "cut.safetensors")
    with pytest.raises(FileNotFoundError, match="calicache calibrate"):
        Factors.load(tmp_path / "missing.safetensors")
    # A lower rank is exact truncation and works.
    apply_cache(model, ICCConfig(svd="cd", factors=path, rank=2))
    remove_cache(model)


def test_bad_arguments():
    model = tiny_model()
    with pytest.raises(ValueError, match="needs calibration images"):
        calicache.calibrate(model, None, svd="cd")
    with pytest.raises(ValueError, match="unknown svd"):
        calicache.calibrate(model, svd="cx")
    with pytest.raises(ValueError, match="period must be"):
        calicache.calibrate(model, fake_data(), svd="cf", period=0)
    with pytest.raises(ValueError, match="use sampler='ddim'"):
        calicache.calibrate(model, fake_data(), svd="cf", sampler="ddpm")
    with pytest.raises(ValueError, match="steps must be >= 4"):
        calicache.calibrate(model, fake_data(), svd="cf", num=8, steps=3)
    with pytest.raises(ValueError, match="fewer than num"):
        calicache.calibrate(model, fake_data(n=4), num=8)
    with pytest.raises(ValueError, match="model takes"):
        calicache.calibrate(model, fake_data(size=10), num=4)
    apply_cache(model, FORAConfig())
    with pytest.raises(ValueError, match="remove_cache"):
        calicache.calibrate(model, svd="plain")
    remove_cache(model)


# -- ICC with calibrated factors ----------------------------------------------------------------
@pytest.mark.parametrize("svd, method", [("ca", "icc"), ("cd", "icc"), ("cf", "forecast")])
def test_full_rank_factors_equal_no_cache(tmp_path, svd, method):
    model = tiny_model()
    path = tmp_path / "f.safetensors"
    calicache.calibrate(model, fake_data(), svd=svd, rank="full", num=16, batch_size=8, steps=STEPS).save(path)
    ref = sample(model, 4, STEPS, seed=1)
    apply_cache(model, METHODS[method](svd=svd, factors=path))
    out = sample(model, 4, STEPS, seed=1)
    remove_cache(model)
    assert rel(out, ref) < 1e-5


def test_cd_factors_beat_plain_on_the_difference_weighted_error():
    """CD-SVD is the best rank-r fit under the norm weighted by the differences it saw; plain SVD is not."""
    model = tiny_model()
    means = stats_means(model, "cd")
    cd = calicache.calibrate(model, fake_data(), svd="cd", rank=4, num=24, batch_size=8, steps=STEPS)
    plain = calicache.calibrate(model, svd="plain", rank=4)
    name, module = "blocks.0.mlp.fc1", model.blocks[0].mlp.fc1
    so, si = finalise(means[(name, "out")]), finalise(means[(name, "in")])

    def err(f):
        a, b = f.tensors[name]
        return float((so[:, None] * (module.weight.detach() - a @ b) * si[None]).norm())

    assert err(cd) < 0.99 * err(plain)


# -- per-layer ranks under a budget -------------------------------------------------------------
def test_allocate_ranks_greedy_by_energy_per_mac():
    cands = [RankCandidate("flat", torch.tensor([4.0, 4.0, 4.0]), 10),
             RankCandidate("steep", torch.tensor([9.0, 1.0, 0.1]), 10),
             RankCandidate("dear", torch.tensor([30.0, 1.0]), 100)]
    assert allocate_ranks(cands, 40) == {"flat": 3, "steep": 1, "dear": 0}  # 0.9, 0.4 x3 beat 0.3 per MAC
    assert allocate_ranks(cands, 140) == {"flat": 3, "steep": 1, "dear": 1}
    assert allocate_ranks(cands, 0) == {"flat": 0, "steep": 0, "dear": 0}


def budget_factors(model, fraction: float) -> Factors:
    """Plain-SVD factors at `budget_ranks`' per-linear ranks (the rule benchmarks/rank_allocation.py measures)."""
    branches = get_adapter(model).branches(model)
    specs = [s for b in branches for s in b.linears]
    energies = {s.name: torch.linalg.svdvals(s.weight().detach().float()) ** 2 for s in specs}
    ranks = budget_ranks(model, branches, energies, fraction)
    scales = {s.name: (None, None) for s in specs}
    return Factors(factorize(model, branches, scales, 0, ranks=ranks), {"svd": "plain", "rank": None})


@pytest.mark.parametrize("fraction", [0.45, 0.6, 0.85])
def test_budget_ranks_respect_the_budget(fraction):
    model = tiny_model()
    f = budget_factors(model, fraction)
    macs = count_macs(model, ICCConfig(factors=f), steps=2)
    calibrated, full = macs["per_call"][1], macs["full_call"]
    assert calibrated <= fraction * full
    # Spent up to the last indivisible unit (the largest unit is fc1/fc2: tokens * 5C).
    assert calibrated > fraction * full - 16 * 5 * 32


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="below the"):
        budget_factors(tiny_model(), 0.01)


def test_budget_favours_slowly_decaying_spectra():
    model = tiny_model()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for i, decay in ((0, 0.97), (1, 0.6)):  # block 0: nearly flat spectrum, block 1: fast decay
            fc1 = model.blocks[i].mlp.fc1
            u, _ = torch.linalg.qr(torch.randn(fc1.out_features, 32, generator=g))
            v, _ = torch.linalg.qr(torch.randn(fc1.in_features, 32, generator=g))
            s = decay ** torch.arange(32.0)
            s = s / s.norm() * 20.0  # equal Frobenius norm: only the decay differs
            fc1.weight.copy_(u @ torch.diag(s) @ v.T)
    ranks = budget_factors(model, 0.6).ranks()
    assert ranks["blocks.0.mlp.fc1"] > ranks["blocks.1.mlp.fc1"] + 4


def test_icc_with_unequal_qkv_ranks_takes_the_loop_and_is_right():
    model = tiny_model()
    full = calicache.calibrate(model, fake_data(), svd="cd", num=16, batch_size=8, steps=STEPS, rank=8)
    cut = {"q": 2, "k": 3, "v": 5}  # unequal ranks for q, k and v of every block
    f = Factors({n: (a[:, :cut.get(n.rsplit(".", 1)[1], 4)], b[:cut.get(n.rsplit(".", 1)[1], 4)])
                 for n, (a, b) in full.tensors.items()}, full.meta)
    ranks = f.ranks()
    apply_cache(model, ICCConfig(svd="cd", factors=f))
    lin = next(c for c in get_engine(model).method.linears if len(c.specs) == 3)
    qkv = [ranks[s.name] for s in lin.specs]
    assert len(set(qkv)) > 1, qkv
    x, x_ref = torch.randn(2, 10, lin.module.in_features).unbind()
    y_ref = torch.randn(10, lin.module.out_features)
    dx = x - x_ref
    expected = y_ref + torch.cat([dx @ f.tensors[s.name][1].T @ f.tensors[s.name][0].T for s in lin.specs], dim=-1)
    lin.last = (lin.project(x_ref), y_ref)
    assert torch.allclose(lin.cached(x), expected, atol=1e-5)
    x = sample(model, 2, STEPS, seed=0)
    remove_cache(model)
    assert torch.isfinite(x).all()


# -- data ---------------------------------------------------------------------------------------
def test_npz_spec(tmp_path):
    images, labels = fake_data()
    np.savez(tmp_path / "d.npz", images, labels)
    model = tiny_model()
    f = calicache.calibrate(model, str(tmp_path / "d.npz"), svd="ca", rank=3, num=8, steps=STEPS)
    same = calicache.calibrate(model, (images, labels), svd="ca", rank=3, num=8, steps=STEPS)
    assert f.meta["data"] == str(tmp_path / "d.npz")
    assert all(torch.equal(f.tensors[k][0], same.tensors[k][0]) for k in f.tensors)


def test_fashion_mnist_spec():
    from calicache.data.fashion_mnist import DEFAULT_DIR

    try:
        from calicache.data.fashion_mnist import load_fashion_mnist

        load_fashion_mnist("train")
    except FileNotFoundError:
        pytest.skip(f"Fashion-MNIST is not installed in {DEFAULT_DIR}")
    model = tiny_model(input_size=28, patch_size=7, num_classes=10)
    f = calicache.calibrate(model, "fashion-mnist", svd="cd", rank=4, num=8, steps=STEPS)
    assert f.meta["data"] == "fashion-mnist" and f.meta["num"] == 8
