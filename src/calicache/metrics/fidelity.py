"""Fidelity of cached sampling to the uncached run: MSE, PSNR and SSIM between two image sets
sampled with the same seeds, image i against image i.

Conventions (chosen here, tested in tests/test_metrics_fidelity.py):
- Inputs: uint8 numpy arrays (N, H, W, C) or (N, H, W), data range 255; or float arrays/tensors,
  data range 2 (calicache's model space [-1, 1]) unless `data_range` is given. Torch tensors are
  taken as (N, C, H, W), numpy arrays as channels-last.
- MSE: mean over every pixel and channel of the set, in data units (0..255^2 for uint8).
- PSNR: 10 log10(range^2 / MSE) of that set-level MSE (torchmetrics' default reduction), not the
  mean of per-image PSNRs: one identical image cannot make the mean infinite. Identical sets give
  +inf (not a cap: a one-level error in one pixel of a 256x256 RGB image is already 101 dB, so any
  cap would hide real differences). The CLI's JSON writes it as the string "inf".
- SSIM (Wang et al. 2004): Gaussian window sigma 1.5 truncated at 3.5 sigma (11 x 11), K1 = 0.01,
  K2 = 0.03, population statistics, mean over the region the window fully covers, then over
  channels and images; the settings of skimage.metrics.structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False). Identical images give 1.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
_RADIUS = int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5)  # 5 -> an 11 x 11 window


def _as_pair(a, b, data_range: float | None) -> tuple[np.ndarray, np.ndarray, float]:
    """Both sets as float64 (N, H, W, C) plus the data range; shapes must agree."""
    arrays = []
    for x in (a, b):
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu()
            uint8 = x.dtype == torch.uint8
            x = x.numpy()
            if x.ndim == 4:
                x = x.transpose(0, 2, 3, 1)  # tensors are (N, C, H, W)
        else:
            x = np.asarray(x)
            uint8 = x.dtype == np.uint8
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4:
            raise ValueError(f"fidelity metrics need image sets (N, H, W[, C]), got shape {x.shape}")
        arrays.append((x.astype(np.float64), uint8))
    (x, x_u8), (y, y_u8) = arrays
    if x.shape != y.shape:
        raise ValueError(f"image sets differ in shape: {x.shape} vs {y.shape}; compare runs sampled with the same "
                         "--num, seed, classes and model (image i of one set against image i of the other)")
    if x_u8 != y_u8:
        raise ValueError("one image set is uint8 and the other float: convert both to the same kind first")
    if len(x) == 0:
        raise ValueError("image sets are empty")
    return x, y, float(data_range if data_range is not None else (255.0 if x_u8 else 2.0))


def mse(a, b, data_range: float | None = None) -> float:
    """Mean squared error over every pixel of the set, in data units."""
    x, y, _ = _as_pair(a, b, data_range)
    return float(np.mean((x - y) ** 2))


def psnr_from_mse(err: float, data_range: float) -> float:
    """10 log10(range^2 / mse); +inf when mse == 0."""
    return math.inf if err == 0 else 10.0 * math.log10(data_range**2 / err)


def psnr(a, b, data_range: float | None = None) -> float:
    """PSNR in dB of the set-level MSE; +inf for identical sets (see the module docstring)."""
    x, y, rng = _as_pair(a, b, data_range)
    return psnr_from_mse(float(np.mean((x - y) ** 2)), rng)


def ssim_per_image(a, b, data_range: float | None = None) -> np.ndarray:
    """SSIM of every image pair, (N,), averaged over channels."""
    x, y, rng = _as_pair(a, b, data_range)
    if min(x.shape[1:3]) < 2 * _RADIUS + 1:
        raise ValueError(f"SSIM needs images of at least {2 * _RADIUS + 1}x{2 * _RADIUS + 1} pixels, got "
                         f"{x.shape[1]}x{x.shape[2]}")
    c1, c2 = (SSIM_K1 * rng) ** 2, (SSIM_K2 * rng) ** 2
    sigma = (0, SSIM_SIGMA, SSIM_SIGMA, 0)  # blur over H and W only

    def blur(z: np.ndarray) -> np.ndarray:
        return gaussian_filter(z, sigma=sigma, truncate=SSIM_TRUNCATE, mode="reflect")

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    s = s[:, _RADIUS:-_RADIUS, _RADIUS:-_RADIUS, :]  # only where the window lies inside the image
    return s.mean(axis=(1, 2, 3))


def ssim(a, b, data_range: float | None = None) -> float:
    """Mean SSIM over images (see the module docstring for the window and constants)."""
    return float(ssim_per_image(a, b, data_range).mean())


def fidelity(a: np.ndarray, b: np.ndarray) -> dict:
    """{"psnr", "ssim", "mse", "num"} of two uint8 (N, H, W, C) sets, image i against image i."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
            raise ValueError(f"fidelity() takes uint8 numpy image sets; {name} is "
                             f"{getattr(x, 'dtype', type(x).__name__)} (use calicache.images.to_uint8)")
    err = mse(a, b)
    return {"psnr": psnr_from_mse(err, 255.0), "ssim": ssim(a, b), "mse": err, "num": int(len(a))}
