"""benchmarks/speed_processes.py: paired speed-ups pooled from speed.py outputs, and a real run in which each
variant's environment reaches its processes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "speed_processes.py"


def _load():
    spec = importlib.util.spec_from_file_location("speed_processes", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _result(none: list[float], icc: list[float]) -> dict:
    row = {"threads": 2, "code": "after", "time": "wall", "ideal": 1.5}
    return {"rows": [{**row, "config": "none", "walls": none, "ideal": 1.0},
                     {**row, "config": "icc", "walls": icc, "cached_share": 0.3}]}


def test_paired_takes_each_repeats_own_ratio_then_the_median():
    mod = _load()
    # Two processes on a drifting machine: the second twice as slow for both configurations.
    out = mod.paired([_result([10.0, 10.0, 10.0], [8.0, 5.0, 10.0]), _result([20.0, 20.0, 20.0], [16.0, 10.0, 20.0])])
    s = out["icc@2t"]
    assert s["pairs"] == 6
    assert s["speedup"] == pytest.approx(1.25)  # ratios 1.25, 2, 1 twice each: the median is 1.25
    assert s["realized_over_ideal"] == pytest.approx(1.25 / 1.5)
    lo, hi = s["realized_over_ideal_iqr"]
    assert lo <= s["realized_over_ideal"] <= hi
    assert s["cached_share"] == pytest.approx(0.3)
    # Pooling the walls across processes instead would have mixed the two machine speeds.
    assert out.keys() == {"icc@2t"}


def test_thread_counts_are_pooled_apart():
    mod = _load()
    one, two = _result([10.0], [5.0]), _result([10.0], [8.0])
    for row in one["rows"]:
        row["threads"] = 1
    out = mod.paired([{"rows": one["rows"] + two["rows"]}])
    assert out["icc@1t"]["speedup"] == pytest.approx(2.0) and out["icc@2t"]["speedup"] == pytest.approx(1.25)


def test_a_run_gives_each_variant_its_environment(tmp_path):
    out = tmp_path / "pp.json"
    cmd = [sys.executable, str(SCRIPT), "--rounds", "1", "--variant", "kept", "--variant", "glibc",
           "CALICACHE_KEEP_FREED_MEMORY=0", "--out", str(out), "--", "--model", "fmnist-dit", "--num", "2",
           "--steps", "2", "--methods", "none,fora", "--repeats", "1", "--warmup", "0"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    d = json.loads(out.read_text())
    kept = {r["variant"]: r["keep_freed_memory"] for r in d["runs"]}
    assert kept == {"kept": sys.platform == "linux", "glibc": False}
    assert set(d["pooled"]) == {"kept", "glibc", "all"}
    assert d["pooled"]["all"]["fora@1t"]["pairs"] == 2
    # An existing --out is refused before any work starts.
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode != 0 and "exists" in again.stderr
    bad = subprocess.run([sys.executable, str(SCRIPT), "--variant", "x", "NOEQUALS", "--", "--model", "fmnist-dit"],
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "VAR=VALUE" in bad.stderr


def test_speed_runs_a_registry_model_at_the_given_rank(tmp_path):
    factors, out = tmp_path / "f.safetensors", tmp_path / "s.json"
    cmd = [sys.executable, str(SCRIPT.parent / "speed.py"), "--model", "DiT-S/8", "--rank", "5", "--num", "1",
           "--steps", "2", "--cfg-scale", "1", "--methods", "none,icc", "--repeats", "1", "--warmup", "0",
           "--factors-file", str(factors), "--out", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    from calicache.cache.factors import Factors

    loaded = Factors.load(factors)
    assert {a.shape[1] for a, _ in loaded.select(None).values()} == {5}
    d = json.loads(out.read_text())
    assert d["rank"] == 5
    icc = next(r for r in d["rows"] if r["config"] == "icc")
    assert 0 < icc["macs_share"] < 0.2  # rank 5 of 384 channels: far below the uncached call's MACs
