"""Calibrated forecasting: ICC's low-rank correction applied to a first-order forecast instead of
the stale cache (calicache's own method; ICC x TaylorSeer/GOC).

For each calibrated linear at a cached call s, with f0 < f1 its last two full calls:

    x_hat = x_f1 + k (x_f1 - x_f0),  y_hat = y_f1 + k (y_f1 - y_f0),  k = w (s - f1) / (f1 - f0)
    y_s   = y_hat + A B (x_s - x_hat)

Since y = W x + b is linear, y_hat = W x_hat + b exactly, so at full rank the result is exact;
at rank 0 each branch output is its own first-order forecast (TaylorSeer order 1 at branch level).
With one full call only it is plain ICC. Distances count calls, or timesteps
(`ForecastConfig(units="timesteps")`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Argument, BranchCache, each, tensors
from .icc import CalibratedLinear, ICCConfig, IncrementCalibration

UNITS = ("calls", "timesteps")


def first_order(v1: torch.Tensor, v0: torch.Tensor, k: float) -> torch.Tensor:
    """v1 + k (v1 - v0): the first-order forecast from two samples of a trajectory."""
    return torch.add(v1, v1 - v0, alpha=k)


class ForecastLinear(CalibratedLinear):
    history_len = 2

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self.history) < 2:
            return super().reference(x)
        k = self.method.forecast_k(self.history[0][0], self.history[1][0])
        x0, x1 = self.input_at(0).to(x.dtype), self.input_at(1).to(x.dtype)
        y0, y1 = self.history[0][2].to(x.dtype), self.history[1][2].to(x.dtype)
        return first_order(x1, x0, k), first_order(y1, y0, k)

    def macs(self, tokens: int) -> int:
        """ICC's matmuls plus the two element-wise forecasts (x_hat, y_hat), one MAC per element."""
        elementwise = tokens * (self.module.in_features + sum(s.out_features for s in self.specs))
        return super().macs(tokens) + elementwise


class ForecastBranchCache(BranchCache):
    """Rank-0 branches: the branch output's own first-order forecast from its last two full outputs."""

    def __init__(self, method: CalibratedForecast, layers: list[int]):
        self.history: dict[int, list[tuple[float, torch.Tensor]]] = {}  # layer -> last two (position, output)
        super().__init__(method, layers)

    def on_full(self, layer: int, out: torch.Tensor) -> None:
        entry = (self.method.position(), self.outputs[layer])  # the stored tensor itself: no second copy
        self.history[layer] = (self.history.get(layer, []) + [entry])[-2:]

    def on_cached(self, layer: int) -> torch.Tensor:
        h = self.history[layer]
        if len(h) < 2:
            return self.outputs[layer]
        k = self.method.forecast_k(h[0][0], h[1][0])
        return each(lambda v1, v0: first_order(v1, v0, k), h[1][1], h[0][1])

    def reset(self) -> None:
        super().reset()
        self.history.clear()

    def cache_bytes(self) -> int:
        return sum(t.nbytes for h in self.history.values() for _, v in h for t in tensors(v))

    def macs(self, branch) -> int:
        """One element-wise forecast of the branch output: N * C_out per sample (both streams of joint attention)."""
        return branch.output_elements()


class CalibratedForecast(IncrementCalibration):
    linear_class = ForecastLinear
    branch_cache_class = ForecastBranchCache

    def __init__(self, engine, config: ForecastConfig):
        self.weight = float(config.weight)
        self.units = config.units
        super().__init__(engine, config)

    def position(self) -> float:
        return self.engine.t if self.units == "timesteps" else self.engine.call

    def forecast_k(self, f0: float, f1: float) -> float:
        return self.weight * (self.position() - f1) / (f1 - f0)


@dataclass
class ForecastConfig(ICCConfig):
    """The calibrated forecast: ICC's fields plus the extrapolation `weight` w and the `units`
    distances between calls are counted in ("calls" or "timesteps")."""

    method: ClassVar[str] = "forecast"
    method_class: ClassVar[type] = CalibratedForecast
    arguments: ClassVar[tuple[Argument, ...]] = ICCConfig.arguments + (
        Argument("--forecast-weight", "weight", "calibrated forecast weight w", float),
        Argument("--forecast-units", "units", "count distances between calls in calls or timesteps", choices=UNITS),
    )

    weight: float = 1.0
    units: str = "calls"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"weight must be a finite number (1 = a plain first-order forecast), got {self.weight!r}")
        if self.units not in UNITS:
            raise ValueError(f"units must be one of {UNITS}, got {self.units!r}")
