"""benchmarks/quality.py end to end at a tiny size: matched step counts, metrics that equal the plain
metric functions, paired comparisons, and a rerun that reuses the saved samples."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from calicache.data.fashion_mnist import load_fashion_mnist
from calicache.metrics.frechet import frechet_distance, gaussian_stats
from calicache.training.classifier import features_uint8, load_classifier
from test_metrics_eval import FakeExtractor  # the Inception stand-in (tests/ is on sys.path)

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "quality.py"


def _load():
    spec = importlib.util.spec_from_file_location("quality_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    try:
        load_fashion_mnist("test")
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST is not installed")
    mod = _load()
    mod.InceptionExtractor = FakeExtractor
    out = tmp_path_factory.mktemp("quality")
    argv = ["--num", "8", "--num-fd", "12", "--ref-num", "40", "--bootstrap", "20", "--out", str(out)]
    return mod, argv, out, mod.main(argv)


def test_configurations_and_matched_step_counts(run):
    _, _, _, res = run
    rows = {r["name"]: r for r in res["rows"]}
    for name in ("no cache, 20 steps", "FORA p=2", "ICC CD r=21 p=2", "ICC plain SVD r=21 p=2", "GOC p=2",
                 "forecast CD r=21 p=2", "no cache, 10 steps"):
        assert name in rows, sorted(rows)
    per_step = rows["no cache, 20 steps"]["macs_per_sample"] / 20
    fewer = [r for r in res["rows"] if r["family"] == "fewer steps"]
    assert fewer and "FORA p=2" in rows["no cache, 10 steps"]["matches"]
    for r in fewer:
        for name in r["matches"].split(", "):
            assert abs(r["macs_per_sample"] - rows[name]["macs_per_sample"]) <= per_step / 2 + 1
    assert len({r["steps"] for r in fewer}) == len(fewer)  # one uncached run per step count


def test_metrics_equal_the_plain_functions(run):
    mod, _, out, res = run
    base = res["rows"][0]
    with np.load(out / "samples" / "no-cache--20-steps.npz") as z:
        images, labels = z["arr_0"], z["arr_1"]
    assert images.shape == (12, 28, 28, 3) and list(labels) == [i % 10 for i in range(12)]
    clf = load_classifier()
    test, _ = load_fashion_mnist("test")
    fd = frechet_distance(*gaussian_stats(features_uint8(clf, images)), *gaussian_stats(features_uint8(clf, test)),
                          method="eigh")
    assert base["fd"] == pytest.approx(fd, rel=1e-6)
    fake = FakeExtractor()
    ref = fake(np.repeat(test[:40, :, :, None], 3, axis=-1))
    fid = frechet_distance(*gaussian_stats(fake(images[:8]).pool), *gaussian_stats(ref.pool), method="eigh")
    assert base["fid"] == pytest.approx(fid, rel=1e-6)
    for r in res["rows"]:
        for m in ("fd", "fid", "sfid", "precision", "recall", "is", "class_agreement", "is_domain"):
            assert r[f"{m}_lo"] <= r[m] <= r[f"{m}_hi"], (r["name"], m)
        assert r["fd_hi"] > r["fd_lo"] and len(r["per_class_agreement"]) == 10
    assert res["rows"][1]["fid"] != base["fid"]  # cached samples differ, so do their metrics


def test_paired_comparisons_and_tables(run):
    _, _, out, res = run
    pairs = {(c["first"], c["second"]): c for c in res["comparisons"]}
    assert ("FORA p=2", "no cache, 10 steps") in pairs
    assert ("ICC CD r=21 p=2", "ICC plain SVD r=21 p=2") in pairs
    rows = {r["name"]: r for r in res["rows"]}
    c = pairs[("FORA p=2", "no cache, 10 steps")]
    assert c["d_fd"] == pytest.approx(rows["FORA p=2"]["fd"] - rows["no cache, 10 steps"]["fd"])
    assert c["d_fd_lo"] <= c["d_fd"] <= c["d_fd_hi"]
    table = (out / "quality.md").read_text()
    assert "FORA p=2 - no cache, 10 steps" in table and "in-domain FD" in table
    assert json.loads((out / "quality.json").read_text())["num"] == 8


def test_rerun_reuses_the_samples(run):
    mod, argv, _, res = run

    def no_sampling(*a, **k):
        raise AssertionError("samples should have been reused")

    mod.run_variant = no_sampling
    again = mod.main(argv)
    assert [r["fd"] for r in again["rows"]] == [r["fd"] for r in res["rows"]]
    with pytest.raises(SystemExit, match="must be >= --num"):
        mod.main(["--num", "20", "--num-fd", "10"])


def test_estimate_scales_a_finished_run(run):
    mod, _, out, res = run
    small = mod.estimate(res, num=8, num_fd=12, bootstrap=20, ref_num=40)
    big = mod.estimate(res, num=16, num_fd=24, bootstrap=20, ref_num=40)
    assert small["configurations"] == len(res["rows"])
    assert big["seconds"]["sampling"] == pytest.approx(2 * small["seconds"]["sampling"], abs=1)
    assert big["seconds"]["total"] >= small["seconds"]["total"]
