"""The method registry: one file per method; the CLI's `--method choices` read this dict."""

from __future__ import annotations

from .fora import Fora, NoCache
from .forecast import CalibratedForecast
from .goc import GradientOptimizedCache
from .icc import IncrementCalibration

METHODS: dict[str, type] = {
    "none": NoCache,
    "fora": Fora,
    "icc": IncrementCalibration,
    "forecast": CalibratedForecast,
    "goc": GradientOptimizedCache,
}
