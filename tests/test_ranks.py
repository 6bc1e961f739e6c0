"""Per-layer rank allocation: floors under the greedy energy rule, and the measured search that
never ends below its start at no more MACs than its start."""

import pytest
import torch

from calicache import ICCConfig, calibrate
from calicache.adapters import get_adapter
from calicache.calibration.ranks import (
    RankCandidate,
    allocate_ranks,
    branch_groups,
    group_factors,
    refine_ranks,
    search_branch_ranks,
    uniform_rank,
)
from calicache.tuning.score import ModelRunner, Reference
from conftest import tiny_model


def cands():
    steep = RankCandidate("steep", torch.tensor([100.0, 1.0, 0.5, 0.1]), 10)
    flat = RankCandidate("flat", torch.tensor([1.0, 1.0, 1.0, 1.0]), 10)
    return [steep, flat]


def test_uniform_rank_and_floors():
    assert uniform_rank(cands(), 79) == 3 and uniform_rank(cands(), 80) == 4 and uniform_rank(cands(), 9) == 0
    # greedy without a floor: steep's big first unit, then units of equal energy per MAC
    free = allocate_ranks(cands(), 60)
    assert sum(free.values()) == 6
    floored = allocate_ranks(cands(), 60, floor=1.0)  # uniform 3 each, the rest greedy
    assert floored["steep"] >= 3 and floored["flat"] >= 3 and sum(floored.values()) == 6
    with pytest.raises(ValueError, match="floor"):
        allocate_ranks(cands(), 60, floor=1.5)


def synthetic(best: dict[str, int]):
    """A concave score that peaks at `best`: each unit away from it costs a group-specific amount."""
    weight = {"a": 1.0, "b": 3.0, "c": 0.2}
    return lambda r: -sum(weight[g] * abs(r[g] - best[g]) for g in r)


def test_refine_moves_ranks_to_where_they_help_and_never_spends_more():
    unit = {"a": 10, "b": 10, "c": 10}
    start = {"a": 4, "b": 4, "c": 4}
    score = synthetic({"a": 4, "b": 8, "c": 0})
    ranks, value, evals = refine_ranks(score, start, unit, {g: 16 for g in unit}, step=2, rounds=4)
    assert value > score(start) and value == score(ranks)
    assert sum(ranks[g] * unit[g] for g in ranks) <= sum(start[g] * unit[g] for g in start)
    assert ranks["b"] > 4 and ranks["c"] < 4 and evals >= 4
    # at its optimum already: nothing changes and the start's score comes back
    flat, v, _ = refine_ranks(synthetic(start), start, unit, {g: 16 for g in unit}, step=1)
    assert flat == start and v == 0
    with pytest.raises(ValueError, match="same groups"):
        refine_ranks(score, start, {"a": 1}, {g: 16 for g in unit}, step=1)


def test_group_factors_truncate_exactly_and_the_search_runs_on_a_model():
    model = tiny_model()
    branches = get_adapter(model).branches(model)
    top = calibrate(model, svd="plain", rank=8)
    groups = branch_groups(branches)
    assert sum(len(v) for v in groups.values()) == len(top.tensors) and len(groups) == 4
    ranks = {g: i for i, g in enumerate(groups)}
    cut = group_factors(top, groups, ranks)
    for g, names in groups.items():
        for name in names:
            assert torch.equal(cut.tensors[name][0], top.tensors[name][0][:, :ranks[g]])
    runner = ModelRunner(model, 6, cfg_scale=1.0)
    ref = Reference(runner, 2, seed=0)
    uniform = ref.score(ICCConfig(period=2, factors=top, rank=4))
    found, value, evals = search_branch_ranks(
        lambda r: ref.score(ICCConfig(period=2, factors=group_factors(top, groups, r))), branches, 4, 2,
        rounds=1, max_rank=8)
    assert value >= uniform and evals >= 1 + len(groups)
    macs = runner.macs(ICCConfig(period=2, factors=group_factors(top, groups, found)))
    assert macs <= runner.macs(ICCConfig(period=2, factors=top, rank=4))
