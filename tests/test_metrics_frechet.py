import numpy as np
import pytest

from calicache.metrics.frechet import frechet_distance, gaussian_stats, subset_frechet_range


def _random_cov(rng: np.random.Generator, d: int) -> np.ndarray:
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_matches_closed_form_for_diagonal_gaussians(method):
    # For diagonal covariances d^2 = |mu1 - mu2|^2 + sum (sqrt(a_i) - sqrt(b_i))^2.
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    a, b = rng.uniform(0.5, 3, 6), rng.uniform(0.5, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b), method=method)
    assert got == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_matches_closed_form_for_scaled_covariance(method):
    # S2 = c^2 S1 (non-diagonal): tr(S1) + c^2 tr(S1) - 2 c tr(S1) = (1 - c)^2 tr(S1).
    rng = np.random.default_rng(1)
    s1 = _random_cov(rng, 12)
    mu = rng.standard_normal(12)
    got = frechet_distance(mu, s1, mu + 0.5, 4.0 * s1, method=method)
    assert got == pytest.approx(12 * 0.25 + np.trace(s1), rel=1e-9)


def test_sampled_gaussians_approach_the_closed_form():
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    mu1, mu2 = np.zeros(d), np.full(d, 0.3)
    a, b = np.array([1.0, 2.0, 0.5, 1.5]), np.array([2.0, 1.0, 0.5, 3.0])
    x = mu1 + rng.standard_normal((n, d)) * np.sqrt(a)
    y = mu2 + rng.standard_normal((n, d)) * np.sqrt(b)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(*gaussian_stats(x), *gaussian_stats(y))
    assert got == pytest.approx(expected, abs=0.02)


def test_sqrtm_and_eigh_agree_on_general_covariances():
    rng = np.random.default_rng(3)
    s1, s2 = _random_cov(rng, 40), _random_cov(rng, 40)
    mu1, mu2 = rng.standard_normal(40), rng.standard_normal(40)
    a = frechet_distance(mu1, s1, mu2, s2, method="sqrtm")
    b = frechet_distance(mu1, s1, mu2, s2, method="eigh")
    assert a == pytest.approx(b, rel=1e-9)
    assert a > 0


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_distance_of_a_set_to_itself_is_zero(method):
    feats = np.random.default_rng(4).standard_normal((300, 64)) @ np.random.default_rng(5).standard_normal((64, 64))
    mu, sigma = gaussian_stats(feats)
    d = frechet_distance(mu, sigma, mu, sigma, method=method)
    assert abs(d) < 1e-6 * np.trace(sigma)


@pytest.mark.parametrize("method", ["sqrtm", "eigh"])
def test_rank_deficient_self_distance_is_near_zero(method):
    # Fewer images than dimensions (a quick run): the covariance is singular; the square root of its
    # ~1e-15 null-space eigenvalues leaves a residue of ~1e-7 of the trace, no more.
    feats = np.random.default_rng(6).standard_normal((10, 200))
    mu, sigma = gaussian_stats(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-6 * np.trace(sigma)


def test_bad_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="at least 2"):
        gaussian_stats(np.zeros((1, 5)))
    with pytest.raises(ValueError, match="unknown Frechet method"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.eye(2), method="svd")


def test_subset_range_is_what_real_data_scores_at_that_sample_size():
    ref = np.random.default_rng(0).normal(size=(400, 6))
    whole = subset_frechet_range(ref, 400, draws=3)
    assert abs(whole["high"]) < 1e-9  # the whole set is the reference: no distance
    small, large = subset_frechet_range(ref, 10), subset_frechet_range(ref, 200)
    assert small["low"] <= small["mean"] <= small["high"] and small["num"] == 10 and small["draws"] == 20
    assert small["mean"] > 5 * large["mean"] > 0  # the estimator's bias falls with the sample size
    with pytest.raises(ValueError, match="subset size"):
        subset_frechet_range(ref, 401)
