import numpy as np
import pytest
import torch

from calicache.metrics.adm import inception_score
from calicache.metrics.domain import (
    class_agreement,
    classifier_input,
    classifier_outputs,
    domain_metrics,
    knn_predict,
)
from calicache.metrics.frechet import frechet_distance, gaussian_stats
from conftest import TinyClassifier


def _images(n: int, seed: int, c: int = 3) -> np.ndarray:
    gray = np.random.default_rng(seed).integers(0, 256, (n, 28, 28, 1), dtype=np.uint8)
    return np.repeat(gray, c, axis=-1)


def test_input_is_model_space_gray():
    x = classifier_input(np.full((2, 28, 28, 3), 255, np.uint8))
    assert x.shape == (2, 1, 28, 28) and torch.all(x == 1.0)
    assert torch.equal(classifier_input(_images(3, 0)), classifier_input(_images(3, 0, c=1)[..., 0]))


def test_metrics_match_direct_computation():
    model = TinyClassifier().eval()
    samples, reference = _images(40, 1), _images(60, 2)
    with torch.no_grad():
        logits = model(classifier_input(samples)).double().numpy()
    labels = logits.argmax(1).copy()
    labels[:10] = (labels[:10] + 1) % 10  # 10 of 40 deliberately wrong
    out = domain_metrics(model, samples, labels, reference, fd_method="eigh")
    assert out["class_agreement"] == pytest.approx(0.75)
    assert out["is"] == pytest.approx(inception_score(logits))
    _, f_s = classifier_outputs(model, samples)
    _, f_r = classifier_outputs(model, reference)
    assert out["fd"] == pytest.approx(frechet_distance(*gaussian_stats(f_s), *gaussian_stats(f_r)), rel=1e-6)
    assert out["num_reference"] == 60 and out["notes"] == []


def test_fd_of_a_set_with_itself_is_zero_and_missing_inputs_are_noted():
    model = TinyClassifier().eval()
    samples = _images(30, 3)
    out = domain_metrics(model, samples, None, samples.copy(), fd_method="eigh")
    assert abs(out["fd"]) < 1e-6
    assert out["class_agreement"] is None and any("arr_1" in n for n in out["notes"])
    out = domain_metrics(model, samples)
    assert out["fd"] is None and any("reference" in n for n in out["notes"])


def test_bad_inputs_are_clear_errors():
    model = TinyClassifier().eval()
    with pytest.raises(ValueError, match="28x28"):
        domain_metrics(model, np.zeros((2, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        classifier_input(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match="labels"):
        class_agreement(np.zeros((3, 10)), np.zeros(2))


def test_rgb_goes_through_bt601_luma_in_training_and_evaluation():
    from calicache.training import classifier as training_classifier

    rgb = np.zeros((1, 28, 28, 3), np.uint8)
    rgb[..., 1] = 200  # pure green: luma 0.587 * 200 = 117.4 -> 117; a channel mean would give 66.67
    x = classifier_input(rgb)
    assert torch.equal(x, torch.full((1, 1, 28, 28), 117.0) / 127.5 - 1.0)
    assert training_classifier.classifier_input is classifier_input


def test_knn_votes_like_a_plain_loop():
    train = _images(60, 4, c=1)[..., 0]
    labels = np.random.default_rng(5).integers(0, 4, 60)
    queries = np.concatenate([_images(20, 6, c=1)[..., 0], train[:5]])
    got = knn_predict(train, labels, queries, k=3, batch_size=7)
    x = train.reshape(60, -1).astype(np.float64) / 127.5 - 1
    for q, pred in zip(queries, got):
        d = ((x - (q.reshape(-1).astype(np.float64) / 127.5 - 1)) ** 2).sum(1)
        votes = np.bincount(labels[np.argsort(d, kind="stable")[:3]], minlength=4)
        assert pred == votes.argmax()
    assert np.array_equal(knn_predict(train, labels, train[:5], k=1), labels[:5])  # its own nearest neighbour
    with pytest.raises(ValueError, match="k = 0"):
        knn_predict(train, labels, queries, k=0)
