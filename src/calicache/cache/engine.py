"""The cache engine: attaches a method's hooks to a model, numbers the model calls of each run,
and detaches without a trace.

Hooks compose with other libraries' (diffusers' HookRegistry, accelerate's offload hooks): a hook
wraps whatever `forward` the module has, an instance attribute set by someone else or the class
method, and removal puts back exactly that. Under an accelerate or diffusers hook ours goes beneath
it, where their wrapper calls the module's own forward and where their removal puts it back, so
either can be removed first. If someone wrapped our forward after us, their wrapper stays and ours
turns into a pass-through to what it wrapped. The model code never learns about
caching. `apply_cache` also takes a diffusers pipeline (see `cache/pipeline.py`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..adapters import Adapter, get_adapter
from ..models.io import weight_hash
from .constants import RunConstants
from .methods import MethodConfig
from .pipeline import is_pipeline, unwrap_pipeline, wrap_pipeline
from .state import ENGINE_ATTR, get_engine

_ABSENT = object()  # the module had no instance `forward` (the class method ran)
# diffusers hook modules that cache; a model carrying one of them must not be cached twice.
DIFFUSERS_CACHE_HOOKS = ("first_block_cache", "taylorseer_cache", "faster_cache", "pyramid_attention_broadcast",
                         "mag_cache", "sea_cache", "text_kv_cache")


@dataclass
class _Patch:
    module: nn.Module
    owner: object  # where ours was installed: the module, or a hook's record of the module's own forward
    attr: str  # ... under this attribute
    previous: object  # what `owner.attr` held before ours, or _ABSENT (no instance attribute)
    inner: Callable  # the forward ours wraps (previous, or the bound class method)
    installed: Callable  # our forward
    target: list  # [the callable `installed` runs]: our hook, or `inner` once removed under someone's wrapper


def _slot(module: nn.Module) -> tuple[object, str]:
    """Where the forward that does the module's own work lives: beneath an accelerate hook
    (`module._old_forward`) or a diffusers HookRegistry (its innermost function reference), which
    call it from there and put it back as `module.forward` on removal; else `module.forward`."""
    if "forward" in module.__dict__:
        if getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__:
            return module, "_old_forward"
        refs = getattr(getattr(module, "_diffusers_hook", None), "_fn_refs", None)
        if refs:
            ref = refs[0]
            return ref, ("original_forward" if getattr(ref, "original_forward", None) is not None else "forward")
    return module, "forward"


def _holds(owner: object, attr: str, fn: Callable) -> bool:
    return vars(owner).get(attr, _ABSENT) is fn


def _dropped(p: _Patch) -> bool:
    """Whether another library put an older forward back over ours: ours is not where it was put,
    and the module's forward is the class method again (bound, or no instance attribute at all)
    without leading to ours through `__wrapped__` (diffusers' and accelerate's wrappers keep that
    chain). A wrapper that hides the chain is taken to wrap ours."""
    if _holds(p.owner, p.attr, p.installed):
        return False
    current = p.module.__dict__.get("forward", _ABSENT)
    if current is _ABSENT:
        return True
    seen = set()
    fn = current
    while fn is not None and id(fn) not in seen:
        if fn is p.installed:
            return False
        seen.add(id(fn))
        fn = getattr(fn, "__wrapped__", None)
    return getattr(current, "__func__", None) is getattr(type(p.module), "forward", None)


def check_no_foreign_cache(model: nn.Module) -> None:
    """Refuse a model that already has a diffusers cache (FirstBlockCache, TaylorSeer, FasterCache, PAB, ...)."""
    found = set()
    if getattr(model, "is_cache_enabled", False) is True:
        found.add(type(getattr(model, "_cache_config", None)).__name__)
    for module in model.modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name, hook in getattr(registry, "hooks", {}).items():
            if type(hook).__module__.rsplit(".", 1)[-1] in DIFFUSERS_CACHE_HOOKS:
                found.add(f"{type(hook).__name__} ({name})")
    if found:
        raise ValueError(f"this model already has a diffusers cache: {', '.join(sorted(found))}; two caches would "
                         "serve each other's stale outputs. Remove it (transformer.disable_cache(), or "
                         "HookRegistry.remove_hook) to cache with calicache")


class CacheEngine:
    """Per-model run state: which call of the run this is and which layers are full at it."""

    def __init__(self, model: nn.Module, config: MethodConfig, adapter: Adapter | None = None,
                 shares: CacheEngine | None = None):
        self.model = model
        self.config = config
        # The engine of the same weights this one was made beside (a guidance twin's original): its weight
        # hash, and its factors when the config is the same, are reused rather than hashed or resolved again.
        self.shares = shares
        self._model_hash: str | None = None
        self.adapter = adapter or get_adapter(model)
        self.branches = self.adapter.branches(model)
        self.schedule = config.schedule.for_branches([b.name for b in self.branches])
        if self.schedule.num_calls is not None:
            self.schedule.check(self.schedule.num_calls, len(self.branches))
        self._patched: list[_Patch] = []
        self.explicit = False  # inside sample()'s begin_run/end_run
        self.run_calls: int | None = None  # the explicit run's length (a schedule's cool-down needs it)
        self.active = False  # a run is in progress
        self.in_call = False  # inside a model call (outside one, e.g. a norm called by hand, producers run in full)
        self.call = -1
        self.prev_t: float | None = None
        self.t: float | None = None  # timestep of the current call (None: an explicit run without timesteps)
        self.full: tuple[bool, ...] = (True,) * len(self.branches)  # per layer: full at this call
        self.last_use: tuple[bool, ...] = (False,) * len(self.branches)  # per layer: its references' last use
        self.timesteps: list[float] | None = None  # of the explicit run in progress, one per call
        self.peak_cache_bytes = 0
        self.full_flags: list[tuple[bool, ...]] = []  # one row per call of the current/last run
        self.method = config.method_class(self, config)
        # Prompt-only modules (cross-attention K/V) computed once per run; "none" stays the plain model.
        constant = self.adapter.constant_modules(model) if config.method != "none" else []
        self.constants = RunConstants(self, constant) if constant else None
        self.patch(model, self._wrap_model)

    # -- hooks -------------------------------------------------------------------------------
    def patch(self, module: nn.Module, make: Callable[[Callable], Callable]) -> None:
        """Wrap the module's forward in `make(current_forward)`, whatever the current forward is."""
        owner, attr = _slot(module)
        previous = vars(owner).get(attr, _ABSENT)
        inner = module.forward if previous is _ABSENT else previous
        target = [make(inner)]

        def forward(*args, **kwargs):
            return target[0](*args, **kwargs)

        functools.update_wrapper(forward, inner)  # signature and name of the wrapped forward
        setattr(owner, attr, forward)
        self._patched.append(_Patch(module, owner, attr, previous, inner, forward, target))

    def remove(self) -> None:
        """Undo every patch, last first: put back what was there, or pass through under a later wrapper."""
        for p in reversed(self._patched):
            # Where ours was put, and `module.forward` where the hook we went beneath put it back on removal.
            for owner, attr in {(id(o), a): (o, a) for o, a in ((p.owner, p.attr), (p.module, "forward"))}.values():
                if not _holds(owner, attr, p.installed):
                    continue
                if p.previous is _ABSENT:
                    delattr(owner, attr)
                else:
                    setattr(owner, attr, p.previous)
            # Anything still calling ours (a wrapper someone put around it) now reaches what ours wrapped.
            p.target[0] = p.inner
        self._patched.clear()
        self._reset()

    def model_hash(self) -> str:
        """The weights' hash that factor and steps files are checked against (computed once)."""
        if self.shares is not None:
            return self.shares.model_hash()
        if self._model_hash is None:
            self._model_hash = weight_hash(self.model)
        return self._model_hash

    def check_attached(self) -> None:
        """Fail if another library dropped one of our hooks (e.g. by writing back an older forward)."""
        for p in self._patched:
            if _dropped(p):
                raise RuntimeError(f"calicache's hook on {type(p.module).__name__} was replaced by another library "
                                   "(a hook registered before calicache and removed after it writes back the forward "
                                   "it saw); call remove_cache(model) and apply_cache(model, config) again")

    def _reset(self) -> None:
        """Forget every cached tensor: the method's and the run constants."""
        self.method.reset()
        if self.constants is not None:
            self.constants.reset()

    def cache_bytes(self) -> int:
        return self.method.cache_bytes() + (self.constants.cache_bytes() if self.constants is not None else 0)

    def _wrap_model(self, forward: Callable) -> Callable:
        # Only `forward` is traced by torch.compile; the bookkeeping around it runs eagerly, so
        # the graph sees per-call Python values that are fixed for each kind of call (the gather
        # flags, a method's per-call tensors) and never the call index.
        def run(*args, **kwargs):
            self._begin_call(args, kwargs)
            try:
                out = forward(*args, **kwargs)
            except BaseException:
                self._failed_call()
                raise
            self._end_call()
            return out

        return run

    @torch._dynamo.disable
    def _begin_call(self, args: tuple, kwargs: dict) -> None:
        """Number the call and set its flags. Inside an explicit run everything is a host-side
        number the sampler handed over: no device read. A bare module driven by another library's
        loop reads the timestep (and the input's finiteness, in the same transfer) once per call:
        that is how it sees a run start (the timestep went up)."""
        self.adapter.check_call(args, kwargs)  # before anything changes: a refused call leaves the run as it was
        if self.explicit:
            if self.run_calls is not None and self.call + 1 >= self.run_calls:
                # Its last call may have consumed references in place: a further call must not meet them.
                raise RuntimeError(f"this run was declared with {self.run_calls} model calls but the model was "
                                   f"called a {self.call + 2}th time; give cache_run the number of calls it makes")
            t = self.timesteps[self.call + 1] if self.timesteps is not None else None
        else:
            t = self._read_bare_call(args, kwargs)
            if not self.active or (self.prev_t is not None and t > self.prev_t):
                check_no_foreign_cache(self.model)  # as begin_run checks: also one put on after ours
                self._start_run()
        self.call += 1
        self.t = t
        try:
            layers = len(self.branches)
            self.full = tuple(self.schedule.row(self.call, layers, self.run_calls).tolist())
            self.full_flags.append(self.full)
            # A cached layer whose next call is full (or that ends the run) may consume its references
            # in place: the sampler told the run's length. A bare module's next call is unknown.
            if self.explicit and self.run_calls is not None:
                last = self.call + 1 >= self.run_calls
                after = ((True,) * layers if last
                         else tuple(self.schedule.row(self.call + 1, layers, self.run_calls).tolist()))
                self.last_use = tuple(not f and n for f, n in zip(self.full, after))
            else:
                self.last_use = (False,) * layers
            self.method.begin_call()
            if self.constants is not None:
                self.constants.begin_call(self.adapter.text_input(args, kwargs))
            self.in_call = True
        except BaseException:
            self._failed_call()
            raise

    def _read_bare_call(self, args: tuple, kwargs: dict) -> float:
        x = self.adapter.sample_input(args, kwargs)
        t = torch.as_tensor(self.adapter.timestep(args, kwargs)).max().to(x.device, torch.float64)
        t, finite = torch.stack([t, torch.isfinite(x).all().to(torch.float64)]).tolist()  # one device read
        if not finite:
            raise ValueError("model input contains NaN or infinite values; check the sampler and the noise")
        return t

    @torch._dynamo.disable
    def _failed_call(self) -> None:
        self.in_call = False
        if not self.explicit:
            self.active = False  # the next call starts a fresh run

    @torch._dynamo.disable
    def _end_call(self) -> None:
        self.in_call = False
        self.method.end_call()
        self.prev_t = self.t
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache_bytes())

    # -- runs --------------------------------------------------------------------------------
    def _start_run(self) -> None:
        self._reset()
        self.call = -1
        self.prev_t = None
        self.active = True
        self.full_flags = []
        self.peak_cache_bytes = 0

    def begin_run(self, num_calls: int, timesteps: Sequence[float] | None = None) -> None:
        """An explicit run of `num_calls` calls: the schedule is checked before any work.

        `timesteps`: the timestep of each call as host-side numbers (a method that measures
        distances in timesteps needs them); the engine never reads them from the device."""
        if timesteps is not None:
            timesteps = [float(t) for t in timesteps]
            if len(timesteps) != num_calls:
                raise ValueError(f"{len(timesteps)} timesteps given for a run of {num_calls} calls; give one per call")
        self.schedule.check(num_calls, len(self.branches))
        self.method.check_run(num_calls)
        self.check_attached()
        check_no_foreign_cache(self.model)  # also one put on after ours
        self._start_run()
        self.explicit = True
        self.run_calls = num_calls
        self.timesteps = timesteps

    def end_run(self) -> None:
        self._reset()
        self.explicit = False
        self.active = False
        self.run_calls = None
        self.timesteps = None

    def stats(self) -> dict:
        """Cached share and peak cache memory of the last run."""
        flags = np.array(self.full_flags) if self.full_flags else np.ones((0, len(self.branches)), bool)
        return {
            "calls": int(flags.shape[0]),
            "cached_ratio": float(1 - flags.mean()) if flags.size else 0.0,
            "cache_bytes": int(self.peak_cache_bytes),
        }


def apply_cache(model: nn.Module, config: MethodConfig) -> nn.Module:
    """Attach caching to `model` (in place) and return it. `remove_cache` undoes it exactly.

    `model` may also be a diffusers pipeline (DiTPipeline, PixArtAlphaPipeline): the cache goes on
    `pipe.transformer` and every call of the pipeline is one run of known length.
    """
    if not isinstance(config, MethodConfig):
        raise TypeError("config must be a method config such as calicache.FORAConfig(period=2) or "
                        "calicache.ICCConfig(rank=21, factors=PATH); see calicache.METHODS")
    if is_pipeline(model):
        if get_engine(model) is not None:
            raise ValueError("this pipeline already has a cache; call remove_cache(pipe) first")
        apply_cache(model.transformer, config)
        wrap_pipeline(model, get_engine(model.transformer))
        return model
    if get_engine(model) is not None:
        raise ValueError("this model already has a cache; call remove_cache(model) first")
    check_no_foreign_cache(model)
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
