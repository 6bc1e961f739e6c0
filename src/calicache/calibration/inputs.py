"""The calibration set: images from a data spec, a seeded subset, and model-space batches
(pixels in [-1, 1], or SD-VAE latents * 0.18215 for latent DiTs)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data import load_dataset
from ..images import LATENT_SCALE, to_model_space

DataArg = tuple[np.ndarray, np.ndarray | None] | str | os.PathLike


def load_images(spec: str | os.PathLike, data_dir: str | os.PathLike | None = None, size: int | None = None
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """(images uint8 (N, H, W[, C]), labels (N,) or None) of the training split named by `spec`
    ("fashion-mnist", an image folder or an .npz file; see `calicache.data.load_dataset`); images of
    a folder are resized and center-cropped to `size` (the model's) when given."""
    return load_dataset(spec, split="train", data_dir=data_dir, size=size if Path(str(spec)).is_dir() else None)


def check_images(images: np.ndarray, labels: np.ndarray | None, num_classes: int) -> None:
    if images.dtype != np.uint8 or images.ndim not in (3, 4):
        raise ValueError(f"calibration images must be uint8 (N, H, W) or (N, H, W, C), got {images.dtype} "
                         f"{images.shape}")
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"labels have shape {labels.shape}; expected ({len(images)},), one per image")
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"labels span {labels.min()}..{labels.max()} but the model has {num_classes} classes")


def select(n: int, num: int, seed: int) -> np.ndarray:
    """`num` distinct indices of `n`, drawn with the seed (the paper's random calibration subset)."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if num > n:
        raise ValueError(f"the data set has {n} images, fewer than num={num}; lower --num")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g)[:num].numpy()


def load_vae(vae) -> nn.Module:
    """A diffusers AutoencoderKL: an instance as it is, or a path / hub id through from_pretrained."""
    if isinstance(vae, nn.Module):
        return vae.eval()
    try:
        from diffusers.models import AutoencoderKL
    except ImportError as e:
        raise RuntimeError("latent models need diffusers for the VAE: pip install diffusers") from e
    return AutoencoderKL.from_pretrained(str(vae)).eval()


class ModelSpaceBatches:
    """Batches of clean model inputs x_0 (B, C, H, W) for `model`, converted one batch at a time."""

    def __init__(self, model: nn.Module, images: np.ndarray, vae=None):
        cfg = model.config
        self.images = images
        self.shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
        self.vae = None
        if cfg.in_channels in (1, 3):
            got = (1 if images.ndim == 3 else images.shape[-1], *images.shape[1:3])
            if got != self.shape:
                raise ValueError(f"images are {got} (C, H, W) but the model takes {self.shape}; "
                                 "give images of the model's size and channels")
        else:
            if vae is None:
                raise ValueError(f"the model works on {cfg.in_channels}-channel latents: pass vae= (a diffusers "
                                 "AutoencoderKL or its path, e.g. stabilityai/sd-vae-ft-ema) to encode the images")
            self.vae = load_vae(vae)
            factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
            need = (cfg.input_size * factor, cfg.input_size * factor, 3)
            if images.ndim != 4 or images.shape[1:] != need:
                raise ValueError(f"images are {images.shape[1:]} but this VAE needs {need} (H, W, C) to give "
                                 f"{cfg.input_size}x{cfg.input_size} latents")
            if self.vae.config.latent_channels != cfg.in_channels:
                raise ValueError(f"the VAE makes {self.vae.config.latent_channels}-channel latents; the model "
                                 f"takes {cfg.in_channels}")

    def __call__(self, idx: np.ndarray, gens: list[torch.Generator], device) -> torch.Tensor:
        x = to_model_space(self.images[idx])
        if self.vae is None:
            return x.to(device)
        dist = self.vae.encode(x.to(next(self.vae.parameters()).device)).latent_dist
        # The posterior sample's noise comes from each image's own generator: batching does not matter.
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in gens]).to(dist.mean)
        return ((dist.mean + dist.std * noise) * LATENT_SCALE).to(device)


def batches(order: np.ndarray, batch_size: int) -> Iterator[tuple[int, np.ndarray]]:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for start in range(0, len(order), batch_size):
        yield start, order[start : start + batch_size]
