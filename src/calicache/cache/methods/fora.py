"""FORA (Selvaraju et al., arXiv 2407.01425): at a cached call every branch output is the cached
output of the last full call. Also the "none" method: every call full."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from .base import Argument, BranchCache, Method, MethodConfig


class Fora(Method):
    def __init__(self, engine, config: FORAConfig):
        super().__init__(engine, config)
        self.cache = BranchCache(self, list(range(len(engine.branches))))

    def reset(self) -> None:
        self.cache.reset()

    def cache_bytes(self) -> int:
        return self.cache.cache_bytes()


class NoCache(Method):
    """Every call full; no hooks beyond the call counter (a reference for the others)."""


@dataclass
class FORAConfig(MethodConfig):
    """FORA: reuse each branch's output of the last full call (`period`, or an explicit `schedule`)."""

    method: ClassVar[str] = "fora"
    method_class: ClassVar[type] = Fora


@dataclass
class NoCacheConfig(MethodConfig):
    """No caching: every call computes every layer (the reference the others are measured against)."""

    method: ClassVar[str] = "none"
    method_class: ClassVar[type] = NoCache
    arguments: ClassVar[tuple[Argument, ...]] = ()
    default_period: ClassVar[int] = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.period != 1:
            raise ValueError("method 'none' computes every call; for a period or a schedule use FORAConfig "
                             "(--method fora)")
