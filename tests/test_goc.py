"""GOC: the update rule and queue, equivalence to FORA at w = 0, run boundaries, the step finder,
steps files, and MACs."""

import json
from functools import partial

import numpy as np
import pytest
import torch

from calicache import FORAConfig, GOCConfig, apply_cache, count_macs, remove_cache, sample
from calicache.cache import cache_run
from calicache.cache.methods import METHODS
from calicache.cache.methods.goc import PUBLISHED_STEPS
from calicache.calibration.goc import (
    GocSteps,
    compensation_steps,
    find_goc_steps,
    inflection_points,
    trajectory_cosines,
)
from conftest import run_cached, tiny_model

run = partial(run_cached, steps=20, num=3)


def test_registered():
    assert "goc" in METHODS


def test_weight_zero_equals_fora_and_nonzero_differs():
    model = tiny_model()
    fora = run(model, FORAConfig(period=2))
    goc0 = run(model, GOCConfig(period=2, weight=0.0))
    goc = run(model, GOCConfig(period=2, weight=1.2))
    ref = sample(model, 3, 20)
    assert torch.equal(goc0, fora)
    assert not torch.allclose(goc, fora, rtol=0, atol=1e-6)
    assert (goc - fora).abs().max() > 1e-5
    assert not torch.equal(goc, ref)


def test_weight_zero_equals_fora_with_cfg_and_explicit_schedule():
    model = tiny_model(seed=1)
    gather = np.ones((10, 4), dtype=bool)
    gather[[1, 2, 4, 5, 7, 8], :2] = False  # block 0 cached twice in a row, block 1 always full
    kw = dict(steps=10, cfg_scale=2.0)
    fora = run(model, FORAConfig(schedule=gather), **kw)
    goc0 = run(model, GOCConfig(schedule=gather, weight=0.0, steps=[2, 4, 5, 8]), **kw)
    goc = run(model, GOCConfig(schedule=gather, weight=0.8, steps=[2, 4, 5, 8]), **kw)
    assert torch.equal(goc0, fora)
    assert not torch.equal(goc, fora)


def test_update_rule_and_queue_by_hand():
    """Block 0's MLP outputs its fc2 bias (fc2 weight 0), so every full call's F is a chosen number.

    Calls 0, 2, 5 are full with F = 1, 3, 10; cached calls 1, 3, 4, 6, 7; compensation at 1, 3, 4, 6
    with w = 0.5:
      1: no F_prev2 -> 1;  3: 3 + .5 (3 - 1) = 4;  4 (after a compensated call): 4 + .5 (4 - 3) = 4.5;
      6: 10 + .5 (10 - 4.5) = 12.75;  7 (not a step): 12.75.
    """
    model = tiny_model()
    mlp = model.blocks[0].mlp
    with torch.no_grad():
        mlp.fc2.weight.zero_()
    full_values = {0: 1.0, 2: 3.0, 5: 10.0}
    gather = np.zeros((8, 4), dtype=bool)
    gather[list(full_values)] = True
    apply_cache(model, GOCConfig(schedule=gather, weight=0.5, steps=[1, 3, 4, 6]))
    served = []
    handle = mlp.register_forward_hook(lambda m, a, out: served.append(out.clone()))
    x = torch.randn(2, 1, 8, 8)
    y = torch.tensor([0, 1])
    with torch.no_grad(), cache_run(model, 8):
        for call in range(8):
            with torch.no_grad():
                # Cached calls must not compute: a bias they would pick up is a wrong number.
                mlp.fc2.bias.fill_(full_values.get(call, 100.0 + call))
            model(x, torch.full((2,), 900 - 100 * call), y)
    handle.remove()
    expected = [1.0, 1.0, 3.0, 4.0, 4.5, 10.0, 12.75, 12.75]
    for call, (out, value) in enumerate(zip(served, expected)):
        assert torch.equal(out, torch.full_like(out, value)), (call, out.flatten()[:3], value)
    remove_cache(model)


def test_state_resets_between_runs():
    model = tiny_model()
    apply_cache(model, GOCConfig(period=2, steps=[3, 5, 7]))
    a = sample(model, 2, 20)
    b = sample(model, 2, 20)
    c = sample(model, 2, 10)
    remove_cache(model)
    assert torch.equal(a, b)
    assert torch.equal(c, run(model, GOCConfig(period=2, steps=[3, 5, 7]), steps=10, num=2))


def test_published_steps_and_clear_errors():
    assert PUBLISHED_STEPS[20] == (3, 5, 7, 9, 11, 13, 15, 19)
    model = tiny_model()
    macs = count_macs(model, GOCConfig(), steps=20)
    comp = [t for t in range(20) if macs["per_call"][t] != macs["per_call"][1] and t % 2]
    assert comp == [3, 5, 7, 9, 11, 13, 15, 19]
    apply_cache(model, GOCConfig())
    calls = []
    handle = model.register_forward_pre_hook(lambda m, a: calls.append(1))
    with pytest.raises(ValueError, match="calibrate --method goc"):
        sample(model, 1, 10)
    assert not calls  # refused before any model call
    with pytest.raises(ValueError, match="calibrate --method goc"):
        count_macs(model, None, steps=10)
    handle.remove()
    remove_cache(model)
    with pytest.raises(ValueError, match="beyond"):
        run(model, GOCConfig(steps=[3, 25]))
    with pytest.raises(ValueError, match="full calls"):
        run(model, GOCConfig(period=2, steps=[3, 4]))
    with pytest.raises(ValueError, match="finite"):
        GOCConfig(weight=float("nan"))
    with pytest.raises(ValueError, match="not both"):
        GOCConfig(steps=[3], steps_file="x.json")


def test_bare_module_runs_need_steps():
    model = tiny_model()
    x, y = torch.randn(1, 1, 8, 8), torch.tensor([0])
    apply_cache(model, GOCConfig())
    with torch.no_grad(), pytest.raises(RuntimeError, match="needs steps or steps_file"):
        for call in range(4):
            model(x, torch.tensor([999 - 100 * call]), y)
    remove_cache(model)
    apply_cache(model, GOCConfig(steps=[3]))
    with torch.no_grad():
        for call in range(4):
            model(x, torch.tensor([999 - 100 * call]), y)
    remove_cache(model)


def test_macs_are_fora_plus_elementwise_update():
    model = tiny_model()
    steps = [3, 5, 9]
    fora = count_macs(model, FORAConfig(period=2), steps=12)
    goc = count_macs(model, GOCConfig(period=2, steps=steps), steps=12)
    c, n, depth = model.config.hidden_size, model.config.num_tokens, model.config.depth
    update = 2 * depth * n * c  # attention and MLP branch outputs, N x C each
    for t in range(12):
        assert goc["per_call"][t] == fora["per_call"][t] + (update if t in steps else 0)
    assert goc["total"] == fora["total"] + len(steps) * update
    by_name = count_macs("DiT-XL/2", GOCConfig(), steps=20)
    fora_xl = count_macs("DiT-XL/2", FORAConfig(), steps=20)
    assert by_name["total"] - fora_xl["total"] == 8 * 2 * 28 * 256 * 1152


def test_cache_bytes_counts_shared_tensors_once():
    model = tiny_model()
    apply_cache(model, GOCConfig(period=2, steps=[3]))
    from calicache.cache import get_engine

    sample(model, 2, 6)
    per_branch = 2 * model.config.num_tokens * model.config.hidden_size * 4  # (B, N, C) float32
    # At most F_prev, F_prev2 and the last full output, which F_prev or F_prev2 shares.
    assert 2 * 4 * per_branch <= get_engine(model).stats()["cache_bytes"] <= 3 * 4 * per_branch
    remove_cache(model)


# -- the finder -----------------------------------------------------------------------------------


def turning_trajectory(calls=12, turn=6, samples=3, seed=0):
    """Moves along v until call turn - 1, then back along -v (with a little noise and varying speed)."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(samples, 5, 7, generator=g)
    pos, out = torch.zeros_like(v), []
    for s in range(calls):
        if s:
            speed = 1.0 + 0.3 * np.sin(s)
            pos = pos + speed * (v if s < turn else -v) + 0.05 * torch.randn(v.shape, generator=g)
        out.append(pos.clone())
    return torch.stack(out)  # (calls, samples, 5, 7)


def test_inflection_finder_marks_the_turn_only():
    cos = trajectory_cosines(turning_trajectory(turn=6))
    assert cos[0] is None and cos[1] is None
    assert cos[6] < -0.9
    assert all(c > 0.9 for s, c in enumerate(cos) if s >= 2 and s != 6)
    assert inflection_points(cos) == [6]
    # Cached calls (odd) >= 2 with no turn at s or s - 1: 7 is excluded (its last change turned).
    assert compensation_steps(cos, period=2) == [3, 5, 9, 11]
    assert compensation_steps(cos, period=3) == [2, 4, 5, 8, 10, 11]
    assert inflection_points(trajectory_cosines(turning_trajectory(turn=100))) == []


def test_inflection_threshold():
    cos = [None, None, 0.9, 0.4, 0.95, -0.2]
    assert inflection_points(cos, 0.0) == [5]
    assert inflection_points(cos, 0.5) == [3, 5]
    assert compensation_steps(cos, period=2, threshold=0.5) == []


def test_finder_runs_and_steps_file_round_trip(tmp_path):
    model = tiny_model()
    found = find_goc_steps(model, 20, num=4, batch_size=2, period=2)
    assert len(found.cosines) == 20 and found.cosines[:2] == [None, None]
    assert all(-1 <= c <= 1 for c in found.cosines[2:])
    assert found.steps == compensation_steps(found.cosines, 2, 0.0)
    assert found.meta["calls"] == 20 and found.meta["spacing"] == "adm" and found.meta["period"] == 2
    path = tmp_path / "goc.json"
    found.save(path)
    loaded = GocSteps.load(path)
    assert loaded == found
    assert "call" in loaded.table()
    # Batching does not change the per-call means (each sample counted once; matmul rounding aside).
    again = find_goc_steps(model, 20, num=4, batch_size=4, period=2)
    np.testing.assert_allclose(np.array(found.cosines[2:]), np.array(again.cosines[2:]), atol=1e-4)


def test_finder_refuses_a_cached_model():
    model = tiny_model()
    apply_cache(model, FORAConfig())
    with pytest.raises(ValueError, match="remove_cache"):
        find_goc_steps(model, 20, num=2)
    remove_cache(model)


def test_goc_file_for_50_steps_and_refusals(tmp_path):
    model = tiny_model()
    found = find_goc_steps(model, 50, num=2)
    assert found.steps, "a random tiny model keeps its direction on most calls"
    path = tmp_path / "goc50.json"
    found.save(path)
    fora = run(model, FORAConfig(), steps=50, num=2)
    goc = run(model, GOCConfig(steps_file=path), steps=50, num=2)
    assert goc.shape == fora.shape and torch.isfinite(goc).all()
    assert not torch.equal(goc, fora)
    assert torch.equal(goc, run(model, GOCConfig(steps=found.steps), steps=50, num=2))
    # Another step count.
    apply_cache(model, GOCConfig(steps_file=path))
    with pytest.raises(ValueError, match="made for 50 model calls"):
        sample(model, 1, 20)
    remove_cache(model)
    # Another model.
    with pytest.raises(ValueError, match="made for model"):
        apply_cache(tiny_model(seed=3), GOCConfig(steps_file=path))
    # Another period.
    with pytest.raises(ValueError, match="period 2"):
        apply_cache(model, GOCConfig(period=3, steps_file=path))
    remove_cache(model)
    # Missing and broken files.
    with pytest.raises(FileNotFoundError, match="calibrate --method goc"):
        apply_cache(model, GOCConfig(steps_file=tmp_path / "nope.json"))
    remove_cache(model)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"gather": [[1]]}))
    with pytest.raises(ValueError, match="not a calicache GOC steps file"):
        apply_cache(model, GOCConfig(steps_file=bad))
    remove_cache(model)
    bad.write_text("{trunc")
    with pytest.raises(ValueError, match="not a readable"):
        GocSteps.load(bad)


def test_hand_written_steps_file(tmp_path):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"format": "calicache-goc-steps", "steps": [3, 5, 7]}))
    model = tiny_model()
    a = run(model, GOCConfig(steps_file=path), steps=12, num=2)
    assert torch.equal(a, run(model, GOCConfig(steps=[3, 5, 7]), steps=12, num=2))
    path.write_text(json.dumps({"format": "calicache-goc-steps", "steps": [0, 3]}))
    with pytest.raises(ValueError, match="call indices >= 1"):
        GocSteps.load(path)
