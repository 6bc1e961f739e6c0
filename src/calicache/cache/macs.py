"""Multiply-accumulates per sample, the papers' convention: linear layers, the two attention
matmuls and adaLN, no CFG doubling (torch's flop counter reports FLOPs = 2 x MACs).

Prompt-only work (cross-attention keys/values, a caption projection) is paid at call 0 of a run
when the cache reuses it, at every call without a cache (method "none")."""

from __future__ import annotations

import torch
from torch import nn

from ..adapters import get_adapter
from ..models.dit import DiT, create_model
from .engine import CacheEngine
from .methods import MethodConfig, NoCacheConfig
from .pipeline import is_pipeline
from .state import get_engine


def _meta_twin(model: nn.Module) -> nn.Module:
    """The same architecture without weights, on the meta device (for counting only)."""
    with torch.device("meta"):
        if isinstance(model, DiT):
            return DiT(model.config)
        return type(model).from_config(model.config)  # a diffusers transformer


def _engine_for(model_or_name, config: MethodConfig | None, shape: dict) -> tuple[CacheEngine, bool]:
    if isinstance(model_or_name, str):
        with torch.device("meta"):
            model = create_model(model_or_name)
        return _meta_engine(model, config or NoCacheConfig(), shape), True
    model = model_or_name.transformer if is_pipeline(model_or_name) else model_or_name
    engine = get_engine(model)
    if engine is not None and config is None and not shape:
        return engine, False
    if engine is not None:  # count on a twin: a second engine must not touch the attached hooks
        config = config or engine.config
        model = _meta_twin(model)
    return _meta_engine(model, config or NoCacheConfig(), shape), True


def _meta_engine(model: nn.Module, config: MethodConfig, shape: dict) -> CacheEngine:
    """An engine used only for counting: it is removed again before anyone calls the model."""
    engine = CacheEngine(model, config, get_adapter(model, **shape))
    engine.remove()
    return engine


def count_macs(model_or_name, config: MethodConfig | None = None, steps: int = 50, cfg_scale: float = 1.0,
               tokens: int | None = None, text_tokens: int | None = None) -> dict:
    """MACs of one sampling run of `steps` model calls.

    Returns `total` (per sample), `per_call` (list), `full_call`, `total_with_cfg` (the doubled
    batch of guidance), `speedup` (uncached / total) and `cached_ratio`. Works on a model or a
    diffusers pipeline with a cache attached (its config), a model plus a config, or a registry
    name (built on the meta device: no memory, no weights). `tokens` / `text_tokens` count a
    diffusers transformer at another resolution (image tokens per sample) or prompt length
    (default: the config's sample size and 120 prompt tokens).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    shape = {k: v for k, v in (("tokens", tokens), ("text_tokens", text_tokens)) if v is not None}
    engine, _ = _engine_for(model_or_name, config, shape)
    base = engine.adapter.base_macs(engine.model)
    constant = engine.adapter.constant_macs(engine.model)  # prompt-only work of one call
    reused = engine.constants is not None  # computed once per run, at call 0
    full_branch = [b.full_macs() for b in engine.branches]
    full_call = base + constant + sum(full_branch)
    gather = engine.schedule.matrix(steps, len(engine.branches))
    engine.method.check_run(steps)  # a run the method cannot serve has no MACs; GOC's steps depend on its length
    per_call = []
    for t in range(steps):
        macs = base + (constant if t == 0 or not reused else 0)
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
