"""A tampered file is an error (issue 18 item 6): every calicache tensor file (factors, models,
classifiers) stores a checksum of its tensors, verified on load."""

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

from calicache.cache.factors import Factors
from calicache.models.io import load_model, save_model, shipped_asset
from calicache.tensorfile import CHECKSUM_KEY, tensor_checksum
from calicache.training.classifier import FashionClassifier, load_classifier, save_classifier
from conftest import tiny_model


def _tamper(path, key_part: str, factor: float = 50.0) -> None:
    """Scale one tensor (finite values), keeping the metadata: what an edit of the weights looks like."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    name = next(k for k in sorted(tensors) if key_part in k)
    tensors[name] = tensors[name] * factor
    save_file(tensors, str(path), metadata=meta)


def _factors() -> Factors:
    g = torch.Generator().manual_seed(0)
    return Factors({"blocks.0.mlp.fc1": (torch.randn(8, 2, generator=g), torch.randn(2, 4, generator=g))},
                   {"svd": "cd"})


def test_tampered_factor_file_is_refused(tmp_path):
    path = tmp_path / "f.safetensors"
    _factors().save(path)
    assert Factors.load(path).tensors["blocks.0.mlp.fc1"][0].shape == (8, 2)
    before = path.read_bytes()
    _tamper(path, ".A")
    assert path.read_bytes() != before
    with pytest.raises(ValueError, match=r"f\.safetensors: the tensors do not match the file's checksum.*calibrate"):
        Factors.load(path)


def test_factor_file_without_checksum_is_refused(tmp_path):
    path = tmp_path / "old.safetensors"
    _factors().save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != CHECKSUM_KEY}
    save_file(load_file(str(path)), str(path), metadata=meta)
    with pytest.raises(ValueError, match="carries no content checksum.*calicache calibrate"):
        Factors.load(path)


def test_tampered_model_and_classifier_are_refused(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(tiny_model(), path)
    _tamper(path, "blocks.0.mlp.fc1.weight", 1.001)
    with pytest.raises(ValueError, match="do not match the file's checksum"):
        load_model(path)
    cpath = tmp_path / "c.safetensors"
    save_classifier(FashionClassifier(), cpath)
    load_classifier(cpath)
    _tamper(cpath, "head.weight")
    with pytest.raises(ValueError, match="do not match the file's checksum.*train-classifier"):
        load_classifier(cpath)


def test_checksum_sees_names_dtypes_and_shapes():
    a = {"x": torch.arange(6, dtype=torch.float32)}
    assert tensor_checksum(a) == tensor_checksum({"x": torch.arange(6, dtype=torch.float32)})
    assert tensor_checksum(a) != tensor_checksum({"y": a["x"]})
    assert tensor_checksum(a) != tensor_checksum({"x": a["x"].reshape(2, 3)})
    assert tensor_checksum(a) != tensor_checksum({"x": a["x"].view(torch.int32)})


@pytest.mark.parametrize("name", ["fmnist-dit.safetensors", "fmnist-dit-cd.safetensors",
                                  "fmnist-classifier.safetensors"])
def test_shipped_assets_carry_a_valid_checksum(name):
    path = shipped_asset(name)
    with safe_open(str(path), framework="pt") as f:
        stored = f.metadata()[CHECKSUM_KEY]
    assert stored == tensor_checksum(load_file(str(path)))


def test_goc_steps_file_carries_a_checksum(tmp_path):
    """GOC steps files (JSON) are checked like factor files; a hand-written one without a checksum loads, with a
    warning, once."""
    import json
    import warnings

    from calicache.cache.methods.goc import GocSteps

    path = tmp_path / "goc.json"
    GocSteps([None, None, 0.5, 0.9], 0.0, [3], {"calls": 4, "period": 2}).save(path)
    data = json.loads(path.read_text())
    assert len(data["sha256"]) == 64
    path.write_text(json.dumps(data))  # re-indented: the same content
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GocSteps.load(path).steps == [3]
    data["steps"] = [2, 3]  # edited after it was written
    path.write_text(json.dumps(data, indent=1))
    with pytest.raises(ValueError, match=r"goc\.json: the GOC steps do not match the file's checksum.*"
                                         r"calibrate --method goc"):
        GocSteps.load(path)
    del data["sha256"]  # hand-written
    path.write_text(json.dumps(data))
    with pytest.warns(UserWarning, match="carries no checksum") as seen:
        assert GocSteps.load(path).steps == [2, 3]
        GocSteps.load(path)
    assert len([w for w in seen if "carries no checksum" in str(w.message)]) == 1


def test_shipped_goc_steps_carry_a_valid_checksum():
    import json
    import warnings

    from calicache.cache.methods.goc import GocSteps, steps_checksum

    data = json.loads(shipped_asset("fmnist-dit-goc20.json").read_text())
    assert data["sha256"] == steps_checksum(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert GocSteps.load("fmnist-dit-goc20").steps == data["steps"]
