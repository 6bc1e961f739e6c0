"""Calibrating a latent DiT: images encoded by a (tiny, random) diffusers AutoencoderKL."""

import numpy as np
import pytest
import torch

import calicache
from conftest import tiny_model

STEPS = 10


def test_latent_model_with_a_tiny_vae():
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8,
        sample_size=32)
    model = tiny_model(input_size=4, in_channels=4)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8)
    kw = dict(svd="cd", rank=4, num=8, batch_size=4, steps=STEPS, vae=vae)
    labels = rng.integers(0, 4, 12)
    f1 = calicache.calibrate(model, (images, labels), **kw)
    f2 = calicache.calibrate(model, (images, labels), **kw)  # the VAE's posterior noise is seeded too
    assert all(torch.isfinite(a).all() for a, _ in f1.tensors.values())
    assert all(torch.equal(f1.tensors[k][0], f2.tensors[k][0]) for k in f1.tensors)
    with pytest.raises(ValueError, match="pass vae="):
        calicache.calibrate(model, (images, None), svd="cd", num=4, steps=STEPS)
    with pytest.raises(ValueError, match="this VAE needs"):
        calicache.calibrate(model, (images[:, :16, :16], None), **kw)
