"""Feature caching: schedules, the engine that attaches methods to a model, and the methods."""

from .engine import apply_cache, remove_cache
from .methods import (
    METHODS,
    FORAConfig,
    ForecastConfig,
    GOCConfig,
    ICCConfig,
    MethodConfig,
    NoCacheConfig,
    config_from_dict,
    load_config,
)
from .schedule import CacheSchedule
from .state import cache_run, get_engine

__all__ = ["METHODS", "MethodConfig", "NoCacheConfig", "FORAConfig", "ICCConfig", "ForecastConfig", "GOCConfig",
           "config_from_dict", "load_config", "CacheSchedule", "apply_cache", "remove_cache", "cache_run", "get_engine"]
