"""Bootstrap 95% intervals for sample-set metrics against fixed reference statistics.

The samples are resampled with replacement (a resample is a vector of multiplicities `w`, summing
to N); the reference statistics stay fixed, so an interval says how much a metric moves with the
draw of N samples, not with the reference set.

Intervals: the 2.5-97.5% percentile spread of the resampled values, placed around the measured value
(`centred_interval`: value - (median - q2.5), value + (q97.5 - median)). For shares this is the
plain percentile interval; a Frechet distance of a resample is shifted up, because a resample holds
only ~63% distinct samples (FD grows as the set shrinks), and the plain percentile interval would
then often miss the measured value. The shift (median - value) is reported beside the interval.

- Frechet distance (FID, sFID, in-domain FD): `FrechetBootstrap` gives exactly
  `frechet_distance` for w = 1 and is fast enough to repeat hundreds of times at 2048 dimensions:
  with R = S_ref^(1/2) computed once, tr((S S_ref)^(1/2)) = sum of the singular values of
  diag(sqrt(w)) (F - m) R / sqrt(N - 1), which come from the smaller of the two Gram matrices
  (resampled unique rows x rows, or dims x dims). The rows x rows one is cut from the Gram matrix
  K of all projected, centred samples, computed once: with u = K w / N, the centred Gram of a
  resample is K_kk - u_k 1^T - 1 u_k^T + w.u / N, scaled by sqrt(w) on both sides (no pass over
  the D dimensions per resample).
- Shares (class agreement, precision): means of per-sample indicators, resampled.
- Recall: the share of reference points inside the ball of at least one *drawn* sample, with the
  balls' radii fixed at their values on the full sample set (a duplicated draw would otherwise be its
  own nearest neighbour at distance 0 and shrink the balls).
- Inception Score (one split): p(y) and the mean KL with multiplicities.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import linalg
from scipy.special import log_softmax

from .adm import _BLOCK, _sq_distances, manifold_radii

KERNEL_MAX = 8192  # samples up to which FrechetBootstrap keeps their (N, N) Gram matrix (512 MB at the limit)


def resamples(n: int, num: int, seed: int = 0) -> np.ndarray:
    """(num, n) float64 multiplicities: row b counts how often each of n samples is drawn in resample b."""
    rng = np.random.default_rng(seed)
    return np.stack([np.bincount(rng.integers(0, n, n), minlength=n) for _ in range(num)]).astype(np.float64)


def percentile_interval(values: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The central `level` interval of bootstrap values."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = np.percentile(values, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


def centred_interval(value: float, values: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """(lo, hi, shift): the percentile spread of bootstrap `values` around `value`; shift = median - value."""
    values = np.asarray(values, dtype=np.float64)
    lo, hi = percentile_interval(values, level)
    median = float(np.median(values))
    return value - (median - lo), value + (hi - median), median - value


class FrechetBootstrap:
    """Frechet distance of (resampled) features to a fixed reference Gaussian N(mu_ref, sigma_ref)."""

    def __init__(self, mu_ref: np.ndarray, sigma_ref: np.ndarray):
        self.mu = np.asarray(mu_ref, dtype=np.float64)
        sigma = np.asarray(sigma_ref, dtype=np.float64)
        if sigma.shape != (len(self.mu), len(self.mu)):
            raise ValueError(f"reference statistics do not match: mu {self.mu.shape}, sigma {sigma.shape}")
        w, v = linalg.eigh((sigma + sigma.T) / 2)
        self.root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T  # S_ref^(1/2), symmetric PSD
        self.trace_ref = float(np.trace(sigma))
        self._features: np.ndarray | None = None
        self._projected: np.ndarray | None = None
        self._kernel: np.ndarray | None = None

    def fit(self, features: np.ndarray) -> FrechetBootstrap:
        """Set the sample features (N, D) that later calls resample; projects them by R once."""
        f = np.asarray(features, dtype=np.float64)
        if f.ndim != 2 or f.shape[1] != len(self.mu) or len(f) < 2:
            raise ValueError(f"features must be (N >= 2, {len(self.mu)}), got shape {f.shape}")
        self._features, self._projected, self._kernel = f, f @ self.root, None
        return self

    def _row_gram(self, keep: np.ndarray, w: np.ndarray, n: float) -> np.ndarray:
        """diag(sqrt(w)) C_kk diag(sqrt(w)) for the kept rows k, C the Gram matrix of the projected samples
        centred at the weighted mean; from the all-sample Gram matrix K (a shift of every row changes
        nothing, so K is taken about the plain mean, which keeps its entries small)."""
        if self._kernel is None:
            z = self._projected - self._projected.mean(0)
            self._kernel = z @ z.T  # (N, N)
        full_w = np.zeros(len(keep))
        full_w[keep] = w
        u = self._kernel @ full_w / n  # (N,): z_i . a with a the weighted mean of the rows
        k = np.flatnonzero(keep)
        gram = self._kernel[np.ix_(k, k)] - u[k][:, None] - u[k][None, :] + full_w @ u / n
        s = np.sqrt(w)
        return gram * s[:, None] * s[None, :]

    def __call__(self, weights: np.ndarray | None = None) -> float:
        """The distance for multiplicities `weights` (N,), or for the fitted set itself."""
        if self._features is None:
            raise RuntimeError("call fit(features) first")
        f, z = self._features, self._projected
        w = np.ones(len(f)) if weights is None else np.asarray(weights, dtype=np.float64)
        keep = w > 0
        f, z, w = f[keep], z[keep], w[keep]
        n = w.sum()
        if n < 2:
            raise ValueError("a Frechet distance needs at least 2 samples")
        mean = w @ f / n
        centred = f - mean
        if len(z) < z.shape[1] and len(keep) <= KERNEL_MAX:
            gram = self._row_gram(keep, w, n)  # (m, m)
        else:
            y = (z - mean @ self.root) * np.sqrt(w)[:, None]  # (m, D): rows of diag(sqrt(w)) (F - m) R
            gram = y @ y.T if len(y) < y.shape[1] else y.T @ y
        # torch's symmetric eigensolver: ~0.5 s for a (1264, 1264) Gram (2,000 samples) where scipy's
        # (OpenBLAS) took 8.5 s of CPU on this machine; float64 both, the same values to ~1e-14 relative.
        eig = torch.linalg.eigvalsh(torch.from_numpy(gram))
        tr_sqrt = float(eig.clamp(min=0).sqrt().sum()) / np.sqrt(n - 1)
        tr_s = float((w[:, None] * centred * centred).sum() / (n - 1))
        diff = mean - self.mu
        return float(diff @ diff + tr_s + self.trace_ref - 2 * tr_sqrt)


def weighted_inception_score(logits: np.ndarray, weights: np.ndarray | None = None) -> float:
    """exp(E_x KL(p(y|x) || p(y))) over one split, samples counted `weights` times."""
    log_p = log_softmax(np.asarray(logits, dtype=np.float64), axis=1)
    w = np.ones(len(log_p)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    p = np.exp(log_p)
    log_marginal = np.log(w @ p)
    return float(np.exp(w @ (p * (log_p - log_marginal)).sum(axis=1)))


class PrecisionRecallBootstrap:
    """k-NN precision and recall (as `adm.precision_recall`) for resamples of the samples.

    Both come from one pass over the (reference x sample) distances: whether each sample lies in
    some reference ball (precision: resampled as indicators) and which sample balls hold each
    reference point (recall: a resample keeps the balls of the samples it draws, radii fixed)."""

    def __init__(self, ref_features: np.ndarray, sample_features: np.ndarray, k: int = 3,
                 ref_radii: np.ndarray | None = None):
        ref = torch.as_tensor(np.asarray(ref_features, dtype=np.float32))
        smp = torch.as_tensor(np.asarray(sample_features, dtype=np.float32))
        r_ref = torch.as_tensor(manifold_radii(ref_features, k) if ref_radii is None else ref_radii,
                                dtype=torch.float32)
        r_smp = torch.as_tensor(manifold_radii(sample_features, k))
        sample_in = torch.zeros(len(smp), dtype=torch.bool)
        self.inside = torch.zeros(len(ref), len(smp), dtype=torch.bool)  # (R, N): ref i in the ball of sample j
        for start in range(0, len(ref), _BLOCK):
            d = _sq_distances(ref[start : start + _BLOCK], smp)  # (B, N)
            sample_in |= (d <= r_ref[start : start + _BLOCK, None]).any(0)
            self.inside[start : start + _BLOCK] = d <= r_smp[None]
        self.precision = share(sample_in.numpy())

    def recall(self, weights: np.ndarray | None = None) -> float:
        cols = self.inside if weights is None else self.inside[:, torch.as_tensor(np.asarray(weights) > 0)]
        return float(cols.any(1).double().mean())


def bootstrap(stat: Callable[[np.ndarray | None], float], weights: np.ndarray, level: float = 0.95) -> dict:
    """{"value": stat(None), "lo", "hi", "shift", "values"}: `centred_interval` over the rows of `weights`."""
    values = np.array([stat(w) for w in weights])
    value = stat(None)
    lo, hi, shift = centred_interval(value, values, level)
    return {"value": value, "lo": lo, "hi": hi, "shift": shift, "values": values}


def share(indicators: np.ndarray) -> Callable[[np.ndarray | None], float]:
    """A statistic: the (weighted) share of true indicators."""
    x = np.asarray(indicators, dtype=np.float64)
    return lambda w: float(x.mean() if w is None else w @ x / w.sum())
