"""Per-layer ranks under a MACs budget.

`allocate_ranks`: a greedy allocation by scaled singular-value energy. Every calibrated linear
starts at its floor (rank 0 without one). Each further rank unit costs `tokens * (C_i + C_o)`
MACs per sample (one row of B and one column of A; DiT's q, k and v share one B pass, which
costs the same per unit) and keeps the energy s_r^2 of its next scaled singular value. Units go,
one at a time, to the linear whose next unit keeps the most energy per MAC, until the budget is
spent. Singular values decrease, so each linear's gains are concave and the greedy order is
the best energy for the MACs spent (up to the last, indivisible unit). The authors' code has a
similar greedy search under a parameter budget. Energies of different layers are not comparable
(each layer's statistics are min-max normalised), so without floors the greedy rule starves whole
layers (rank 2 on the shipped model) and loses to uniform ranks at equal MACs.

`refine_ranks`: allocation by measured output error. Starting from given ranks (uniform), it
probes each group of linears (a branch) one rank step down, moves a step from the group whose
loss costs least to the groups that gain most, and keeps a move only when the measured score
(PSNR against uncached sampling) improves, at no more MACs than the start. It is therefore never
worse than its start on the seeds it measures on.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..adapters import BranchSpec, get_adapter
from ..cache.factors import Factors


@dataclass
class RankCandidate:
    name: str
    energy: torch.Tensor  # (k,) squared scaled singular values, descending
    unit_macs: int  # MACs per sample of one rank unit


def uniform_rank(candidates: list[RankCandidate], budget: float) -> int:
    """The highest rank r that every candidate can have (clamped to its full rank) within `budget`."""
    r = 0
    top = max((len(c.energy) for c in candidates), default=0)
    while r < top and sum(min(r + 1, len(c.energy)) * c.unit_macs for c in candidates) <= budget:
        r += 1
    return r


def allocate_ranks(candidates: list[RankCandidate], budget: float, floor: float = 0.0) -> dict[str, int]:
    """Ranks per candidate with sum(rank * unit_macs) <= budget, greedily by energy per MAC.

    `floor` (0..1): every candidate first gets that share of the uniform rank the budget affords."""
    if budget < 0:
        raise ValueError(f"MACs budget {budget} is negative")
    if not 0 <= floor <= 1:
        raise ValueError(f"floor is a share of the affordable uniform rank, 0..1; got {floor}")
    for c in candidates:
        if c.unit_macs <= 0:
            raise ValueError(f"{c.name}: a rank unit must cost MACs, got {c.unit_macs}")
    base = int(floor * uniform_rank(candidates, budget))
    ranks = {c.name: min(base, len(c.energy)) for c in candidates}
    heap: list[tuple[float, int, int]] = []  # (-energy per MAC, candidate index, rank it would reach)
    energy = [c.energy.double().cpu().tolist() for c in candidates]
    for i, c in enumerate(candidates):
        r = ranks[c.name]
        if r < len(energy[i]):
            heapq.heappush(heap, (-energy[i][r] / c.unit_macs, i, r + 1))
    spent = sum(ranks[c.name] * c.unit_macs for c in candidates)
    while heap:
        _, i, r = heapq.heappop(heap)
        c = candidates[i]
        if spent + c.unit_macs > budget:
            continue  # spending only grows: this linear never fits again
        spent += c.unit_macs
        ranks[c.name] = r
        if r < len(energy[i]):
            heapq.heappush(heap, (-energy[i][r] / c.unit_macs, i, r + 1))
    return ranks


def refine_ranks(score: Callable[[dict[str, int]], float], start: dict[str, int], unit_macs: dict[str, int],
                 max_rank: dict[str, int], step: int, rounds: int = 3, tries: int = 3,
                 on_eval: Callable[[], None] | None = None) -> tuple[dict[str, int], float, int]:
    """Group ranks with score >= score(start) at MACs <= those of `start` (see the module notes).

    `score(ranks)` measures a configuration (higher is better); `unit_macs[g]` is the MACs of one
    rank unit of group g; each round costs one probe per group plus up to `tries` moves.
    Returns (ranks, their score, evaluations made)."""
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    if set(start) != set(unit_macs) or set(start) != set(max_rank):
        raise ValueError("start, unit_macs and max_rank must name the same groups")
    budget = sum(start[g] * unit_macs[g] for g in start)
    evals = 0

    def measure(ranks: dict[str, int]) -> float:
        nonlocal evals
        evals += 1
        if on_eval is not None:
            on_eval()
        return score(ranks)

    best, best_score = dict(start), measure(start)
    for _ in range(rounds):
        loss = {g: best_score - measure({**best, g: best[g] - step}) for g in best if best[g] >= step}
        donors = sorted(loss, key=loss.get)
        moved = False
        for donor in donors[:tries]:
            spare = budget - sum(best[g] * unit_macs[g] for g in best) + step * unit_macs[donor]
            # the freed MACs go to the groups whose step down hurt most (they gain most from a step up)
            receivers = [g for g in sorted(loss, key=loss.get, reverse=True) if g != donor and best[g] < max_rank[g]]
            cand = {**best, donor: best[donor] - step}
            for g in receivers:
                add = min(step, max_rank[g] - cand[g], int(spare // unit_macs[g]))
                if add > 0:
                    cand[g] += add
                    spare -= add * unit_macs[g]
            if cand == {**best, donor: best[donor] - step}:
                continue
            s = measure(cand)
            if s > best_score:
                best, best_score, moved = cand, s, True
                break
        if not moved:
            break
    return best, best_score, evals


def branch_groups(branches: list[BranchSpec]) -> dict[str, list[str]]:
    """Branch name -> the calibrated linears in it: the groups `search_branch_ranks` moves ranks between."""
    return {b.name: [s.name for s in b.linears] for b in branches}


def group_factors(factors: Factors, groups: dict[str, list[str]], ranks: dict[str, int]) -> Factors:
    """`factors` truncated to one rank per group (exact: columns are ordered by singular value)."""
    tensors = {}
    for group, names in groups.items():
        for name in names:
            a, b = factors.tensors[name]
            r = min(ranks[group], a.shape[1])
            tensors[name] = (a[:, :r].contiguous(), b[:r].contiguous())
    return Factors(tensors, {**factors.meta, "rank": None, "branch_ranks": dict(ranks)})


def search_branch_ranks(score: Callable[[dict[str, int]], float], branches: list[BranchSpec], rank: int,
                        step: int, rounds: int = 3, max_rank: int | None = None,
                        on_eval: Callable[[], None] | None = None) -> tuple[dict[str, int], float, int]:
    """`refine_ranks` over branches from uniform `rank`: one rank per branch, at most the MACs of uniform `rank`.

    A branch's rank unit costs what all its linears' units cost together (N (C_in + C_out) each)."""
    unit = {b.name: sum(s.tokens * (s.in_features + s.out_features) for s in b.linears) for b in branches}
    top = {b.name: min(min(s.in_features, s.out_features) for s in b.linears) for b in branches}
    if max_rank is not None:
        top = {g: min(v, max_rank) for g, v in top.items()}
    start = {g: min(rank, top[g]) for g in unit}
    return refine_ranks(score, start, unit, top, step, rounds, on_eval=on_eval)


def budget_ranks(model: nn.Module, branches: list[BranchSpec], energies: dict[str, torch.Tensor],
                 fraction: float, floor: float = 0.0) -> dict[str, int]:
    """Greedy per-linear ranks (`allocate_ranks`) so that a calibrated call costs at most `fraction`
    of a full call's MACs; what a calibrated call pays besides its rank units (embeddings, adaLN, final
    layer, attention matmuls) is set aside first. Kept for benchmarks/rank_allocation.py: it lost to
    uniform ranks at equal MACs, so calibration does not offer it."""
    if not 0 < fraction < 1:
        raise ValueError(f"fraction is the MACs share of a full call, 0 < F < 1; got {fraction}")
    base = get_adapter(model).base_macs(model)
    full_call = base + sum(b.full_macs() for b in branches)
    fixed = base + sum(b.attention_macs() for b in branches)
    if fraction * full_call < fixed:
        raise ValueError(f"rank budget {fraction} is below the {fixed / full_call:.4f} of a full call that a "
                         "calibrated call pays outside its low-rank factors")
    cands = [RankCandidate(s.name, energies[s.name], s.tokens * (s.in_features + s.out_features))
             for b in branches for s in b.linears]
    return allocate_ranks(cands, fraction * full_call - fixed, floor)
