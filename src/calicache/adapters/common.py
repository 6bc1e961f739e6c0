"""Pieces the diffusers adapters share: MACs of linear layers and embedders, reading a top-level call's
arguments by name, and the branches of MMDiT-style blocks (FLUX, SD3, Qwen-Image) where image and text
tokens attend jointly and each stream has its own projections and feed-forward.
"""

from __future__ import annotations

import inspect

from torch import nn

from .base import Adapter, BranchSpec, LinearSpec


def linear_macs(m: nn.Linear) -> int:
    """MACs per row of a linear layer."""
    return m.in_features * m.out_features


def embedder_macs(embedder: nn.Module) -> int:
    """MACs per row of diffusers' two-layer embedders (TimestepEmbedding, PixArtAlphaTextProjection)."""
    return linear_macs(embedder.linear_1) + linear_macs(embedder.linear_2)


def attention_linears(prefix: str, attn: nn.Module, names: tuple[str, ...], tokens: int) -> list[LinearSpec]:
    """One plain spec per projection of `attn` that exists (q, k and v separate), each seeing `tokens` rows."""
    out = []
    for name in names:
        module = getattr(attn, "to_out", [None])[0] if name == "to_out.0" else getattr(attn, name, None)
        if isinstance(module, nn.Linear):
            out.append(LinearSpec(f"{prefix}.{name}", module, tokens=tokens))
    return out


def feed_forward_branch(name: str, ff: nn.Module, tokens: int) -> BranchSpec:
    """diffusers' FeedForward (net.0 = GELU with its `proj`, net.2 = the output linear) over `tokens` rows."""
    return BranchSpec(name=name, module=ff, tokens=tokens, linears=[
        LinearSpec(f"{name}.net.0.proj", ff.net[0].proj), LinearSpec(f"{name}.net.2", ff.net[2])])


IMAGE_PROJECTIONS = ("to_q", "to_k", "to_v")
TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj")


def joint_attention_branch(name: str, attn: nn.Module, n: int, t: int) -> BranchSpec:
    """Joint attention over n image and t text tokens, returning (image output, text output).

    The attention module's call is the branch: both outputs are cached pre-gate, as one tuple (the two
    streams come out of one softmax, so neither can be cached alone). Its linears: q, k, v of each stream,
    `to_out.0` on the image rows and `to_add_out` on the text rows. A block whose text stream ends here
    (SD3's last block, `context_pre_only`) has no `to_add_out`: its text output is the raw attention output.
    """
    linears = attention_linears(name, attn, IMAGE_PROJECTIONS, n) + attention_linears(name, attn, TEXT_PROJECTIONS, t)
    linears += attention_linears(name, attn, ("to_out.0",), n) + attention_linears(name, attn, ("to_add_out",), t)
    c = attn.to_q.out_features
    text_out = attn.to_add_out.out_features if getattr(attn, "to_add_out", None) is not None else c
    return BranchSpec(name=name, module=attn, tokens=n + t, attention_dim=c, linears=linears,
                      output_size=n * attn.to_out[0].out_features + t * text_out)


def check_linear_ff(name: str, ff: nn.Module) -> None:
    """Refuse a FeedForward whose layers are not (GELU-projection, dropout, linear)."""
    from diffusers.models.activations import GELU

    if not isinstance(ff.net[0], GELU) or len(ff.net) < 3 or not isinstance(ff.net[2], nn.Linear):
        raise ValueError(f"{name} uses {type(ff.net[0]).__name__}; calicache caches diffusers' GELU feed-forward "
                         "(activation_fn 'gelu' or 'gelu-approximate')")


def check_processor(name: str, attn: nn.Module, allowed: tuple[str, ...]) -> None:
    """Refuse attention processors that would not call the projections the adapter lists (fused QKV, IP-Adapter)."""
    proc = type(attn.processor).__name__
    if proc not in allowed or getattr(attn, "fused_projections", False):
        raise ValueError(f"{name} uses {proc}{' with fused projections' if proc in allowed else ''}; calicache "
                         f"calibrates the separate q/k/v/out layers that {' or '.join(allowed)} calls: call "
                         "unfuse_qkv_projections() or set_default_attn_processor() before apply_cache")


class TransformerAdapter(Adapter):
    """A diffusers transformer whose calls are read by argument name. Subclasses set `text_arg` (the prompt
    embedding the run constants depend on), `default_text_tokens`, and compute `self.tokens` themselves."""

    text_arg = "encoder_hidden_states"
    default_text_tokens = 512

    def __init__(self, model: nn.Module, text_tokens: int | None = None):
        self.text_tokens = int(text_tokens) if text_tokens is not None else self.default_text_tokens
        if self.text_tokens < 1:
            raise ValueError(f"text_tokens must be >= 1, got {self.text_tokens}")
        names = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
        self._position = {name: i for i, name in enumerate(names)}

    def _check_tokens(self) -> None:
        if self.tokens < 1:
            raise ValueError(f"tokens must be >= 1, got {self.tokens}")

    def arg(self, name: str, args: tuple, kwargs: dict):
        """The argument `name` of a top-level call, given by keyword or position (None: not given)."""
        if name in kwargs:
            return kwargs[name]
        i = self._position.get(name)
        return args[i] if i is not None and i < len(args) else None

    def timestep(self, args: tuple, kwargs: dict):
        t = self.arg("timestep", args, kwargs)
        if t is None:
            raise ValueError("the transformer was called without a timestep; pass timestep=... as the pipelines do")
        return t

    def sample_input(self, args: tuple, kwargs: dict):
        return self.arg("hidden_states", args, kwargs)

    def text_input(self, args: tuple, kwargs: dict):
        return self.arg(self.text_arg, args, kwargs)
