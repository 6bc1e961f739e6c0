"""`calicache.summary(model)`: what the cache did in the last run (cached share per call and per
layer, peak cache memory, MACs), as a dict with a readable table for `print`."""

from __future__ import annotations

import numpy as np
from torch import nn

from .macs import count_macs
from .pipeline import pass_engines
from .state import get_engine


class Summary(dict):
    """A plain dict (JSON-ready); `str(summary)` is a table."""

    def __str__(self) -> str:
        lines = [f"calicache summary: method {self['method']}, {self['calls']} calls in the last run, "
                 f"{self['cached_share']:.1%} of branch computations served from the cache"]
        if self["calls"] == 0:
            return lines[0] + " (no run yet)"
        macs = self["macs"]
        passes = f" ({self['passes']} guidance passes, each with its own cache)" if self["passes"] > 1 else ""
        lines.append(f"peak cache memory {self['cache_bytes'] / 2**20:.2f} MiB{passes}; MACs per sample "
                     f"{macs['total'] / 1e9:.4g} G vs {macs['full_call'] * self['calls'] / 1e9:.4g} G uncached "
                     f"({macs['speedup']:.2f}x fewer)")
        lines += ["", f"{'call':>4}  {'cached':>7}  {'MACs (G)':>9}"]
        for call, (share, m) in enumerate(zip(self["per_call"], macs["per_call"])):
            lines.append(f"{call:>4}  {share:>7.1%}  {m / 1e9:>9.4f}")
        width = max(len(layer["name"]) for layer in self["per_layer"])
        lines += ["", f"{'layer':<{width}}  {'cached':>7}"]
        lines += [f"{layer['name']:<{width}}  {layer['cached_share']:>7.1%}" for layer in self["per_layer"]]
        return "\n".join(lines)


def summary(model: nn.Module) -> Summary:
    """The last run of `model`'s cache (a model or pipeline after `apply_cache`).

    Keys: method, calls, cached_share (all branch computations), per_call (cached share of each
    call's layers), per_layer ([{name, cached_share}] per cacheable branch), passes (separate guidance
    passes of a pipeline, each cached alike by its own engine), cache_bytes (the peaks of all passes),
    macs (`count_macs` of one pass of that many calls; None before the first run).
    """
    engine = get_engine(model)
    if engine is None:
        raise ValueError("this model has no cache attached; call apply_cache(model, config) first")
    engines = pass_engines(model)
    stats = engine.stats()  # calls, cached share and cache memory: the engine's own numbers
    calls = stats["calls"]
    cached = ~np.array(engine.full_flags, dtype=bool).reshape(calls, len(engine.branches))  # (calls, layers)
    return Summary(
        method=engine.config.method,
        calls=calls,
        cached_share=stats["cached_ratio"],
        per_call=[float(row.mean()) for row in cached],
        per_layer=[{"name": b.name, "cached_share": float(cached[:, i].mean()) if calls else 0.0}
                   for i, b in enumerate(engine.branches)],
        passes=len(engines),
        cache_bytes=sum(e.stats()["cache_bytes"] for e in engines),
        macs=count_macs(model, None, calls) if calls else None,
    )
