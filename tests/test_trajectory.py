"""Trajectory-consistent calibration: CD statistics along the cached sampler's own runs, recomputed
here from recorded activations, and the options of `calibrate(trajectory="cached")`."""

import json

import numpy as np
import pytest
import torch

from calicache import ICCConfig, apply_cache, calibrate, remove_cache
from calicache.adapters import get_adapter
from calicache.cache import cache_run
from calicache.cache.factors import Factors
from calicache.calibration.stats import minmax_normalise
from calicache.calibration.trajectory import trajectory_generator, trajectory_statistics
from calicache.diffusion.guidance import guided_model_fn
from calicache.diffusion.samplers import ddim
from calicache.diffusion.schedule import Schedule
from conftest import calibrate_cli, tiny_model

STEPS, PERIOD, NUM, CFG = 7, 3, 3, 2.0


def images(n: int = 16):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 8, 8)).astype(np.uint8), np.arange(n) % 4


def recorded_increments(model, factors, module: torch.nn.Module) -> tuple[np.ndarray, np.ndarray]:
    """Per cached call of the same cached runs: mean over tokens of |x_m - x_s| and |W (x_m - x_s)|,
    min-max normalised per sample, against the input of the last full call s."""
    cfg = model.config
    ins = []
    handle = module.register_forward_hook(lambda mod, a, out: ins.append(a[0].detach().clone()))
    apply_cache(model, ICCConfig(period=PERIOD, factors=factors))
    try:
        gens = [trajectory_generator(0, i) for i in range(NUM)]
        x = torch.stack([torch.randn(1, 8, 8, generator=g) for g in gens])
        fn = guided_model_fn(model, torch.arange(NUM) % cfg.num_classes, cfg.num_classes, CFG)
        with torch.inference_mode(), cache_run(model, STEPS):
            ddim(fn, x, Schedule.create(STEPS))
    finally:
        remove_cache(model)
        handle.remove()
    rows_in, rows_out = [], []
    for m in range(STEPS):
        if m % PERIOD == 0:
            continue
        dx = ins[m] - ins[m - m % PERIOD]
        rows_in.append(minmax_normalise(dx.abs().mean(dim=1)))
        rows_out.append(minmax_normalise((dx @ module.weight.detach().T).abs().mean(dim=1)))
    return torch.cat(rows_in).double().mean(0).numpy(), torch.cat(rows_out).double().mean(0).numpy()


def test_statistics_match_a_recomputation_from_the_cached_runs():
    model = tiny_model()
    branches = get_adapter(model).branches(model)
    factors = calibrate(model, images(), svd="cd", rank=3, num=16, steps=STEPS)
    stats = trajectory_statistics(model, factors, branches, ("in", "out"), num=NUM, batch_size=NUM, steps=STEPS,
                                  period=PERIOD, cfg_scale=CFG)
    # 2 cached calls per period of 3 in 7 calls (1, 2, 4, 5); doubled batch under guidance
    assert stats.count == 4 * 2 * NUM
    means = stats.means()
    for name in ("blocks.1.mlp.fc1", "blocks.0.attn.proj"):
        module = model.get_submodule(name)
        exp_in, exp_out = recorded_increments(model, factors, module)
        np.testing.assert_allclose(means[(name, "in")].numpy(), exp_in, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(means[(name, "out")].numpy(), exp_out, rtol=1e-4, atol=1e-6)


def test_calibrate_cached_trajectory_rounds_and_options():
    model = tiny_model()
    data = images()
    base = calibrate(model, data, svd="cd", rank=3, num=16, steps=STEPS)
    one = calibrate(model, data, svd="cd", rank=3, num=16, steps=STEPS, trajectory="cached", trajectory_rounds=1,
                    trajectory_num=4, period=PERIOD, cfg_scale=CFG)
    two = calibrate(model, data, svd="cd", rank=3, num=16, steps=STEPS, trajectory="cached", trajectory_rounds=2,
                    trajectory_num=4, period=PERIOD, cfg_scale=CFG)
    assert one.meta["trajectory"] == "cached" and two.meta["trajectory_rounds"] == 2 and one.meta["period"] == PERIOD
    name = "blocks.0.mlp.fc1"
    assert not torch.allclose(base.tensors[name][0], one.tensors[name][0])  # other statistics, other factors
    assert not torch.allclose(one.tensors[name][0], two.tensors[name][0])  # round 2 runs on round 1's factors
    assert one.ranks() == base.ranks()
    with pytest.raises(ValueError, match="svd='cd'"):
        calibrate(model, svd="plain", rank=3, trajectory="cached")
    with pytest.raises(ValueError, match="unknown trajectory"):
        calibrate(model, data, svd="cd", rank=3, trajectory="sideways")
    with pytest.raises(ValueError, match="trajectory_rounds"):
        calibrate(model, data, svd="cd", rank=3, trajectory="cached", trajectory_rounds=0)


def test_cli_cached_trajectory(calibrate_files, capsys):
    tmp_path, _ = calibrate_files
    out = tmp_path / "tcc.safetensors"
    assert calibrate_cli(tmp_path, "--svd", "cd", "--rank", "4", "--trajectory", "cached", "--trajectory-rounds", "1",
               "--trajectory-num", "2", "--period", "3", "--out", str(out), "--json") == 0
    report = json.loads(capsys.readouterr().out)
    assert report["trajectory"] == "cached" and report["trajectory_rounds"] == 1 and report["period"] == 3
    assert Factors.load(out).meta["trajectory"] == "cached"
    assert calibrate_cli(tmp_path, "--svd", "ca", "--trajectory", "cached", "--out", str(out), "--overwrite") == 2
    assert "svd='cd'" in capsys.readouterr().err
