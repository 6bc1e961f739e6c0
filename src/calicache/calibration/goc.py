"""GOC's compensation steps, found offline (Qiu et al., arXiv 2503.05156, "inflection-aware" steps).

GOC extrapolates a cached branch output along its last change, F_prev + w (F_prev - F_prev2), which
helps only while the branch-output trajectory keeps its direction. The finder runs uncached sampling,
measures for every call s >= 2 the cosine between successive changes d_s = F_s - F_{s-1} and
d_{s-1} (per sample over the flattened branch output, averaged over samples and branches), and
calls every s where it drops below a threshold (0: the trajectory turns back) an inflection point.
A cached call gets compensation unless an inflection point lies at it or at the call before it
(that call's change is the gradient the extrapolation would use).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed
from ..cache.methods.goc import GocSteps, inflection_points
from ..cache.schedule import check_period


def sample_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine between a[i] and b[i] over everything but the first (sample) dimension: (B,).

    A zero change has no direction and counts as 0 (neither keeps nor reverses the direction).
    """
    return F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1, eps=1e-12)


class CosineAccumulator:
    """cos(d_s, d_{s-1}) per call over one or more trajectories (keys), summed as they stream in.

    Only F_{s-1} and d_{s-1} are kept per key, so memory does not grow with the number of calls.
    A trajectory restarts whenever a key is fed call 0.
    """

    def __init__(self, num_calls: int):
        self.sums = np.zeros(num_calls, dtype=np.float64)
        self.counts = np.zeros(num_calls, dtype=np.int64)
        self._last: dict[Hashable, tuple[int, torch.Tensor, torch.Tensor | None]] = {}

    def update(self, key: Hashable, call: int, value: torch.Tensor) -> None:
        """Feed F_call (samples, ...) of trajectory `key`; calls of one trajectory come in order."""
        value = value.detach().float()
        if call == 0:
            self._last[key] = (0, value, None)
            return
        last = self._last.get(key)
        if last is None or last[0] != call - 1:
            raise RuntimeError(f"trajectory {key!r} got call {call} after call {None if last is None else last[0]}; "
                               "calls must come in order from 0")
        _, prev, prev_d = last
        d = value - prev
        if prev_d is not None:
            cos = sample_cosines(d, prev_d)
            self.sums[call] += float(cos.sum())
            self.counts[call] += cos.numel()
        self._last[key] = (call, value, d)

    def all_reduce_(self) -> None:
        """Sum the per-call cosine sums and counts over the ranks of a torch.distributed job (no-op in one process)."""
        tensors = {"sums": torch.from_numpy(self.sums), "counts": torch.from_numpy(self.counts)}
        distributed.all_reduce_sum_(tensors)  # in place: the tensors share memory with the arrays

    def cosines(self) -> list[float | None]:
        """Mean cosine per call; None where it is undefined (calls 0 and 1)."""
        return [float(s / n) if n else None for s, n in zip(self.sums, self.counts)]


def trajectory_cosines(trajectory: torch.Tensor) -> list[float | None]:
    """Per-call mean cos(d_s, d_{s-1}) of one trajectory `(calls, samples, ...)`."""
    if trajectory.ndim < 2:
        raise ValueError(f"a trajectory is (calls, samples, ...), got shape {tuple(trajectory.shape)}")
    acc = CosineAccumulator(trajectory.shape[0])
    for call, value in enumerate(trajectory):
        acc.update(0, call, value)
    return acc.cosines()


def compensation_steps(cosines: Sequence[float | None], period: int = 2, threshold: float = 0.0) -> list[int]:
    """Cached calls (s % period != 0) that get compensation: s >= 2 (F_prev2 exists) and no
    inflection point at s or s - 1."""
    check_period(period)
    turns = set(inflection_points(cosines, threshold))
    return [s for s in range(2, len(cosines)) if s % period and s not in turns and s - 1 not in turns]


def find_goc_steps(
    model: nn.Module,
    steps: int,
    sampler: str = "ddim",
    spacing: str = "adm",
    num: int = 32,
    cfg_scale: float = 1.0,
    seed: int = 0,
    threshold: float = 0.0,
    batch_size: int | None = None,
    period: int = 2,
    progress: bool = False,
) -> GocSteps:
    """Run uncached sampling of `num` samples (classes i % num_classes, seeds (seed, i)) and choose
    the compensation steps for FORA period `period` (see the module docstring).

    Branch outputs are read by temporary forward hooks and reduced to cosine sums on the fly.
    """
    from ..adapters import get_adapter
    from ..cache.state import get_engine
    from ..models.io import weight_hash
    from ..sampling import model_calls, sample

    if get_engine(model) is not None:
        raise ValueError("the model has a cache attached; the finder needs uncached outputs: remove_cache(model) first")
    if num < 1 or (batch_size is not None and batch_size < 1):
        raise ValueError(f"need num >= 1 and batch_size >= 1 (or None for one batch), got {num} and {batch_size}")
    if not math.isfinite(threshold):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    check_period(period)
    calls = model_calls(steps, sampler)
    if calls < 3:
        raise ValueError(f"a run of {calls} calls has no call with two earlier changes; use --steps >= 3")
    branches = get_adapter(model).branches(model)
    acc = CosineAccumulator(calls)
    seen = {"calls": 0}

    def count_call(module, args, kwargs):
        seen["calls"] += 1

    def record(layer: int):
        # The model pre-hook has counted this call already; every run makes exactly `calls` calls.
        return lambda module, args, out: acc.update(layer, (seen["calls"] - 1) % calls, out)

    handles = [model.register_forward_pre_hook(count_call, with_kwargs=True)]
    try:
        handles += [b.module.register_forward_hook(record(i)) for i, b in enumerate(branches)]
        # Under torchrun batch j goes to rank j % world; sample(start=) gives it the samples one process draws.
        mine = distributed.split_for_rank(num, batch_size or num)
        with distributed.job_progress(num, "finding GOC steps", progress) as advance:
            for idx in mine:
                sample(model, len(idx), steps, sampler=sampler, cfg_scale=cfg_scale, seed=seed, batch_size=batch_size,
                       spacing=spacing, start=idx.start)
                advance(len(idx))
    finally:
        for h in handles:
            h.remove()
    if seen["calls"] != calls * len(mine):
        raise RuntimeError(f"the sampler made {seen['calls']} model calls; expected {calls} per run x {len(mine)} runs")
    acc.all_reduce_()
    cosines = acc.cosines()
    meta = {"model_hash": weight_hash(model), "steps": steps, "calls": calls, "sampler": sampler,
            "spacing": spacing, "cfg_scale": cfg_scale, "num": num, "seed": seed, "period": period,
            "branches": len(branches)}
    return GocSteps(cosines=cosines, threshold=float(threshold),
                    steps=compensation_steps(cosines, period, threshold), meta=meta)
