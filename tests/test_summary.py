"""calicache.summary: the last run's cached shares, cache memory and MACs."""

import json

import numpy as np
import pytest

import calicache
from calicache import FORAConfig, ICCConfig, apply_cache, count_macs, remove_cache, sample
from calicache.cache import get_engine
from conftest import tiny_model

STEPS = 6


def test_fora_run():
    model = apply_cache(tiny_model(), FORAConfig(period=2))
    before = calicache.summary(model)
    assert before["calls"] == 0 and before["macs"] is None and "no run yet" in str(before)
    sample(model, 2, STEPS, cfg_scale=2.0)
    s = calicache.summary(model)
    assert s["method"] == "fora" and s["calls"] == STEPS
    assert s["per_call"] == [0.0, 1.0] * (STEPS // 2) and s["cached_share"] == 0.5
    assert [layer["cached_share"] for layer in s["per_layer"]] == [0.5] * 4
    assert s["cache_bytes"] == get_engine(model).stats()["cache_bytes"] > 0
    assert s["macs"] == count_macs(tiny_model(), FORAConfig(period=2), STEPS)
    assert json.loads(json.dumps(s)) == s  # a plain dict
    text = str(s).splitlines()
    assert text[0].startswith("calicache summary: method fora, 6 calls") and "50.0%" in text[0]
    assert any(line.split() == ["1", "100.0%", f"{s['macs']['per_call'][1] / 1e9:.4f}"] for line in text)
    assert any(line.split() == [s["per_layer"][3]["name"], "50.0%"] for line in text)
    remove_cache(model)


def test_per_layer_schedule_and_icc():
    g = np.ones((STEPS, 4), dtype=bool)
    g[1:, 0] = False  # layer 0 cached after call 0, layer 3 cached at odd calls
    g[1::2, 3] = False
    model = apply_cache(tiny_model(), ICCConfig(schedule=g, rank=2))
    sample(model, 2, STEPS)
    s = calicache.summary(model)
    assert [layer["cached_share"] for layer in s["per_layer"]] == [5 / 6, 0.0, 0.0, 0.5]
    assert s["per_call"] == [0.0, 0.5, 0.25, 0.5, 0.25, 0.5]
    assert s["macs"]["total"] < s["macs"]["full_call"] * STEPS


def test_without_a_cache_is_an_error():
    with pytest.raises(ValueError, match="apply_cache"):
        calicache.summary(tiny_model())


def test_summary_reads_the_engines_own_numbers(monkeypatch):
    """One implementation: calls, the cached share and the cache memory are engine.stats()'s."""
    from calicache.cache.engine import CacheEngine

    model = apply_cache(tiny_model(), FORAConfig(period=2))
    sample(model, 2, STEPS)
    stats = CacheEngine.stats
    monkeypatch.setattr(CacheEngine, "stats", lambda self: {**stats(self), "cached_ratio": 0.25, "cache_bytes": 7})
    s = calicache.summary(model)
    assert (s["calls"], s["cached_share"], s["cache_bytes"]) == (STEPS, 0.25, 7)
    remove_cache(model)
