"""Multiply-accumulates per sample, the papers' convention: linear layers, the two attention
matmuls and adaLN, no CFG doubling (torch's flop counter reports FLOPs = 2 x MACs)."""

from __future__ import annotations

import torch
from torch import nn

from ..cache.config import CacheConfig
from ..cache.engine import CacheEngine
from ..cache.state import get_engine
from ..models.dit import create_model


def _engine_for(model_or_name: nn.Module | str, config: CacheConfig | None) -> tuple[CacheEngine, bool]:
    if isinstance(model_or_name, str):
        with torch.device("meta"):
            model = create_model(model_or_name)
        return _meta_engine(model, config or CacheConfig()), True
    engine = get_engine(model_or_name)
    if engine is not None and config is None:
        return engine, False
    return _meta_engine(model_or_name, config or CacheConfig()), True


def _meta_engine(model: nn.Module, config: CacheConfig) -> CacheEngine:
    """An engine used only for counting: it is removed again before anyone calls the model."""
    engine = CacheEngine(model, config)
    engine.remove()
    return engine


def count_macs(model_or_name: nn.Module | str, config: CacheConfig | None = None, steps: int = 50,
               cfg_scale: float = 1.0) -> dict:
    """MACs of one sampling run of `steps` model calls.

    Returns `total` (per sample), `per_call` (list), `full_call`, `total_with_cfg` (the doubled
    batch of guidance), `speedup` (uncached / total) and `cached_ratio`. Works on a model with
    a cache attached (its config), a model plus a config, or a registry name (built on the meta
    device: no memory, no weights).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    engine, _ = _engine_for(model_or_name, config)
    base = engine.adapter.base_macs(engine.model)
    full_branch = [b.full_macs() for b in engine.branches]
    full_call = base + sum(full_branch)
    gather = engine.schedule.matrix(steps, len(engine.branches))
    engine.method.check_run(steps)  # a run the method cannot serve has no MACs; GOC's steps depend on its length
    per_call = []
    for t in range(steps):
        macs = base
        for layer, full in enumerate(gather[t]):
            macs += full_branch[layer] if full else engine.method.cached_macs(layer, t)
        per_call.append(int(macs))
    total = sum(per_call)
    return {
        "total": int(total),
        "per_call": per_call,
        "full_call": int(full_call),
        "total_with_cfg": int(total * (2 if cfg_scale > 1 else 1)),
        "speedup": float(full_call * steps / total),
        "cached_ratio": float(1 - gather.mean()),
    }
