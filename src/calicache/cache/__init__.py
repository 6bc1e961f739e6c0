"""Feature caching: schedules, the engine that attaches methods to a model, and the methods."""

from .config import CacheConfig
from .engine import apply_cache, remove_cache
from .schedule import CacheSchedule
from .state import cache_run, get_engine

__all__ = ["CacheConfig", "CacheSchedule", "apply_cache", "remove_cache", "cache_run", "get_engine"]
