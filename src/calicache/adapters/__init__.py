"""Adapters tell the cache engine where the branches and linear layers of a model family are."""

from __future__ import annotations

from torch import nn

from ..models.dit import DiT
from .base import Adapter, BranchSpec, LinearSpec
from .diffusers import DiffusersAdapter, diffusers_family
from .dit import DiTAdapter
from .flux import FluxAdapter
from .qwenimage import QwenImageAdapter
from .sd3 import SD3Adapter
from .wan import WanAdapter

__all__ = ["Adapter", "BranchSpec", "LinearSpec", "get_adapter", "transformer_family"]

# diffusers transformer class -> its adapter (matched by class name in the model's MRO: no diffusers import).
FAMILIES: dict[str, type[Adapter]] = {
    "FluxTransformer2DModel": FluxAdapter,
    "SD3Transformer2DModel": SD3Adapter,
    "WanTransformer3DModel": WanAdapter,
    "QwenImageTransformer2DModel": QwenImageAdapter,
}


def transformer_family(model: nn.Module) -> str | None:
    """The diffusers class name of a transformer one of FAMILIES' adapters serves, else None."""
    for cls in type(model).__mro__:
        if cls.__name__ in FAMILIES and cls.__module__.startswith("diffusers."):
            return cls.__name__
    return None


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
    family = transformer_family(model)
    if family is not None:
        return FAMILIES[family](model, tokens, text_tokens)
    raise ValueError(
        f"calicache cannot cache {type(model).__name__}: supported are calicache's DiT "
        "(create_model / load_model) and diffusers' DiTTransformer2DModel, PixArtTransformer2DModel, "
        f"{', '.join(FAMILIES)} (or a pipeline holding one)"
    )
