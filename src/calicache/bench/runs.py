"""Run cache configurations on one model with the same seeds and score them against the uncached
run: the shared core of `calicache demo` and `calicache bench`.

Every score comes from `calicache.metrics` (fidelity, the in-domain classifier and its Frechet
distance, Inception FID); this module only runs, times and collects.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..cache import MethodConfig, apply_cache, get_engine, remove_cache
from ..cache.macs import count_macs
from ..images import to_uint8
from ..metrics.domain import class_agreement, classifier_outputs, classifier_pass
from ..metrics.fidelity import fidelity
from ..metrics.frechet import feature_frechet_distance, frechet_distance, gaussian_stats, subset_frechet_range
from ..sampling import _class_labels, sample

# Few samples, many feature dimensions: the eigh form of the Frechet trace is the stable one.
FD_METHOD = "eigh"


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


class PeakRSS:
    """Peak growth of this process's resident set while the block runs, sampled from /proc/self/statm
    every 5 ms (Linux). torch's tensors are invisible to tracemalloc; memory the allocator kept from
    earlier runs is reused without growing the RSS, so this is a lower bound."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self.available = Path("/proc/self/statm").exists()
        self.start = self.peak = 0
        self._stop = threading.Event()

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _watch(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __enter__(self) -> PeakRSS:
        if self.available:
            self.start = self.peak = self._rss()
            self._thread = threading.Thread(target=self._watch, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.available:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss())

    @property
    def delta_mb(self) -> float | None:
        return round((self.peak - self.start) / 2**20, 1) if self.available else None


def warm_up(model: nn.Module, num: int, cfg_scale: float, batch_size: int | None = None) -> None:
    """One untimed, uncached sampling step at the real batch shape, so that first-call costs (kernel
    choice, allocations) do not land in the first timed configuration, the reference that every
    wall-clock speed-up divides."""
    sample(model, min(num, batch_size or num), 1, cfg_scale=cfg_scale)


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


def score(results: list[Result], reference: Result, classifier: nn.Module | None = None,
          test_images: np.ndarray | None = None) -> dict | None:
    """Speed-ups and fidelity to the `reference` run (PSNR, SSIM, MSE) of every result; with the
    in-domain `classifier` also class agreement with the sampled classes, and with uint8 `test_images`
    the Frechet distance of classifier features to them (`fd`).

    Returns, when `fd` is computed, the FD that `test_images` subsets of the same sample size get
    (`metrics.frechet.subset_frechet_range`): differences inside that range are sampling noise.
    """
    for r in results:
        r.scores["macs_speedup"] = round(reference.macs["total"] / r.macs["total"], 3)
        r.scores["wall_speedup"] = round(reference.wall_seconds / r.wall_seconds, 3)
        r.scores.update({k: (round(v, 4) if isinstance(v, float) else v)
                         for k, v in fidelity(r.images, reference.images).items()})
    if classifier is None:
        return None
    test_features = None
    if test_images is not None:
        test_features = classifier_pass([classifier.features], test_images, desc="classifier (test images)")[0]
    for r in tqdm(results, desc="classifier", leave=False):
        logits, features = classifier_outputs(classifier, r.images)
        labels = _class_labels(None, len(r.images), logits.shape[1]).numpy()
        r.scores["class_agreement"] = round(class_agreement(logits, labels), 4)
        if test_features is not None:
            r.scores["fd"] = round(feature_frechet_distance(features, test_features, method=FD_METHOD), 3)
    if test_features is None:
        return None
    return subset_frechet_range(test_features, len(reference.images), method=FD_METHOD)


def inception_fid(results: list[Result], ref: str, inception: str | None, data_dir: str | None) -> str | None:
    """Inception FID of each result against `ref` (`fid`); returns why it was skipped, or None."""
    from ..metrics.inception import InceptionExtractor
    from ..metrics.reference import reference_stats

    try:
        extractor = InceptionExtractor(inception)
        stats = reference_stats(ref, extractor, data_dir=data_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        return f"--fid skipped: {e}"
    for r in results:
        acts = extractor(r.images, desc=f"inception ({r.variant.name})")
        r.scores["fid"] = round(frechet_distance(*gaussian_stats(acts.pool), stats.mu, stats.sigma,
                                                 method=FD_METHOD), 3)
    return None
