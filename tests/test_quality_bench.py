"""benchmarks/quality.py on a tiny model: matched step counts, metrics that equal the plain metric
functions, paired comparisons; chunks that a rerun reuses (sampler calls counted), a changed setting
that computes afresh, an interrupted run that leaves no partial file, --chunks/--budget-hours that stop
cleanly and --report-only that marks the unfinished rows."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from calicache import FORAConfig, save_model
from calicache.bench.chunks import ChunkStore
from calicache.data.fashion_mnist import load_fashion_mnist
from calicache.metrics.frechet import frechet_distance, gaussian_stats
from calicache.training.classifier import features_uint8, load_classifier
from conftest import tiny_model
from test_metrics_eval import FakeExtractor  # the Inception stand-in (tests/ is on sys.path)

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "quality.py"
UNITS = 6 * 3  # configurations (uncached 4 steps, FORA, ICC plain, the extra config, 1 and 2 steps) x chunks
REF_UNITS = 10  # the 40 Inception reference images in chunks of 4


def _load():
    spec = importlib.util.spec_from_file_location("quality_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """(module, argv builder, sampler calls): Inception faked, sample_chunk counted."""
    try:
        load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    mod = _load()
    mod.InceptionExtractor = FakeExtractor
    tmp = tmp_path_factory.mktemp("quality-model")
    model_path = tmp / "tiny.safetensors"
    save_model(tiny_model(input_size=28, patch_size=7, num_classes=10, hidden_size=64), model_path)
    extra = FORAConfig(period=4).save(tmp / "fora4.json")
    calls = []
    sample_chunk = mod.sample_chunk

    def counted(model, c, start, end, args):
        calls.append((c.ident, start, end))
        return sample_chunk(model, c, start, end, args)

    mod.sample_chunk = counted

    def argv(out, *more):
        return ["--model", str(model_path), "--steps", "4", "--configs", "fora,icc-plain",
                "--extra-config", f"FORA p=4={extra}", "--num", "6", "--num-fd", "10", "--chunk", "4",
                "--ref-num", "40", "--domain-ref-num", "200", "--bootstrap", "10", "--out", str(out), *more]

    return mod, argv, calls


@pytest.fixture(scope="module")
def full(bench, tmp_path_factory):
    mod, argv, calls = bench
    out = tmp_path_factory.mktemp("quality-full")
    calls.clear()
    res = mod.main(argv(out))
    return out, res, list(calls)


def test_configurations_and_matched_step_counts(full):
    _, res, calls = full
    rows = {r["name"]: r for r in res["rows"]}
    assert list(rows) == ["no cache, 4 steps", "FORA p=2", "ICC plain SVD r=21 p=2", "FORA p=4",
                          "no cache, 1 steps", "no cache, 2 steps"]  # ICC at rank 21 of width 64 costs ~4 steps
    assert rows["FORA p=4"]["family"] == "tuned" and rows["no cache, 1 steps"]["matches"] == "FORA p=4"
    per_step = rows["no cache, 4 steps"]["macs_per_sample"] / 4
    for r in (r for r in res["rows"] if r["family"] == "fewer steps"):
        for name in r["matches"].split(", "):
            assert abs(r["macs_per_sample"] - rows[name]["macs_per_sample"]) <= per_step / 2 + 1
    assert len(calls) == UNITS and res["complete"] and res["progress"]["units_left"] == 0
    assert all(r["complete"] and r["n_fd"] == 10 and r["n_inception"] == 6 for r in res["rows"])


def test_metrics_equal_the_plain_functions(full):
    out, res, _ = full
    base = res["rows"][0]
    store = ChunkStore(out)
    images = np.concatenate([np.load(p)["images"] for p in sorted((out / "uncached").glob("samples-*.npz"))])
    assert images.shape == (10, 28, 28, 3) and len(list(store.root.rglob("samples-*.npz"))) == UNITS
    clf = load_classifier()
    test, _ = load_fashion_mnist("test")
    fd = frechet_distance(*gaussian_stats(features_uint8(clf, images)),
                          *gaussian_stats(features_uint8(clf, test[:200])), method="eigh")
    assert base["fd"] == pytest.approx(fd, rel=1e-6)
    fake = FakeExtractor()
    ref = fake(np.repeat(test[:40, :, :, None], 3, axis=-1))
    fid = frechet_distance(*gaussian_stats(fake(images[:6]).pool), *gaussian_stats(ref.pool), method="eigh")
    assert base["fid"] == pytest.approx(fid, rel=1e-6)
    for r in res["rows"]:
        for m in ("fd", "fid", "sfid", "precision", "recall", "is", "class_agreement", "is_domain"):
            assert r[f"{m}_lo"] <= r[m] <= r[f"{m}_hi"], (r["name"], m)
        assert r["fd_hi"] > r["fd_lo"] and len(r["per_class_agreement"]) == 10
    assert res["rows"][1]["fid"] != base["fid"]  # cached samples differ, so do their metrics


def test_paired_comparisons_and_tables(full):
    out, res, _ = full
    pairs = {(c["first"], c["second"]): c for c in res["comparisons"]}
    rows = {r["name"]: r for r in res["rows"]}
    c = pairs[("FORA p=2", "no cache, 2 steps")]
    assert c["d_fd"] == pytest.approx(rows["FORA p=2"]["fd"] - rows["no cache, 2 steps"]["fd"])
    assert c["d_fd_lo"] <= c["d_fd"] <= c["d_fd_hi"] and "d_fid" in c
    table = (out / "quality.md").read_text()
    assert "FORA p=2 - no cache, 2 steps" in table and "10 / 6 |" in table and "incomplete" not in table
    assert json.loads((out / "quality.json").read_text())["num"] == 6


def test_rerun_reuses_every_piece(bench, full):
    mod, argv, calls = bench
    out, res, _ = full
    calls.clear()
    seen = FakeExtractor.images_seen
    again = mod.main(argv(out))
    assert calls == [] and FakeExtractor.images_seen == seen  # no sampling, no Inception (reference cached)
    assert again["rows"] == res["rows"] and again["reference"]["from_cache"]


def test_a_changed_setting_computes_afresh(bench, full, tmp_path):
    mod, argv, calls = bench
    out, res, _ = full
    calls.clear()
    other = mod.main(argv(out, "--seed", "1", "--configs", "fora", "--chunks", "3", "--no-report"))
    assert len(calls) == 3 and other["progress"]["units_run"] == 3  # nothing of seed 0 is reused
    assert {ident for ident, _, _ in calls} == {"uncached", "fora", "tuned-fora-p-4"}


def test_chunks_stop_cleanly_and_report_only_marks_unfinished_rows(bench, tmp_path):
    mod, argv, calls = bench
    calls.clear()
    part = mod.main(argv(tmp_path, "--chunks", "2", "--no-report"))
    assert calls == [("uncached", 0, 4), ("fora", 0, 4)]  # chunk 0 of each configuration first
    progress = {**part["progress"], "units_run": 2, "units_left": UNITS + REF_UNITS - 2, "stopped_by": "--chunks 2"}
    assert part["progress"] == progress
    est = mod.main(argv(tmp_path, "--estimate"))
    assert est["cpu_seconds_left"]["sampling"] > 0 and est["sampling_cpu_seconds_per_sample"]["FORA p=2"] > 0
    calls.clear()
    res = mod.main(argv(tmp_path, "--report-only"))
    assert calls == [] and not res["complete"] and res["progress"] is None
    rows = {r["name"]: r for r in res["rows"]}
    assert rows["FORA p=2"]["n_fd"] == 4 and rows["FORA p=2"]["n_inception"] == 4 and not rows["FORA p=2"]["complete"]
    assert rows["no cache, 2 steps"]["n_fd"] == 0 and rows["no cache, 2 steps"].get("fd") is None
    table = (tmp_path / "quality.md").read_text()
    assert "| FORA p=2 | 4 | " in table and "4 / 4 (incomplete)" in table and "0 / 0 (incomplete)" in table
    pair = next(c for c in res["comparisons"] if c["first"] == "FORA p=2")
    assert "d_fd" not in pair  # the uncached 2-step run has no samples yet: nothing to pair
    calls.clear()
    res = mod.main(argv(tmp_path, "--budget-hours", "1e-9", "--no-report"))
    assert len(calls) == 1 and res["progress"]["stopped_by"] == "--budget-hours 1e-09"  # one unit, then the budget


def test_an_interrupted_run_leaves_no_partial_file_and_continues(bench, tmp_path):
    mod, argv, calls = bench
    sample_chunk = mod.sample_chunk

    def interrupted(model, c, start, end, args):
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample_chunk(model, c, start, end, args)

    calls.clear()
    mod.sample_chunk = interrupted
    try:
        with pytest.raises(KeyboardInterrupt):
            mod.main(argv(tmp_path))
    finally:
        mod.sample_chunk = sample_chunk
    files = sorted(p.name for p in tmp_path.rglob("*-0000*.npz") if p.parent.name != "reference")
    assert len(files) == 2 * 3 and not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]
    (tmp_path / "fora" / ".samples-000004-000008-0.npz.x.tmp.npz").write_bytes(b"PK")  # what a kill -9 leaves
    calls.clear()
    res = mod.main(argv(tmp_path))
    assert len(calls) == UNITS - 2 and res["complete"] and not [p for p in tmp_path.rglob("*") if ".tmp" in p.name]


def test_store_keys_locks_and_bad_arguments(bench, tmp_path):
    mod, argv, _ = bench
    store = ChunkStore(tmp_path)
    a, b = {"seed": 0}, {"seed": 1}
    path = store.save("g", "samples", 0, 4, a, images=np.zeros(3))
    assert store.has("g", "samples", 0, 4, a) and not store.has("g", "samples", 0, 4, b)
    path.rename(store.path("g", "samples", 0, 4, b))  # a file under another key's name is not trusted
    assert store.load("g", "samples", 0, 4, b) is None
    with store.lock(), pytest.raises(RuntimeError, match="another run is using"):
        mod.main(argv(tmp_path))
    with pytest.raises(SystemExit, match="must be >= --num"):
        mod.main(["--num", "20", "--num-fd", "10"])
    with pytest.raises(SystemExit):
        mod.main(["--configs", "fora,nope"])


def test_shards_split_the_units_and_report_like_one_run(bench, full, tmp_path):
    mod, argv, calls = bench
    _, res, whole_calls = full
    seen = []
    for k in range(2):
        calls.clear()
        part = mod.main(argv(tmp_path, "--shard", f"{k}/2"))
        assert "rows" not in part and part["progress"]["units_left"] == 0  # a shard only runs units
        seen.append(list(calls))
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == sorted(whole_calls)
    assert abs(len(seen[0]) - len(seen[1])) <= 1
    calls.clear()
    joined = mod.main(argv(tmp_path, "--report-only"))
    assert calls == [] and joined["complete"] and joined["rows"] == res["rows"]
    store = ChunkStore(tmp_path)
    with store.lock(shard="0-of-2"):
        with store.lock(shard="1-of-2"):  # two shards run side by side ...
            pass
        with pytest.raises(RuntimeError, match="another run is using"):
            mod.main(argv(tmp_path))  # ... but no whole run beside them
        with pytest.raises(RuntimeError, match="another run is using"):
            mod.main(argv(tmp_path, "--shard", "0/2"))  # nor the same shard twice
    for bad in ("2/2", "a/b", "1"):
        with pytest.raises(SystemExit):
            mod.main(argv(tmp_path, "--shard", bad))
    with pytest.raises(SystemExit, match="only runs units"):
        mod.main(argv(tmp_path, "--shard", "0/2", "--report-only"))


def test_peers_sample_in_chunks(bench, tmp_path):
    mod, argv, calls = bench
    pytest.importorskip("diffusers")
    calls.clear()
    res = mod.main(argv(tmp_path, "--configs", "taylorseer", "--num-fd", "6", "--bootstrap", "0"))
    rows = {r["name"]: r for r in res["rows"]}
    assert "diffusers TaylorSeer p=2" in rows and rows["diffusers TaylorSeer p=2"]["complete"]
    assert "diffusers TaylorSeer p=2" in rows["no cache, 2 steps"]["matches"]
    assert ("taylorseer", 0, 4) in calls and ("taylorseer", 4, 6) in calls
