"""Per-layer ranks under a MACs budget: a greedy allocation by scaled singular-value energy.

Every calibrated linear starts at rank 0. Each further rank unit costs `tokens * (C_i + C_o)`
MACs per sample (one row of B and one column of A; DiT's q, k and v share one B pass, which
costs the same per unit) and keeps the energy s_r^2 of its next scaled singular value. Units go,
one at a time, to the linear whose next unit keeps the most energy per MAC, until the budget is
spent. Singular values decrease, so each linear's gains are concave and the greedy order is
the best energy for the MACs spent (up to the last, indivisible unit). The authors' code has a
similar greedy search under a parameter budget.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class RankCandidate:
    name: str
    energy: torch.Tensor  # (k,) squared scaled singular values, descending
    unit_macs: int  # MACs per sample of one rank unit


def allocate_ranks(candidates: list[RankCandidate], budget: float) -> dict[str, int]:
    """Ranks per candidate with sum(rank * unit_macs) <= budget, greedily by energy per MAC."""
    if budget < 0:
        raise ValueError(f"MACs budget {budget} is negative")
    ranks = {c.name: 0 for c in candidates}
    heap: list[tuple[float, int, int]] = []  # (-energy per MAC, candidate index, rank it would reach)
    energy = [c.energy.double().cpu().tolist() for c in candidates]
    for i, c in enumerate(candidates):
        if c.unit_macs <= 0:
            raise ValueError(f"{c.name}: a rank unit must cost MACs, got {c.unit_macs}")
        if energy[i]:
            heapq.heappush(heap, (-energy[i][0] / c.unit_macs, i, 1))
    spent = 0
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
