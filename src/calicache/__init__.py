"""calicache: faster Diffusion Transformer sampling by calibrated feature caching."""

from .cache import (
    METHODS,
    CacheSchedule,
    FORAConfig,
    ForecastConfig,
    GOCConfig,
    ICCConfig,
    MethodConfig,
    NoCacheConfig,
    apply_cache,
    config_from_dict,
    load_config,
    remove_cache,
)
from .cache.macs import count_macs
from .cache.summary import summary

# The function shadows the subpackage's name on purpose: `calicache.calibrate(...)` is the API;
# import submodules as `from calicache.cache.factors import Factors` (sys.modules still has them).
from .calibration.calibrate import calibrate
from .calibration.text import calibrate_text
from .models.dit import DIT_MODELS, DiT, DiTConfig, create_model
from .models.io import load_model, save_model, weight_hash
from .sampling import sample
from .tuning.api import tune

__all__ = [
    "METHODS",
    "MethodConfig",
    "NoCacheConfig",
    "FORAConfig",
    "ICCConfig",
    "ForecastConfig",
    "GOCConfig",
    "config_from_dict",
    "load_config",
    "CacheSchedule",
    "apply_cache",
    "remove_cache",
    "calibrate",
    "calibrate_text",
    "count_macs",
    "summary",
    "DIT_MODELS",
    "DiT",
    "DiTConfig",
    "create_model",
    "load_model",
    "save_model",
    "weight_hash",
    "sample",
    "tune",
]
__version__ = "0.1.0"
