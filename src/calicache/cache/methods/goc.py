"""Gradient-optimized cache (Qiu et al., arXiv 2503.05156): FORA-style branch caching whose cached
output is pushed along the branch's last change.

Each branch keeps a two-slot queue (F_prev2, F_prev) of the values it produced or served at its last
two calls; the queue shifts after every call. At a cached call s the branch serves
`F_prev + w (F_prev - F_prev2)` if s is a compensation step and F_prev2 exists, else `F_prev`.
Compensation steps come from `goc_steps`, a steps file made by `calicache calibrate --method goc`
(`goc_file`), or the authors' list for 20-call runs.
"""

from __future__ import annotations

import torch

from ...calibrate.goc import GocSteps
from ...models.io import weight_hash
from ..config import CacheConfig
from .base import BranchCache, Method

# The authors' hard-coded list for 20-step DDIM at period 2 (cached calls 1, 3, ..., 19): call 1 has
# no F_prev2 and call 17 sits at the trajectory's late inflection point.
PUBLISHED_STEPS: dict[int, tuple[int, ...]] = {20: (3, 5, 7, 9, 11, 13, 15, 19)}


class GocBranchCache(BranchCache):
    """BranchCache plus the per-branch queue; full calls still store through BranchCache."""

    def __init__(self, method: GradientOptimizedCache, layers: list[int]):
        self.queue: dict[int, tuple[torch.Tensor | None, torch.Tensor]] = {}  # layer -> (F_prev2, F_prev)
        super().__init__(method, layers)

    def _shift(self, layer: int, value: torch.Tensor) -> None:
        prev = self.queue[layer][1] if layer in self.queue else None
        self.queue[layer] = (prev, value)

    def on_full(self, layer: int, out: torch.Tensor) -> None:
        self._shift(layer, self.outputs[layer])  # the stored tensor itself: no second copy

    def on_cached(self, layer: int) -> torch.Tensor:
        prev2, prev = self.queue[layer]
        out = prev
        if prev2 is not None and self.method.compensates(self.method.engine.call):
            out = torch.add(prev, prev - prev2, alpha=self.method.weight)  # w = 0 gives prev exactly
        self._shift(layer, out)
        return out

    def reset(self) -> None:
        super().reset()
        self.queue.clear()

    def cache_bytes(self) -> int:
        held = {id(t): t for t in self.outputs.values()}
        held.update({id(t): t for pair in self.queue.values() for t in pair if t is not None})
        return sum(t.nbytes for t in held.values())


class GradientOptimizedCache(Method):
    def __init__(self, engine, config: CacheConfig):
        super().__init__(engine, config)
        self.weight = float(config.goc_weight)
        self.file: GocSteps | None = None
        if config.goc_file is not None:
            self.file = GocSteps.load(config.goc_file)
            on_meta = next(engine.model.parameters()).is_meta  # counting MACs by name: no weights to hash
            self.file.check(model_hash=None if on_meta else weight_hash(engine.model))
            made_for, period = self.file.meta.get("period"), engine.schedule.period
            if period is not None and made_for is not None and made_for != period:
                raise ValueError(f"GOC steps file {config.goc_file} was found for period {made_for} but this cache "
                                 f"uses period {period}; use --period {made_for} or find steps for period {period}")
        self.given: list[int] | None = (sorted(set(config.goc_steps)) if config.goc_steps is not None
                                        else (sorted(set(self.file.steps)) if self.file is not None else None))
        self.run_steps: frozenset[int] | None = None  # set by check_run for the coming run
        self.cache = GocBranchCache(self, list(range(len(engine.branches))))
        # The update is one subtract and one multiply-add per element of the branch output (N x C_out,
        # C_out = the branch's last linear's outputs): counted as N * C_out MACs per sample.
        self._update_macs = [b.tokens * b.linears[-1].out_features for b in engine.branches]

    def steps_for(self, num_calls: int) -> list[int]:
        """The compensation steps of a run of `num_calls` calls; a run GOC cannot serve is an error."""
        if self.file is not None:
            self.file.check(num_calls=num_calls)
        if self.given is None:
            if num_calls not in PUBLISHED_STEPS:
                raise ValueError(
                    f"GOC's published compensation steps are for 20-call runs; this run makes {num_calls}. Find "
                    f"steps for it with `calicache calibrate --method goc --model M --steps {num_calls} --out "
                    "goc.json` and pass goc_file (--goc-file goc.json), or give goc_steps (--goc-steps 3,5,7)")
            return list(PUBLISHED_STEPS[num_calls])
        late = [s for s in self.given if s >= num_calls]
        if late:
            raise ValueError(f"goc steps {late} are beyond this run's {num_calls} calls (numbered 0..{num_calls - 1})")
        layers = len(self.engine.branches)
        full = [s for s in self.given if self.engine.schedule.row(s, layers).all()]
        if full:
            raise ValueError(f"goc steps {full} are full calls for every layer under this schedule, so they are never "
                             "compensated; give cached calls (with period p: calls where call % p != 0)")
        return self.given

    def check_run(self, num_calls: int) -> None:
        self.run_steps = frozenset(self.steps_for(num_calls))

    def compensates(self, call: int) -> bool:
        if self.engine.explicit:  # inside calicache.sample: check_run chose this run's steps
            return call in self.run_steps
        if self.given is None:
            raise RuntimeError("GOC outside calicache.sample cannot know the run length, so it needs goc_steps or "
                               "goc_file (or sample with calicache.sample)")
        return call in self.given

    def reset(self) -> None:
        self.cache.reset()

    def cache_bytes(self) -> int:
        return self.cache.cache_bytes()

    def cached_macs(self, layer: int, call: int) -> int:
        """FORA's 0 for the branch, plus the update's N * C_out at compensated calls (call >= 2)."""
        steps = self.run_steps if self.run_steps is not None else frozenset(self.given or ())
        return self._update_macs[layer] if call >= 2 and call in steps else 0

