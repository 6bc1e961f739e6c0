"""The budgeted search over cache configurations (`calicache.tune`, `calicache tune`)."""

from .api import TuneResult, make_tuner, tune
from .space import Candidate, Space

__all__ = ["Candidate", "Space", "TuneResult", "make_tuner", "tune"]
