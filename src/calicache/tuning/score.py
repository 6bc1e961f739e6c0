"""Scoring cache configurations: PSNR of cached samples against the uncached samples of the same
seeds (image i against image i), the fidelity `calicache bench` reports.

A runner samples uint8 images (N, H, W, 3) for a seed set from calicache's DiT or from a diffusers
pipeline; sample i's noise depends only on (seed, i), so the first n samples of a set are the same
whatever n is, and a candidate scored on n seeds is compared with the first n reference images.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..cache import apply_cache, remove_cache
from ..cache.macs import count_macs
from ..images import to_uint8
from ..metrics.fidelity import psnr
from ..sampling import sample, sample_generator


class ModelRunner:
    """calicache's DiT sampled with `calicache.sample` (classes i % num_classes)."""

    def __init__(self, model: nn.Module, steps: int, cfg_scale: float = 1.0, sampler: str = "ddim",
                 spacing: str = "adm", batch_size: int | None = None):
        self.target = model
        self.model = model
        self.steps, self.cfg_scale, self.sampler, self.spacing = steps, cfg_scale, sampler, spacing
        self.batch_size = batch_size

    def images(self, num: int, seed: int) -> np.ndarray:
        x = sample(self.model, num, self.steps, sampler=self.sampler, cfg_scale=self.cfg_scale, seed=seed,
                   batch_size=self.batch_size, spacing=self.spacing)
        return to_uint8(x)

    def macs(self, config) -> int:
        return count_macs(self.model, config, self.steps, self.cfg_scale)["total"]


class PipelineRunner:
    """A PixArt pipeline sampled from prompt embeddings (prompt i % P for sample i), decoded by its VAE."""

    def __init__(self, pipe, steps: int, prompt_embeds: dict[str, torch.Tensor], cfg_scale: float = 4.5,
                 batch_size: int | None = None):
        from ..data.prompts import prompt_rows

        self.target = pipe
        self.model = pipe.transformer
        self.steps, self.cfg_scale, self.batch_size = steps, cfg_scale, batch_size
        self.embeds = prompt_embeds
        self._rows = prompt_rows
        self.text_tokens = int(prompt_embeds["prompt_embeds"].shape[1])
        pipe.set_progress_bar_config(disable=True)

    @torch.inference_mode()
    def images(self, num: int, seed: int) -> np.ndarray:
        count = self.embeds["prompt_embeds"].shape[0]
        batch = self.batch_size or num
        out = []
        for start in range(0, num, batch):
            idx = list(range(start, min(num, start + batch)))
            given = {k: self._rows(v, [i % count for i in idx]) for k, v in self.embeds.items()}
            res = self.target(negative_prompt=None, num_inference_steps=self.steps, guidance_scale=self.cfg_scale,
                              output_type="np", generator=[sample_generator(seed, i) for i in idx],
                              use_resolution_binning=False, **given)
            out.append(np.asarray(res.images))
        return (np.concatenate(out).clip(0, 1) * 255).round().astype(np.uint8)

    def macs(self, config) -> int:
        return count_macs(self.model, config, self.steps, self.cfg_scale, text_tokens=self.text_tokens)["total"]


def run_config(runner, config, num: int, seed: int) -> np.ndarray:
    """Images of `num` seeds with `config` attached (None: uncached); the model is left without a cache."""
    if config is None:
        return runner.images(num, seed)
    apply_cache(runner.target, config)
    try:
        return runner.images(num, seed)
    finally:
        remove_cache(runner.target)


class Reference:
    """The uncached images of one seed set, sampled once; `score(config, n)` is the PSNR (dB) of
    `config` on the first n of them."""

    def __init__(self, runner, num: int, seed: int, on_sample: Callable[[int], None] | None = None):
        self.runner, self.num, self.seed = runner, num, seed
        self.on_sample = on_sample
        self.images = run_config(runner, None, num, seed)
        self.evaluations = 0

    def score(self, config, num: int | None = None) -> float:
        n = self.num if num is None else min(num, self.num)
        images = run_config(self.runner, config, n, self.seed)
        self.evaluations += 1
        if self.on_sample is not None:
            self.on_sample(n)
        value = psnr(images, self.images[:n])
        return float(value)  # +inf for identical images
