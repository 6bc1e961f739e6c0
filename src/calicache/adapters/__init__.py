"""Adapters tell the cache engine where the branches and linear layers of a model family are."""

from __future__ import annotations

from torch import nn

from ..models.dit import DiT
from .base import Adapter, BranchSpec, LinearSpec
from .diffusers import DiffusersAdapter, diffusers_family
from .dit import DiTAdapter

__all__ = ["Adapter", "BranchSpec", "LinearSpec", "get_adapter"]


def get_adapter(model: nn.Module, tokens: int | None = None, text_tokens: int | None = None) -> Adapter:
    """The adapter of a supported model family; anything else is a clear error.

    `tokens` / `text_tokens` set the image and prompt tokens per sample of a diffusers transformer
    (for counting MACs at other resolutions or prompt lengths); calicache's DiT has a fixed size.
    """
    if isinstance(model, DiT):
        if tokens not in (None, model.config.num_tokens) or text_tokens is not None:
            raise ValueError(f"calicache's DiT always sees {model.config.num_tokens} tokens and no text; "
                             "tokens/text_tokens apply to diffusers transformers")
        return DiTAdapter()
    if diffusers_family(model) is not None:
        return DiffusersAdapter(model, tokens, text_tokens)
    raise ValueError(
        f"calicache cannot cache {type(model).__name__}: supported are calicache's DiT "
        "(create_model / load_model) and diffusers' DiTTransformer2DModel and PixArtTransformer2DModel "
        "(or a DiTPipeline / PixArtAlphaPipeline holding one)"
    )
