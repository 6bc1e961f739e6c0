"""FORA (Selvaraju et al., arXiv 2407.01425): at a cached call every branch output is the cached
output of the last full call."""

from __future__ import annotations

from ..config import CacheConfig
from .base import BranchCache, Method


class Fora(Method):
    def __init__(self, engine, config: CacheConfig):
        super().__init__(engine, config)
        self.cache = BranchCache(self, list(range(len(engine.branches))))

    def reset(self) -> None:
        self.cache.reset()

    def cache_bytes(self) -> int:
        return self.cache.cache_bytes()


class NoCache(Method):
    """Every call full; no hooks beyond the call counter (a reference for the others)."""
