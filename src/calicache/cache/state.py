"""Where a cache engine lives on a model, and the explicit run boundaries `sample` uses."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn

ENGINE_ATTR = "_calicache_engine"


def get_engine(model: nn.Module) -> Any | None:
    """The cache engine attached to `model` by `apply_cache`, or None."""
    return getattr(model, ENGINE_ATTR, None)


def shared_method(engine: Any, config: Any) -> Any | None:
    """The method of the cache `engine.shares` (a guidance twin's original, or the attached cache a MACs
    count reads) when it was built from this very config, so its loaded files can be reused; else None."""
    source = getattr(engine, "shares", None)
    return source.method if source is not None and source.config is config else None


@contextmanager
def cache_run(model: nn.Module, num_calls: int, timesteps: Sequence[float] | None = None) -> Iterator[None]:
    """One sampling run of `num_calls` model calls; a no-op on a model without a cache.

    The engine checks its schedule against `num_calls` before any work and forgets every cached
    tensor when the run ends, also when it ends with an error. `timesteps` (one host-side number
    per call, in call order) serve methods that measure distances in timesteps. Inside a run the
    engine reads nothing from the device, and the conditioning (a prompt) must stay the same:
    prompt-only work is computed at call 0 and reused.
    """
    engine = get_engine(model)
    if engine is None:
        yield
        return
    engine.begin_run(num_calls, timesteps)
    try:
        yield
    finally:
        engine.end_run()
