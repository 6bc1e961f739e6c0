"""`calicache.tune` in a reduced mode: exact MACs of the search space, the budget respected, the
search never below its best coarse candidate, files that sample again, a PixArt pipeline from
prompt embeddings, and the CLI."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from calicache import (
    MethodConfig,
    NoCacheConfig,
    apply_cache,
    count_macs,
    load_config,
    remove_cache,
    sample,
    save_model,
)
from calicache.cache.schedule import CacheSchedule
from calicache.cli import main
from calicache.tuning import Candidate, Space, make_tuner, tune
from calicache.tuning.space import cache_config
from conftest import tiny_model

STEPS = 8
SMALL = Space(periods=(2, 3, 4), warmups=(0, 1, 2), cooldowns=(0, 1), blocks=(0, 1), ranks=(2, 4, 8),
              forecast_ranks=(0, 2, 4), forecast_weights=(0.5, 1.0), goc_weights=(0.8,), coarse_warmups=(0, 2),
              coarse_cooldowns=(0,), coarse_blocks=((0, 0), (1, 0)), coarse_ranks=(4,), coarse_forecast=((2, 1.0),))


def images(n: int = 16):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8)).astype(np.uint8), np.arange(n) % 4


@pytest.fixture(scope="module")
def tuner():
    model = tiny_model(depth=3)
    return make_tuner(model, STEPS, data=images(), cfg_scale=2.0, num=4, rank=8, calibration_num=16,
                      trajectory=False, space=SMALL, progress=False)


@pytest.mark.parametrize("c", [
    Candidate("fora", 3, warmup=2, cooldown=1, last_blocks=1),
    Candidate("icc", 2, first_blocks=1, rank=4, factors="cd"),
    Candidate("forecast", 4, warmup=1, cooldown=1, rank=2, weight=0.5, factors="cd"),
    Candidate("forecast", 3, rank=0, weight=1.0, factors="cd"),
    Candidate("goc", 2, warmup=2, weight=0.8),
    Candidate("forecast", 3, rank=2, weight=1.0, factors="cd", order=2),
    Candidate("forecast", 0, calls=(0, 1, 3, 6), first_blocks=1, rank=2, weight=0.5, factors="cd", order=2),
    Candidate("icc", 0, calls=(0, 2, 5), rank=4, factors="cd"),
    Candidate("fora", 0, calls=(0, 3, 4), last_blocks=1),
])
def test_costs_equal_count_macs(tuner, c):
    costs = tuner.costs
    steps = [s for s in range(2, STEPS) if not costs.gather(c)[s].all()] if c.method == "goc" else None
    expected = count_macs(tuner.runner.model, cache_config(c, tuner.factors, steps), STEPS)["total"]
    assert costs.macs(c, steps) == expected
    assert costs.uncached == count_macs(tuner.runner.model, NoCacheConfig(), STEPS)["total"]


def test_candidates_refuse_mismatched_fields():
    with pytest.raises(ValueError, match="rank and factors"):
        Candidate("fora", 2, rank=4, factors="cd")
    with pytest.raises(ValueError, match="weight"):
        Candidate("icc", 2, rank=4, factors="cd", weight=1.0)
    with pytest.raises(ValueError, match="unknown method"):
        Candidate("magic", 2)
    with pytest.raises(ValueError, match="order goes with forecast"):
        Candidate("icc", 2, rank=4, factors="cd", order=2)
    for bad in (dict(period=2, calls=(0, 2)), dict(period=0), dict(period=0, calls=(0, 2), warmup=1)):
        with pytest.raises(ValueError, match="full calls"):
            Candidate("fora", **bad)
    assert Candidate("forecast", 2, rank=4, weight=1.0, factors="cd").order == 1  # one key per configuration


def test_listed_calls_move_one_at_a_time_and_fill_the_budget(tuner):
    c = Candidate("forecast", 0, calls=(0, 2, 3, 6), rank=2, weight=1.0, factors="cd")
    moved = {n.calls for n in tuner.space.neighbours(c) if n.calls != c.calls}
    assert moved == {(0, 1, 3, 6), (0, 2, 4, 6), (0, 2, 3, 5), (0, 2, 3, 7)}  # 2 -> 3 or 3 -> 2 would collide
    assert all(n.period == 0 and not n.warmup for n in tuner.space.neighbours(c))
    assert {n.order for n in replace(tuner.space, forecast_orders=(1, 2)).neighbours(c)} == {1, 2}
    limit = 0.6 * tuner.costs.uncached
    dense = tuner.densest(c, 1.5, limit)
    assert tuner.feasible(dense, limit)
    more = replace(dense, calls=CacheSchedule.spread(len(dense.calls) + 1, STEPS, 1.5).calls)
    assert not tuner.feasible(more, limit)  # one more full call breaks the budget
    p2 = replace(c, rank=0, period=2, calls=())
    even = tuner.densest(p2, 1.0, tuner.costs.macs(p2))  # 4 full calls fit: spread(4, 8) is calls 0, 2, 4, 6
    assert even == p2  # a FORA period is kept as one (one key, scored once)


def test_tune_respects_the_budget_and_beats_its_coarse_rung(tuner, tmp_path):
    result = tune(None, budget=0.6, tuner=tuner, heldout=3, heldout_seed=5, local=6, out=tmp_path)
    chosen = result.chosen
    limit = 0.6 * tuner.costs.uncached
    assert chosen.macs <= limit and all(e.macs <= limit for e in result.evaluated)
    assert chosen.score == max(e.score for e in result.evaluated)  # the best on all tuning seeds
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["chosen"]["label"] == chosen.candidate.label()
    front = report["frontier"]
    assert [f["macs"] for f in front] == sorted(f["macs"] for f in front)
    assert all(a["psnr"] < b["psnr"] for a, b in zip(front, front[1:]))
    # the written config samples exactly as the chosen configuration did on the held-out seeds
    model = tuner.runner.model
    config = load_config(tmp_path / "config.json")
    assert count_macs(model, config, STEPS)["total"] == chosen.macs
    apply_cache(model, config)
    written = sample(model, 3, STEPS, cfg_scale=2.0, seed=5)
    remove_cache(model)
    apply_cache(model, result.config)
    direct = sample(model, 3, STEPS, cfg_scale=2.0, seed=5)
    remove_cache(model)
    assert torch.equal(written, direct)
    # a budget nothing fits in is a clear error; so is a time budget nothing meets
    with pytest.raises(ValueError, match="no configuration fits"):
        tune(None, budget=0.01, tuner=tuner)
    with pytest.raises(ValueError, match="budget-seconds"):
        tune(None, budget=0.6, tuner=tuner, heldout=3, heldout_seed=5, local=6, budget_seconds=1e-9)
    # a time budget everything meets changes nothing (the scores are reused)
    loose = tune(None, budget=0.6, tuner=tuner, heldout=3, heldout_seed=5, local=6, budget_seconds=1e9)
    assert loose.chosen.candidate == chosen.candidate


def test_tune_a_pixart_pipeline_from_prompt_embeddings(tmp_path):
    pytest.importorskip("diffusers")
    from conftest import pixart_pipe, prompts

    pipe = pixart_pipe()
    embeds = {k: v for k, v in prompts(2).items() if v is not None}
    space = Space(periods=(2, 3), warmups=(0, 1), cooldowns=(0,), blocks=(0,), ranks=(2, 4), forecast_ranks=(0, 2),
                  forecast_weights=(1.0,), coarse_warmups=(0, 1), coarse_cooldowns=(0,), coarse_blocks=((0, 0),),
                  coarse_ranks=(4,), coarse_forecast=((2, 1.0),))
    tuner = make_tuner(pipe, 5, prompt_embeds=embeds, num=2, rank=4, space=space, progress=False)
    result = tune(pipe, steps=5, budget=0.7, tuner=tuner, heldout=2, local=3, progress=False, out=tmp_path)
    assert result.chosen.macs <= 0.7 * result.uncached_macs
    # GOC is searched too, its compensated calls from the pipeline's own cosine profile (none at calls 0, 1)
    cos = tuner.goc_cosines
    assert len(cos) == 5 and cos[:2] == [None, None] and all(-1 <= c <= 1 for c in cos[2:])
    gocs = [e for e in tuner.results.values() if e.candidate.method == "goc" and e.psnr]
    assert gocs and all(s >= 2 for e in gocs for s in e.goc_steps)
    config = load_config(tmp_path / "config.json")
    assert count_macs(pipe.transformer, config, 5, text_tokens=embeds["prompt_embeds"].shape[1])["total"] \
        == result.chosen.macs
    assert np.isfinite(result.heldout_psnr)


def test_cli_tune(tmp_path, capsys):
    model = tiny_model()
    save_model(model, tmp_path / "m.safetensors")
    data, labels = images()
    np.savez(tmp_path / "d.npz", data, labels)
    out = tmp_path / "tuned"
    argv = ["tune", "--model", str(tmp_path / "m.safetensors"), "--data", str(tmp_path / "d.npz"), "--steps", "6",
            "--budget", "0.7", "--num", "2", "--heldout", "2", "--rank", "4", "--calibration-num", "16",
            "--methods", "fora,icc", "--periods", "2,3", "--local", "2", "--no-trajectory", "--cfg-scale", "1",
            "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chosen"]["method"] in ("fora", "icc") and (out / "config.json").is_file()
    assert report["chosen"]["macs_ratio"] <= 0.7
    config = load_config(out / "config.json")
    assert isinstance(config, MethodConfig)
    assert main([*argv[:-3], "--budget", "1.5", "--out", str(tmp_path / "bad")]) == 2
    assert "budget" in capsys.readouterr().err and not (tmp_path / "bad" / "config.json").exists()


@pytest.fixture
def folders(tmp_path):
    """A saved tiny PixArt pipeline (no text encoder) and a prompt-embeddings file."""
    pytest.importorskip("diffusers")
    from safetensors.torch import save_file

    from conftest import pixart_pipe, prompts

    pixart_pipe().save_pretrained(tmp_path / "pixart")
    save_file({k: v.contiguous() for k, v in prompts(2).items() if v is not None}, str(tmp_path / "embeds.safetensors"))
    return tmp_path


def test_cli_tune_a_pipeline_folder(folders, tmp_path, capsys):
    out = tmp_path / "tuned"
    assert main(["tune", "--pipeline", str(folders / "pixart"), "--prompt-embeds", str(folders / "embeds.safetensors"),
                 "--steps", "4", "--budget", "0.7", "--num", "2", "--heldout", "2", "--rank", "4", "--methods",
                 "fora,icc", "--periods", "2,3", "--local", "1", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["chosen"]["macs_ratio"] <= 0.7 and (out / "report.md").is_file()
    assert isinstance(load_config(out / "config.json"), MethodConfig)
