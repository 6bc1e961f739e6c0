"""Caching inside diffusers pipelines (DiTPipeline, PixArtAlphaPipeline).

`apply_cache(pipe, config)` attaches the cache to `pipe.transformer` and makes every call of the
pipeline one cache run whose length is known before the first model call. During a call the
pipeline's own `scheduler.set_timesteps` is observed: once it has run, the run has one model call
per entry of `scheduler.timesteps` (both pipelines call the transformer once per timestep, with
classifier-free guidance in one doubled batch), so custom `timesteps=`/`sigmas=` lists and any
scheduler are counted right. That length is what explicit schedules and GOC check before work.

`pipe(...)` looks `__call__` up on the class, not on the instance, so the pipeline's class is
swapped for a subclass of the same name whose `__call__` wraps the original one;
`remove_cache(pipe)` puts the original class back.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from torch import nn

from .state import ENGINE_ATTR, get_engine

PIPE_ATTR = "_calicache_pipeline"  # (original class, cached transformer) on a wrapped pipeline
_SUBCLASSES: dict[type, type] = {}


def is_pipeline(obj: Any) -> bool:
    """A diffusers-style pipeline: not a module itself, holding a `transformer` module and a `scheduler`."""
    return (not isinstance(obj, nn.Module) and isinstance(getattr(obj, "transformer", None), nn.Module)
            and hasattr(obj, "scheduler"))


def _cached_class(cls: type) -> type:
    """`cls` with a `__call__` that makes each pipeline call one cache run (one subclass per class)."""
    sub = _SUBCLASSES.get(cls)
    if sub is None:
        @functools.wraps(cls.__call__)
        def __call__(self, *args, **kwargs):
            return _call(self, cls.__call__, args, kwargs)

        # Same name and module: save_pretrained and error messages still name the user's class.
        sub = type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__,
                                          "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
        _SUBCLASSES[cls] = sub
    return sub


def wrap_pipeline(pipe: Any, engine) -> None:
    """Make `pipe(...)` run its transformer's cache `engine` one run per call."""
    cls = type(pipe)
    # object.__setattr__: DiffusionPipeline.__setattr__ would try to register values as components.
    object.__setattr__(pipe, PIPE_ATTR, (cls, pipe.transformer))
    object.__setattr__(pipe, ENGINE_ATTR, engine)  # get_engine(pipe), cache_run(pipe, n) work too
    object.__setattr__(pipe, "__class__", _cached_class(cls))


def unwrap_pipeline(pipe: Any) -> nn.Module | None:
    """Restore `pipe`'s class and attributes; returns the transformer the cache was attached to."""
    state = vars(pipe).get(PIPE_ATTR)
    if state is None:
        return None
    cls, transformer = state
    object.__setattr__(pipe, "__class__", cls)
    del vars(pipe)[PIPE_ATTR]
    vars(pipe).pop(ENGINE_ATTR, None)
    return transformer


def _call(pipe: Any, call: Callable, args: tuple, kwargs: dict):
    _, transformer = vars(pipe)[PIPE_ATTR]
    engine = get_engine(transformer)
    if pipe.transformer is not transformer or engine is None:
        raise RuntimeError("pipe.transformer was replaced (or its cache removed) after apply_cache(pipe); "
                           "call remove_cache(pipe) and apply_cache(pipe, config) again")
    if engine.explicit:  # inside the caller's own `with cache_run(pipe, n)`: the caller sets the run
        return call(pipe, *args, **kwargs)
    scheduler = pipe.scheduler
    own = "set_timesteps" in vars(scheduler)
    set_timesteps = scheduler.set_timesteps

    @functools.wraps(set_timesteps)  # keeps the signature: pipelines inspect it for timesteps=/sigmas=
    def observed(*a, **k):
        out = set_timesteps(*a, **k)
        if engine.explicit:  # a second set_timesteps in one call starts a new run
            engine.end_run()
        # One host-side read of the run's timesteps; checks the schedule / GOC before any model call.
        engine.begin_run(len(scheduler.timesteps), [float(t) for t in scheduler.timesteps.tolist()])
        return out

    scheduler.set_timesteps = observed
    try:
        return call(pipe, *args, **kwargs)
    finally:
        if own:
            scheduler.set_timesteps = set_timesteps
        else:
            del scheduler.set_timesteps
        if engine.explicit:
            engine.end_run()
