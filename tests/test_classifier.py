"""The in-domain Fashion-MNIST classifier: input conversion, training, files, and the shipped weights."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from calicache.data import load_dataset
from calicache.data.fashion_mnist import DEFAULT_DIR
from calicache.training.classifier import (
    ClassifierConfig,
    FashionClassifier,
    accuracy,
    classifier_input,
    classifier_metadata,
    features_uint8,
    load_classifier,
    predict_uint8,
    save_classifier,
    shipped_classifier_path,
    train_classifier,
)

needs_real = pytest.mark.skipif(not (Path(DEFAULT_DIR) / "t10k-labels-idx1-ubyte.gz").exists(),
                                reason="Debian's dataset-fashion-mnist is not installed")


@pytest.fixture(scope="module")
def fmnist():
    x, y = load_dataset("fashion-mnist", "train")
    xt, yt = load_dataset("fashion-mnist", "test")
    return x, y, xt, yt


def test_classifier_input_forms():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, 28, 28), dtype=np.uint8)
    x = classifier_input(a)
    assert x.shape == (3, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert torch.equal(x[0, 0], torch.from_numpy(a[0].astype(np.float32)) / 127.5 - 1)
    # samples.npz form: grayscale replicated to 3 channels, and the 1-channel NHWC form
    assert torch.equal(classifier_input(np.repeat(a[..., None], 3, -1)), x)
    assert torch.equal(classifier_input(a[..., None]), x)
    # true colour goes through PIL's luma weights
    rgb = np.zeros((1, 28, 28, 3), np.uint8)
    rgb[..., 0] = 255
    assert torch.allclose(classifier_input(rgb), torch.full((1, 1, 28, 28), round(255 * 0.299) / 127.5 - 1))
    with pytest.raises(ValueError, match="uint8"):
        classifier_input(a.astype(np.float32))
    with pytest.raises(ValueError, match="28x28"):
        classifier_input(np.zeros((2, 32, 32, 3), np.uint8))


def test_interface_shapes_and_eval_mode(tmp_path):
    torch.manual_seed(0)
    model = FashionClassifier(ClassifierConfig(widths=(4, 8), hidden=16)).eval()
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    assert model(x).shape == (5, 10) and model.features(x).shape == (5, 16)
    # logits are the head applied to the features (dropout is off in eval mode)
    assert torch.allclose(model(x), model.head(model.features(x)))
    with pytest.raises(ValueError, match=r"\(N, 1, 28, 28\)"):
        model(torch.zeros(2, 3, 28, 28))
    save_classifier(model, tmp_path / "c.safetensors", test_accuracy=0.5, epochs=1, seed=0)
    loaded = load_classifier(tmp_path / "c.safetensors")
    assert not loaded.training
    assert loaded.config == model.config
    assert torch.equal(loaded(x), model(x))
    assert loaded.calicache_metadata == {"test_accuracy": 0.5, "epochs": 1, "seed": 0}
    assert not list(tmp_path.glob(".*tmp*"))  # atomic write leaves nothing behind


def test_bad_classifier_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="train-classifier"):
        load_classifier(tmp_path / "none.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_classifier(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"), metadata={"format": "calicache-dit"})
    with pytest.raises(ValueError, match="not a calicache classifier"):
        load_classifier(tmp_path / "other.safetensors")
    model = FashionClassifier(ClassifierConfig(widths=(4, 8), hidden=16))
    save_classifier(model, tmp_path / "c.safetensors")
    data = (tmp_path / "c.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-200])
    with pytest.raises(ValueError, match="truncated|not a readable"):
        load_classifier(tmp_path / "cut.safetensors")


def test_train_rejects_bad_labels():
    x = np.zeros((4, 28, 28), np.uint8)
    with pytest.raises(ValueError, match="as many labels"):
        train_classifier(x, np.zeros(3, np.int64), progress=False)
    with pytest.raises(ValueError, match=r"0\.\.9"):
        train_classifier(x, np.array([0, 1, 2, 10]), progress=False)


@needs_real
def test_trains_on_a_small_subset(fmnist):
    x, y, xt, yt = fmnist
    model = train_classifier(x[:300], y[:300], epochs=4, batch_size=32, seed=1, progress=False)
    assert not model.training
    acc = accuracy(model, xt[:500], yt[:500])
    assert acc > 0.5, acc  # chance is 0.1; this setting measured 0.69
    # same seed, same weights
    a = train_classifier(x[:64], y[:64], epochs=1, batch_size=16, seed=3, progress=False)
    b = train_classifier(x[:64], y[:64], epochs=1, batch_size=16, seed=3, progress=False)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_shipped_classifier_file():
    path = shipped_classifier_path()
    assert path.is_file(), "src/calicache/assets/fmnist-classifier.safetensors is missing; run train-classifier"
    assert path.stat().st_size < 2_000_000
    meta = classifier_metadata()
    assert meta["test_accuracy"] >= 0.90 and meta["train_images"] == 60000


@needs_real
def test_shipped_classifier_accuracy(fmnist):
    _, _, xt, yt = fmnist
    model = load_classifier()
    assert not model.training
    pred = predict_uint8(model, xt[:1000])
    assert pred.dtype == np.int64 and pred.shape == (1000,)
    assert np.mean(pred == yt[:1000]) >= 0.90
    # the samples.npz form (3-channel NHWC) gives the same answers
    assert np.array_equal(predict_uint8(model, np.repeat(xt[:200, ..., None], 3, -1)), pred[:200])
    feats = features_uint8(model, xt[:8])
    assert feats.shape == (8, model.config.hidden) and np.isfinite(feats).all()


@needs_real
def test_cli_train_classifier(tmp_path, capsys):
    from calicache.cli import main

    out = tmp_path / "clf.safetensors"
    assert main(["train-classifier", "--out", str(out), "--epochs", "1", "--limit", "256", "--batch-size", "64",
                 "--threads", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    meta = classifier_metadata(out)
    assert meta["train_images"] == 256 and meta["epochs"] == 1 and meta["seed"] == 0
    assert meta["test_accuracy"] == summary["test_accuracy"] > 0.1  # seed 0 measured 0.22 after 4 steps (chance 0.1)
    assert load_classifier(out).config == ClassifierConfig()
