"""Precomputed prompt embeddings for text-to-image transformers (PixArt): the file `calicache sample
--prompt-embeds` and `calicache calibrate --prompt-embeds` read, so the T5 text encoder need not be loaded.

A file (.safetensors, or .pt of plain tensors) holds `prompt_embeds` (P, T, D) and
`prompt_attention_mask` (P, T), and for guidance `negative_prompt_embeds` /
`negative_prompt_attention_mask` (1 or P rows) - what a PixArt pipeline's `encode_prompt` returns.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

EMBED_KEYS = ("prompt_embeds", "prompt_attention_mask", "negative_prompt_embeds", "negative_prompt_attention_mask")


def load_tensor_file(path: str | Path, what: str, expected: str) -> object:
    """Tensors from a safetensors or torch file (weights only); clear errors naming `what` and the `expected` layout."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; save {expected} (safetensors.torch.save_file or torch.save)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{path}: refused to load objects other than tensors ({e}); save plain tensors") from e
    except Exception as e:  # safetensors and torch raise several types for damaged files
        raise ValueError(f"{path}: cannot read {what} ({e})") from e


def load_prompt_embeds(path: str | Path, guidance: bool, width: int) -> dict[str, torch.Tensor]:
    """Prompt embeddings from a safetensors or torch file, checked against the pipeline's needs."""
    data = load_tensor_file(path, "prompt embeddings", "a dict with prompt_embeds and prompt_attention_mask")
    return check_prompt_embeds(data, guidance, width, str(path))


def check_prompt_embeds(data: Mapping[str, torch.Tensor], guidance: bool, width: int,
                        source: str = "prompt embeddings") -> dict[str, torch.Tensor]:
    """The embedding tensors of `data` (float embeddings, long masks) after checking keys, shapes and values."""
    if not isinstance(data, Mapping) or "prompt_embeds" not in data or "prompt_attention_mask" not in data:
        found = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise ValueError(f"{source} must hold prompt_embeds and prompt_attention_mask (found {found})")
    out = {k: data[k] for k in EMBED_KEYS if data.get(k) is not None}
    for k, v in out.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"{source}: {k} is a {type(v).__name__}, not a tensor")
    if guidance and ("negative_prompt_embeds" not in out or "negative_prompt_attention_mask" not in out):
        raise ValueError(f"{source} has no negative_prompt_embeds / negative_prompt_attention_mask, which guidance "
                         "needs (PixArt-alpha: the T5 embeddings of the empty prompt \"\"); add them or use "
                         "--cfg-scale 1")
    pe, pm = out["prompt_embeds"], out["prompt_attention_mask"]
    if pe.dim() != 3 or pe.shape[-1] != width or tuple(pm.shape) != tuple(pe.shape[:2]):
        raise ValueError(f"{source}: prompt_embeds {tuple(pe.shape)} and prompt_attention_mask {tuple(pm.shape)} "
                         f"must be (P, T, {width}) and (P, T) for this transformer")
    if "negative_prompt_embeds" in out:
        ne, nm = out["negative_prompt_embeds"], out.get("negative_prompt_attention_mask")
        if ne.dim() != 3 or ne.shape[0] not in (1, pe.shape[0]) or ne.shape[1:] != pe.shape[1:] or nm is None \
                or tuple(nm.shape) != tuple(ne.shape[:2]):
            raise ValueError(f"{source}: negative_prompt_embeds must be (1 or {pe.shape[0]}, {pe.shape[1]}, {width}) "
                             "with a matching negative_prompt_attention_mask")
    for k, v in out.items():
        if not torch.isfinite(v.float()).all():
            raise ValueError(f"{source}: {k} contains NaN or infinite values")
    return {k: v.float() if "embeds" in k else v.long() for k, v in out.items()}


def prompt_rows(t: torch.Tensor, idx) -> torch.Tensor:
    """Rows `idx` (cycled) of a per-prompt tensor; a single row serves every sample."""
    return t[[int(i) % t.shape[0] for i in idx]]


def text_width(model: torch.nn.Module) -> int:
    """D of the prompt embeddings a PixArt transformer takes (its caption projection's input)."""
    return model.config.caption_channels or model.config.cross_attention_dim
