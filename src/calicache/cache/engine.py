"""The cache engine: attaches a method's hooks to a model, numbers the model calls of each run,
and detaches without a trace.

Hooks replace `forward` on module instances (an instance attribute shadows the class method), so
`remove_cache` deleting the attribute restores the original forward bit-exactly. The model code
never learns about caching. `apply_cache` also takes a diffusers pipeline (see `cache/pipeline.py`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from .config import CacheConfig
from .constants import RunConstants
from .pipeline import is_pipeline, unwrap_pipeline, wrap_pipeline
from .state import ENGINE_ATTR, get_engine


class CacheEngine:
    """Per-model run state: which call of the run this is and which layers are full at it."""

    def __init__(self, model: nn.Module, config: CacheConfig, adapter: Adapter | None = None):
        from .methods import METHODS

        self.model = model
        self.config = config
        self.adapter = adapter or get_adapter(model)
        self.branches = self.adapter.branches(model)
        self.schedule = config.cache_schedule.for_branches([b.name for b in self.branches])
        if self.schedule.num_calls is not None:
            self.schedule.check(self.schedule.num_calls, len(self.branches))
        self.num_calls: int | None = None
        self._patched: list[nn.Module] = []
        self.explicit = False  # inside sample()'s begin_run/end_run
        self.active = False  # a run is in progress
        self.call = -1
        self.prev_t: float | None = None
        self.t: float = 0.0  # timestep of the current call
        self.full: np.ndarray = np.ones(len(self.branches), dtype=bool)
        self.peak_cache_bytes = 0
        self.full_flags: list[np.ndarray] = []  # one row per call of the current/last run
        self.method = METHODS[config.method](self, config)
        # Prompt-only modules (cross-attention K/V) computed once per run; "none" stays the plain model.
        constant = self.adapter.constant_modules(model) if config.method != "none" else []
        self.constants = RunConstants(self, constant) if constant else None
        self._patch(model, self._wrap_model(model.forward))

    # -- hooks -------------------------------------------------------------------------------
    def patch(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """Replace `module.forward` by `make(original_forward)`."""
        if "forward" in module.__dict__:
            raise ValueError(f"{type(module).__name__} already has a patched forward; remove_cache first")
        self._patch(module, make(module.forward))

    def _patch(self, module: nn.Module, fn: Callable) -> None:
        module.forward = fn
        self._patched.append(module)

    def remove(self) -> None:
        for module in self._patched:
            del module.forward
        self._patched.clear()
        self._reset()

    def _reset(self) -> None:
        """Forget every cached tensor: the method's and the run constants."""
        self.method.reset()
        if self.constants is not None:
            self.constants.reset()

    def cache_bytes(self) -> int:
        return self.method.cache_bytes() + (self.constants.cache_bytes() if self.constants is not None else 0)

    def _wrap_model(self, forward: Callable) -> Callable:
        def run(*args, **kwargs):
            x = self.adapter.sample_input(args, kwargs)
            if not torch.isfinite(x).all():
                raise ValueError("model input contains NaN or infinite values; check the sampler and the noise")
            t = float(torch.as_tensor(self.adapter.timestep(args, kwargs)).max())
            if not self.explicit and (not self.active or (self.prev_t is not None and t > self.prev_t)):
                self._start_run()  # a bare module driven by someone else's loop: t went up
            self.call += 1
            self.t = t
            try:
                self.full = self.schedule.row(self.call, len(self.branches), self.num_calls if self.explicit else None)
                self.full_flags.append(self.full)
                if self.constants is not None:
                    self.constants.begin_call(self.adapter.text_input(args, kwargs))
                out = forward(*args, **kwargs)
            except BaseException:
                if not self.explicit:
                    self.active = False  # the next call starts a fresh run
                raise
            self.prev_t = t
            self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())
            return out

        return run

    # -- runs --------------------------------------------------------------------------------
    def _start_run(self) -> None:
        self._reset()
        self.call = -1
        self.prev_t = None
        self.active = True
        self.full_flags = []
        self.peak_cache_bytes = 0

    def begin_run(self, num_calls: int) -> None:
        """An explicit run of `num_calls` calls: the schedule is checked before any work."""
        self.schedule.check(num_calls, len(self.branches))
        self.method.check_run(num_calls)
        self._start_run()
        self.explicit = True
        self.num_calls = num_calls

    def end_run(self) -> None:
        self._reset()
        self.explicit = False
        self.active = False

    def stats(self) -> dict:
        """Cached share and peak cache memory of the last run."""
        flags = np.array(self.full_flags) if self.full_flags else np.ones((0, len(self.branches)), bool)
        return {
            "calls": int(flags.shape[0]),
            "cached_ratio": float(1 - flags.mean()) if flags.size else 0.0,
            "cache_bytes": int(self.peak_cache_bytes),
        }


def apply_cache(model: nn.Module, config: CacheConfig) -> nn.Module:
    """Attach caching to `model` (in place) and return it. `remove_cache` undoes it exactly.

    `model` may also be a diffusers pipeline (DiTPipeline, PixArtAlphaPipeline): the cache goes on
    `pipe.transformer` and every call of the pipeline is one run of known length.
    """
    if not isinstance(config, CacheConfig):
        raise TypeError("config must be a calicache.CacheConfig")
    if is_pipeline(model):
        if get_engine(model) is not None:
            raise ValueError("this pipeline already has a cache; call remove_cache(pipe) first")
        apply_cache(model.transformer, config)
        wrap_pipeline(model, get_engine(model.transformer))
        return model
    if get_engine(model) is not None:
        raise ValueError("this model already has a cache; call remove_cache(model) first")
    engine = CacheEngine(model, config)
    setattr(model, ENGINE_ATTR, engine)
    return model


def remove_cache(model: nn.Module) -> nn.Module:
    """Detach caching: every patched forward is restored and all cached tensors are dropped."""
    if is_pipeline(model):
        transformer = unwrap_pipeline(model)  # the module the cache was attached to
        if transformer is not None:
            remove_cache(transformer)
        return model
    engine = get_engine(model)
    if engine is not None:
        engine.remove()
        delattr(model, ENGINE_ATTR)
    return model
