"""Inception Score and k-NN precision/recall as the ADM evaluator (guided-diffusion
evaluations/evaluator.py) computes them; FID/sFID are in `frechet.py`.

- IS (Salimans et al. 2016): exp(E_x KL(p(y|x) || p(y))) on splits of 5000 samples, averaged.
  Any classifier's logits work (the in-domain analogue uses the Fashion-MNIST classifier's).
- Precision/recall (Kynkaanniemi et al. 2019), k = 3: each feature vector gets a ball whose
  squared radius is the squared distance to its k-th nearest neighbour in its own set (itself at
  distance 0 not counted). Precision = share of samples inside some reference ball; recall =
  share of reference vectors inside some sample ball. ADM tries float16 distances first for speed;
  we use float32 throughout, which can only change decisions that sit on a ball's boundary.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.special import log_softmax
from tqdm.auto import tqdm

IS_SPLIT = 5000
NEIGHBOURS = 3
_BLOCK = 2048  # rows per distance block: 2048 x 50k float32 = 400 MB at most


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT) -> float:
    """IS from (N, K) logits: splits of `split_size`, the mean of exp(mean KL) over splits (ADM)."""
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or len(logits) == 0:
        raise ValueError(f"inception_score needs (N, K) logits with N >= 1, got shape {logits.shape}")
    log_p = log_softmax(logits, axis=1)  # no log(0) even for saturated predictions
    scores = []
    for start in range(0, len(log_p), split_size):
        part = log_p[start : start + split_size]
        log_marginal = np.log(np.exp(part).mean(axis=0, keepdims=True))
        kl = (np.exp(part) * (part - log_marginal)).sum(axis=1).mean()
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _sq_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances (|a|^2 - 2 a.b + |b|^2, floored at 0, as ADM)."""
    return ((a * a).sum(1, keepdim=True) - 2 * a @ b.T + (b * b).sum(1)[None]).clamp_min_(0)


def manifold_radii(features: np.ndarray, k: int = NEIGHBOURS) -> np.ndarray:
    """Squared distance of every vector to its k-th nearest neighbour in the same set, (N,)."""
    feats = torch.as_tensor(np.asarray(features, dtype=np.float32))
    if feats.ndim != 2 or len(feats) <= k:
        raise ValueError(f"precision/recall with k = {k} needs more than {k} feature vectors, got shape "
                         f"{tuple(feats.shape)}: evaluate more images")
    radii = torch.empty(len(feats))
    for start in tqdm(range(0, len(feats), _BLOCK), desc="k-NN radii", leave=False, disable=len(feats) <= _BLOCK):
        d = _sq_distances(feats[start : start + _BLOCK], feats)
        radii[start : start + _BLOCK] = d.kthvalue(k + 1, dim=1).values  # k+1: the vector itself is at 0
    return radii.numpy()


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray, k: int = NEIGHBOURS,
                     ref_radii: np.ndarray | None = None) -> tuple[float, float]:
    """(precision, recall) of samples against references; `ref_radii` may come from a cache."""
    ref = torch.as_tensor(np.asarray(ref_features, dtype=np.float32))
    smp = torch.as_tensor(np.asarray(sample_features, dtype=np.float32))
    if ref.ndim != 2 or smp.ndim != 2 or ref.shape[1] != smp.shape[1]:
        raise ValueError(f"precision/recall: feature shapes {tuple(ref.shape)} and {tuple(smp.shape)} do not match")
    r_ref = torch.as_tensor(manifold_radii(ref_features, k) if ref_radii is None else ref_radii, dtype=torch.float32)
    r_smp = torch.as_tensor(manifold_radii(sample_features, k))
    if r_ref.shape != (len(ref),):
        raise ValueError(f"precision/recall: {len(r_ref)} reference radii for {len(ref)} reference vectors")
    sample_in = torch.zeros(len(smp), dtype=torch.bool)  # inside some reference ball -> precision
    ref_in = torch.zeros(len(ref), dtype=torch.bool)  # inside some sample ball -> recall
    for start in range(0, len(ref), _BLOCK):
        d = _sq_distances(ref[start : start + _BLOCK], smp)  # (B, M)
        sample_in |= (d <= r_ref[start : start + _BLOCK, None]).any(0)
        ref_in[start : start + _BLOCK] = (d <= r_smp[None]).any(1)
    return float(sample_in.double().mean()), float(ref_in.double().mean())
