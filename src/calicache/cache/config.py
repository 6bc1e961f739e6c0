"""`CacheConfig`: one validated description of how a model is cached."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .schedule import CacheSchedule

SVD_KINDS = ("plain", "ca", "cd", "cf")
SCALES = ("both", "input", "output")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class CacheConfig:
    """How to cache. `method`: "none", "fora", "icc", "goc" (see `calicache.cache.methods.METHODS`).

    - period / schedule: FORA period p (call t is full when t % p == 0), or an explicit gather
      matrix (CacheSchedule, array, or a JSON/npz path) that overrides the period.
    - rank: ICC rank; "full", an int (uniform), or None = the factor file's (per-layer) ranks, or
      round(width / 9) (the paper's 128 / 1152) for plain SVD without a file.
    - svd / scale / factors: where ICC's low-rank factors come from; "ca"/"cd"/"cf" need a factor
      file made by `calicache calibrate`; "plain" is computed from the weights when none is given.
    - cache_dtype: dtype of the stored activations (None: the model's).
    - goc_weight / goc_steps / goc_file: GOC's compensation weight and the calls it compensates.
    - forecast_weight / forecast_units: the calibrated forecast's extrapolation weight and whether
      distances between calls are counted in calls or in timesteps.
    """

    method: str = "none"
    period: int = 2
    schedule: Any = None
    rank: int | str | None = None
    svd: str = "plain"
    scale: str = "both"
    factors: Any = None
    cache_dtype: Any = None
    goc_weight: float = 1.2
    goc_steps: list[int] | None = None
    goc_file: str | os.PathLike | None = None
    forecast_weight: float = 1.0
    forecast_units: str = "calls"
    _schedule: CacheSchedule = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        from .methods import METHODS

        if self.method not in METHODS:
            raise ValueError(f"unknown cache method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.schedule is not None:
            s = self.schedule
            if isinstance(s, CacheSchedule):
                self._schedule = s
            elif isinstance(s, (str, os.PathLike)):
                self._schedule = CacheSchedule.load(s)
            else:
                self._schedule = CacheSchedule.from_matrix(np.asarray(s))
        elif self.method == "none":
            self._schedule = CacheSchedule.none()
        else:
            if not isinstance(self.period, int) or isinstance(self.period, bool) or self.period < 1:
                raise ValueError(f"period must be an integer >= 1 (1 = no caching), got {self.period!r}")
            self._schedule = CacheSchedule.fora(self.period)
        if self.rank is not None and self.rank != "full":
            if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 0:
                raise ValueError(f"rank must be 'full', a non-negative integer or None, got {self.rank!r}")
        if self.svd not in SVD_KINDS:
            raise ValueError(f"unknown svd {self.svd!r}; choose one of {SVD_KINDS}")
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; choose one of {SCALES}")
        if self.method in ("icc", "forecast") and self.svd != "plain" and self.factors is None:
            raise ValueError(f"svd={self.svd!r} needs a factor file: run `calicache calibrate --svd {self.svd}` "
                             "and pass factors=PATH (or use svd='plain')")
        if isinstance(self.cache_dtype, str):
            if self.cache_dtype not in _DTYPES:
                raise ValueError(f"unknown cache_dtype {self.cache_dtype!r}; choose one of {sorted(_DTYPES)}")
            self.cache_dtype = _DTYPES[self.cache_dtype]
        if self.cache_dtype is not None and not isinstance(self.cache_dtype, torch.dtype):
            raise ValueError(f"cache_dtype must be a torch dtype or one of {sorted(_DTYPES)}")
        if self.forecast_units not in ("calls", "timesteps"):
            raise ValueError("forecast_units must be 'calls' or 'timesteps'")
        if self.goc_steps is not None and self.goc_file is not None:
            raise ValueError("give goc_steps or goc_file, not both")
        if self.goc_steps is not None and any((not isinstance(s, int)) or s < 1 for s in self.goc_steps):
            raise ValueError(f"goc_steps are call indices >= 1, got {self.goc_steps}")
        if isinstance(self.goc_weight, bool) or not isinstance(self.goc_weight, (int, float)) \
                or not np.isfinite(self.goc_weight):
            raise ValueError(f"goc_weight must be a finite number (the paper: 1.2 on FORA), got {self.goc_weight!r}")

    @property
    def cache_schedule(self) -> CacheSchedule:
        return self._schedule
