"""Multiply-accumulates per sample, the papers' convention: linear layers, the two attention
matmuls and adaLN, no CFG doubling (torch's flop counter reports FLOPs = 2 x MACs).

One departure, because calicache computes it: ICC and the forecast keep their references in rank
space, so a full call also runs each calibrated linear's B pass (z_ref = B x, r / C_out of that
linear's MACs). The papers store x_ref instead and count a full call as the uncached one; their
figure is `total - extra_full`.

Prompt-only work (cross-attention keys/values, a caption projection) is paid at call 0 of a run
when the cache reuses it, at every call without a cache (method "none")."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..models.dit import create_model
from .methods import MethodConfig, NoCacheConfig
from .pipeline import is_pipeline
from .state import get_engine


class _Counter:
    """What a method's constructor reads from its engine, without the hooks: counting MACs never
    patches a module, so it works on a live model, one with a cache attached, or a meta model."""

    def __init__(self, model: nn.Module, config: MethodConfig, adapter: Adapter, shares=None):
        self.model = model
        self.config = config
        self.shares = shares  # the attached cache: its factors are reused (never decomposed or loaded again)
        self.adapter = adapter
        self.branches = adapter.branches(model)
        self.schedule = config.schedule.for_branches([b.name for b in self.branches])  # Fn/Bn need the blocks
        self.explicit = False
        self.call = -1
        self.t = 0.0
        self.full = np.ones(len(self.branches), dtype=bool)
        self.method = config.method_class(self, config)
        self.reuses_constants = config.method != "none" and bool(adapter.constant_modules(model))

    def patch(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """Nothing is attached: the method only needs its own bookkeeping to count."""

    def model_hash(self) -> None:
        return None  # factor and steps files are checked against the weights by apply_cache, not by counting


def _counter_for(model_or_name, config: MethodConfig | None, shape: dict) -> _Counter:
    if isinstance(model_or_name, str):
        with torch.device("meta"):
            model = create_model(model_or_name)
    else:
        model = model_or_name.transformer if is_pipeline(model_or_name) else model_or_name
        engine = get_engine(model)
        if engine is not None and (config is None or config is engine.config):  # the attached cache, reused
            return _Counter(model, engine.config, get_adapter(model, **shape) if shape else engine.adapter, engine)
    return _Counter(model, config or NoCacheConfig(), get_adapter(model, **shape))


def count_macs(model_or_name, config: MethodConfig | None = None, steps: int = 50, cfg_scale: float = 1.0,
               tokens: int | None = None, text_tokens: int | None = None) -> dict:
    """MACs of one sampling run of `steps` model calls.

    Returns `total` (per sample), `extra_full` (the part of `total` that full calls add to the
    uncached computation: ICC's B passes; the papers leave it out), `per_call` (list),
    `full_call`, `total_with_cfg` (the doubled batch of guidance), `speedup` (uncached / total)
    and `cached_ratio`. Works on a model or a diffusers pipeline with a cache attached (its
    config), a model plus a config, or a registry name (built on the meta device: no memory, no
    weights). `tokens` / `text_tokens` count a diffusers transformer at another resolution (image
    tokens per sample) or prompt length (default: the config's sample size and 120 prompt tokens).
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    shape = {k: v for k, v in (("tokens", tokens), ("text_tokens", text_tokens)) if v is not None}
    engine = _counter_for(model_or_name, config, shape)
    base = engine.adapter.base_macs(engine.model)
    constant = engine.adapter.constant_macs(engine.model)  # prompt-only work of one call
    reused = engine.reuses_constants  # computed once per run, at call 0
    full_branch = [b.full_macs() for b in engine.branches]
    full_call = base + constant + sum(full_branch)
    gather = engine.schedule.matrix(steps, len(engine.branches))
    engine.method.check_run(steps)  # a run the method cannot serve has no MACs; GOC's steps depend on its length
    method = engine.method
    per_call, extra_full = [], 0
    for t in range(steps):
        macs = base + (constant if t == 0 or not reused else 0)
        for layer, full in enumerate(gather[t]):
            extra = method.full_macs(layer, t) if full else 0
            macs += full_branch[layer] + extra if full else method.cached_macs(layer, t)
            extra_full += extra
        per_call.append(int(macs))
    total = sum(per_call)
    return {
        "total": int(total),
        "extra_full": int(extra_full),
        "per_call": per_call,
        "full_call": int(full_call),
        "total_with_cfg": int(total * (2 if cfg_scale > 1 else 1)),
        "speedup": float(full_call * steps / total),
        "cached_ratio": float(1 - gather.mean()),
    }
