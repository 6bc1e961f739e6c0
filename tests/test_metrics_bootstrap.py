"""Bootstrap intervals: each resampled statistic equals the plain metric on the explicitly repeated set."""

import numpy as np
import pytest

from calicache.metrics.adm import inception_score, manifold_radii, precision_recall
from calicache.metrics.bootstrap import (
    FrechetBootstrap,
    PrecisionRecallBootstrap,
    bootstrap,
    centred_interval,
    percentile_interval,
    resamples,
    share,
    weighted_inception_score,
)
from calicache.metrics.frechet import frechet_distance, gaussian_stats


def _gauss(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    return rng.normal(size=(n, d)) @ mix + shift


# fewer and more samples than dimensions (two Gram matrices); 30: more samples, fewer distinct in a resample
@pytest.mark.parametrize("n", [12, 30, 80])
def test_frechet_bootstrap_equals_frechet_distance_on_the_repeated_set(n):
    d = 24
    ref = _gauss(300, d, 0)
    fb = FrechetBootstrap(*gaussian_stats(ref)).fit(_gauss(n, d, 1, shift=0.3))
    feats = fb._features
    exact = frechet_distance(*gaussian_stats(feats), *gaussian_stats(ref), method="eigh")
    assert fb() == pytest.approx(exact, rel=1e-7) and exact > 0.1
    # ADM's sqrtm agrees too (to its own accuracy on a rank-deficient product)
    assert fb() == pytest.approx(frechet_distance(*gaussian_stats(feats), *gaussian_stats(ref)), rel=1e-6)
    for w in resamples(n, 3, seed=2):
        repeated = np.repeat(feats, w.astype(int), axis=0)
        assert fb(w) == pytest.approx(frechet_distance(*gaussian_stats(repeated), *gaussian_stats(ref), method="eigh"),
                                      rel=1e-7)
    with pytest.raises(ValueError, match="features must be"):
        fb.fit(np.zeros((5, d + 1)))


def test_resamples_and_intervals():
    w = resamples(50, 20, seed=0)
    assert w.shape == (20, 50) and (w.sum(1) == 50).all() and (w >= 0).all()
    assert not np.array_equal(w[0], w[1]) and np.array_equal(w, resamples(50, 20, seed=0))
    assert percentile_interval(np.arange(101.0)) == pytest.approx((2.5, 97.5))
    # a share of Bernoulli(0.3) draws: the interval is about +-1.96 sqrt(p(1-p)/n) wide and holds the value
    x = np.random.default_rng(1).random(400) < 0.3
    out = bootstrap(share(x), resamples(400, 300, seed=3))
    half = 1.96 * np.sqrt(0.21 / 400)
    assert out["lo"] < out["value"] < out["hi"] and out["value"] == x.mean()
    assert 0.7 * half < (out["hi"] - out["lo"]) / 2 < 1.3 * half
    assert (out["lo"], out["hi"]) == pytest.approx(percentile_interval(out["values"]), abs=0.01)
    # an upward-shifted bootstrap distribution is placed around the measured value, the shift reported
    lo, hi, shift = centred_interval(10.0, np.arange(100.0) / 10 + 12)  # median 16.95, q2.5 12.2475, q97.5 21.6525
    assert (lo, hi, shift) == pytest.approx((10 - 4.7025, 10 + 4.7025, 6.95))


def test_weighted_inception_score_equals_the_score_of_the_repeated_set():
    logits = np.random.default_rng(0).normal(size=(30, 7)) * 3
    assert weighted_inception_score(logits) == pytest.approx(inception_score(logits), rel=1e-12)
    w = resamples(30, 1, seed=1)[0]
    assert weighted_inception_score(logits, w) == pytest.approx(
        inception_score(np.repeat(logits, w.astype(int), axis=0)), rel=1e-12)


def test_precision_recall_bootstrap():
    ref, smp = _gauss(120, 8, 0), _gauss(60, 8, 1, shift=0.5)
    pr = PrecisionRecallBootstrap(ref, smp, k=3)
    p, r = precision_recall(ref, smp, 3)
    assert (pr.precision(None), pr.recall(None)) == (p, r) and 0 < p < 1 and 0 < r < 1
    # with the reference radii from a cache: the same numbers
    assert PrecisionRecallBootstrap(ref, smp, 3, ref_radii=manifold_radii(ref, 3)).precision(None) == p
    w = np.zeros(60)
    w[:20] = 3  # draw only the first 20 samples: recall counts only their balls (full-set radii)
    radii = manifold_radii(smp, 3)
    d = ((ref[:, None] - smp[None, :20]) ** 2).sum(-1)
    assert pr.recall(w) == pytest.approx(float((d <= radii[None, :20] + 1e-4).any(1).mean()), abs=1 / 120)
    assert pr.recall(w) < r
