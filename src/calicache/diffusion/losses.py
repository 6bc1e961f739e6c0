"""DiT's training objective: epsilon MSE plus the variational bound term for the learned variance
(Nichol & Dhariwal 2021, "hybrid" loss with the mean frozen inside the bound term), with an
optional min-SNR-gamma weighting of the MSE term (Hang et al. 2023, "Efficient Diffusion Training
via Min-SNR Weighting Strategy")."""

from __future__ import annotations

import math

import numpy as np
import torch

from .schedule import Schedule


def _normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def _discretized_gaussian_log_likelihood(x, means, log_scales) -> torch.Tensor:
    """Log-likelihood of 8-bit data in [-1, 1] under a Gaussian discretised to 256 bins."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _take(arr: np.ndarray, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    out = torch.from_numpy(arr).to(like.device)[t].float()
    return out.view(-1, *([1] * (like.dim() - 1)))


LOSS_WEIGHTINGS = ("uniform", "min-snr")


def min_snr_weight(schedule: Schedule, t: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma weight of the eps-MSE at timestep indices `t`: min(SNR, gamma) / SNR, SNR = abar / (1 - abar).

    For eps prediction this equals an x0-MSE weighted by min(SNR, gamma) (Hang et al. 2023, Eq. 9):
    1 at high noise (SNR <= gamma), gamma / SNR at low noise, where the easy steps would
    otherwise pull the shared weights their way.
    """
    if gamma <= 0:
        raise ValueError(f"min-SNR gamma must be > 0, got {gamma}")
    abar = torch.as_tensor(schedule.alphas_cumprod, dtype=torch.float64)[t.cpu()]
    snr = abar / (1.0 - abar)
    return (snr.clamp(max=gamma) / snr).to(torch.float32).to(t.device)


def training_loss(model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                  noise: torch.Tensor, schedule: Schedule, weighting: str = "uniform",
                  snr_gamma: float = 5.0) -> torch.Tensor:
    """Per-sample loss: (weighted) mean-squared eps error + the bound term (in bits per dim).

    `weighting="min-snr"` multiplies the MSE by `min_snr_weight` (gamma `snr_gamma`); the bound
    term, which only trains the variance, stays unweighted as in the authors' code.
    """
    if weighting not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {weighting!r}")
    c = x0.shape[1]
    eps, v = model_out[:, :c], model_out[:, c:]
    mse = ((noise - eps) ** 2).mean(dim=tuple(range(1, x0.dim())))
    if weighting == "min-snr":
        mse = mse * min_snr_weight(schedule, t, snr_gamma)
    if v.shape[1] == 0:
        return mse
    # The bound term trains only the variance: the mean comes from a detached eps.
    eps_frozen = eps.detach()
    abar, abar_prev, betas = (_take(a, t, x0) for a in
                              (schedule.alphas_cumprod, schedule.alphas_cumprod_prev, schedule.betas))
    min_log = _take(schedule.posterior_log_variance_clipped, t, x0)
    max_log = torch.log(betas)
    frac = (v + 1) / 2
    model_log_var = frac * max_log + (1 - frac) * min_log
    coef1 = betas * abar_prev.sqrt() / (1 - abar)
    coef2 = (1 - abar_prev) * (1 - betas).sqrt() / (1 - abar)
    pred_x0 = (x_t - (1 - abar).sqrt() * eps_frozen) / abar.sqrt()
    model_mean = coef1 * pred_x0 + coef2 * x_t
    true_mean = coef1 * x0 + coef2 * x_t
    dims = tuple(range(1, x0.dim()))
    kl = _normal_kl(true_mean, min_log, model_mean, model_log_var).mean(dim=dims) / math.log(2.0)
    nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var).mean(dim=dims) / math.log(2.0)
    vb = torch.where(t == 0, nll, kl)
    return mse + vb
