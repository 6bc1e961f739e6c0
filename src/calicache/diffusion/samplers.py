"""Samplers: plain functions over `model_fn(x, t) -> model output`; they know nothing of caching.

Every sampler has the signature `(model_fn, x, schedule, noise_fn=None, progress=False,
clip_denoised=False, **opts)` and calls `model_fn` once per step, from the noisiest kept step down
to step 0. `noise_fn(x)` returns fresh Gaussian noise shaped like x (per-sample generators live
with the caller). `clip_denoised` clamps each x0 prediction to [-1, 1] as ADM does for pixel-space
models (DiT's latent models sample without it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedule import Schedule

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def _coef(values, i: int, x: torch.Tensor) -> torch.Tensor:
    """A schedule value as a 0-dim float64 CPU tensor.

    Coefficient arithmetic then runs in double precision, as ADM's numpy tables do: near t = 0,
    1 - abar is ~1e-4 and float32 loses 3 digits there (DDPM's last step shrank images by 1.7e-4).
    A 0-dim CPU tensor combines with `x` on any device and keeps x's dtype.
    """
    return torch.tensor(float(values[i]), dtype=torch.float64)


def _split_output(out: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    if out.shape[1] == 2 * channels:
        return out[:, :channels], out[:, channels:]
    if out.shape[1] == channels:
        return out, None
    raise ValueError(f"model output has {out.shape[1]} channels; expected {channels} or {2 * channels}")


def _steps(schedule: Schedule, progress: bool, desc: str):
    return tqdm(list(reversed(range(len(schedule)))), desc=desc, disable=not progress, leave=False)


def _x0(x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, clip: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 predicted from eps; with clipping, x0 is clamped and eps re-derived from it (ADM)."""
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    if not clip:
        return x0, eps
    x0 = x0.clamp(-1, 1)
    return x0, (x - a.sqrt() * x0) / (1 - a).sqrt()


def _timestep(schedule: Schedule, i: int, x: torch.Tensor) -> torch.Tensor:
    return torch.full((x.shape[0],), int(schedule.timesteps[i]), device=x.device, dtype=torch.long)


def ddim_step(x: torch.Tensor, eps: torch.Tensor, a: torch.Tensor, a_prev: torch.Tensor,
              clip_denoised: bool = False, sigma: torch.Tensor | float = 0.0) -> torch.Tensor:
    """One DDIM update from abar `a` to `a_prev` without its noise term (Song et al. 2021, Eq. 12);
    `a`, `a_prev` and `sigma` broadcast against x (scalars, or per sample (N, 1, 1, 1))."""
    x0, eps = _x0(x, eps, a, clip_denoised)
    return a_prev.sqrt() * x0 + (1 - a_prev - sigma**2).sqrt() * eps


def ddim(
    model_fn: ModelFn,
    x: torch.Tensor,
    schedule: Schedule,
    noise_fn: NoiseFn | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
    eta: float = 0.0,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, arXiv 2010.02502), as ADM's ddim_sample_loop."""
    if eta > 0 and noise_fn is None:
        raise ValueError("DDIM with eta > 0 needs a noise_fn")
    abar, abar_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    for i in _steps(schedule, progress, "ddim"):
        eps, _ = _split_output(model_fn(x, _timestep(schedule, i, x)), x.shape[1])
        a, ap = _coef(abar, i, x), _coef(abar_prev, i, x)
        sigma = eta * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()
        x = ddim_step(x, eps, a, ap, clip_denoised, sigma)
        if eta > 0 and i > 0:
            x = x + sigma * noise_fn(x)
    return x


def ddpm(
    model_fn: ModelFn,
    x: torch.Tensor,
    schedule: Schedule,
    noise_fn: NoiseFn | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020) with ADM's learned-range variance (Nichol & Dhariwal 2021)."""
    if noise_fn is None:
        raise ValueError("DDPM needs a noise_fn")
    abar, abar_prev, betas = schedule.alphas_cumprod, schedule.alphas_cumprod_prev, schedule.betas
    min_logs = schedule.posterior_log_variance_clipped
    for i in _steps(schedule, progress, "ddpm"):
        eps, v = _split_output(model_fn(x, _timestep(schedule, i, x)), x.shape[1])
        a, ap, b = _coef(abar, i, x), _coef(abar_prev, i, x), _coef(betas, i, x)
        x0, _ = _x0(x, eps, a, clip_denoised)
        mean = b * ap.sqrt() / (1 - a) * x0 + (1 - ap) * (1 - b).sqrt() / (1 - a) * x
        if i == 0:
            x = mean
            continue
        min_log, max_log = _coef(min_logs, i, x), b.log()
        if v is None:
            log_var = max_log
        else:
            frac = (v + 1) / 2
            log_var = frac * max_log + (1 - frac) * min_log
        x = mean + (0.5 * log_var).exp() * noise_fn(x)
    return x


def dpmpp_2m(
    model_fn: ModelFn,
    x: torch.Tensor,
    schedule: Schedule,
    noise_fn: NoiseFn | None = None,
    progress: bool = False,
    clip_denoised: bool = False,
) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Alg. 2): multistep, data prediction from eps.

    One model call per step. The first step is first order (no history yet); the last step goes to
    x_0 (sigma = 0), where the second-order correction is undefined (h is infinite), so it is first
    order and returns the data prediction, as diffusers' DPMSolverMultistepScheduler does with its
    default final_sigmas_type="zero". `noise_fn` is unused (the solver is deterministic).
    """
    abar, abar_prev = schedule.alphas_cumprod, schedule.alphas_cumprod_prev
    alpha, sigma = np.sqrt(abar), np.sqrt(1.0 - abar)
    alpha_prev, sigma_prev = np.sqrt(abar_prev), np.sqrt(1.0 - abar_prev)
    lam = np.log(alpha) - np.log(sigma)  # half log-SNR; grows as i decreases
    # h[i]: log-SNR step from index i to i - 1; the step to x_0 (i = 0, sigma = 0) is infinite.
    h = np.append(np.inf, lam[:-1] - lam[1:])
    x0_prev = None
    for i in _steps(schedule, progress, "dpm++2m"):
        eps, _ = _split_output(model_fn(x, _timestep(schedule, i, x)), x.shape[1])
        x0 = (x - _coef(sigma, i, x) * eps) / _coef(alpha, i, x)
        if clip_denoised:
            x0 = x0.clamp(-1, 1)
        d = x0
        if x0_prev is not None and i > 0:
            r = h[i + 1] / h[i]
            d = x0 + (x0 - x0_prev) / (2 * r)  # (1 + 1/2r) x0_i - (1/2r) x0_{i+1}
        # At i = 0 the coefficients are 0 and 1: the result is exactly the data prediction.
        x = _coef(sigma_prev / sigma, i, x) * x - _coef(alpha_prev * np.expm1(-h), i, x) * d
        x0_prev = x0
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {"ddim": ddim, "ddpm": ddpm, "dpmpp_2m": dpmpp_2m}
