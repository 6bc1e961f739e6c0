"""Method configs: validation, JSON files (paths, hashes, schedules) and the command-line flags."""

import json
import shutil

import numpy as np
import pytest
import torch

import calicache
from calicache import (
    METHODS,
    FORAConfig,
    ForecastConfig,
    GOCConfig,
    ICCConfig,
    NoCacheConfig,
    cli,
    load_config,
)
from calicache.cache.methods import config_from_dict
from calicache.commands.common import add_cache_arguments, cache_config_from_args
from calicache.models.io import save_model
from conftest import run_cached, tiny_model

STEPS = 6


@pytest.fixture
def factors(tmp_path):
    path = tmp_path / "f.safetensors"
    calicache.calibrate(tiny_model(), svd="plain", rank=4).save(path)
    return path


def run(config) -> torch.Tensor:
    return run_cached(tiny_model(), config, STEPS, num=3, cfg_scale=2.0, seed=1)


@pytest.mark.parametrize("config", [
    NoCacheConfig(),
    FORAConfig(period=3, cache_dtype="bfloat16"),
    ICCConfig(rank="full"),
    ForecastConfig(period=3, rank=2, weight=0.5, units="timesteps"),
    GOCConfig(steps=[3, 5], weight=0.8),
])
def test_roundtrip_in_memory_and_on_disk(tmp_path, config):
    again = load_config(config.save(tmp_path / "c.json"))
    assert type(again) is type(config) and again.to_dict() == config.to_dict()
    assert again == config
    assert json.loads((tmp_path / "c.json").read_text())["method"] == config.method
    assert torch.equal(run(again), run(config))


def test_factor_file_by_relative_path_and_hash(tmp_path, factors):
    config = ICCConfig(rank=3, factors=str(factors))
    ref = run(config)
    config.save(tmp_path / "icc.json")
    data = json.loads((tmp_path / "icc.json").read_text())
    assert data["factors"] == "f.safetensors" and len(data["factors_sha256"]) == 64
    moved = tmp_path / "moved"
    moved.mkdir()
    for name in ("icc.json", "f.safetensors"):
        shutil.move(tmp_path / name, moved / name)  # the pair travels together
    loaded = load_config(moved / "icc.json")
    assert loaded.factors == str(moved / "f.safetensors") and torch.equal(run(loaded), ref)
    calicache.calibrate(tiny_model(seed=5), svd="plain", rank=4).save(moved / "f.safetensors")
    with pytest.raises(ValueError, match="factors file .* changed since the config was saved"):
        load_config(moved / "icc.json")


@pytest.mark.parametrize("null", [False, True], ids=["absent", "null"])
def test_hand_written_config_without_a_file_hash_loads_and_warns_once(tmp_path, factors, null):
    from calicache.utils import file_sha256

    data = {"method": "icc", "rank": 3, "factors": "f.safetensors"} | ({"factors_sha256": None} if null else {})
    (tmp_path / "hand.json").write_text(json.dumps(data))
    digest = file_sha256(factors)
    with pytest.warns(UserWarning, match=rf"hand\.json: no factors_sha256, so factors file .* cannot be checked.*"
                                         rf"add \"factors_sha256\": \"{digest}\".*config\.save\(path\)") as seen:
        loaded = load_config(tmp_path / "hand.json")
        load_config(tmp_path / "hand.json")
    assert len([w for w in seen if "no factors_sha256" in str(w.message)]) == 1
    assert loaded == ICCConfig(rank=3, factors=str(factors))
    loaded.save(tmp_path / "saved.json")  # records the hash: that config is checked
    assert json.loads((tmp_path / "saved.json").read_text())["factors_sha256"] == digest
    (tmp_path / "hand.json").write_text(json.dumps(data | {"factors_sha256": 5}))
    with pytest.raises(ValueError, match=r"factors_sha256 must be the file's sha256 \(64 hex digits\) or absent"):
        load_config(tmp_path / "hand.json")


def test_goc_steps_file_by_relative_path_and_hash(tmp_path):
    from calicache.cache.methods.goc import GocSteps

    GocSteps([None] * STEPS, 0.0, [3], {"calls": STEPS}).save(tmp_path / "goc.json")
    GOCConfig(steps_file=str(tmp_path / "goc.json")).save(tmp_path / "c.json")
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["steps_file"] == "goc.json" and len(data["steps_file_sha256"]) == 64
    assert load_config(tmp_path / "c.json").steps_file == str(tmp_path / "goc.json")
    GocSteps([None] * STEPS, 0.0, [5], {"calls": STEPS}).save(tmp_path / "goc.json")
    with pytest.raises(ValueError, match="steps_file file .* changed since the config was saved"):
        load_config(tmp_path / "c.json")


def test_in_memory_factors_cannot_be_saved(tmp_path):
    config = ICCConfig(rank=2, factors=calicache.calibrate(tiny_model(), svd="plain", rank=4))
    with pytest.raises(ValueError, match=r"save it to a file first"):
        config.save(tmp_path / "c.json")
    assert not (tmp_path / "c.json").exists()


def test_schedule_inline_and_by_path(tmp_path):
    g = np.ones((STEPS, 4), dtype=bool)
    g[1::2, 1:] = False
    inline = FORAConfig(schedule=g)
    inline.save(tmp_path / "inline.json")
    assert json.loads((tmp_path / "inline.json").read_text())["schedule"]["gather"][1] == [1, 0, 0, 0]
    calicache.CacheSchedule.from_matrix(g).save(tmp_path / "s.json")
    by_path = FORAConfig(schedule=str(tmp_path / "s.json"))
    by_path.save(tmp_path / "by_path.json")
    assert json.loads((tmp_path / "by_path.json").read_text())["schedule"] == "s.json"
    ref = run(inline)
    other = g.copy()
    other[2, 1] = False
    assert load_config(tmp_path / "inline.json") == inline != FORAConfig(schedule=other)
    assert torch.equal(run(load_config(tmp_path / "inline.json")), ref)
    assert torch.equal(run(load_config(tmp_path / "by_path.json")), ref)
    # A schedule file kept by path is checked like a factor file: changed, the config would cache other calls.
    calicache.CacheSchedule.from_matrix(other).save(tmp_path / "s.json")
    with pytest.raises(ValueError, match="schedule file .* changed since the config was saved"):
        load_config(tmp_path / "by_path.json")


def test_save_refuses_to_overwrite(tmp_path):
    path = FORAConfig(period=2).save(tmp_path / "c.json")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        FORAConfig(period=3).save(path)
    assert load_config(path).period == 2
    FORAConfig(period=3).save(path, overwrite=True)
    assert load_config(path).period == 3


@pytest.mark.parametrize("data, match", [
    ({"method": "magic"}, r"'method' is 'magic'; choose one of"),
    ({"period": 2}, "'method' is None"),
    ({"method": "fora", "periodd": 2}, r"unknown key\(s\) \['periodd'\]"),
    ({"method": "fora", "rank": 3}, r"unknown key\(s\) \['rank'\] for method 'fora'"),
    ({"method": "icc", "rank": "x"}, "rank must be"),
    ({"method": "icc", "period": "2"}, "period must be an integer"),
    ({"method": "goc", "steps": "3,5"}, "steps must be a list"),
    ({"method": "goc", "weight": "big"}, "weight must be a finite number"),
    ({"method": "fora", "cache_dtype": 16}, "cache_dtype must be"),
    ({"method": "icc", "factors": 7}, "factors must be a file path"),
    ({"method": "fora", "schedule": {"gather": [[1, 1, 1, 1]], "what": 1}}, r"unknown schedule key\(s\) \['what'\]"),
    ({"format": "calicache-factors", "method": "fora"}, "is this a cache config"),
    ([1, 2], "JSON object"),
])
def test_bad_files_name_the_key(tmp_path, data, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=match):
        load_config(path)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.save"):
        load_config(tmp_path / "nope.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="not a readable JSON"):
        load_config(tmp_path / "broken.json")
    with pytest.raises(FileNotFoundError, match="factors file"):
        config_from_dict({"method": "icc", "factors": str(tmp_path / "gone.safetensors")})


# -- the command line ---------------------------------------------------------------------------------
def parse(*argv: str):
    import argparse

    p = argparse.ArgumentParser()
    add_cache_arguments(p)
    return cache_config_from_args(p.parse_args(list(argv)))


def test_every_method_builds_itself_from_its_flags():
    assert parse() == NoCacheConfig()
    assert parse("--method", "fora", "--period", "3") == FORAConfig(period=3)
    assert parse("--method", "icc", "--rank", "full") == ICCConfig(rank="full")
    assert parse("--method", "forecast", "--rank", "2", "--forecast-weight", "0.5") == \
        ForecastConfig(rank=2, weight=0.5)
    assert parse("--method", "goc", "--goc-steps", "3,5", "--goc-weight", "0") == GOCConfig(steps=[3, 5], weight=0.0)
    for name, cls in METHODS.items():
        assert type(parse("--method", name)) is cls and cls.method == name


@pytest.mark.parametrize("argv, match", [
    (["--method", "fora", "--rank", "3"], "--rank not used by --method fora"),
    (["--rank", "3"], "--rank not used by --method none"),
    (["--method", "icc", "--rank", "half"], "--rank half: --rank must be"),
    (["--method", "goc", "--goc-steps", "a"], "--goc-steps a: GOC steps are comma-separated"),
    (["--config", "c.json", "--period", "3"], "--config holds the whole cache config"),
])
def test_bad_flags(argv, match):
    with pytest.raises(ValueError, match=match):
        parse(*argv)


def test_sample_with_config_file_equals_the_flags(tmp_path):
    save_model(tiny_model(), tmp_path / "m.safetensors")
    ICCConfig(period=2, rank=3).save(tmp_path / "icc.json")
    common = ["sample", "--model", str(tmp_path / "m.safetensors"), "--num", "2", "--steps", "4"]
    assert cli.main([*common, "--config", str(tmp_path / "icc.json"), "--out", str(tmp_path / "a")]) == 0
    assert cli.main([*common, "--method", "icc", "--rank", "3", "--out", str(tmp_path / "b")]) == 0
    with np.load(tmp_path / "a" / "samples.npz") as a, np.load(tmp_path / "b" / "samples.npz") as b:
        assert np.array_equal(a["arr_0"], b["arr_0"])
    report = json.loads((tmp_path / "a" / "report.json").read_text())
    assert report["method"] == "icc" and report["cache_config"]["rank"] == 3


def test_demo_and_bench_run_a_config_file(tmp_path):
    save_model(tiny_model(input_size=12), tmp_path / "m.safetensors")
    ICCConfig(period=2, rank=3).save(tmp_path / "icc.json")
    model, config = ["--model", str(tmp_path / "m.safetensors")], ["--config", str(tmp_path / "icc.json")]
    assert cli.main(["demo", *model, "--num", "2", "--steps", "4", "--methods", "none", "--no-classifier",
                     "--out", str(tmp_path / "demo"), *config]) == 0
    rows = json.loads((tmp_path / "demo" / "demo.json").read_text())["rows"]
    assert [r["name"] for r in rows] == ["no cache, 4 steps", "icc from icc.json"]
    assert cli.main(["bench", *model, "--quick", "--steps", "3", "--num", "2", "--families", "fora", "--no-peers",
                     "--no-classifier", "--out", str(tmp_path / "bench"), *config]) == 0
    rows = json.loads((tmp_path / "bench" / "bench.json").read_text())["rows"]
    assert [r["family"] for r in rows] == ["uncached", "FORA", "config"] and rows[-1]["name"] == "icc (icc.json)"
