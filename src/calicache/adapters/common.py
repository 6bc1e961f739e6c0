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


IMAGE_PROJECTIONS = ("to_q", "to_k", "to_v")
TEXT_PROJECTIONS = ("add_q_proj", "add_k_proj", "add_v_proj")


def attention_linears(prefix: str, attn: nn.Module, names: tuple[str, ...], tokens: int) -> list[LinearSpec]:
    """One spec per projection of `attn` that exists, each seeing `tokens` rows. The q, k and v projections
    of one stream see one tensor: it is stored once, with the first of them."""
    out, first = [], {}
    for name in names:
        module = getattr(attn, "to_out", [None])[0] if name == "to_out.0" else getattr(attn, name, None)
        if isinstance(module, nn.Linear):
            full = f"{prefix}.{name}"
            stream = next((g for g in (IMAGE_PROJECTIONS, TEXT_PROJECTIONS) if name in g), None)
            shared = first.setdefault(stream, full) if stream is not None else full
            out.append(LinearSpec(full, module, tokens=tokens, input_shared_with=None if shared == full else shared))
    return out


def feed_forward_branch(name: str, ff: nn.Module, tokens: int) -> BranchSpec:
    """diffusers' FeedForward (net.0 = GELU with its `proj`, net.2 = the output linear) over `tokens` rows;
    net.2's input is GELU(net.0.proj's output): recomputed from that, never stored."""
    act, fc1 = ff.net[0], f"{name}.net.0.proj"
    return BranchSpec(name=name, module=ff, tokens=tokens, linears=[
        LinearSpec(fc1, act.proj), LinearSpec(f"{name}.net.2", ff.net[2], input_from=fc1, input_fn=act.gelu)])


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
    embedding the run constants depend on), `default_text_tokens` and `default_tokens` (image tokens per
    sample at the family's usual resolution; unset: read from the config's sample size)."""

    text_arg = "encoder_hidden_states"
    default_text_tokens = 512
    default_tokens: int | None = None  # None: the config's sample_size / patch_size, squared

    def __init__(self, model: nn.Module, tokens: int | None = None, text_tokens: int | None = None):
        self.tokens = int(tokens) if tokens is not None else self.tokens_of(model)
        self.text_tokens = int(text_tokens) if text_tokens is not None else self.default_text_tokens
        if self.tokens < 1 or self.text_tokens < 1:
            raise ValueError(f"tokens and text_tokens must be >= 1, got {self.tokens} and {self.text_tokens}")
        names = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
        self._position = {name: i for i, name in enumerate(names)}

    def tokens_of(self, model: nn.Module) -> int:
        """Image tokens per sample when `tokens` is not given."""
        if self.default_tokens is not None:
            return self.default_tokens
        return (model.config.sample_size // model.config.patch_size) ** 2

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
