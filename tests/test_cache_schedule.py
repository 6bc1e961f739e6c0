"""Cache schedules: warm-up, cool-down, period, listed full calls (and their spread) and
always-full first/last blocks (Fn/Bn), their matrices written out by hand, JSON round trips, and
the block layout taken from the model."""

import numpy as np
import pytest
import torch

from calicache import CacheSchedule, FORAConfig, apply_cache, count_macs, load_config, remove_cache, sample
from calicache.cache import cache_run, get_engine
from calicache.cache.schedule import block_layout
from conftest import tiny_model


def runs(flags) -> list[int]:
    """Lengths of the runs of consecutive equal values in a 1-D sequence."""
    out, prev = [], None
    for f in flags:
        if f == prev:
            out[-1] += 1
        else:
            out.append(1)
        prev = f
    return out


def test_plain_period_is_fora():
    m = CacheSchedule.fora(3).matrix(10, 4)
    assert m[:, 0].tolist() == [t % 3 == 0 for t in range(10)]
    assert (m == m[:, :1]).all()  # every layer alike


def test_warmup_is_the_first_calls_and_anchors_the_period():
    m = CacheSchedule.fora(2, warmup=4).matrix(12, 2)
    assert m[:, 0].tolist() == [1, 1, 1, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    # warm-up 1 is plain FORA (call 0 is always full anyway)
    assert np.array_equal(CacheSchedule.fora(3, warmup=1).matrix(9, 2), CacheSchedule.fora(3).matrix(9, 2))


def test_cooldown_is_the_last_calls():
    m = CacheSchedule.fora(3, cooldown=2).matrix(10, 2)
    assert m[:, 1].tolist() == [1, 0, 0, 1, 0, 0, 1, 0, 1, 1]
    assert runs(m[:, 1]) == [1, 2, 1, 2, 1, 1, 2]
    # the run length is needed: without it a cool-down is a clear error
    with pytest.raises(ValueError, match="run length"):
        CacheSchedule.fora(3, cooldown=2).row(4, 2)


@pytest.mark.parametrize("per_block", [2, 3])
def test_first_and_last_blocks_stay_full(per_block):
    names = [f"blocks.{b}.br{i}" for b in range(5) for i in range(per_block)]
    s = CacheSchedule.fora(2, first_blocks=1, last_blocks=2).for_branches(names)
    m = s.matrix(6, len(names))
    kept = np.array([b == 0 or b >= 3 for b in range(5) for _ in range(per_block)])
    assert m[0].all() and m[2].all() and m[4].all()
    for t in (1, 3, 5):
        assert np.array_equal(m[t], kept)
    assert runs(kept) == [per_block, 2 * per_block, 2 * per_block]


def test_all_patterns_together_and_call_0_full():
    names = [f"b.{i}.{x}" for i in range(4) for x in "am"]
    s = CacheSchedule.fora(4, warmup=2, cooldown=1, last_blocks=1).for_branches(names)
    m = s.matrix(11, 8)
    assert m[0].all()
    full_calls = [t for t in range(11) if m[t].all()]
    assert full_calls == [0, 1, 5, 9, 10]
    assert m[~m.all(1)][:, 6:].all() and not m[~m.all(1)][:, :6].any()


def test_listed_calls_are_the_full_calls_with_blocks_kept():
    names = [f"b.{i}.{x}" for i in range(3) for x in "am"]
    s = CacheSchedule(calls=[0, 1, 3, 7], last_blocks=1).for_branches(names)
    assert s.calls == (0, 1, 3, 7)  # a list becomes a tuple: the schedule stays hashable and comparable
    m = s.matrix(9, 6)
    assert [t for t in range(9) if m[t].all()] == [0, 1, 3, 7]
    assert m[~m.all(1)][:, 4:].all() and not m[~m.all(1)][:, :4].any()
    with pytest.raises(ValueError, match=r"go past this run's 6 calls"):
        s.matrix(6, 6)


def test_spread_even_is_fora_and_a_higher_power_packs_early():
    assert CacheSchedule.spread(5, 20).calls == (0, 4, 8, 12, 16)
    assert np.array_equal(CacheSchedule.spread(5, 20).matrix(20, 2), CacheSchedule.fora(4).matrix(20, 2))
    early = CacheSchedule.spread(6, 20, power=2).calls
    gaps = np.diff(early)
    assert len(early) == 6 and early[0] == 0 and (gaps >= 1).all() and (np.diff(gaps) >= 0).all()
    assert gaps[0] < gaps[-1]
    assert CacheSchedule.spread(20, 20, power=3).calls == tuple(range(20))  # every call: distinct, still inside
    assert CacheSchedule.spread(7, 50, power=1.5).calls[-1] < 50
    with pytest.raises(ValueError, match="full must be an integer from 1"):
        CacheSchedule.spread(0, 20)
    with pytest.raises(ValueError, match="power must be > 0"):
        CacheSchedule.spread(4, 20, power=0)


def test_block_layout_from_branch_names():
    assert block_layout(["blocks.0.attn", "blocks.0.mlp", "blocks.1.attn", "blocks.1.mlp"]) == (0, 0, 1, 1)
    assert block_layout(["t.0.attn1", "t.0.attn2", "t.0.ff", "t.1.attn1", "t.1.attn2", "t.1.ff"]) == (0,) * 3 + (1,) * 3
    with pytest.raises(ValueError, match="consecutive"):
        block_layout(["b.0.a", "b.1.a", "b.0.m"])


@pytest.mark.parametrize("kw, match", [
    (dict(period=0), "period"), (dict(period=2, warmup=-1), "warmup"), (dict(period=2, cooldown=1.5), "cooldown"),
    (dict(period=2, first_blocks=True), "first_blocks"), (dict(period=True), "period"),
    (dict(gather=np.ones((2, 2), bool), warmup=1), "go with a period"),
    (dict(period=2, calls=[0, 2]), "exactly one of"), (dict(calls=[1, 3]), "start with call 0"),
    (dict(calls=[0, 3, 3]), "strictly increasing"), (dict(calls=[0, 2.5]), "integer call indices"),
    (dict(calls=[]), "non-empty"), (dict(calls=5), "list of call indices"),
    (dict(calls=[0, 4], warmup=2), "put the warm-up"),
])
def test_bad_values_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        CacheSchedule(**kw)


def test_unusable_patterns_are_refused_at_check_time():
    names = [f"b.{i}.{x}" for i in range(3) for x in "am"]
    with pytest.raises(ValueError, match="none of the model's 3 blocks"):
        CacheSchedule.fora(2, first_blocks=2, last_blocks=1).for_branches(names)
    with pytest.raises(ValueError, match="block layout"):
        CacheSchedule.fora(2, first_blocks=1).matrix(4, 6)
    with pytest.raises(ValueError, match="nothing is cached"):
        CacheSchedule.fora(2, warmup=3, cooldown=2).matrix(5, 6)


def test_json_round_trip_and_bad_files(tmp_path):
    s = CacheSchedule.fora(3, warmup=2, cooldown=1, first_blocks=1, last_blocks=0)
    s.save(tmp_path / "s.json")
    assert CacheSchedule.load(tmp_path / "s.json") == s
    g = CacheSchedule.fora(2).matrix(4, 2)
    CacheSchedule.from_matrix(g).save(tmp_path / "g.json")
    assert np.array_equal(CacheSchedule.load(tmp_path / "g.json").gather, g)
    c = CacheSchedule(calls=(0, 2, 5, 9), first_blocks=1)
    c.save(tmp_path / "c.json")
    assert CacheSchedule.load(tmp_path / "c.json") == c
    config = FORAConfig(schedule=c)
    config.save(tmp_path / "config.json")
    assert load_config(tmp_path / "config.json").schedule == c
    (tmp_path / "bad.json").write_text('{"period": 2, "warmpu": 3}')
    with pytest.raises(ValueError, match=r"bad.json: unknown schedule fields \['warmpu'\]"):
        CacheSchedule.load(tmp_path / "bad.json")
    (tmp_path / "none.json").write_text('{"warmup": 3}')
    with pytest.raises(ValueError, match="needs 'period'"):
        CacheSchedule.load(tmp_path / "none.json")


def test_engine_binds_blocks_and_sampling_follows_the_pattern():
    torch.manual_seed(0)
    model = tiny_model(depth=3)
    s = CacheSchedule.fora(3, warmup=2, cooldown=2, first_blocks=1)
    apply_cache(model, FORAConfig(schedule=s))
    sample(model, 2, 9, cfg_scale=1.0)
    flags = np.array(get_engine(model).full_flags)
    assert np.array_equal(flags, get_engine(model).schedule.matrix(9, 6))
    assert flags[:, :2].all() and [t for t in range(9) if flags[t].all()] == [0, 1, 4, 7, 8]
    macs = count_macs(model, steps=9)
    assert macs["cached_ratio"] == pytest.approx(1 - flags.mean())
    # a bare loop that never says the run length cannot use a cool-down
    remove_cache(model)
    apply_cache(model, FORAConfig(schedule=CacheSchedule.fora(2, cooldown=1)))
    x, t, y = torch.randn(1, 1, 8, 8), torch.tensor([999]), torch.tensor([0])
    with pytest.raises(ValueError, match="run length"):
        model(x, t, y)
    with cache_run(model, 3):
        for step in (999, 500, 0):
            model(x, torch.tensor([step]), y)
    assert np.array(get_engine(model).full_flags)[:, 0].tolist() == [1, 0, 1]


def test_pattern_on_a_pixart_transformer_has_three_branches_per_block():
    pytest.importorskip("diffusers")
    from conftest import tiny_pixart

    tr = tiny_pixart()
    apply_cache(tr, FORAConfig(schedule=CacheSchedule.fora(2, last_blocks=1)))
    m = get_engine(tr).schedule.matrix(4, 6)
    assert m[1].tolist() == [0, 0, 0, 1, 1, 1]
