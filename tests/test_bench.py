"""`calicache bench` end to end on a tiny model, the peer adapters against independent references, and
the report helpers."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from calicache import ForecastConfig, apply_cache, count_macs, remove_cache, sample, save_model
from calicache.bench.grid import cached_call_share
from calicache.bench.peers import BranchCounter, Peer, attach, counted_sample, missing
from calicache.bench.plot import COLOURS, MARKERS, quality_figure
from calicache.bench.report import winners
from calicache.bench.runs import Result, Variant, score
from calicache.cli import main
from calicache.metrics.domain import class_agreement, classifier_outputs
from calicache.metrics.fidelity import fidelity
from calicache.metrics.frechet import feature_frechet_distance
from conftest import TinyClassifier, randomize, tiny_model

HAS_CACHE_DIT = importlib.util.find_spec("cache_dit") is not None


def test_bench_quick_end_to_end(tmp_path):
    path = tmp_path / "tiny.safetensors"
    save_model(randomize(tiny_model(input_size=12), std=0.05), path)  # SSIM needs >= 11x11 images
    out = tmp_path / "out"
    assert main(["bench", "--model", str(path), "--quick", "--steps", "4", "--num", "4", "--out", str(out),
                 "--threads", "1"]) == 0
    md = (out / "bench.md").read_text()
    report = json.loads((out / "bench.json").read_text())
    assert md.startswith("# calicache bench\n\n```\ncalicache bench --model ")
    assert report["command"] in md and "--quick" in report["command"]
    rows = {r["name"]: r for r in report["rows"]}
    ref = report["rows"][0]
    assert ref["name"] == "no cache, 4 steps" and ref["psnr"] == "inf"
    assert rows["no cache, 2 steps"]["macs_per_sample"] * 2 == ref["macs_per_sample"]
    assert rows["FORA p=2"]["cached_ratio"] == 0.5 and rows["FORA p=2"]["macs_per_sample"] < ref["macs_per_sample"]
    # Cache memory is a column of the table: nothing for the uncached run, FORA's two branch outputs per block.
    assert "| cache bytes |" in md and ref["cache_bytes"] == 0
    # 2 blocks x 2 branches, 4 samples x 36 tokens x width 32, float32
    assert rows["FORA p=2"]["cache_bytes"] == 2 * 2 * 4 * 36 * 32 * 4
    for family in ("fewer steps", "FORA", "ICC plain", "GOC", "forecast plain"):
        assert any(r["family"] == family for r in report["rows"]), family
    # CD factors cannot be made for a non-Fashion-MNIST model and the classifier does not fit it: said, not faked.
    assert any("CD-SVD skipped" in n for n in report["notes"]) and any("CF-SVD skipped" in n for n in report["notes"])
    assert any("class agreement" in n for n in report["notes"]) and "class_agreement" not in ref
    # Every peer either has rows (MACs by the flop counter) or a note saying why not.
    for kind in ("dbcache", "dbcache-taylorseer", "fbc", "taylorseer"):
        peer_rows = [r for r in report["rows"] if r.get("macs_source", "").startswith("torch flop counter")
                     and r["family"] == Peer(kind, 2, 0.1).family]
        assert peer_rows or any(f"peer {kind}" in n or "FirstBlockCache" in n for n in report["notes"]), kind
    if HAS_CACHE_DIT:
        assert rows["cache-dit DBCache F1B0 p=2"]["cached_calls"] == 0.5
    assert report["winners"][0]["level"] == "2 steps"
    for name in ("quality.png", "side_by_side.png"):
        with Image.open(out / name) as img:
            assert img.width > 200


def test_diffusers_taylorseer_at_period_2_is_calicache_forecast_at_rank_0():
    # Independent implementations of the same thing: a first-order forecast of every branch output.
    model = tiny_model(depth=3)
    apply_cache(model, ForecastConfig(period=2, rank=0))
    ours = sample(model, 3, 8, seed=1)
    remove_cache(model)
    wrapper = attach(model, Peer("taylorseer", 2), 8)
    counter = BranchCounter(wrapper.transformer)
    theirs = sample(wrapper, 3, 8, seed=1)
    assert torch.allclose(theirs, ours, atol=1e-5), (theirs - ours).abs().max()
    assert counter.shares(wrapper.calls) == (0.5, 0.5)
    again = sample(wrapper, 3, 8, seed=1)  # a second run starts from a reset state
    assert torch.equal(again, theirs)


def test_flop_counter_counts_cpu_attention_like_count_macs():
    model = tiny_model()
    _, macs = counted_sample(model, 2, 3, cfg_scale=1.0)
    assert macs == count_macs(model, None, 3)["total"]
    # The diffusers copy computes the same samples; it runs the timestep MLP in every block and again for the
    # final layer (the original DiT once): depth extra copies per call.
    wrapper = attach(model, Peer("none"), 3)
    x, dmacs = counted_sample(wrapper, 2, 3, cfg_scale=1.0)
    c, d = model.config.hidden_size, model.config.depth
    assert dmacs - macs == 3 * d * (256 * c + c * c)
    assert torch.allclose(x, sample(model, 2, 3), atol=1e-5)


@pytest.mark.skipif(not HAS_CACHE_DIT, reason="cache-dit is not installed (pip install 'calicache[peers]')")
def test_dbcache_static_mask_caches_foras_calls_in_every_run():
    model = tiny_model(depth=3)
    wrapper = attach(model, Peer("dbcache", 3), 7)
    counter = BranchCounter(wrapper.transformer)
    first = sample(wrapper, 2, 7, seed=0)
    assert counter.shares(wrapper.calls)[1] == pytest.approx(cached_call_share(7, 3))  # calls 1, 2, 4, 5 cached
    assert torch.equal(sample(wrapper, 2, 7, seed=0), first)  # the context is refreshed at every run
    assert not torch.allclose(first, sample(model, 2, 7, seed=0), atol=1e-3)  # it did cache


def test_missing_peer_is_a_note(monkeypatch, tmp_path):
    monkeypatch.setattr("calicache.bench.grid.missing", lambda kind: f"{kind} not here")
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model(input_size=12), path)
    out = tmp_path / "out"
    assert main(["bench", "--model", str(path), "--quick", "--steps", "3", "--num", "2", "--out", str(out),
                 "--families", "fora,peers", "--json"]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["family"] for r in report["rows"]] == ["uncached", "FORA"]
    assert {n for n in report["notes"] if n.startswith("peer")} == {
        f"peer {k} skipped: {k} not here" for k in ("none", "dbcache", "dbcache-taylorseer", "fbc", "taylorseer")}


def test_bad_input_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "tiny.safetensors"
    save_model(tiny_model(input_size=12), path)
    assert main(["bench", "--model", str(path), "--families", "fora,speed", "--out", str(tmp_path)]) == 2
    assert "unknown --families ['speed']" in capsys.readouterr().err
    assert main(["bench", "--model", str(path), "--factors-dir", str(tmp_path / "nope"), "--out", str(tmp_path)]) == 2
    assert "--factors-dir" in capsys.readouterr().err
    with pytest.raises(ValueError, match="threshold"):
        Peer("fbc", 2)
    assert missing("taylorseer") is None


def test_winners_respect_the_budget():
    rows = [{"name": "ref", "family": "uncached", "macs_per_sample": 100, "psnr": float("inf")},
            {"name": "half", "family": "fewer steps", "macs_per_sample": 50, "psnr": 20.0, "fd": 9.0},
            {"name": "a", "family": "FORA", "macs_per_sample": 52, "psnr": 30.0, "fd": 5.0},
            {"name": "b", "family": "ICC", "macs_per_sample": 48, "psnr": 25.0, "fd": 7.0}]
    low, high = winners(rows, [("5 steps", 50), ("10 steps", 100)])
    assert (low["by_psnr"], low["by_fd"], low["candidates"]) == ("b", "b", 2)
    assert (high["by_psnr"], high["by_fd"], high["candidates"]) == ("a", "a", 3)


def _rows(families: int, per_family: int = 3) -> list[dict]:
    rows = [{"name": "no cache, 20 steps", "family": "uncached", "macs_per_sample": 2_000_000_000,
             "psnr": float("inf"), "ssim": 1.0, "fd": 250.0}]
    for f in range(families):
        rows += [{"name": f"family {f} #{i}", "family": f"family {f}", "macs_per_sample": (5 + i + f) * 10**8,
                  "psnr": 20.0 + i + f, "ssim": 0.8 + 0.01 * i, "fd": 260.0 + i} for i in range(per_family)]
    return rows


def _series(fig) -> list:
    return [line for ax in fig.axes for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_quality_plot_one_style_per_series_and_matching_legend(tmp_path):
    fig = quality_figure(_rows(17), 32, tmp_path / "quality.png")
    with Image.open(tmp_path / "quality.png") as img:
        assert img.format == "PNG" and img.width > 800
    assert len(fig.axes) == 2  # PSNR and SSIM; no FD panel without the real-data band
    assert [ax.get_xlabel() for ax in fig.axes] == ["MACs per sample (GMACs)"] * 2
    assert "dB" in fig.axes[0].get_ylabel()
    first = [line for line in _series(fig) if line.axes is fig.axes[0]]
    assert len(first) == 17  # the uncached reference (PSNR inf) is the dotted line, not a series
    styles = {line.get_label(): (line.get_color(), line.get_marker()) for line in first}
    assert len({c for c, _ in styles.values()}) == len({m for _, m in styles.values()}) == 17
    for line in _series(fig):  # the same family has the same style in every panel
        assert styles[line.get_label()] == (line.get_color(), line.get_marker())
    legend = {h.get_label(): (h.get_color(), h.get_marker()) for h in fig.legends[0].legend_handles
              if h.get_label() in styles}
    assert legend == styles
    assert "no cache, 20 steps (the reference)" in [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(COLOURS) == len(set(COLOURS)) == len(MARKERS) == len(set(MARKERS)) == 20


def test_quality_plot_draws_fd_only_with_the_real_data_band(tmp_path):
    band = {"num": 32, "draws": 20, "mean": 255.0, "low": 240.0, "high": 270.0}
    fig = quality_figure(_rows(3), 32, None, band)
    assert len(fig.axes) == 3 and "FD" in fig.axes[2].get_ylabel()
    assert len([p for p in fig.axes[2].patches]) == 1  # the band
    assert "real test images, n = 32 (5th-95th pct.)" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_bench_scores_come_from_metrics():
    rng = np.random.default_rng(0)
    gray = [rng.integers(0, 256, (12, 28, 28, 1), dtype=np.uint8) for _ in range(2)]
    results = [Result(Variant(f"v{i}", None, 4, "f"), np.repeat(g, 3, -1), 1.0 + i, {"total": 100 - 10 * i}, 0)
               for i, g in enumerate(gray)]
    test_images = rng.integers(0, 256, (200, 28, 28), dtype=np.uint8)
    classifier = TinyClassifier().eval()
    band = score(results, results[0], classifier, test_images)
    logits, feats = classifier_outputs(classifier, results[1].images)
    _, test_feats = classifier_outputs(classifier, test_images)
    got = results[1].scores
    assert got["class_agreement"] == round(class_agreement(logits, np.arange(12) % 10), 4)
    assert got["fd"] == round(feature_frechet_distance(feats, test_feats, method="eigh"), 3)
    assert got["psnr"] == round(fidelity(results[1].images, results[0].images)["psnr"], 4)
    assert (got["macs_speedup"], got["wall_speedup"]) == (round(100 / 90, 3), 0.5)
    assert band["num"] == 12 and band["low"] <= band["mean"] <= band["high"]
    # Real test images of the same size score inside the band's scale, far from 0 at n = 12.
    assert band["low"] > 0


def test_replot_redraws_from_the_report(tmp_path, capsys):
    rows = [{**r, "num": 32} for r in _rows(2)]
    rows[0]["psnr"] = "inf"  # as bench.json writes it
    (tmp_path / "bench.json").write_text(json.dumps({"rows": rows, "fd_range": None}))
    assert main(["bench", "--replot", "--out", str(tmp_path)]) == 0
    with Image.open(tmp_path / "quality.png") as img:
        assert img.format == "PNG"
    assert main(["bench", "--replot", "--out", str(tmp_path / "none")]) == 2
    assert "run `calicache bench --out" in capsys.readouterr().err


REPORT_FILES = ["bench.json", "bench.md", "quality.png", "side_by_side.png"]


def _write_report(out, seed: int = 0):
    """The report of three made-up results (images drawn with `seed`)."""
    from calicache.bench.report import write_report

    rng = np.random.default_rng(seed)
    rows = [("no cache, 4 steps", "uncached", 4, 400, 0.0, float("inf")),
            ("no cache, 2 steps", "fewer steps", 2, 200, 0.0, 21.0), ("FORA p=2", "FORA", 4, 220, 0.5, 25.0)]
    results = [Result(Variant(name, None, steps, family), rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8), 1.0,
                      {"total": total, "cached_ratio": ratio}, 0, {"psnr": psnr, "ssim": 0.9})
               for name, family, steps, total, ratio, psnr in rows]
    return write_report(out, f"calicache bench --seed {seed}", "settings", [], results, 4, 4, {"total": 1.0})


def test_report_files_are_written_as_one_set(tmp_path, monkeypatch):
    """A failure while writing the last file leaves none of the new ones: the folder holds the previous
    set, or nothing (issue 18 item 4)."""
    import calicache.bench.report as report

    def broken(value):
        raise RuntimeError("disk full (injected)")

    with monkeypatch.context() as m:  # bench.json, the last one written, fails
        m.setattr(report, "jsonable", broken)
        with pytest.raises(RuntimeError, match="injected"):
            _write_report(tmp_path / "new")
    assert list((tmp_path / "new").iterdir()) == []  # not even a temporary file
    _write_report(tmp_path / "old")
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == REPORT_FILES
    before = {name: (tmp_path / "old" / name).read_bytes() for name in REPORT_FILES}
    with monkeypatch.context() as m:
        m.setattr(report, "jsonable", broken)
        with pytest.raises(RuntimeError, match="injected"):
            _write_report(tmp_path / "old", seed=1)
    assert {name: (tmp_path / "old" / name).read_bytes() for name in REPORT_FILES} == before
    (tmp_path / "old" / "bench.md").unlink()
    (tmp_path / "old" / "bench.md").mkdir()  # a rename that fails: the ones already renamed are put back
    with pytest.raises(IsADirectoryError):
        _write_report(tmp_path / "old", seed=1)
    for name in ("bench.json", "quality.png", "side_by_side.png"):
        assert (tmp_path / "old" / name).read_bytes() == before[name], name
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == REPORT_FILES
