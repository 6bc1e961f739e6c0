"""Gather/scatter schedules over (model call, cacheable layer).

G[t, l] = 1: compute layer l fully at call t and store it; S = 1 - G: serve it from the cache.
Calls are numbered from 0, the noisiest; call 0 is always full (the cache starts empty).

A schedule is an explicit gather matrix (a fixed run length), a list of full calls, or a pattern:
- `calls` (c_0 = 0, c_1, ...): exactly these calls are full, whatever the spacing between them
  (non-uniform periods: dense where the trajectory moves fast; `CacheSchedule.spread` makes such
  lists); a run shorter than the list is an error, not silently cut;
- `period` p: between warm-up and cool-down, call t is full when (t - a) % p == 0, where the
  anchor a is the last warm-up call (0 without warm-up: plain FORA, t % p == 0);
- `warmup` k: calls 0 .. k-1 are full (the early, fast-moving calls; TaylorSeer and cache-dit
  keep them too);
- `cooldown` c: the last c calls of the run are full (needs the run length: `calicache.sample`,
  `cache_run` and the pipelines give it);
- `first_blocks` n / `last_blocks` m: every branch of the first n and the last m transformer
  blocks is full at every call (cache-dit's Fn/Bn). A block is its branches (2 per DiT block,
  3 per PixArt block); the engine tells the schedule which layer belongs to which block. Fn/Bn go
  with `calls` too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

_PATTERN_FIELDS = ("warmup", "cooldown", "first_blocks", "last_blocks")


def block_layout(branch_names: Sequence[str]) -> tuple[int, ...]:
    """Block index of every cacheable layer, from branch names `<block>.<branch>` in model order.

    Consecutive branches with the same prefix form one block ("blocks.3.attn", "blocks.3.mlp").
    """
    prefixes = [name.rsplit(".", 1)[0] if "." in name else name for name in branch_names]
    out, seen = [], {}
    for i, p in enumerate(prefixes):
        if i and p != prefixes[i - 1] and p in seen:
            raise ValueError(f"branches of block {p!r} are not consecutive; cannot number blocks")
        seen.setdefault(p, len(seen))
        out.append(seen[p])
    return tuple(out)


def _check_count(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")


def _check_calls(calls) -> tuple[int, ...]:
    """A list of full calls as a tuple: integers, strictly increasing, starting at call 0."""
    try:
        out = tuple(calls)
    except TypeError:
        raise ValueError(f"calls must be a list of call indices, e.g. [0, 2, 5, 9], got {calls!r}") from None
    if not out or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in out):
        raise ValueError(f"calls must be a non-empty list of integer call indices, e.g. [0, 2, 5, 9], got {calls!r}")
    out = tuple(int(c) for c in out)
    if out[0] != 0:
        raise ValueError(f"calls must start with call 0 (the cache is empty before it), got {list(out)}")
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"calls must be strictly increasing, got {list(out)}")
    return out


def check_period(period: object, what: str = "") -> None:
    """A FORA period: an integer >= 1 (1 = every call full). `what` says what the period is for."""
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise ValueError(f"period must be an integer >= 1{what}, got {period!r}")


@dataclass(frozen=True)
class CacheSchedule:
    """A FORA-style pattern (any run length), a list of full calls, or an explicit gather matrix
    (a fixed run length)."""

    period: int | None = None
    gather: np.ndarray | None = None  # bool (T, L)
    warmup: int = 0
    cooldown: int = 0
    first_blocks: int = 0
    last_blocks: int = 0
    calls: tuple[int, ...] | None = None  # the full calls, instead of a period
    blocks: tuple[int, ...] | None = field(default=None, compare=False, repr=False)  # block of each layer

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.period, self.gather, self.calls)) != 1:
            raise ValueError("give exactly one of period, calls (the full calls) or gather")
        if self.period is not None:
            check_period(self.period, " (1 = no caching)")
        for name in _PATTERN_FIELDS:
            _check_count(name, getattr(self, name))
        if self.calls is not None:
            object.__setattr__(self, "calls", _check_calls(self.calls))
            if self.warmup or self.cooldown:
                raise ValueError("warmup / cooldown go with a period; a calls list names every full call already "
                                 "(put the warm-up and cool-down calls in it)")
        if self.gather is not None:
            if any(getattr(self, name) for name in _PATTERN_FIELDS):
                raise ValueError("warmup / cooldown / first_blocks / last_blocks go with a period; an explicit "
                                 "gather matrix already says which layers are full at every call")
            g = self.gather
            if g.ndim != 2 or g.shape[0] < 1:
                raise ValueError(f"a schedule matrix must be 2-D (calls, layers), got shape {g.shape}")
            if not g[0].all():
                raise ValueError("call 0 must be full for every layer (the cache is empty before it); "
                                 f"layers {np.flatnonzero(~g[0]).tolist()[:8]} are not")

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def none(cls) -> CacheSchedule:
        return cls(period=1)

    @classmethod
    def fora(cls, period: int, warmup: int = 0, cooldown: int = 0, first_blocks: int = 0,
             last_blocks: int = 0) -> CacheSchedule:
        """Period p with optional warm-up / cool-down calls and always-full first/last blocks."""
        return cls(period=period, warmup=warmup, cooldown=cooldown, first_blocks=first_blocks,
                   last_blocks=last_blocks)

    @classmethod
    def spread(cls, full: int, num_calls: int, power: float = 1.0, first_blocks: int = 0,
               last_blocks: int = 0) -> CacheSchedule:
        """`full` full calls over a run of `num_calls`, the i-th at round(num_calls (i / full)^power) (kept
        distinct): power 1 spaces them evenly (FORA's period when full divides num_calls), power > 1 packs
        them into the early calls, where the trajectory moves most, power < 1 into the late ones."""
        if isinstance(full, bool) or not isinstance(full, int) or not 1 <= full <= num_calls:
            raise ValueError(f"full must be an integer from 1 to num_calls = {num_calls}, got {full!r}")
        if not power > 0:
            raise ValueError(f"power must be > 0 (1 = evenly spaced), got {power!r}")
        calls: list[int] = []
        for i in range(full):
            c = max(int(round(num_calls * (i / full) ** power)), calls[-1] + 1 if calls else 0)
            calls.append(min(c, num_calls - full + i))  # room for the ones still to place
        return cls(calls=tuple(calls), first_blocks=first_blocks, last_blocks=last_blocks)

    @classmethod
    def from_matrix(cls, gather) -> CacheSchedule:
        try:
            g = np.asarray(gather)
        except ValueError:  # numpy's message for rows of different lengths names no schedule
            g = None
        if g is None or g.ndim != 2:
            raise ValueError("a schedule matrix is rectangular, calls x layers (one row per model call, each as "
                             "long as the number of cacheable layers); this one is "
                             + ("ragged (rows of different lengths)" if g is None else f"{g.ndim}-dimensional"))
        if g.dtype != bool:
            if not np.isin(g, (0, 1)).all():
                raise ValueError("a schedule matrix holds only 0/1 (or booleans)")
            g = g.astype(bool)
        return cls(gather=g)

    @classmethod
    def from_dict(cls, data) -> CacheSchedule:
        """From `to_dict`'s form: `{"gather": [[1, 0, ...], ...]}`, `{"period": 2, "warmup": 3, ...}`
        or a bare matrix (a list of lists)."""
        if not isinstance(data, dict):
            return cls.from_matrix(data)
        if "gather" in data:
            extra = sorted(set(data) - {"gather"})
            if extra:
                raise ValueError(f"a schedule with a gather matrix takes no other fields, got {extra}")
            return cls.from_matrix(data["gather"])
        unknown = sorted(set(data) - {"period", "calls", *_PATTERN_FIELDS})
        if unknown:
            raise ValueError(f"unknown schedule fields {unknown}; known: period, calls, {', '.join(_PATTERN_FIELDS)}, "
                             "gather")
        if "calls" in data:
            return cls(**data)
        if "period" not in data:
            raise ValueError("a schedule needs 'period' (e.g. {\"period\": 2}), 'calls' (the full calls, e.g. "
                             "{\"calls\": [0, 2, 5, 9]}) or 'gather' (a calls x layers matrix)")
        return cls.fora(**data)

    def to_dict(self) -> dict:
        if self.gather is not None:
            return {"gather": self.gather.astype(int).tolist()}
        if self.calls is not None:
            return {"calls": list(self.calls), "first_blocks": self.first_blocks, "last_blocks": self.last_blocks}
        return {"period": self.period, **{name: int(getattr(self, name)) for name in _PATTERN_FIELDS}}

    @classmethod
    def load(cls, path: str | os.PathLike) -> CacheSchedule:
        """A schedule from JSON (`to_dict`'s form) or npz (an array named `gather`)."""
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"schedule file {path} does not exist")
        try:
            if path.suffix == ".npz":
                with np.load(path) as f:
                    if "gather" not in f:
                        raise ValueError(f"{path}: npz schedule needs an array named 'gather' (calls x layers)")
                    return cls.from_matrix(f["gather"])
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: unreadable schedule file ({e})") from e
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e

    def save(self, path: str | os.PathLike) -> None:
        from ..utils import atomic_path

        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict()))

    # -- the model's block layout ------------------------------------------------------------
    @property
    def needs_blocks(self) -> bool:
        return bool(self.first_blocks or self.last_blocks)

    def for_branches(self, branch_names: Sequence[str]) -> CacheSchedule:
        """This schedule bound to a model's layers (which block each branch belongs to)."""
        if not self.needs_blocks:
            return self
        blocks = block_layout(branch_names)
        bound = replace(self, blocks=blocks)
        bound._check_blocks(len(blocks))
        return bound

    def _check_blocks(self, num_layers: int) -> None:
        if self.blocks is None:
            raise ValueError("first_blocks / last_blocks need the model's block layout: attach the schedule with "
                             "apply_cache (or call schedule.for_branches(names of the model's branches))")
        if len(self.blocks) != num_layers:
            raise ValueError(f"the schedule was bound to {len(self.blocks)} layers but the model has {num_layers}")
        n = max(self.blocks) + 1
        if self.first_blocks + self.last_blocks >= n:
            raise ValueError(f"first_blocks + last_blocks = {self.first_blocks + self.last_blocks} leaves none of the "
                             f"model's {n} blocks to cache; use fewer")

    def _always_full(self) -> np.ndarray:
        b = np.asarray(self.blocks)
        return (b < self.first_blocks) | (b >= b.max() + 1 - self.last_blocks)

    # -- use ---------------------------------------------------------------------------------
    @property
    def num_calls(self) -> int | None:
        """Calls of the run the schedule was made for (None: any)."""
        return None if self.gather is None else self.gather.shape[0]

    def check(self, num_calls: int, num_layers: int) -> None:
        """Fail before any work if the schedule cannot drive a run of `num_calls` calls."""
        if self.gather is None:
            if self.needs_blocks:
                self._check_blocks(num_layers)
            if self.calls is not None and self.calls[-1] >= num_calls:
                raise ValueError(f"the schedule's full calls {list(self.calls)} go past this run's {num_calls} calls; "
                                 "make the calls list for this step count")
            if self.period is not None and self.warmup + self.cooldown >= num_calls > 1 and self.period > 1:
                raise ValueError(f"warm-up {self.warmup} + cool-down {self.cooldown} cover all {num_calls} calls of "
                                 "this run, so nothing is cached; use fewer full calls or more steps")
            return
        if self.gather.shape[1] != num_layers:
            raise ValueError(f"schedule has {self.gather.shape[1]} layers but the model has {num_layers} "
                             "cacheable layers (2 per DiT block, 3 per PixArt block)")
        if self.gather.shape[0] != num_calls:
            raise ValueError(f"schedule has {self.gather.shape[0]} calls but this run makes {num_calls} model "
                             "calls; make the schedule for this step count")

    def full_call(self, call: int, num_calls: int | None = None) -> bool:
        """Whether every layer is full at `call` under the pattern (calls, or warm-up, cool-down, period)."""
        if self.calls is not None:
            return call in self.calls
        if call < self.warmup:
            return True
        if self.cooldown:
            if num_calls is None:
                raise ValueError("a cool-down needs the run length: sample with calicache.sample (or inside "
                                 "calicache.cache.cache_run(model, num_calls)) or through a diffusers pipeline")
            if call >= num_calls - self.cooldown:
                return True
        return (call - max(self.warmup - 1, 0)) % self.period == 0

    def row(self, call: int, num_layers: int, num_calls: int | None = None) -> np.ndarray:
        """Gather flags (L,) of one call; a schedule that runs out is a clear error.

        `num_calls` (the run length) is needed by a cool-down only."""
        if self.gather is None:
            if self.full_call(call, num_calls):
                return np.ones(num_layers, dtype=bool)
            if self.needs_blocks:
                self._check_blocks(num_layers)
                return self._always_full()
            return np.zeros(num_layers, dtype=bool)
        if call >= self.gather.shape[0]:
            raise ValueError(f"the schedule covers {self.gather.shape[0]} calls but the model was called a "
                             f"{call + 1}th time in this run; make the schedule for this run's length")
        return self.gather[call]

    def matrix(self, num_calls: int, num_layers: int) -> np.ndarray:
        self.check(num_calls, num_layers)
        return np.stack([self.row(t, num_layers, num_calls) for t in range(num_calls)])
