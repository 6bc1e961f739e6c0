"""Adapters tell the cache engine where the branches and linear layers of a model family are."""

from __future__ import annotations

from torch import nn

from ..models.dit import DiT
from .base import Adapter, BranchSpec, LinearSpec
from .dit import DiTAdapter

__all__ = ["Adapter", "BranchSpec", "LinearSpec", "get_adapter"]


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter of a supported model family; anything else is a clear error."""
    if isinstance(model, DiT):
        return DiTAdapter()
    raise ValueError(
        f"calicache cannot cache {type(model).__name__}: supported are calicache's DiT "
        "(create_model / load_model)"
    )
