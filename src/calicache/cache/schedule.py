"""Gather/scatter schedules over (model call, cacheable layer).

G[t, l] = 1: compute layer l fully at call t and store it; S = 1 - G: serve it from the cache.
Calls are numbered from 0, the noisiest; call 0 is always full (the cache starts empty).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def check_period(period: object, what: str = "") -> None:
    """A FORA period: an integer >= 1 (1 = every call full). `what` says what the period is for."""
    if not isinstance(period, int) or isinstance(period, bool) or period < 1:
        raise ValueError(f"period must be an integer >= 1{what}, got {period!r}")


@dataclass(frozen=True)
class CacheSchedule:
    """Either a FORA period (any run length) or an explicit gather matrix (a fixed run length)."""

    period: int | None = None
    gather: np.ndarray | None = None  # bool (T, L)

    def __post_init__(self) -> None:
        if (self.period is None) == (self.gather is None):
            raise ValueError("give exactly one of period or gather")
        if self.period is not None:
            check_period(self.period, " (1 = no caching)")
        if self.gather is not None:
            g = self.gather
            if g.ndim != 2 or g.shape[0] < 1:
                raise ValueError(f"a schedule matrix must be 2-D (calls, layers), got shape {g.shape}")
            if not g[0].all():
                raise ValueError("call 0 must be full for every layer (the cache is empty before it); "
                                 f"layers {np.flatnonzero(~g[0]).tolist()[:8]} are not")

    @classmethod
    def none(cls) -> CacheSchedule:
        return cls(period=1)

    @classmethod
    def fora(cls, period: int) -> CacheSchedule:
        return cls(period=period)

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
    def load(cls, path: str | os.PathLike) -> CacheSchedule:
        """A gather matrix from JSON (`{"gather": [[1, 0, ...], ...]}` or a bare list) or npz (`gather`)."""
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
        return cls.from_matrix(data["gather"] if isinstance(data, dict) else data)

    def save(self, path: str | os.PathLike) -> None:
        from ..utils import atomic_path

        if self.gather is None:
            raise ValueError("only explicit schedules are saved; a FORA period is one number")
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps({"gather": self.gather.astype(int).tolist()}))

    @property
    def num_calls(self) -> int | None:
        """Calls of the run the schedule was made for (None: any)."""
        return None if self.gather is None else self.gather.shape[0]

    def check(self, num_calls: int, num_layers: int) -> None:
        """Fail before any work if the schedule cannot drive a run of `num_calls` calls."""
        if self.gather is None:
            return
        if self.gather.shape[1] != num_layers:
            raise ValueError(f"schedule has {self.gather.shape[1]} layers but the model has {num_layers} "
                             "cacheable layers (2 per DiT block)")
        if self.gather.shape[0] != num_calls:
            raise ValueError(f"schedule has {self.gather.shape[0]} calls but this run makes {num_calls} model "
                             "calls; make the schedule for this step count")

    def row(self, call: int, num_layers: int) -> np.ndarray:
        """Gather flags (L,) of one call; a schedule that runs out is a clear error."""
        if self.gather is None:
            return np.full(num_layers, call % self.period == 0)
        if call >= self.gather.shape[0]:
            raise ValueError(f"the schedule covers {self.gather.shape[0]} calls but the model was called a "
                             f"{call + 1}th time in this run; make the schedule for this run's length")
        return self.gather[call]

    def matrix(self, num_calls: int, num_layers: int) -> np.ndarray:
        self.check(num_calls, num_layers)
        return np.stack([self.row(t, num_layers) for t in range(num_calls)])
