"""calicache: faster Diffusion Transformer sampling by calibrated feature caching."""

from .cache import CacheConfig, CacheSchedule, apply_cache, remove_cache

# The function shadows the subpackage's name on purpose: `calicache.calibrate(...)` is the API;
# import submodules as `from calicache.calibrate.factors import Factors` (sys.modules still has them).
from .calibrate.calibrate import calibrate
from .calibrate.text import calibrate_text
from .metrics.macs import count_macs
from .models.dit import DIT_MODELS, DiT, DiTConfig, create_model
from .models.io import load_model, save_model, weight_hash
from .sampling import sample

__all__ = [
    "CacheConfig",
    "CacheSchedule",
    "apply_cache",
    "remove_cache",
    "calibrate",
    "calibrate_text",
    "count_macs",
    "DIT_MODELS",
    "DiT",
    "DiTConfig",
    "create_model",
    "load_model",
    "save_model",
    "weight_hash",
    "sample",
]
__version__ = "0.1.0"
