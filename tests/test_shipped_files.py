"""Shipped factor files, GOC steps and the classifier go by name from any folder, as `--model fmnist-dit` does."""

import json

from calicache.cache.factors import Factors
from calicache.cache.methods.goc import GocSteps
from calicache.cli import main
from calicache.models.io import shipped_asset, shipped_file
from calicache.training.classifier import classifier_metadata


def test_names_resolve_to_the_shipped_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no repository around: the names alone must do
    assert shipped_file("fmnist-dit-cd") == shipped_asset("fmnist-dit-cd.safetensors")
    assert shipped_file("fmnist-dit-goc20") == shipped_asset("fmnist-dit-goc20.json")
    assert shipped_file("fmnist-classifier") == shipped_asset("fmnist-classifier.safetensors")
    assert Factors.load("fmnist-dit-cd").meta["svd"] == "cd"
    assert GocSteps.load("fmnist-dit-goc20").calls == 20
    assert classifier_metadata("fmnist-classifier")["format"] == classifier_metadata()["format"]


def test_files_and_paths_win_over_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fmnist-dit-cd").write_text("mine")
    assert shipped_file("fmnist-dit-cd") == tmp_path.joinpath("fmnist-dit-cd").relative_to(tmp_path)
    # a name inside a folder, or an unknown name, is a path for the caller (its error names it)
    assert str(shipped_file("sub/fmnist-dit-goc20")) == "sub/fmnist-dit-goc20"
    assert str(shipped_file("no-such-asset")) == "no-such-asset"


def test_cli_samples_with_shipped_names(tmp_path, capsys):
    out = tmp_path / "s"
    argv = ["sample", "--num", "2", "--steps", "20", "--threads", "1", "--json", "--out", str(out)]
    assert main([*argv, "--method", "goc", "--goc-file", "fmnist-dit-goc20"]) == 0
    assert json.loads(capsys.readouterr().out)["cached_ratio"] == 0.5
    assert main([*argv, "--overwrite", "--method", "icc", "--svd", "cd", "--factors", "fmnist-dit-cd"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_config"]["factors"] == "fmnist-dit-cd"


def test_config_files_keep_shipped_names(tmp_path, monkeypatch):
    from calicache import GOCConfig, ICCConfig, load_config

    monkeypatch.chdir(tmp_path)
    for config in (ICCConfig(svd="cd", factors="fmnist-dit-cd"), GOCConfig(steps_file="fmnist-dit-goc20")):
        path = config.save(tmp_path / "sub" / f"{config.method}.json")
        key = "factors" if config.method == "icc" else "steps_file"
        data = json.loads(path.read_text())
        assert data[key] == getattr(config, key) and len(data[f"{key}_sha256"]) == 64
        assert load_config(path) == config  # still the name, wherever the config file lies
