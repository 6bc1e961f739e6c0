"""`sample()`, the DDIM/DDPM samplers and classifier-free guidance on tiny random DiTs."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from calicache.diffusion.guidance import guided_model_fn
from calicache.diffusion.samplers import ddim, ddpm
from calicache.diffusion.schedule import Schedule, respaced_timesteps
from calicache.sampling import sample, sample_generator
from conftest import tiny_model

STEPS = 6
SETTINGS = [("ddim", 1.0), ("ddim", 2.5), ("ddpm", 1.0), ("ddpm", 2.5)]


class Recorder(nn.Module):
    """Passes calls through to a DiT and records (batch size, t, y) of every call."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], t.clone(), y.clone()))
        return self.inner(x, t, y)


def _base_abar() -> np.ndarray:
    """DiT's alpha-bar from its definition: linear betas 1e-4..0.02 over 1000 steps, float64."""
    return np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))


@pytest.mark.parametrize(("sampler", "cfg"), SETTINGS)
def test_sampling_is_deterministic(model, sampler, cfg):
    a = sample(model, 3, STEPS, sampler=sampler, cfg_scale=cfg, seed=5)
    b = sample(model, 3, STEPS, sampler=sampler, cfg_scale=cfg, seed=5)
    assert a.shape == (3, 1, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, sample(model, 3, STEPS, sampler=sampler, cfg_scale=cfg, seed=6))


@pytest.mark.parametrize(("sampler", "cfg"), SETTINGS)
def test_batch_size_does_not_change_the_samples(model, sampler, cfg):
    whole = sample(model, 5, STEPS, sampler=sampler, cfg_scale=cfg, seed=1)
    # A random model's trajectories grow to |x| ~ 100s; float32 rounding scales with that size.
    atol = 1e-6 * max(1.0, whole.abs().max().item())
    for bs in (1, 2, 3):
        parts = sample(model, 5, STEPS, sampler=sampler, cfg_scale=cfg, seed=1, batch_size=bs)
        torch.testing.assert_close(parts, whole, atol=atol, rtol=1e-5)
        assert torch.equal(parts, sample(model, 5, STEPS, sampler=sampler, cfg_scale=cfg, seed=1, batch_size=bs))


@pytest.mark.parametrize(("sampler", "cfg"), SETTINGS)
def test_sample_i_depends_only_on_seed_and_index(model, sampler, cfg):
    six = sample(model, 6, STEPS, sampler=sampler, cfg_scale=cfg, seed=3, batch_size=3)
    three = sample(model, 3, STEPS, sampler=sampler, cfg_scale=cfg, seed=3, batch_size=3)
    assert torch.equal(three, six[:3])  # the same first batch: bit-exact
    torch.testing.assert_close(sample(model, 3, STEPS, sampler=sampler, cfg_scale=cfg, seed=3), six[:3],
                               atol=1e-6 * max(1.0, six.abs().max().item()), rtol=1e-5)


def test_explicit_noise_is_the_starting_point(model):
    shape = (1, 8, 8)
    seeded = torch.stack([torch.randn(shape, generator=sample_generator(4, i)) for i in range(3)])
    assert torch.equal(sample(model, 3, STEPS, seed=4), sample(model, 3, STEPS, noise=seeded))
    other = torch.randn(3, *shape, generator=torch.Generator().manual_seed(99))
    with_other = sample(model, 3, STEPS, noise=other, seed=4)
    assert not torch.allclose(with_other, sample(model, 3, STEPS, seed=4))
    # Deterministic DDIM then ignores the seed entirely.
    assert torch.equal(with_other, sample(model, 3, STEPS, noise=other, seed=123))
    with pytest.raises(ValueError, match=r"noise has shape \(2, 1, 8, 8\); expected \(3, 1, 8, 8\)"):
        sample(model, 3, STEPS, noise=other[:2])
    with pytest.raises(ValueError, match="NaN"):
        sample(model, 3, STEPS, noise=other.index_fill(0, torch.tensor([1]), float("nan")))


def _labels_seen(model, **kwargs) -> list[int]:
    rec = Recorder(model)
    sample(rec, 6, 2, **kwargs)
    return rec.calls[0][2].tolist()


def test_classes_default_list_int_and_errors(model):
    assert _labels_seen(model) == [0, 1, 2, 3, 0, 1]  # index % num_classes (4)
    assert _labels_seen(model, classes=[2, 3]) == [2, 3, 2, 3, 2, 3]  # repeated over the samples
    assert _labels_seen(model, classes=[3, 2, 1, 0, 1, 2]) == [3, 2, 1, 0, 1, 2]
    assert _labels_seen(model, classes=1) == [1] * 6
    assert _labels_seen(model, classes=np.int64(2)) == [2] * 6
    # With guidance the second half of the doubled batch is the null class (index num_classes).
    assert _labels_seen(model, classes=[2, 3], cfg_scale=2.0) == [2, 3, 2, 3, 2, 3] + [4] * 6
    for bad in (4, [0, 4], -1):
        with pytest.raises(ValueError, match=r"class labels \[-?\d\] are outside 0\.\.3"):
            sample(model, 6, 2, classes=bad)
    with pytest.raises(ValueError, match="classes is empty"):
        sample(model, 6, 2, classes=[])


def test_bad_arguments_are_clear_errors(model):
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        sample(model, 2, 4, sampler="euler")
    with pytest.raises(ValueError, match="num must be >= 1"):
        sample(model, 0, 4)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        sample(model, 2, 4, batch_size=-1)
    with pytest.raises(ValueError, match="cfg_scale must be >= 1"):
        sample(model, 2, 4, cfg_scale=0.5)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        sample(model, 2, 0)
    with pytest.raises(ValueError, match="unknown spacing"):
        sample(model, 2, 4, spacing="trailing")
    no_null = tiny_model(class_dropout_prob=0.0)
    with pytest.raises(ValueError, match="no null class .* cfg_scale=1"):
        sample(no_null, 2, 4, cfg_scale=2.0)
    assert sample(no_null, 2, 4).shape == (2, 1, 8, 8)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_model_calls_and_batch_doubling(model, sampler):
    rec = Recorder(model)
    sample(rec, 5, STEPS, sampler=sampler, batch_size=2)
    assert [n for n, _, _ in rec.calls] == [2] * STEPS + [2] * STEPS + [1] * STEPS  # no doubling at cfg 1
    kept = respaced_timesteps(STEPS, "adm")
    assert [int(t[0]) for _, t, _ in rec.calls[:STEPS]] == kept[::-1]  # noisiest first, down to t = 0
    rec.calls.clear()
    sample(rec, 5, STEPS, sampler=sampler, batch_size=2, cfg_scale=4.0)
    assert [n for n, _, _ in rec.calls] == [4] * STEPS + [4] * STEPS + [2] * STEPS  # one doubled call per step


def test_cfg_channels_guide_only_the_first_k_channels():
    model = tiny_model(in_channels=3)
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([400, 400])
    y = torch.tensor([1, 2])
    s = 3.0
    with torch.no_grad():
        cond = model(x, t, y)
        uncond = model(x, t, torch.full_like(y, 4))
        for k in (1, 2, 3):
            expected = cond.clone()
            expected[:, :k] = uncond[:, :k] + s * (cond[:, :k] - uncond[:, :k])
            got = guided_model_fn(model, y, 4, s, cfg_channels=k)(x, t)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        unguided = guided_model_fn(model, y, 4, 1.0, cfg_channels=2)(x, t)
        assert torch.equal(unguided, cond)
        default = guided_model_fn(model, y, 4, s)(x, t)
        assert torch.equal(default, guided_model_fn(model, y, 4, s, cfg_channels=3)(x, t))
    all3 = sample(model, 2, 4, cfg_scale=s)
    assert torch.equal(all3, sample(model, 2, 4, cfg_scale=s, cfg_channels=3))
    assert not torch.allclose(all3, sample(model, 2, 4, cfg_scale=s, cfg_channels=1))
    for bad in (0, 4):  # 4 would guide a variance channel
        with pytest.raises(ValueError, match=r"cfg_channels must be between 1 and the 3 eps channels"):
            sample(model, 2, 4, cfg_scale=s, cfg_channels=bad)


def _recorded_run(model, sampler, steps, **opts):
    """Run a sampler and keep every model input/output and every noise draw."""
    inputs, outputs, noises = [], [], []
    fn = guided_model_fn(model, torch.tensor([0, 3]), 4, 2.0)
    gen = torch.Generator().manual_seed(0)

    def model_fn(x, t):
        out = fn(x, t)
        inputs.append((x.clone(), int(t[0])))
        outputs.append(out.clone())
        return out

    def noise_fn(like):
        noises.append(torch.randn(like.shape, generator=gen))
        return noises[-1]

    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        final = sampler(model_fn, x_T, Schedule.create(steps, "adm"), noise_fn=noise_fn, **opts)
    return inputs, outputs, noises, final


def test_ddpm_learned_range_step_matches_manual_computation(model):
    inputs, outputs, noises, final = _recorded_run(model, ddpm, 5)
    kept = respaced_timesteps(5, "adm")
    assert [t for _, t in inputs] == kept[::-1] and len(noises) == 4  # no noise after the last step
    abar = _base_abar()
    for i in (0, 2):  # the first step and one in the middle
        x, t = inputs[i][0].double(), inputs[i][1]
        t_prev = kept[len(kept) - 2 - i]
        eps, v = outputs[i][:, :1].double(), outputs[i][:, 1:].double()
        a, ap = abar[t], abar[t_prev]
        beta = 1 - a / ap  # the respaced beta between the two kept steps
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        mean = beta * math.sqrt(ap) / (1 - a) * x0 + (1 - ap) * math.sqrt(1 - beta) / (1 - a) * x
        frac = (v + 1) / 2
        log_var = frac * math.log(beta) + (1 - frac) * math.log(beta * (1 - ap) / (1 - a))
        expected = mean + torch.exp(0.5 * log_var) * noises[i].double()
        torch.testing.assert_close(inputs[i + 1][0].double(), expected, atol=2e-5, rtol=1e-5)
    # The last step (t = 0) returns the posterior mean, which is the predicted x0 there.
    x, eps = inputs[-1][0].double(), outputs[-1][:, :1].double()
    a = abar[0]
    torch.testing.assert_close(final.double(), (x - math.sqrt(1 - a) * eps) / math.sqrt(a), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_step_matches_manual_computation(model, eta):
    inputs, outputs, noises, _ = _recorded_run(model, ddim, 5, eta=eta)
    kept = respaced_timesteps(5, "adm")
    assert len(noises) == (4 if eta else 0)
    abar = _base_abar()
    x, t = inputs[1][0].double(), inputs[1][1]
    a, ap = abar[t], abar[kept[-3]]
    eps = outputs[1][:, :1].double()
    x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
    sigma = eta * math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
    expected = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps
    if eta:
        expected = expected + sigma * noises[1].double()
    torch.testing.assert_close(inputs[2][0].double(), expected, atol=2e-5, rtol=1e-5)


def test_ddim_with_eta_needs_noise_and_ddpm_needs_noise(model):
    fn = guided_model_fn(model, torch.tensor([0]), 4)
    x = torch.randn(1, 1, 8, 8)
    with pytest.raises(ValueError, match="eta > 0 needs a noise_fn"):
        ddim(fn, x, Schedule.create(3), eta=0.5)
    with pytest.raises(ValueError, match="DDPM needs a noise_fn"):
        ddpm(fn, x, Schedule.create(3))


def test_ddim_leading_matches_diffusers_ddim_scheduler(model):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                                  clip_sample=False, set_alpha_to_one=True, timestep_spacing="leading")
    ref.set_timesteps(10)
    fn = guided_model_fn(model, torch.tensor([1, 2]), 4, 3.0)
    x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = ddim(fn, x_T, Schedule.create(10, "leading"))
        x = x_T
        for t in ref.timesteps:
            eps = fn(x, t.expand(2))[:, :1]
            x = ref.step(eps, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_sampling_uses_eval_mode_and_restores_training_mode(model):
    expected = sample(model, 4, 3, cfg_scale=2.0)
    model.train()  # in training mode label dropout would randomly replace classes
    got = sample(model, 4, 3, cfg_scale=2.0)
    assert model.training
    assert torch.equal(got, expected)
