"""Calibrated forecasting: ICC's low-rank correction applied to a first-order forecast instead of
the stale cache (calicache's own method; ICC x TaylorSeer/GOC).

For each calibrated linear at a cached call s, with f0 < f1 its last two full calls:

    x_hat = x_f1 + k (x_f1 - x_f0),  y_hat = y_f1 + k (y_f1 - y_f0),  k = w (s - f1) / (f1 - f0)
    y_s   = y_hat + A B (x_s - x_hat)

Since y = W x + b is linear, y_hat = W x_hat + b exactly, so at full rank the result is exact;
at rank 0 each branch output is its own first-order forecast (TaylorSeer order 1 at branch level).
With one full call only it is plain ICC (k = 0). Distances count calls, or timesteps
(`ForecastConfig(units="timesteps")`).

`order=2` forecasts from the last three full calls f0, f1, f2 with Newton's divided differences
(TaylorSeer's second-order term, on uneven spacing too), the increment scaled by w:

    v_hat = v2 + w [(s - f2) D(f2, f1) + (s - f2)(s - f1) D(f2, f1, f0)] = v2 + a (v2 - v1) + b (v1 - v0)

for v = x (in rank space) and y alike, so full rank stays exact; with two full calls so far it is
the first-order forecast (b = 0 on an empty third slot).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from .base import Argument, BranchCache, each, first_order, tensors
from .icc import CalibratedLinear, ICCConfig, IncrementCalibration

UNITS = ("calls", "timesteps")
ORDERS = (1, 2)


def empty_slot(value):
    """Zeros shaped like a reference: the older slot while a layer has one full call. With k = 0
    the forecast then equals the one reference exactly, and a compiled cached call keeps its graph."""
    return each(torch.zeros_like, value)


def second_order(v2: torch.Tensor, v1: torch.Tensor, v0: torch.Tensor, a: torch.Tensor, b: torch.Tensor
                 ) -> torch.Tensor:
    """v2 + a (v2 - v1) + b (v1 - v0): the second-order forecast in Newton form (a fresh tensor)."""
    return first_order(v2, v1, a).addcmul_(v1 - v0, b)


def newton_weights(positions: list[float], s: float, weight: float) -> tuple[float, float]:
    """(a, b) of `second_order` at s from the last three full positions f0, f1, f2 (oldest first): w times
    the increment of the quadratic through them (a first-order forecast, b = 0, from two)."""
    if len(positions) == 2:
        f1, f2 = positions
        return weight * (s - f2) / (f2 - f1), 0.0
    f0, f1, f2 = positions
    h1, h0, span = f2 - f1, f1 - f0, f2 - f0
    curve = (s - f2) * (s - f1) / span
    return weight * ((s - f2) / h1 + curve / h1), -weight * curve / h0


class ForecastLinear(CalibratedLinear):
    """Both forecasts without leaving rank space on the input side: with z = B x stored at full calls,
    `B x_hat = z1 + k (z1 - z0)`, so a cached call is `y_hat + A (B x_s - z_hat)`: the B pass, one
    pass over R columns, one over the output (y_hat, a lerp) and the A matmul accumulated into it.

    References sit in two fixed slots, `prev` (f0) and `last` (f1); the host moves last to prev
    before a full call (`begin_call`), so a full call only writes `last` and a cached call always
    reads both: one graph each under torch.compile."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.prev: tuple[torch.Tensor, torch.Tensor] | None = None  # (z, y) of the full call before `last`
        self.prev2: tuple[torch.Tensor, torch.Tensor] | None = None  # order 2: the one before `prev`

    def begin_call(self, full: bool) -> None:
        """Host-side: shift the slots before a full call; fill an empty older slot before a cached one."""
        if full:
            if self.method.order == 2:
                self.prev2 = self.prev
            self.prev = self.last
            return
        if self.prev is None and self.last is not None:
            self.prev = empty_slot(self.last)  # k = 0 at this call: plain ICC on `last`
        if self.method.order == 2 and self.prev2 is None and self.prev is not None:
            self.prev2 = empty_slot(self.prev)  # b = 0 at this call: the first-order forecast

    def cached(self, x: torch.Tensor) -> torch.Tensor:
        if self.method.order == 2:
            return self.cached_second_order(x)
        (z0, y0), (z1, y1) = self.prev, self.last
        k = self.method.k[self.layer].to(x.dtype)
        y0, y1 = y0.to(x.dtype), y1.to(x.dtype)
        if self.consumes():  # y0 is not needed again: forecast into its memory
            y_hat = y0.lerp_(y1, 1 + k)  # y0 + (1 + k)(y1 - y0) = y1 + k (y1 - y0)
        else:
            y_hat = first_order(y1, y0, k)  # a fresh tensor
        if not self.blocks:
            return y_hat
        dz = self.project(x).sub_(first_order(z1.to(x.dtype), z0.to(x.dtype), k))  # B x - z_hat
        return self.correct(y_hat, dz, fresh=True)

    def cached_second_order(self, x: torch.Tensor) -> torch.Tensor:
        (z0, y0), (z1, y1), (z2, y2) = self.prev2, self.prev, self.last
        a, b = (v.to(x.dtype) for v in self.method.ab[self.layer])
        y_hat = second_order(*(y.to(x.dtype) for y in (y2, y1, y0)), a, b)
        if not self.blocks:
            return y_hat
        dz = self.project(x).sub_(second_order(*(z.to(x.dtype) for z in (z2, z1, z0)), a, b))
        return self.correct(y_hat, dz, fresh=True)

    def reset(self) -> None:
        super().reset()
        self.prev = self.prev2 = None

    def cache_bytes(self) -> int:
        return super().cache_bytes() + sum(t.nbytes for t in (*(self.prev or ()), *(self.prev2 or ())))

    def macs(self, tokens: int) -> int:
        """ICC's matmuls plus the element-wise forecasts (y_hat over C_out, z_hat over R): one MAC per
        element and order (order 2 counts two also at the calls before its third full call)."""
        elementwise = tokens * (self.rank_total + sum(s.out_features for s in self.specs))
        return super().macs(tokens) + self.method.order * elementwise


class ForecastBranchCache(BranchCache):
    """Rank-0 branches: the branch output's own first-order forecast from its last two full outputs
    (`prev` and BranchCache's `outputs`, slots shifted on the host as ForecastLinear's)."""

    def __init__(self, method: CalibratedForecast, layers: list[int]):
        self.prev: dict[int, torch.Tensor | None] = dict.fromkeys(layers)  # layer -> the full output before the last
        self.prev2: dict[int, torch.Tensor | None] = dict.fromkeys(layers)  # order 2: the one before that
        super().__init__(method, layers)

    def begin_call(self) -> None:
        full, two = self.method.engine.full, self.method.order == 2
        for layer in self.layers:
            if full[layer]:
                if two:
                    self.prev2[layer] = self.prev[layer]
                self.prev[layer] = self.outputs[layer]
                continue
            if self.prev[layer] is None and self.outputs[layer] is not None:
                self.prev[layer] = empty_slot(self.outputs[layer])
            if two and self.prev2[layer] is None and self.prev[layer] is not None:
                self.prev2[layer] = empty_slot(self.prev[layer])

    def on_cached(self, layer: int) -> torch.Tensor:
        if self.method.order == 2:
            a, b = self.method.ab[layer]
            return each(lambda v2, v1, v0: second_order(v2, v1, v0, a.to(v2.dtype), b.to(v2.dtype)),
                        self.outputs[layer], self.prev[layer], self.prev2[layer])
        k = self.method.k[layer]
        return each(lambda v1, v0: first_order(v1, v0, k.to(v1.dtype)), self.outputs[layer], self.prev[layer])

    def reset(self) -> None:
        super().reset()
        self.prev = dict.fromkeys(self.layers)
        self.prev2 = dict.fromkeys(self.layers)

    def cache_bytes(self) -> int:
        held = {id(t): t for v in (*self.outputs.values(), *self.prev.values(), *self.prev2.values())
                if v is not None for t in tensors(v)}
        return sum(t.nbytes for t in held.values())

    def macs(self, branch) -> int:
        """The element-wise forecast of the branch output: N * C_out per sample and order (both streams of
        joint attention)."""
        return self.method.order * branch.output_elements()


class CalibratedForecast(IncrementCalibration):
    linear_class = ForecastLinear
    branch_cache_class = ForecastBranchCache

    def __init__(self, engine, config: ForecastConfig):
        self.weight = float(config.weight)
        self.units = config.units
        self.order = config.order
        super().__init__(engine, config)
        self.positions: list[list[float]] = [[] for _ in engine.branches]  # per layer: its last order + 1 full calls
        self.k = torch.zeros(len(engine.branches))  # per layer: this call's forecast weight
        self.ab = torch.zeros(len(engine.branches), 2)  # order 2, per layer: this call's (a, b)

    def position(self) -> float:
        """Where the current call lies: its index, or its timestep (a host-side number the sampler gave)."""
        if self.units == "calls":
            return self.engine.call
        if self.engine.t is None:
            raise ValueError("forecast_units='timesteps' needs each call's timestep: sample with calicache.sample, "
                             "or give cache_run(model, num_calls, timesteps=[...])")
        return self.engine.t

    def begin_call(self) -> None:
        """Host-side, before the model runs: each layer's k = w (s - f1) / (f1 - f0) for this call s,
        as one small tensor (so a compiled graph sees a tensor, not a new constant per call)."""
        s, ab = self.position(), []
        for layer, full in enumerate(self.engine.full):
            pos = self.positions[layer]
            ab.append(newton_weights(pos, s, self.weight) if not full and len(pos) >= 2 else (0.0, 0.0))
            if full:
                self.positions[layer] = [*pos, s][-(self.order + 1):]
        self.ab = torch.tensor(ab)
        self.k = self.ab[:, 0].contiguous()  # order 1: newton_weights of two positions is w (s - f1) / (f1 - f0)
        full = self.engine.full
        for c in self.linears:
            c.begin_call(full[c.layer])
        self.branch_cache.begin_call()

    def reset(self) -> None:
        super().reset()
        self.positions = [[] for _ in self.engine.branches]


@dataclass
class ForecastConfig(ICCConfig):
    """The calibrated forecast: ICC's fields plus the extrapolation `weight` w, the `units`
    distances between calls are counted in ("calls" or "timesteps") and the forecast's `order`
    (1: from the last two full calls; 2: from the last three, Newton's divided differences)."""

    method: ClassVar[str] = "forecast"
    method_class: ClassVar[type] = CalibratedForecast
    arguments: ClassVar[tuple[Argument, ...]] = ICCConfig.arguments + (
        Argument("--forecast-weight", "weight", "calibrated forecast weight w", float),
        Argument("--forecast-units", "units", "count distances between calls in calls or timesteps", choices=UNITS),
        Argument("--forecast-order", "order", "forecast order: 1 (last two full calls) or 2 (last three)", int),
    )

    weight: float = 1.0
    units: str = "calls"
    order: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or not math.isfinite(self.weight):
            raise ValueError(f"weight must be a finite number (1 = a plain first-order forecast), got {self.weight!r}")
        if self.units not in UNITS:
            raise ValueError(f"units must be one of {UNITS}, got {self.units!r}")
        if isinstance(self.order, bool) or self.order not in ORDERS:
            raise ValueError(f"order must be 1 (first-order forecast) or 2 (second order), got {self.order!r}")
