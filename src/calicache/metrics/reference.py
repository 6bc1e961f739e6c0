"""Reference statistics for the ADM suite, computed once and cached.

The cache is an npz beside the reference file (or in the cache folder for `fashion-mnist-test` or
a read-only folder) named by the SHA-256 of the reference's content and of the feature extractor
(weights + preprocessing), so an edited reference or other weights never reuse stale numbers.
It holds mu/sigma (pool3), mu_s/sigma_s (spatial), the pool3 features and their k-NN radii.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..images import save_npz
from ..utils import file_sha256
from .adm import NEIGHBOURS, manifold_radii
from .frechet import gaussian_stats
from .npz import STAT_KEYS, load_batch

FASHION_MNIST_TEST = "fashion-mnist-test"
CACHE_ENV = "CALICACHE_CACHE"
CACHE_VERSION = "1"


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "calicache" / "eval"


@dataclass
class ReferenceStats:
    source: str
    num: int  # images the statistics were computed from (0: statistics read from the file only)
    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray | None
    sigma_s: np.ndarray | None
    pool: np.ndarray | None  # pool3 features for precision/recall
    radii: np.ndarray | None
    stats_from_file: bool = False
    cache_file: str | None = None
    from_cache: bool = False


def load_reference_images(ref: str, data_dir: str | None = None):
    """(uint8 images (N, H, W, C) or None, labels or None, precomputed stats, content SHA-256) of `ref`."""
    if ref == FASHION_MNIST_TEST:
        from ..data.fashion_mnist import load_fashion_mnist

        images, labels = load_fashion_mnist("test", data_dir)
        key = hashlib.sha256(images.tobytes()).hexdigest()
        return images[..., None], labels, {}, key
    batch = load_batch(ref, require_images=False)
    return batch.images, batch.labels, batch.stats, file_sha256(ref)


def _cache_path(ref: str, key: str, fingerprint: str, cache_dir: Path) -> Path:
    name = f"{key[:16]}-{fingerprint[:16]}-v{CACHE_VERSION}.npz"
    if ref == FASHION_MNIST_TEST:
        return cache_dir / f"{FASHION_MNIST_TEST}.calicache-ref-{name}"
    path = Path(ref)
    beside = path.parent / f"{path.stem}.calicache-ref-{name}"
    return beside if os.access(path.parent, os.W_OK) else cache_dir / beside.name


def reference_cache_file(ref: str, extractor, cache_dir: str | os.PathLike | None = None,
                         data_dir: str | None = None) -> Path:
    """Where `reference_stats(ref, extractor, cache_dir=...)` keeps its statistics (a file there need not exist)."""
    _, _, _, key = load_reference_images(ref, data_dir)
    return _cache_path(ref, key, extractor.fingerprint, Path(cache_dir) if cache_dir else default_cache_dir())


def _from_cache(path: Path, ref: str, key: str, fingerprint: str) -> ReferenceStats | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["ref_sha256"]) != key or str(z["fingerprint"]) != fingerprint:
                return None
            get = {k: (z[k] if k in z.files else None) for k in (*STAT_KEYS, "pool", "radii")}
            return ReferenceStats(ref, int(z["num"]), get["mu"], get["sigma"], get["mu_s"], get["sigma_s"],
                                  get["pool"], get["radii"], bool(z["stats_from_file"]), str(path), True)
    except (OSError, ValueError, KeyError):
        return None  # unreadable cache: recompute and overwrite it


def reference_stats(ref: str, extractor, batch_size: int = 64, cache_dir: str | os.PathLike | None = None,
                    use_cache: bool = True, data_dir: str | None = None, activations=None) -> ReferenceStats:
    """Statistics of `ref` (an npz path or "fashion-mnist-test") under `extractor`, cached.

    `activations`: the extractor's outputs for all of the reference's images, computed elsewhere (in
    resumable pieces, say), used instead of running the extractor when the cache has no statistics."""
    images, _, file_stats, key = load_reference_images(ref, data_dir)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    path = _cache_path(ref, key, extractor.fingerprint, cache_dir)
    if use_cache and path.is_file():
        cached = _from_cache(path, ref, key, extractor.fingerprint)
        if cached is not None:
            return cached
    pool = radii = mu_s = sigma_s = None
    if images is not None:
        acts = activations if activations is not None else extractor(images, batch_size=batch_size,
                                                                      desc="inception (reference)")
        if len(acts.pool) != len(images):
            raise ValueError(f"{len(acts.pool)} activations for the {len(images)} images of {ref}; pass the "
                             "extractor's outputs for every reference image, in order")
        pool, radii = acts.pool, manifold_radii(acts.pool, NEIGHBOURS)
        (mu, sigma), (mu_s, sigma_s) = gaussian_stats(acts.pool), gaussian_stats(acts.spatial)
    # An ADM reference batch's own statistics win, as in the ADM evaluator (they come from the TF graph).
    stats_from_file = {"mu", "sigma"} <= file_stats.keys()
    if stats_from_file:
        mu, sigma = file_stats["mu"], file_stats["sigma"]
        if {"mu_s", "sigma_s"} <= file_stats.keys():
            mu_s, sigma_s = file_stats["mu_s"], file_stats["sigma_s"]
    stats = ReferenceStats(ref, 0 if images is None else len(images), mu, sigma, mu_s, sigma_s, pool, radii,
                           stats_from_file, str(path) if use_cache else None, False)
    if use_cache and images is not None:
        arrays = {k: v for k, v in (("mu", mu), ("sigma", sigma), ("mu_s", mu_s), ("sigma_s", sigma_s),
                                    ("pool", pool), ("radii", radii)) if v is not None}
        try:
            save_npz(path, ref_sha256=np.array(key), fingerprint=np.array(extractor.fingerprint),
                     num=np.array(stats.num), stats_from_file=np.array(stats_from_file), **arrays)
        except OSError as e:  # a cache that cannot be written costs time next run, not this result
            print(f"warning: could not write the reference cache {path}: {e}; set ${CACHE_ENV} to a writable folder",
                  file=sys.stderr)
            stats.cache_file = None
    return stats
