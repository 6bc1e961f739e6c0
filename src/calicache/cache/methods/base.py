"""What every cache method shares: the engine link, cache dtype, and branch-level caching."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..config import CacheConfig


def each(fn: Callable, *values):
    """`fn` applied to tensors, or element-wise to tuples of them (a joint-attention branch returns the image
    and the text stream)."""
    if isinstance(values[0], tuple):
        return tuple(fn(*vs) for vs in zip(*values))
    return fn(*values)


def tensors(value) -> tuple:
    """The tensors of a branch output (one, or a tuple of them)."""
    return value if isinstance(value, tuple) else (value,)


class Method:
    """A cache method. Subclasses install hooks in `__init__` through `engine.patch`."""

    def __init__(self, engine, config: CacheConfig):
        self.engine = engine
        self.config = config
        self.cache_dtype = config.cache_dtype

    def store(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.cache_dtype is None else t.to(self.cache_dtype)

    def reset(self) -> None:
        """Forget every cached tensor (run boundaries, removal)."""

    def check_run(self, num_calls: int) -> None:
        """Fail before a run of `num_calls` calls starts if the method cannot serve it."""

    def cache_bytes(self) -> int:
        return 0

    def position(self) -> float:
        """Where the current call lies, for methods that extrapolate: its index, or its timestep."""
        return self.engine.call

    def cached_macs(self, layer: int, call: int) -> int:
        """MACs per sample of cacheable layer `layer` at a cached call (the papers' convention)."""
        return 0


class BranchCache:
    """Serves whole branch outputs (pre-gate) at cached calls; `on_cached` decides what is served.

    Used by FORA (serve the last full output), GOC (extrapolate it) and ICC's rank-0 branches.
    """

    def __init__(self, method: Method, layers: list[int]):
        self.method = method
        self.outputs: dict[int, torch.Tensor] = {}
        engine = method.engine
        for layer in layers:
            engine.patch(engine.branches[layer].module, lambda fwd, layer=layer: self._hook(layer, fwd))

    def _hook(self, layer: int, forward: Callable) -> Callable:
        engine = self.method.engine

        def run(*args, **kwargs):
            if engine.full[layer]:
                out = forward(*args, **kwargs)
                self.outputs[layer] = each(self.method.store, out)
                self.on_full(layer, out)
                return out
            if layer not in self.outputs:
                raise RuntimeError(f"layer {engine.branches[layer].name} has no cached output at call {engine.call}; "
                                   "the schedule must make every layer full at call 0")
            out = self.on_cached(layer)
            like = args[0] if args else next(iter(kwargs.values()))
            return each(lambda t: t.to(like.dtype), out)

        return run

    def on_full(self, layer: int, out: torch.Tensor) -> None:
        """Called after a full computation of `layer` (after `outputs` was updated)."""

    def on_cached(self, layer: int) -> torch.Tensor:
        return self.outputs[layer]

    def reset(self) -> None:
        self.outputs.clear()

    def cache_bytes(self) -> int:
        return sum(t.nbytes for out in self.outputs.values() for t in tensors(out))

    def macs(self, branch) -> int:
        """MACs per sample of serving `branch` at a cached call (FORA: nothing is computed)."""
        return 0
