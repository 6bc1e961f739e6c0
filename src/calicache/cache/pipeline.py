"""Caching inside diffusers pipelines (DiT, PixArt, FLUX, SD3, Wan, Qwen-Image).

`apply_cache(pipe, config)` attaches the cache to `pipe.transformer` and makes every call of the
pipeline one cache run whose length is known before the first model call. During a call the
pipeline's own `scheduler.set_timesteps` is observed: once it has run, the run has one model call
per entry of `scheduler.timesteps` (DiT, PixArt and SD3 call the transformer once per timestep, with
classifier-free guidance in one doubled batch), so custom `timesteps=`/`sigmas=` lists and any
scheduler are counted right. That length is what explicit schedules and GOC check before work.

Separate guidance passes (WanPipeline, FluxPipeline and QwenImagePipeline with true CFG) call the
transformer twice per timestep, conditional then unconditional. Each pass must meet its own cache, or the
unconditional pass would be served the conditional pass's branches: during a pipeline call, the k-th
transformer call since the scheduler's last `step` (k >= 2) goes to twin k - 1 of the transformer (the
same parameter tensors, no copy of the weights; its own hooks and cache state), built at the first such
call and kept; its cache reuses the transformer's resolved factors and weight hash (nothing is decomposed,
loaded or hashed mid-run). Counting `scheduler.step` calls keeps the routing on the host (no timestep is
read). Each pass is then one run of one call per timestep, so schedules, GOC steps and forecasts count
timesteps in both. SD3's skip-layer guidance (`skip_guidance_layers`) is refused: its extra call comes at
some steps only and skips blocks, so no pass of one call per timestep fits it.

`pipe(...)` looks `__call__` up on the class, not on the instance, so the pipeline's class is
swapped for a subclass of the same name whose `__call__` wraps the original one;
`remove_cache(pipe)` puts the original class back.
"""

from __future__ import annotations

import copy
import functools
import inspect
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from .state import ENGINE_ATTR, get_engine

PIPE_ATTR = "_calicache_pipeline"  # (original class, cached transformer, _Passes) on a wrapped pipeline
_SUBCLASSES: dict[type, type] = {}
FOREIGN_HOOK_ATTRS = ("_hf_hook", "_old_forward", "_diffusers_hook")  # accelerate's and diffusers' hook state


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


def _twin(transformer: nn.Module, engine) -> nn.Module:
    """`transformer` with new module objects around the same parameter and buffer tensors, cached alike."""
    memo = {id(t): t for t in itertools.chain(transformer.parameters(), transformer.buffers())}
    memo[id(engine)] = engine
    # Other libraries' hooks are not copied (accelerate's offload hook leads to the pipeline's other models).
    hooks = [vars(m)[a] for m in transformer.modules() for a in FOREIGN_HOOK_ATTRS if a in vars(m)]
    memo.update({id(h): h for h in hooks})
    twin = copy.deepcopy(transformer, memo)
    for module in twin.modules():  # the copied forwards are the original's hooks: drop them, then attach anew
        for attr in ("forward",) + FOREIGN_HOOK_ATTRS:
            vars(module).pop(attr, None)
    vars(twin).pop(ENGINE_ATTR, None)
    setattr(twin, ENGINE_ATTR, type(engine)(twin, engine.config, shares=engine))  # factors and hash reused
    return twin


class _Passes:
    """Routes the calls of one timestep: the first to the cached transformer, the k-th to twin k - 1."""

    def __init__(self, transformer: nn.Module, engine):
        self.transformer = transformer
        self.engine = engine
        self.twins: list[nn.Module] = []
        self.num_calls: int | None = None
        self.timesteps: list[float] | None = None
        self.index = 0  # transformer calls since the scheduler's last step
        self.caller_run = False  # inside the caller's `with cache_run(pipe, n)`: it owns the first pass's run

    def engines(self) -> list:
        """The engines whose runs the pipeline call opens and closes."""
        return ([] if self.caller_run else [self.engine]) + [get_engine(t) for t in self.twins]

    def begin_run(self, timesteps: list[float]) -> None:
        """A run of one call per timestep, told to every pass's engine as host-side numbers."""
        for engine in self.engines():
            if engine.explicit:  # a second set_timesteps in one call starts a new run
                engine.end_run()
            engine.begin_run(len(timesteps), timesteps)  # checks the schedule / GOC before any model call
        self.num_calls, self.timesteps, self.index = len(timesteps), timesteps, 0

    def end_run(self) -> None:
        for engine in self.engines():
            if engine.explicit:
                engine.end_run()
        self.num_calls = None

    def stepped(self) -> None:
        self.index = 0

    def route(self, forward: Callable) -> Callable:
        @functools.wraps(forward)  # `__wrapped__` leads to the engine's hook: it still counts as attached
        def run(*args, **kwargs):
            k = self.index
            self.index += 1
            if k == 0:
                return forward(*args, **kwargs)
            while len(self.twins) < k:
                twin = _twin(self.transformer, self.engine)
                self.twins.append(twin)
                if self.num_calls is not None:
                    get_engine(twin).begin_run(self.num_calls, self.timesteps)
            return self.twins[k - 1](*args, **kwargs)

        return run


def wrap_pipeline(pipe: Any, engine) -> None:
    """Make `pipe(...)` run its transformer's cache `engine` one run per call."""
    if getattr(pipe, "transformer_2", None) is not None:  # refused before the pipeline is touched
        engine.remove()
        delattr(pipe.transformer, ENGINE_ATTR)
        raise ValueError(f"{type(pipe).__name__} runs a second expert (transformer_2, Wan 2.2) for low-noise steps; "
                         "calicache caches one transformer per pipeline: use a single-expert pipeline (Wan 2.1) or "
                         "apply_cache(pipe.transformer, config) and drive the runs yourself")
    cls = type(pipe)
    # object.__setattr__: DiffusionPipeline.__setattr__ would try to register values as components.
    object.__setattr__(pipe, PIPE_ATTR, (cls, pipe.transformer, _Passes(pipe.transformer, engine)))
    object.__setattr__(pipe, ENGINE_ATTR, engine)  # get_engine(pipe), cache_run(pipe, n) work too
    object.__setattr__(pipe, "__class__", _cached_class(cls))


def unwrap_pipeline(pipe: Any) -> nn.Module | None:
    """Restore `pipe`'s class and attributes; returns the transformer the cache was attached to."""
    state = vars(pipe).get(PIPE_ATTR)
    if state is None:
        return None
    cls, transformer, passes = state
    object.__setattr__(pipe, "__class__", cls)
    del vars(pipe)[PIPE_ATTR]
    vars(pipe).pop(ENGINE_ATTR, None)
    for twin in passes.twins:
        get_engine(twin).remove()
    return transformer


def pass_engines(model: Any) -> list:
    """The cache engine of each separate guidance pass: the model's own, then its twins' (a pipeline's)."""
    state = vars(model).get(PIPE_ATTR)
    return [get_engine(model)] + ([get_engine(t) for t in state[2].twins] if state is not None else [])


@contextmanager
def _after(obj: Any, name: str, then: Callable[[], None]) -> Iterator[None]:
    """Within the block, `obj.name(...)` runs `then()` after itself; the method is put back on exit."""
    own = name in vars(obj)
    method = getattr(obj, name)

    @functools.wraps(method)  # keeps the signature: pipelines inspect set_timesteps for timesteps=/sigmas=
    def observed(*a, **k):
        out = method(*a, **k)
        then()
        return out

    setattr(obj, name, observed)
    try:
        yield
    finally:
        if own:
            setattr(obj, name, method)
        else:
            delattr(obj, name)


def _refuse_skip_layer_guidance(pipe: Any, call: Callable, args: tuple, kwargs: dict) -> None:
    """SD3's skip-layer guidance calls the transformer a second time (blocks skipped) at the steps between
    skip_layer_guidance_start and _stop only: a twin would number those calls as a run of its own, off the
    timesteps that schedules, GOC steps and forecasts count."""
    try:
        given = inspect.signature(call).bind(pipe, *args, **kwargs).arguments
    except TypeError:
        return  # the pipeline reports its own argument errors
    if given.get("skip_guidance_layers") is not None:
        raise ValueError(f"{type(pipe).__name__}(skip_guidance_layers=...): skip-layer guidance is not supported "
                         "with a calicache cache (its extra transformer calls come at some steps only, with "
                         "blocks skipped); call without skip_guidance_layers, or remove_cache(pipe) to use it "
                         "uncached")


def _call(pipe: Any, call: Callable, args: tuple, kwargs: dict):
    _refuse_skip_layer_guidance(pipe, call, args, kwargs)
    _, transformer, passes = vars(pipe)[PIPE_ATTR]
    engine = get_engine(transformer)
    if pipe.transformer is not transformer or engine is not passes.engine:
        raise RuntimeError("pipe.transformer was replaced (or its cache removed or replaced) after apply_cache(pipe); "
                           "call remove_cache(pipe) and apply_cache(pipe, config) again")
    passes.caller_run = engine.explicit  # the caller's own `with cache_run(pipe, n)` sets the first pass's run
    scheduler = pipe.scheduler
    forward = vars(transformer).get("forward")
    transformer.forward = passes.route(transformer.forward)
    try:
        # One host-side read of the run's timesteps per run: the model calls read none. (Flow pipelines
        # hand the transformer t / 1000; the forecast's timestep distances are ratios, so either scale serves.)
        with _after(scheduler, "set_timesteps", lambda: passes.begin_run(scheduler.timesteps.tolist())), \
                _after(scheduler, "step", passes.stepped):
            return call(pipe, *args, **kwargs)
    finally:
        if forward is None:
            del transformer.forward
        else:
            transformer.forward = forward
        passes.end_run()
