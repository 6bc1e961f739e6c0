"""A cache resolves its factors once (issue 18 leftovers): `summary()`, `count_macs()` and a pipeline's guidance
twin reuse the attached cache's factors, weight hash and GOC steps instead of decomposing, loading or hashing again."""

import json

import pytest
import torch

import calicache
from calicache import ForecastConfig, GOCConfig, ICCConfig, apply_cache, count_macs, remove_cache, sample
from calicache.adapters import get_adapter
from calicache.cache import get_engine
from calicache.cache.factors import Factors
from calicache.cache.pipeline import PIPE_ATTR
from calicache.cache.svd import scaled_svd
from calicache.models.io import weight_hash
from conftest import tiny_model

STEPS = 4


def counting(monkeypatch) -> dict[str, int]:
    """Counts from now on: SVDs, factor-file checksums (every load verifies one), weight hashes and GOC steps
    files read."""
    import calicache.cache.engine as engine_module
    import calicache.tensorfile as tensorfile
    from calicache.cache.methods.goc import GocSteps

    counts = {"svd": 0, "checksum": 0, "weight_hash": 0, "steps_file": 0}

    def counted(name, fn):
        def run(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return run

    monkeypatch.setattr(torch.linalg, "svd", counted("svd", torch.linalg.svd))
    monkeypatch.setattr(tensorfile, "tensor_checksum", counted("checksum", tensorfile.tensor_checksum))
    monkeypatch.setattr(engine_module, "weight_hash", counted("weight_hash", engine_module.weight_hash))
    monkeypatch.setattr(GocSteps, "load", staticmethod(counted("steps_file", GocSteps.load)))
    return counts


def plain_factors(model, rank: int) -> Factors:
    specs = [s for b in get_adapter(model).branches(model) for s in b.linears]
    return Factors({s.name: scaled_svd(s.weight(), rank) for s in specs}, {"svd": "plain",
                                                                          "model_hash": weight_hash(model)})


@pytest.fixture
def factor_file(tmp_path):
    path = tmp_path / "f.safetensors"
    plain_factors(tiny_model(), 4).save(path)
    return path


@pytest.mark.parametrize("make", [
    lambda f: ICCConfig(rank=3),
    lambda f: ICCConfig(rank=0),  # every branch served whole: its linears hold no factors
    lambda f: ICCConfig(rank=3, factors=str(f)),
    lambda f: ForecastConfig(rank=2, factors=str(f), period=3),
], ids=["plain", "rank0", "file", "forecast-file"])
def test_summary_and_count_macs_reuse_the_attached_factors(monkeypatch, factor_file, make):
    config = make(factor_file)
    expected = count_macs(tiny_model(), config, STEPS)  # resolved from scratch
    model = apply_cache(tiny_model(), config)
    sample(model, 1, STEPS)
    counts = counting(monkeypatch)
    s = calicache.summary(model)
    assert count_macs(model, None, STEPS) == count_macs(model, get_engine(model).config, STEPS) == s["macs"]
    assert count_macs(model, None, STEPS, tokens=16) == s["macs"]  # the shape given: a new adapter, the same factors
    assert counts == {"svd": 0, "checksum": 0, "weight_hash": 0, "steps_file": 0}
    assert s["macs"] == expected
    # Another config is another cache: resolved anew, the attached one untouched.
    count_macs(model, ICCConfig(rank=2), STEPS)
    assert counts["svd"] > 0 and get_engine(model).config is config
    remove_cache(model)


def test_summary_and_count_macs_reuse_the_attached_goc_steps(monkeypatch, tmp_path):
    from calicache.cache.methods.goc import GocSteps

    path = tmp_path / "goc.json"
    meta = {"model_hash": weight_hash(tiny_model()), "calls": STEPS, "period": 2}
    GocSteps([None] * STEPS, 0.0, [3], meta).save(path)
    config = GOCConfig(steps_file=str(path))
    expected = count_macs(tiny_model(), config, STEPS)
    model = apply_cache(tiny_model(), config)
    sample(model, 1, STEPS)
    counts = counting(monkeypatch)
    assert count_macs(model, None, STEPS) == calicache.summary(model)["macs"] == expected
    assert counts == {"svd": 0, "checksum": 0, "weight_hash": 0, "steps_file": 0}
    remove_cache(model)


def test_the_weight_hash_is_computed_once_per_cache(monkeypatch, factor_file):
    model = tiny_model()
    counts = counting(monkeypatch)
    apply_cache(model, ICCConfig(rank=3, factors=str(factor_file)))
    assert counts["weight_hash"] == 1
    assert get_engine(model).model_hash() == weight_hash(model) and counts["weight_hash"] == 1


@pytest.fixture
def wan_goc_file(tmp_path):
    """GOC steps for the tiny Wan pipeline's 5-call runs, tied to its weights."""
    from calicache.cache.methods.goc import GocSteps
    from tiny_families import STEPS as PIPE_STEPS
    from tiny_families import wan

    path = tmp_path / "goc.json"
    GocSteps([None] * PIPE_STEPS, 0.0, [3], {"model_hash": weight_hash(wan().transformer), "calls": PIPE_STEPS,
                                             "period": 2}).save(path)
    assert json.loads(path.read_text())["steps"] == [3]
    return path


@pytest.mark.parametrize("make", [lambda f: ICCConfig(rank=3), lambda f: GOCConfig(steps_file=str(f))],
                         ids=["icc", "goc-file"])
def test_guidance_twin_reuses_factors_and_hash_mid_run(monkeypatch, wan_goc_file, make):
    """Wan's unconditional pass meets a twin built at its first call: nothing is decomposed or hashed then."""
    pytest.importorskip("diffusers")
    from tiny_families import run, wan

    pipe = apply_cache(wan(), make(wan_goc_file))
    counts = counting(monkeypatch)
    run(pipe, "wan")
    (twin,) = vars(pipe)[PIPE_ATTR][2].twins
    assert counts == {"svd": 0, "checksum": 0, "weight_hash": 0, "steps_file": 0}
    assert get_engine(twin).shares is get_engine(pipe)
    remove_cache(pipe)
