"""The search space of `tune`: candidates (method, schedule, rank, weight), their exact MACs
without building an engine per candidate, and the neighbours a local search steps to."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import numpy as np
from torch import nn

from ..adapters import get_adapter
from ..cache import CacheSchedule, FORAConfig, ForecastConfig, GOCConfig, ICCConfig, MethodConfig
from ..cache.factors import Factors
from ..cache.macs import _Counter

METHODS = ("fora", "icc", "forecast", "goc")
FACTOR_METHODS = ("icc", "forecast")  # the methods that use low-rank factors


@dataclass(frozen=True, order=True)
class Candidate:
    """One configuration: a method on a pattern schedule (period, warm-up, cool-down, Fn/Bn; or
    period 0 and the full `calls` listed), with its rank and factor source (icc, forecast), weight
    (forecast, goc) and order (forecast)."""

    method: str
    period: int
    warmup: int = 0
    cooldown: int = 0
    first_blocks: int = 0
    last_blocks: int = 0
    rank: int | None = None
    weight: float | None = None
    factors: str | None = None  # key of the factor set ("cd", "tcc")
    calls: tuple[int, ...] = ()  # the full calls (non-uniform periods), with period 0
    order: int | None = None  # the forecast's order (None: 1)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; tune searches {METHODS}")
        if (self.method in FACTOR_METHODS) != (self.rank is not None and self.factors is not None):
            raise ValueError(f"{self.method}: rank and factors go with icc and forecast only")
        if (self.method in ("forecast", "goc")) != (self.weight is not None):
            raise ValueError(f"{self.method}: a weight goes with forecast and goc only")
        if self.method == "forecast" and self.order is None:
            object.__setattr__(self, "order", 1)  # the forecast's default: one key per configuration
        if (self.method == "forecast") != (self.order is not None):
            raise ValueError(f"{self.method}: an order goes with forecast only (1 or 2)")
        if (self.period == 0) != bool(self.calls) or self.calls and (self.warmup or self.cooldown):
            raise ValueError("a candidate has a period (with warm-up / cool-down) or, with period 0, its full calls")

    def schedule(self) -> CacheSchedule:
        if self.calls:
            return CacheSchedule(calls=self.calls, first_blocks=self.first_blocks, last_blocks=self.last_blocks)
        return CacheSchedule.fora(self.period, self.warmup, self.cooldown, self.first_blocks, self.last_blocks)

    def label(self) -> str:
        parts = [self.method, f"p{self.period}" if self.period else "calls " + ",".join(map(str, self.calls))]
        parts += [f"{k}{v}" for k, v in (("w", self.warmup), ("c", self.cooldown), ("F", self.first_blocks),
                                        ("B", self.last_blocks)) if v]
        if self.rank is not None:
            parts.append(f"{self.factors} r{self.rank}")
        if self.weight is not None:
            parts.append(f"weight {self.weight:g}")
        if self.order is not None and self.order != 1:
            parts.append(f"order {self.order}")
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()
                if v is not None and v != ()}


def cache_config(c: Candidate, factors: dict[str, Factors], goc_steps: list[int] | None = None,
                 factors_file: str | None = None) -> MethodConfig:
    """The cache config of a candidate, with its factor set in memory (or `factors_file`, where it was saved)."""
    s = c.schedule()
    if c.method == "fora":
        return FORAConfig(schedule=s)
    if c.method == "goc":
        return GOCConfig(schedule=s, weight=c.weight, steps=goc_steps)
    f = factors[c.factors]
    kw = dict(schedule=s, factors=f if factors_file is None else factors_file, rank=c.rank,
              svd=f.meta.get("svd", "plain"))
    return ICCConfig(**kw) if c.method == "icc" else ForecastConfig(**kw, weight=c.weight, order=c.order)


class Costs:
    """MACs per sample of a candidate's run, as `count_macs` counts them (a test holds the two equal).

    Per-layer costs at cached calls are read once per (method, rank) from `count_macs`'s counter; a
    candidate's total is then the sum over its gather matrix."""

    def __init__(self, model: nn.Module, steps: int, factors: dict[str, Factors], text_tokens: int | None = None):
        self.model, self.steps, self.factors = model, steps, factors
        adapter = get_adapter(model, **({"text_tokens": text_tokens} if text_tokens is not None else {}))
        self.adapter = adapter
        self.branches = adapter.branches(model)
        self.names = [b.name for b in self.branches]
        self.base = adapter.base_macs(model)
        self.constant = adapter.constant_macs(model)  # paid at call 0 only under a cache
        self.full = np.array([b.full_macs() for b in self.branches], dtype=np.int64)
        self.goc_update = np.array([b.output_elements() for b in self.branches], dtype=np.int64)
        self.uncached = steps * (self.base + self.constant + int(self.full.sum()))
        self._layer: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def num_blocks(self) -> int:
        return len(set(b.name.rsplit(".", 1)[0] for b in self.branches))

    def layer_macs(self, c: Candidate) -> tuple[np.ndarray, np.ndarray]:
        """MACs of each layer at a cached call (GOC's compensation excluded: see `macs`), and what a full
        call adds to each layer's uncached MACs (ICC's B pass that stores its rank-space reference)."""
        if c.method in ("fora", "goc"):
            zero = np.zeros(len(self.branches), dtype=np.int64)
            return zero, zero
        key = (c.method, c.rank, c.factors, c.order)
        if key not in self._layer:
            probe = replace(c, warmup=0, cooldown=0, first_blocks=0, last_blocks=0, period=2, calls=())
            method = _Counter(self.model, cache_config(probe, self.factors), self.adapter).method
            layers = range(len(self.branches))
            self._layer[key] = (np.array([method.cached_macs(i, 1) for i in layers], dtype=np.int64),
                                np.array([method.full_macs(i, 0) for i in layers], dtype=np.int64))
        return self._layer[key]

    def gather(self, c: Candidate) -> np.ndarray:
        return c.schedule().for_branches(self.names).matrix(self.steps, len(self.branches))

    def macs(self, c: Candidate, goc_steps: list[int] | None = None) -> int:
        g = self.gather(c)
        cached, extra = self.layer_macs(c)
        total = self.steps * self.base + self.constant + int((g * (self.full + extra)).sum() + (~g * cached).sum())
        if c.method == "goc" and goc_steps:
            total += sum(int((~g[s] * self.goc_update).sum()) for s in goc_steps if s >= 2)
        return total


@dataclass(frozen=True)
class Space:
    """The values each dimension may take; `coarse_*` are the first rung's subset."""

    methods: tuple[str, ...] = METHODS
    periods: tuple[int, ...] = (2, 3, 4, 5, 6)
    warmups: tuple[int, ...] = (0, 1, 2, 3, 4, 6)
    cooldowns: tuple[int, ...] = (0, 1, 2, 3)
    blocks: tuple[int, ...] = (0, 1, 2)  # first_blocks / last_blocks
    ranks: tuple[int, ...] = (4, 8, 12, 16, 24, 32, 48)
    forecast_ranks: tuple[int, ...] = (0, 4, 8, 12, 16, 24, 32)
    forecast_weights: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    # Order 2 lost to order 1 on every schedule tried at budget 0.35 (benchmarks/tune_ideas.py): not searched.
    forecast_orders: tuple[int, ...] = (1,)
    # Powers of CacheSchedule.spread (1: even, < 1: packed late); packing early lost there.
    spreads: tuple[float, ...] = (0.8, 1.0)
    goc_weights: tuple[float, ...] = (0.4, 0.8, 1.2)
    goc_periods: tuple[int, ...] = (2,)  # GOC diverges at period 3 on the shipped model (10.8 dB)
    coarse_warmups: tuple[int, ...] = (0, 3)
    coarse_cooldowns: tuple[int, ...] = (0, 2)
    coarse_blocks: tuple[tuple[int, int], ...] = ((0, 0), (1, 1))
    coarse_ranks: tuple[int, ...] = (8, 24)
    coarse_forecast: tuple[tuple[int, float], ...] = ((0, 1.0), (8, 0.5), (16, 1.0))
    coarse_goc_weights: tuple[float, ...] = (0.8,)
    coarse_orders: tuple[int, ...] = (1,)
    width_ranks: bool = True  # add the bench grid's ranks C/18, C/9, C/4 (the paper's 128 of 1152 is C/9)

    def restrict(self, max_rank: int, num_blocks: int, steps: int, width: int | None = None) -> Space:
        """Drop values the model or run cannot take (ranks above the factors', blocks it lacks); with
        `width_ranks`, add the model's width-based ranks (C/9 also to the coarse rung)."""
        keep_blocks = tuple(b for b in self.blocks if 2 * b < num_blocks)
        space = self
        if self.width_ranks and width:
            ninth = max(1, round(width / 9))
            extra = {max(1, round(width / d)) for d in (18, 9, 4)}
            space = replace(self, ranks=tuple(sorted(set(self.ranks) | extra)),
                            forecast_ranks=tuple(sorted(set(self.forecast_ranks) | {ninth})),
                            coarse_ranks=tuple(sorted(set(self.coarse_ranks) | {ninth})),
                            coarse_forecast=tuple(sorted(set(self.coarse_forecast) | {(ninth, 1.0)})))
        return space._restricted(max_rank, keep_blocks, num_blocks, steps)

    def _restricted(self, max_rank: int, keep_blocks: tuple[int, ...], num_blocks: int, steps: int) -> Space:
        return replace(
            self,
            periods=tuple(p for p in self.periods if p < steps),
            warmups=tuple(w for w in self.warmups if w < steps // 2),
            cooldowns=tuple(c for c in self.cooldowns if c < steps // 3),
            blocks=keep_blocks,
            ranks=tuple(r for r in self.ranks if r <= max_rank),
            forecast_ranks=tuple(r for r in self.forecast_ranks if r <= max_rank),
            coarse_warmups=tuple(w for w in self.coarse_warmups if w < steps // 2),
            coarse_cooldowns=tuple(c for c in self.coarse_cooldowns if c < steps // 3),
            coarse_blocks=tuple(fb for fb in self.coarse_blocks if sum(fb) < num_blocks and max(fb) in keep_blocks),
            coarse_ranks=tuple(r for r in self.coarse_ranks if r <= max_rank) or (max_rank,),
            coarse_forecast=tuple((r, w) for r, w in self.coarse_forecast if r <= max_rank),
        )

    def coarse(self, factor_key: str) -> list[Candidate]:
        """The first rung: every method at coarse ranks/weights on coarse schedule shapes, all periods."""
        out = []
        for p in self.periods:
            for w in self.coarse_warmups:
                for c in self.coarse_cooldowns:
                    for fb, bb in self.coarse_blocks:
                        shape = dict(period=p, warmup=w, cooldown=c, first_blocks=fb, last_blocks=bb)
                        if "fora" in self.methods:
                            out.append(Candidate("fora", **shape))
                        if "icc" in self.methods:
                            out += [Candidate("icc", **shape, rank=r, factors=factor_key) for r in self.coarse_ranks]
                        if "forecast" in self.methods:
                            out += [Candidate("forecast", **shape, rank=r, weight=wt, factors=factor_key, order=o)
                                    for r, wt in self.coarse_forecast for o in self.coarse_orders]
                        if "goc" in self.methods and p in self.goc_periods:
                            out += [Candidate("goc", **shape, weight=wt) for wt in self.coarse_goc_weights]
        return out

    def neighbours(self, c: Candidate) -> list[Candidate]:
        """Candidates one step away in one dimension (the next larger or smaller value; a listed full
        call one call earlier or later)."""
        dims = {"first_blocks": self.blocks, "last_blocks": self.blocks}
        if not c.calls:
            dims.update(period=self.goc_periods if c.method == "goc" else self.periods, warmup=self.warmups,
                        cooldown=self.cooldowns)
        if c.method == "icc":
            dims["rank"] = self.ranks
        if c.method == "forecast":
            dims.update(rank=self.forecast_ranks, weight=self.forecast_weights, order=self.forecast_orders)
        if c.method == "goc":
            dims["weight"] = self.goc_weights
        out = []
        for name, values in dims.items():
            values = sorted(set(values) | {getattr(c, name)})
            i = values.index(getattr(c, name))
            for j in (i - 1, i + 1):
                if 0 <= j < len(values):
                    out.append(replace(c, **{name: values[j]}))
        for i in range(1, len(c.calls)):
            for step in (-1, 1):
                calls = list(c.calls)
                calls[i] += step
                if calls[i] > calls[i - 1] and (i + 1 == len(calls) or calls[i] < calls[i + 1]):
                    out.append(replace(c, calls=tuple(calls)))  # past the run's end: infeasible, dropped there
        return out
