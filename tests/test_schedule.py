"""Respacing conventions ("adm" vs "leading") and the respaced schedule's coefficients."""

import numpy as np
import pytest
import torch

from calicache.diffusion.schedule import Schedule, linear_betas, respaced_timesteps


def adm_space_timesteps(num_timesteps: int, count: int) -> list[int]:
    """ADM's space_timesteps rule for one section, written from its definition: a float cursor
    starts at 0 and advances by (T - 1) / (count - 1) (stride 1 for one step); each kept step is
    the cursor rounded half to even (Python's round)."""
    stride = 1.0 if count <= 1 else (num_timesteps - 1) / (count - 1)
    kept, cursor = [], 0.0
    while len(kept) < count:
        kept.append(round(cursor))
        cursor += stride
    return sorted(set(kept))


def test_adm_spacing_for_20_steps_is_0_53_to_999():
    kept = respaced_timesteps(20, "adm")
    assert kept[:4] == [0, 53, 105, 158] and kept[-1] == 999 and len(kept) == 20
    assert kept == adm_space_timesteps(1000, 20)


@pytest.mark.parametrize("steps", [1, 2, 3, 7, 10, 25, 50, 100, 250, 999, 1000])
def test_adm_spacing_matches_adm_rule(steps):
    kept = respaced_timesteps(steps, "adm")
    assert kept == adm_space_timesteps(1000, steps)
    assert kept[0] == 0 and (steps == 1 or kept[-1] == 999)


def test_leading_spacing_for_20_steps_is_0_50_to_950():
    assert respaced_timesteps(20, "leading") == list(range(0, 1000, 50))


@pytest.mark.parametrize("steps", [7, 20, 30, 50, 300])
def test_leading_spacing_matches_diffusers_ddim_scheduler(steps):
    diffusers = pytest.importorskip("diffusers")
    ref = diffusers.DDIMScheduler(num_train_timesteps=1000, timestep_spacing="leading")
    ref.set_timesteps(steps)
    assert respaced_timesteps(steps, "leading") == sorted(ref.timesteps.tolist())


@pytest.mark.parametrize("steps", [0, -3, 1001, 2.5, "20", None])
def test_bad_steps_raise(steps):
    with pytest.raises(ValueError, match="steps"):
        respaced_timesteps(steps, "adm")


def test_bad_spacing_raises_and_names_the_choices():
    with pytest.raises(ValueError, match=r"unknown spacing 'trailing'.*adm.*leading"):
        respaced_timesteps(20, "trailing")
    with pytest.raises(ValueError, match="unknown spacing"):
        Schedule.create(20, "linspace")


def test_respaced_schedule_coefficients():
    full = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    assert np.array_equal(linear_betas(), np.linspace(1e-4, 0.02, 1000))
    s = Schedule.create(20, "adm")
    assert len(s) == 20 and s.timesteps.tolist() == respaced_timesteps(20, "adm")
    np.testing.assert_allclose(s.alphas_cumprod, full[s.timesteps], rtol=1e-12)
    # The respaced betas reproduce the kept alpha-bars: prod(1 - beta) up to step i = abar_i.
    np.testing.assert_allclose(np.cumprod(1 - s.betas), s.alphas_cumprod, rtol=1e-10)
    assert s.alphas_cumprod_prev[0] == 1.0
    np.testing.assert_allclose(s.alphas_cumprod_prev[1:], full[s.timesteps[:-1]], rtol=1e-12)
    # Posterior variance of q(x_{i-1} | x_i, x_0); its log is clipped at step 0 (where it is 0).
    pv = s.betas * (1 - s.alphas_cumprod_prev) / (1 - s.alphas_cumprod)
    assert pv[0] == 0
    np.testing.assert_allclose(s.posterior_log_variance_clipped[1:], np.log(pv[1:]), rtol=1e-12)
    assert s.posterior_log_variance_clipped[0] == np.log(pv[1])
    # No respacing keeps all 1000 steps and the original betas.
    base = Schedule.create(None)
    assert len(base) == 1000
    np.testing.assert_allclose(base.betas, linear_betas(), rtol=1e-9)


def test_q_sample_is_the_forward_process():
    s = Schedule.create(10)
    x0, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    idx = torch.tensor([0, 4, 9])
    z = s.q_sample(x0, idx, noise)
    for n, i in enumerate(idx.tolist()):
        a = float(s.alphas_cumprod[i])
        torch.testing.assert_close(z[n], a**0.5 * x0[n] + (1 - a) ** 0.5 * noise[n])
