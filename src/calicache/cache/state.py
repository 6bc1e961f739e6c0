"""Where a cache engine lives on a model, and the explicit run boundaries `sample` uses."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

ENGINE_ATTR = "_calicache_engine"


def get_engine(model: nn.Module) -> Any | None:
    """The cache engine attached to `model` by `apply_cache`, or None."""
    return getattr(model, ENGINE_ATTR, None)


@contextmanager
def cache_run(model: nn.Module, num_calls: int) -> Iterator[None]:
    """One sampling run of `num_calls` model calls; a no-op on a model without a cache.

    The engine checks its schedule against `num_calls` before any work and forgets every cached
    tensor when the run ends, also when it ends with an error.
    """
    engine = get_engine(model)
    if engine is None:
        yield
        return
    engine.begin_run(num_calls)
    try:
        yield
    finally:
        engine.end_run()
