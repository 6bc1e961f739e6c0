"""The embedded default: the shipped model, factors, GOC steps and classifier load offline and
belong together; the demo runs end to end in a reduced mode."""

import json

import pytest
import torch

from calicache import FORAConfig, ICCConfig, apply_cache, load_model, remove_cache, sample, weight_hash
from calicache.cache.factors import Factors
from calicache.calibration.goc import GocSteps
from calicache.cli import main
from calicache.models.io import read_metadata, shipped_asset, shipped_path


@pytest.fixture(scope="module")
def model():
    return load_model("fmnist-dit")


def test_shipped_files_are_small_and_safe():
    total = sum(shipped_asset(f).stat().st_size for f in
                ("fmnist-dit.safetensors", "fmnist-dit-cd.safetensors", "fmnist-classifier.safetensors"))
    assert total <= 25 * 2**20


def test_model_metadata(model):
    meta = read_metadata(shipped_path("fmnist-dit"))
    rec = meta["recommended"]
    assert 1.0 <= rec["cfg_scale"] <= 4.0 and rec["steps"] >= 10
    assert model.calicache_defaults == rec
    assert model.config.num_classes == 10 and model.config.input_size == 28
    assert meta["weight_hash"] == weight_hash(model)


def test_factors_and_goc_steps_match_the_model(model):
    h = weight_hash(model)
    factors = Factors.load(shipped_asset("fmnist-dit-cd.safetensors"))
    assert factors.meta["model_hash"] == h and factors.meta["svd"] == "cd"
    steps = GocSteps.load(shipped_asset("fmnist-dit-goc20.json"))
    steps.check(model_hash=h, num_calls=20)


def test_shipped_factors_calibrate_the_model(model):
    ref = sample(model, 4, 8)
    apply_cache(model, FORAConfig(period=2))
    fora = sample(model, 4, 8)
    remove_cache(model)
    apply_cache(model, ICCConfig(period=2, svd="cd", factors=str(shipped_asset("fmnist-dit-cd.safetensors"))))
    icc = sample(model, 4, 8)
    remove_cache(model)
    assert torch.isfinite(icc).all()
    assert (icc - ref).norm() < (fora - ref).norm()


def test_demo_reduced_mode(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--num", "4", "--steps", "6", "--methods", "fora,icc,forecast,equal-macs",
                 "--out", str(out), "--threads", "1"]) == 0
    rows = json.loads((out / "demo.json").read_text())["rows"]
    names = [r["name"] for r in rows]
    assert names[0].startswith("no cache") and any(n.startswith("ICC") for n in names)
    assert rows[0]["psnr"] >= 99 and all(0 <= r["class_agreement"] <= 1 for r in rows)
    assert (out / "demo.png").stat().st_size > 0 and "| configuration |" in (out / "demo.md").read_text()
    # Cache memory is a column: none uncached; ICC keeps outputs and rank-space inputs, more than FORA's branch outputs.
    assert "| cache bytes |" in (out / "demo.md").read_text() and rows[0]["cache_bytes"] == 0
    fora, icc = (next(r["cache_bytes"] for r in rows if r["name"].startswith(p)) for p in ("FORA", "ICC"))
    assert 0 < fora < icc
