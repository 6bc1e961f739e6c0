import math

import numpy as np
import pytest
import torch

from calicache.metrics.fidelity import fidelity, mse, psnr, ssim, ssim_per_image


def _images(seed: int = 0, n: int = 4, size: int = 16, c: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, c), dtype=np.uint8)


def test_identical_sets_give_infinite_psnr_ssim_one_mse_zero():
    a = _images()
    out = fidelity(a, a.copy())
    assert out == {"psnr": math.inf, "ssim": pytest.approx(1.0), "mse": 0.0, "num": 4}


def test_one_identical_image_does_not_make_psnr_infinite():
    # PSNR is of the set-level MSE, not the mean of per-image PSNRs.
    a = _images()
    b = a.copy()
    b[1:] ^= 1  # every pixel of images 1..3 off by one level
    assert math.isfinite(psnr(a, b))


def test_psnr_and_mse_known_values():
    a = np.zeros((2, 12, 12, 3), np.uint8)
    b = np.full_like(a, 10)
    assert mse(a, b) == 100.0
    assert psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 100))
    # Floats default to the model's [-1, 1] range (data range 2).
    x = torch.zeros(2, 1, 12, 12)
    assert psnr(x, x + 0.2) == pytest.approx(10 * math.log10(4 / 0.04))


def test_ssim_of_constant_images_matches_the_closed_form():
    # Constant images: variances are 0, so SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1).
    c1, c2 = 100.0, 140.0
    a = np.full((1, 20, 20, 1), c1, np.uint8)
    b = np.full((1, 20, 20, 1), c2, np.uint8)
    k1 = (0.01 * 255) ** 2
    assert ssim(a, b) == pytest.approx((2 * c1 * c2 + k1) / (c1**2 + c2**2 + k1))


def test_ssim_drops_with_noise_and_is_symmetric():
    a = _images(1, n=3, size=24)
    noise = np.random.default_rng(2).normal(0, 25, a.shape)
    b = np.clip(a + noise, 0, 255).astype(np.uint8)
    s = ssim_per_image(a, b)
    assert s.shape == (3,) and np.all(s < 0.99)
    assert ssim(a, b) == pytest.approx(ssim(b, a))


def test_grayscale_replicated_to_rgb_gives_the_same_numbers():
    g = _images(3, c=1)
    h = _images(4, c=1)
    assert fidelity(g, h)["ssim"] == pytest.approx(fidelity(np.repeat(g, 3, -1), np.repeat(h, 3, -1))["ssim"])
    assert fidelity(g, h)["mse"] == pytest.approx(fidelity(np.repeat(g, 3, -1), np.repeat(h, 3, -1))["mse"])


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        fidelity(_images(size=16), _images(size=20))
    with pytest.raises(ValueError, match="uint8"):
        fidelity(_images().astype(np.float32), _images())
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(_images(size=8), _images(size=8))
    with pytest.raises(ValueError, match="empty"):
        psnr(np.zeros((0, 4, 4, 3), np.uint8), np.zeros((0, 4, 4, 3), np.uint8))
