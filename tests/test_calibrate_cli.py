"""`calicache calibrate` on a tiny saved model and an .npz calibration set."""

import json

from calicache import ForecastConfig, ICCConfig, apply_cache, remove_cache, sample
from calicache.cache.factors import Factors
from calicache.cli import main
from conftest import calibrate_cli


def test_cli_writes_factors_that_sample_uses(calibrate_files, capsys):
    tmp_path, model = calibrate_files
    out = tmp_path / "f.safetensors"
    assert calibrate_cli(tmp_path, "--svd", "cd", "--rank", "6", "--out", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["rank_min"] == report["rank_max"] == 6 and report["svd"] == "cd"
    f = Factors.load(out)
    assert f.meta["svd"] == "cd" and f.meta["num"] == 16 and f.meta["data"] == str(tmp_path / "d.npz")
    apply_cache(model, ICCConfig(svd="cd", factors=out))
    x = sample(model, 2, 10)
    remove_cache(model)
    assert x.shape == (2, 1, 8, 8)


def test_cli_cf_factors_for_the_forecast(calibrate_files, capsys):
    tmp_path, model = calibrate_files
    out = tmp_path / "cf.safetensors"
    assert calibrate_cli(tmp_path, "--svd", "cf", "--rank", "4", "--period", "3", "--forecast-weight", "0.8",
               "--out", str(out)) == 0
    f = Factors.load(out)
    assert (f.meta["svd"], f.meta["period"], f.meta["forecast_weight"]) == ("cf", 3, 0.8)
    apply_cache(model, ForecastConfig(svd="cf", factors=out, period=3, weight=0.8))
    x = sample(model, 2, 10)
    remove_cache(model)
    assert x.shape == (2, 1, 8, 8) and bool(x.isfinite().all())


def test_cli_errors_leave_no_file(calibrate_files, capsys):
    tmp_path, _ = calibrate_files
    out = tmp_path / "x.safetensors"
    assert calibrate_cli(tmp_path, "--rank", "big", "--out", str(out)) == 2
    assert "--rank must be" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "none.npz"),
                 "--out", str(out)]) == 2
    assert not out.exists() and not list(tmp_path.glob(".x*"))
