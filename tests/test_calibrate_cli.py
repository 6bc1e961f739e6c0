"""`calicache calibrate` on a tiny saved model and an .npz calibration set."""

import json

import numpy as np
import pytest

from calicache import ForecastConfig, ICCConfig, apply_cache, remove_cache, sample, save_model
from calicache.cache.factors import Factors
from calicache.cli import main
from conftest import tiny_model


@pytest.fixture
def setup(tmp_path):
    model = tiny_model()
    save_model(model, tmp_path / "m.safetensors")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", rng.integers(0, 256, (40, 8, 8), dtype=np.uint8), rng.integers(0, 4, 40))
    return tmp_path, model


def run(tmp_path, *extra):
    return main(["calibrate", "--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "d.npz"),
                 "--num", "16", "--batch-size", "8", "--steps", "10", *extra])


def test_cli_writes_factors_that_sample_uses(setup, capsys):
    tmp_path, model = setup
    out = tmp_path / "f.safetensors"
    assert run(tmp_path, "--svd", "cd", "--rank", "6", "--out", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank_min"] == report["rank_max"] == 6 and report["svd"] == "cd"
    f = Factors.load(out)
    assert f.meta["svd"] == "cd" and f.meta["num"] == 16 and f.meta["data"] == str(tmp_path / "d.npz")
    apply_cache(model, ICCConfig(svd="cd", factors=out))
    x = sample(model, 2, 10)
    remove_cache(model)
    assert x.shape == (2, 1, 8, 8)


def test_cli_cf_factors_for_the_forecast(setup, capsys):
    tmp_path, model = setup
    out = tmp_path / "cf.safetensors"
    assert run(tmp_path, "--svd", "cf", "--rank", "4", "--period", "3", "--forecast-weight", "0.8",
               "--out", str(out)) == 0
    f = Factors.load(out)
    assert (f.meta["svd"], f.meta["period"], f.meta["forecast_weight"]) == ("cf", 3, 0.8)
    apply_cache(model, ForecastConfig(svd="cf", factors=out, period=3, weight=0.8))
    x = sample(model, 2, 10)
    remove_cache(model)
    assert x.shape == (2, 1, 8, 8) and bool(x.isfinite().all())


def test_cli_errors_leave_no_file(setup, capsys):
    tmp_path, _ = setup
    out = tmp_path / "x.safetensors"
    assert run(tmp_path, "--rank", "big", "--out", str(out)) == 2
    assert "--rank must be" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "none.npz"),
                 "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".x*"))
