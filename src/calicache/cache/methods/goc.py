"""Gradient-optimized cache (Qiu et al., arXiv 2503.05156): FORA-style branch caching whose cached
output is pushed along the branch's last change.

Each branch keeps a two-slot queue (F_prev2, F_prev) of the values it produced or served at its last
two calls; the queue shifts after every call. At a cached call s the branch serves
`F_prev + w (F_prev - F_prev2)` if s is a compensation step and F_prev2 exists, else `F_prev`.
Compensation steps come from `GOCConfig.steps`, a steps file made by `calicache calibrate --method
goc` (`GOCConfig.steps_file`), or the authors' list for 20-call runs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from ...models.io import shipped_file
from ...utils import atomic_path, warn_once
from ..state import shared_method
from .base import Argument, BranchCache, Method, MethodConfig, each, first_order, tensors, traced

# The authors' hard-coded list for 20-step DDIM at period 2 (cached calls 1, 3, ..., 19): call 1 has
# no F_prev2 and call 17 sits at the trajectory's late inflection point.
PUBLISHED_STEPS: dict[int, tuple[int, ...]] = {20: (3, 5, 7, 9, 11, 13, 15, 19)}


GOC_STEPS_FORMAT = "calicache-goc-steps"
STEPS_CHECKSUM_KEY = "sha256"


def steps_checksum(data: dict) -> str:
    """SHA-256 of a steps file's JSON object without its `sha256`, in canonical form (sorted keys, no
    spaces): the same content gives the same checksum however the file is indented."""
    content = {k: v for k, v in data.items() if k != STEPS_CHECKSUM_KEY}
    return hashlib.sha256(json.dumps(content, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _verify_steps(path: Path, data: dict) -> None:
    """A steps file calicache wrote carries its checksum: a changed or damaged one is an error. A hand-written
    file (no `sha256`) loads, with a note, once, that it is not verified."""
    stored = data.get(STEPS_CHECKSUM_KEY)
    if stored is None:
        warn_once(f"{path}: this GOC steps file carries no checksum ({STEPS_CHECKSUM_KEY!r}), so its steps are not "
                  "verified; files written by `calicache calibrate --method goc` (or GocSteps.save) carry one",
                  stacklevel=3)
    elif stored != steps_checksum(data):
        raise ValueError(f"{path}: the GOC steps do not match the file's checksum ({STEPS_CHECKSUM_KEY!r}): the file "
                         "was changed or damaged after it was written; re-create it with `calicache calibrate "
                         f"--method goc`, or, for steps edited by hand on purpose, delete its {STEPS_CHECKSUM_KEY!r} "
                         "entry")


def inflection_points(cosines: Sequence[float | None], threshold: float = 0.0) -> list[int]:
    """Calls whose change turns away from the previous one: cosine below `threshold`."""
    return [s for s, c in enumerate(cosines) if c is not None and c < threshold]


@dataclass
class GocSteps:
    """Found compensation steps: per-call cosines, the threshold, the chosen calls, and what they were
    found for (`meta`: model_hash, steps, calls, sampler, spacing, cfg_scale, num, seed, period)."""

    cosines: list[float | None]
    threshold: float
    steps: list[int]
    meta: dict = field(default_factory=dict)

    @property
    def inflections(self) -> list[int]:
        return inflection_points(self.cosines, self.threshold)

    @property
    def calls(self) -> int | None:
        """Model calls of the run the steps were found for (None: a hand-written file that does not say)."""
        calls = self.meta.get("calls", len(self.cosines) or None)
        return None if calls is None else int(calls)

    def table(self) -> str:
        """One line per call: cosine, inflection mark, compensation mark."""
        turns, comp = set(self.inflections), set(self.steps)
        lines = ["call  cos(d_s, d_s-1)  mark"]
        for s, c in enumerate(self.cosines):
            mark = "inflection" if s in turns else ("compensate" if s in comp else "")
            lines.append(f"{s:4d}  {'-' if c is None else f'{c:+.4f}':>15}  {mark}")
        return "\n".join(lines)

    def check(self, model_hash: str | None = None, num_calls: int | None = None) -> None:
        """Refuse steps found for another model or another run length."""
        made_for = self.meta.get("model_hash")
        if model_hash is not None and made_for is not None and made_for != model_hash:
            raise ValueError(f"GOC steps file was made for model {made_for[:12]}... but this model's weights hash to "
                             f"{model_hash[:12]}...; find steps for this model with `calicache calibrate --method goc`")
        if num_calls is not None and self.calls is not None and self.calls != num_calls:
            raise ValueError(f"GOC steps file was made for {self.calls} model calls ({self.meta.get('steps')} "
                             f"{self.meta.get('sampler')} steps) but this run makes {num_calls}; find steps for this "
                             f"step count with `calicache calibrate --method goc --steps {num_calls}`")

    def to_dict(self) -> dict:
        """The file's JSON object, with `sha256`: a checksum of everything else in it (see `steps_checksum`)."""
        data = {"format": GOC_STEPS_FORMAT, "version": 1, "steps": list(self.steps), "threshold": self.threshold,
                "cosines": list(self.cosines), "meta": dict(self.meta)}
        return data | {STEPS_CHECKSUM_KEY: steps_checksum(data)}

    def save(self, path: str | os.PathLike) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | os.PathLike) -> GocSteps:
        """A steps file, or a shipped one by name (`fmnist-dit-goc20`)."""
        path = shipped_file(path)
        if not path.exists():
            raise FileNotFoundError(f"GOC steps file {path} does not exist; make one with "
                                    "`calicache calibrate --method goc --model M --steps S --out PATH`")
        try:
            data = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a readable GOC steps file ({e}); re-create it with "
                             "`calicache calibrate --method goc`") from e
        if not isinstance(data, dict) or data.get("format") != GOC_STEPS_FORMAT:
            raise ValueError(f"{path}: not a calicache GOC steps file (expected format {GOC_STEPS_FORMAT!r}); "
                             "make one with `calicache calibrate --method goc`")
        _verify_steps(path, data)
        steps = data.get("steps")
        if not isinstance(steps, list) or any(not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in steps):
            raise ValueError(f"{path}: 'steps' must be a list of call indices >= 1, got {steps!r}")
        return cls(cosines=list(data.get("cosines", [])), threshold=float(data.get("threshold", 0.0)),
                   steps=steps, meta=dict(data.get("meta", {})))


class GocBranchCache(BranchCache):
    """BranchCache plus the per-branch queue; full calls still store through BranchCache.

    The queue is three fixed slots: a call reads F_prev2 and F_prev and writes only `served` (its
    value), and the host shifts the queue after the call (`end_call`). F_prev2 is zeros until it
    exists, with a compensation weight of 0, so under torch.compile every cached call is one graph."""

    def __init__(self, method: GradientOptimizedCache, layers: list[int]):
        self.prev2: dict[int, torch.Tensor | None] = dict.fromkeys(layers)  # F_prev2
        self.prev: dict[int, torch.Tensor | None] = dict.fromkeys(layers)  # F_prev
        self.served: dict[int, torch.Tensor | None] = dict.fromkeys(layers)  # this call's value
        super().__init__(method, layers)

    def on_full(self, layer: int, out: torch.Tensor) -> None:
        self.served[layer] = self.outputs[layer]  # the stored tensor itself: no second copy

    def on_cached(self, layer: int) -> torch.Tensor:
        prev2, prev = self.prev2[layer], self.prev[layer]
        m = self.method
        if traced() or m.compensate_now:  # w = 0 gives prev exactly
            out = each(lambda p, q: first_order(p, q, m.weight_now.to(p.dtype)), prev, prev2)
        else:
            out = prev
        self.served[layer] = out
        return out

    def begin_call(self) -> None:
        for layer in self.layers:
            if self.prev2[layer] is None and self.prev[layer] is not None:
                self.prev2[layer] = each(torch.zeros_like, self.prev[layer])  # read with weight 0 only

    def end_call(self) -> None:
        for layer in self.layers:
            if self.served[layer] is not None:  # a branch the model did not call keeps its queue
                self.prev2[layer], self.prev[layer], self.served[layer] = self.prev[layer], self.served[layer], None

    def reset(self) -> None:
        super().reset()
        for slots in (self.prev2, self.prev, self.served):
            slots.update(dict.fromkeys(self.layers))

    def cache_bytes(self) -> int:
        slots = (self.outputs, self.prev2, self.prev, self.served)
        held = {id(t): t for d in slots for v in d.values() if v is not None for t in tensors(v)}
        return sum(t.nbytes for t in held.values())


class GradientOptimizedCache(Method):
    def __init__(self, engine, config: GOCConfig):
        super().__init__(engine, config)
        self.weight = float(config.weight)
        self.file: GocSteps | None = None
        source = shared_method(engine, config)
        if isinstance(source, GradientOptimizedCache):
            # A guidance twin (or a MACs count) of the attached cache: its steps, read and checked once.
            self.file = source.file
        elif config.steps_file is not None:
            self.file = GocSteps.load(config.steps_file)
            self.file.check(model_hash=engine.model_hash())
            made_for, period = self.file.meta.get("period"), engine.schedule.period
            if period is not None and made_for is not None and made_for != period:
                raise ValueError(f"GOC steps file {config.steps_file} was found for period {made_for} but this cache "
                                 f"uses period {period}; use --period {made_for} or find steps for period {period}")
        self.given: list[int] | None = (sorted(set(config.steps)) if config.steps is not None
                                        else (sorted(set(self.file.steps)) if self.file is not None else None))
        self.run_steps: frozenset[int] | None = None  # set by check_run for the coming run
        self.compensate_now = False  # set before each call (host-side), read by eager hooks
        self.weight_now = torch.tensor(0.0)  # w at a compensated call, else 0: what a compiled hook reads
        self.cache = GocBranchCache(self, list(range(len(engine.branches))))
        # The update is one lerp (a subtract and a multiply-add) per element of the branch output
        # (N x C_out, C_out = the branch's last linear's outputs): counted as N * C_out MACs per sample.
        self._update_macs = [b.output_elements() for b in engine.branches]

    def steps_for(self, num_calls: int) -> list[int]:
        """The compensation steps of a run of `num_calls` calls; a run GOC cannot serve is an error."""
        if self.file is not None:
            self.file.check(num_calls=num_calls)
        if self.given is None:
            if num_calls not in PUBLISHED_STEPS:
                raise ValueError(
                    f"GOC's published compensation steps are for 20-call runs; this run makes {num_calls}. Find "
                    f"steps for it with `calicache calibrate --method goc --model M --steps {num_calls} --out "
                    "goc.json` and pass steps_file (--goc-file goc.json), or give steps (--goc-steps 3,5,7)")
            return list(PUBLISHED_STEPS[num_calls])
        late = [s for s in self.given if s >= num_calls]
        if late:
            raise ValueError(f"goc steps {late} are beyond this run's {num_calls} calls (numbered 0..{num_calls - 1})")
        layers = len(self.engine.branches)
        full = [s for s in self.given if self.engine.schedule.row(s, layers, num_calls).all()]
        if full:
            raise ValueError(f"goc steps {full} are full calls for every layer under this schedule, so they are never "
                             "compensated; give cached calls (with period p: calls where call % p != 0)")
        return self.given

    def check_run(self, num_calls: int) -> None:
        self.run_steps = frozenset(self.steps_for(num_calls))

    def begin_call(self) -> None:
        """Host-side: whether this call compensates (F_prev2 exists from call 2 on) and its weight as a tensor."""
        call = self.engine.call
        self.compensate_now = call >= 2 and self.compensates(call)
        self.weight_now = torch.tensor(self.weight if self.compensate_now else 0.0)
        self.cache.begin_call()

    def end_call(self) -> None:
        self.cache.end_call()

    def compensates(self, call: int) -> bool:
        if self.engine.explicit:  # inside calicache.sample: check_run chose this run's steps
            return call in self.run_steps
        if self.given is None:
            raise RuntimeError("GOC outside calicache.sample cannot know the run length, so it needs steps or "
                               "steps_file (or sample with calicache.sample)")
        return call in self.given

    def reset(self) -> None:
        self.cache.reset()

    def cache_bytes(self) -> int:
        return self.cache.cache_bytes()

    def cached_macs(self, layer: int, call: int) -> int:
        """FORA's 0 for the branch, plus the update's N * C_out at compensated calls (call >= 2)."""
        steps = self.run_steps if self.run_steps is not None else frozenset(self.given or ())
        return self._update_macs[layer] if call >= 2 and call in steps else 0



def parse_steps(text: str) -> list[int]:
    """Comma-separated call indices ("3,5,7")."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise ValueError(f"GOC steps are comma-separated call indices like 3,5,7, got {text!r}") from e


@dataclass
class GOCConfig(MethodConfig):
    """GOC: FORA plus compensation at chosen cached calls.

    - weight: the compensation weight w (the paper: 1.2 on FORA; 0 is FORA exactly).
    - steps: the compensated call indices, or steps_file: a steps file from `calicache calibrate
      --method goc`; neither: the authors' list for 20-call runs.
    """

    method: ClassVar[str] = "goc"
    method_class: ClassVar[type] = GradientOptimizedCache
    arguments: ClassVar[tuple[Argument, ...]] = MethodConfig.arguments + (
        Argument("--goc-weight", "weight", "GOC compensation weight w", float),
        Argument("--goc-steps", "steps", "GOC compensated calls, comma-separated", parse_steps),
        Argument("--goc-file", "steps_file", "GOC steps file from `calicache calibrate --method goc`, "
                 "or a shipped one by name (fmnist-dit-goc20)"),
    )
    files: ClassVar[tuple[str, ...]] = ("steps_file",)

    weight: float = 1.2
    steps: list[int] | None = None
    steps_file: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps is not None and self.steps_file is not None:
            raise ValueError("give steps or steps_file, not both")
        if self.steps is not None:
            if not isinstance(self.steps, (list, tuple)) or any(
                    not isinstance(s, int) or isinstance(s, bool) or s < 1 for s in self.steps):
                raise ValueError(f"steps must be a list of call indices >= 1, got {self.steps!r}")
            self.steps = list(self.steps)
        if self.steps_file is not None and not isinstance(self.steps_file, (str, os.PathLike)):
            raise ValueError(f"steps_file must be a file path, got {self.steps_file!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"weight must be a finite number (the paper: 1.2 on FORA), got {self.weight!r}")
