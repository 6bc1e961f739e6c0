import numpy as np
import pytest

from calicache.metrics.adm import inception_score, manifold_radii, precision_recall


def test_is_of_uniform_predictions_is_one():
    assert inception_score(np.zeros((50, 1008))) == pytest.approx(1.0, abs=1e-12)


def test_is_of_confident_balanced_predictions_is_the_class_count():
    # p(y|x) one-hot, p(y) uniform over K classes: KL = log K for every x, so IS = K.
    k = 7
    logits = np.full((k * 20, k), -1e4)
    logits[np.arange(k * 20), np.arange(k * 20) % k] = 0.0
    assert inception_score(logits) == pytest.approx(k, rel=1e-9)


def test_is_averages_over_splits_like_adm():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((30, 5)) * 3
    parts = [inception_score(logits[:10]), inception_score(logits[10:20]), inception_score(logits[20:])]
    assert inception_score(logits, split_size=10) == pytest.approx(np.mean(parts))
    assert inception_score(logits, split_size=10) != pytest.approx(inception_score(logits))


def _brute_force_pr(ref: np.ndarray, smp: np.ndarray, k: int) -> tuple[float, float]:
    def d2(a, b):
        return np.array([[np.sum((x - y) ** 2) for y in b] for x in a])

    r_ref = np.sort(d2(ref, ref), axis=1)[:, k]
    r_smp = np.sort(d2(smp, smp), axis=1)[:, k]
    cross = d2(ref, smp)
    precision = np.mean([any(cross[i, j] <= r_ref[i] for i in range(len(ref))) for j in range(len(smp))])
    recall = np.mean([any(cross[i, j] <= r_smp[j] for j in range(len(smp))) for i in range(len(ref))])
    return precision, recall


def test_precision_recall_of_identical_sets_are_one():
    feats = np.random.default_rng(1).standard_normal((40, 16)).astype(np.float32)
    assert precision_recall(feats, feats.copy()) == (1.0, 1.0)


def test_precision_recall_match_a_brute_force_reference():
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((60, 8))
    smp = rng.standard_normal((45, 8)) * 1.3 + 0.4
    p, r = precision_recall(ref, smp)
    bp, br = _brute_force_pr(ref, smp, 3)
    assert (p, r) == (pytest.approx(bp), pytest.approx(br))
    assert 0 < p < 1 and 0 < r < 1


def test_far_apart_sets_have_zero_precision_and_recall():
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((20, 4))
    assert precision_recall(ref, ref + 100.0) == (0.0, 0.0)


def test_cached_radii_give_the_same_result():
    rng = np.random.default_rng(4)
    ref, smp = rng.standard_normal((30, 6)), rng.standard_normal((25, 6))
    assert precision_recall(ref, smp, ref_radii=manifold_radii(ref)) == precision_recall(ref, smp)


def test_too_few_vectors_is_a_clear_error():
    with pytest.raises(ValueError, match="more than 3"):
        manifold_radii(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="do not match"):
        precision_recall(np.zeros((10, 5)), np.zeros((10, 6)))
    with pytest.raises(ValueError, match="logits"):
        inception_score(np.zeros((0, 10)))
