"""Run cache configurations on one model with the same seeds and score them against the uncached
run: the shared core of `calicache demo` and `calicache bench`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from ..cache import MethodConfig, apply_cache, get_engine, remove_cache
from ..cache.macs import count_macs
from ..images import to_uint8
from ..sampling import _class_labels, sample


@dataclass
class Variant:
    """One row of a comparison: a label, a cache config and the step count it samples with."""

    name: str
    config: MethodConfig
    steps: int
    family: str = ""


@dataclass
class Result:
    variant: Variant
    images: np.ndarray  # uint8 (N, H, W, 3)
    wall_seconds: float
    macs: dict
    cache_bytes: int
    scores: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"name": self.variant.name, "family": self.variant.family, "steps": self.variant.steps,
                "macs_per_sample": self.macs["total"], "macs_speedup": self.scores.get("macs_speedup"),
                "wall_seconds": round(self.wall_seconds, 3), "wall_speedup": self.scores.get("wall_speedup"),
                "cached_ratio": self.macs["cached_ratio"], "cache_bytes": self.cache_bytes,
                **{k: v for k, v in self.scores.items() if k not in ("macs_speedup", "wall_speedup")}}


def run_variant(model: nn.Module, variant: Variant, num: int, cfg_scale: float, seed: int = 0,
                batch_size: int | None = None, spacing: str = "adm", sampler: str = "ddim",
                progress: bool = True) -> Result:
    """Sample `num` images with one configuration; the model is left without a cache."""
    apply_cache(model, variant.config)
    try:
        macs = count_macs(model, None, variant.steps, cfg_scale)
        t0 = time.perf_counter()
        x = sample(model, num, variant.steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed,
                   batch_size=batch_size, spacing=spacing, progress=progress)
        wall = time.perf_counter() - t0
        cache_bytes = get_engine(model).stats()["cache_bytes"]
    finally:
        remove_cache(model)
    return Result(variant, to_uint8(x), wall, macs, cache_bytes)


def score(results: list[Result], reference: Result, classifier: nn.Module | None = None) -> None:
    """Fidelity to the reference (PSNR, SSIM, MSE), speed-ups, and class agreement if a classifier is given."""
    from ..metrics.fidelity import fidelity

    labels = None
    if classifier is not None:
        from ..training.classifier import predict_uint8

        num_classes = int(classifier(torch.zeros(1, 1, 28, 28)).shape[1])
        labels = _class_labels(None, len(reference.images), num_classes).numpy()
    for r in results:
        r.scores["macs_speedup"] = round(reference.macs["total"] / r.macs["total"], 3)
        r.scores["wall_speedup"] = round(reference.wall_seconds / r.wall_seconds, 3)
        r.scores.update({k: (round(v, 4) if isinstance(v, float) else v)
                         for k, v in fidelity(r.images, reference.images).items()})
        if labels is not None:
            r.scores["class_agreement"] = round(float((predict_uint8(classifier, r.images) == labels).mean()), 4)


def side_by_side(results: list[Result], columns: int = 8, scale: int = 3) -> Image.Image:
    """A grid: one row per result (labelled), the same sample indices in every column."""
    h, w = results[0].images.shape[1:3]
    label_w = 190
    canvas = Image.new("RGB", (label_w + columns * w * scale, len(results) * h * scale), "white")
    draw = ImageDraw.Draw(canvas)
    for i, r in enumerate(results):
        y = i * h * scale
        draw.text((4, y + h * scale // 2 - 6), r.variant.name[:30], fill="black")
        for j, img in enumerate(r.images[:columns]):
            tile = Image.fromarray(img).resize((w * scale, h * scale), Image.NEAREST)
            canvas.paste(tile, (label_w + j * w * scale, y))
    return canvas


def markdown_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """rows -> a markdown table; columns are (key, header, format spec)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = []
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("n/a" if v is None else (format(v, fmt) if fmt else str(v)))
        body.append("| " + " | ".join(cells) + " |")
    return "\n".join([head, sep, *body])
