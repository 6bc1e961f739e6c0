"""diffusers' `DiTTransformer2DModel` and `PixArtTransformer2DModel`: every `BasicTransformerBlock`
has the cacheable branches self-attention `attn1`, cross-attention `attn2` (PixArt; no gate) and
feed-forward `ff`, cached pre-gate, so L = 3 x depth with cross-attention, 2 x depth without
(the ICC paper, arXiv 2505.05829 Sec. 3, caches DiT's attention and MLP branches; cross-attention
is PixArt-alpha's third branch per block).

The cross-attention keys and values and PixArt's caption projection depend on the prompt only; the
adapter names them as run constants, which the engine computes once per run and reuses exactly
(`calicache.cache.constants`). Each branch names the LayerNorm that produces its input (`input_producers`),
which a cache need not run over every token at calls that serve the branch whole. Everything here is
read from the modules themselves, so the MACs are those of the model as diffusers runs it (a DiT block
carries its own timestep/label embedder).
"""

from __future__ import annotations

import sys

from torch import nn

from .base import BranchSpec
from .common import IMAGE_PROJECTIONS, TransformerAdapter, attention_linears, feed_forward_branch
from .common import embedder_macs as _mlp
from .common import linear_macs as _lin

# PixArt-alpha's pipelines pad prompts to 120 T5 tokens (max_sequence_length); PixArt-Sigma uses 300.
DEFAULT_TEXT_TOKENS = 120
# The processors that call to_q, to_k, to_v and to_out[0] as separate modules on the inputs we expect.
_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor")


def diffusers_family(model: nn.Module) -> str | None:
    """"dit" or "pixart" for the diffusers transformers calicache caches, else None."""
    if "diffusers" not in sys.modules:  # a diffusers model cannot exist without diffusers imported
        return None
    from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

    if isinstance(model, PixArtTransformer2DModel):
        return "pixart"
    if isinstance(model, DiTTransformer2DModel):
        return "dit"
    return None


class DiffusersAdapter(TransformerAdapter):
    """Adapter for one diffusers transformer. `tokens` / `text_tokens` (image tokens and prompt
    tokens per sample) default to the config's sample size and PixArt-alpha's 120; give them to
    count the MACs of other resolutions or prompt lengths."""

    default_text_tokens = DEFAULT_TEXT_TOKENS

    def __init__(self, model: nn.Module, tokens: int | None = None, text_tokens: int | None = None):
        family = diffusers_family(model)
        if family is None:
            raise ValueError(f"{type(model).__name__} is not a DiTTransformer2DModel or PixArtTransformer2DModel")
        self.family = family
        super().__init__(model, tokens, text_tokens)
        _check_supported(model)

    # -- where things are --------------------------------------------------------------------
    def branches(self, model: nn.Module) -> list[BranchSpec]:
        n = self.tokens
        out = []
        for i, blk in enumerate(model.transformer_blocks):
            p = f"transformer_blocks.{i}"
            a1, producers = blk.attn1, input_producers(blk)
            out.append(BranchSpec(name=f"{p}.attn1", module=a1, tokens=n, attention_dim=a1.to_q.out_features,
                                  linears=attention_linears(f"{p}.attn1", a1, IMAGE_PROJECTIONS + ("to_out.0",), n),
                                  input_producer=producers.get("attn1")))
            if blk.attn2 is not None:
                a2 = blk.attn2
                # Only the query side is calibrated: keys and values of the prompt are run constants.
                out.append(BranchSpec(name=f"{p}.attn2", module=a2, tokens=n, attention_dim=a2.to_q.out_features,
                                      kv_tokens=self.text_tokens, input_producer=producers.get("attn2"),
                                      linears=attention_linears(f"{p}.attn2", a2, ("to_q", "to_out.0"), n)))
            # fc2's input is act(fc1's output): GELU with the block's own `approximate` ("tanh" in DiT/PixArt).
            ff = feed_forward_branch(f"{p}.ff", blk.ff, n)
            ff.input_producer = producers.get("ff")
            out.append(ff)
        return out

    def constant_modules(self, model: nn.Module) -> list[nn.Module]:
        mods = [model.caption_projection] if getattr(model, "caption_projection", None) is not None else []
        for blk in model.transformer_blocks:
            if blk.attn2 is not None:
                mods += [blk.attn2.to_k, blk.attn2.to_v]
        return mods

    def text_input(self, args: tuple, kwargs: dict):
        return super().text_input(args, kwargs) if self.family == "pixart" else None

    # -- MACs --------------------------------------------------------------------------------
    def base_macs(self, model: nn.Module) -> int:
        cfg, n = model.config, self.tokens
        c, p = model.inner_dim, cfg.patch_size
        patch = n * cfg.in_channels * p * p * c
        final = n * _lin(model.proj_out if self.family == "pixart" else model.proj_out_2)
        if self.family == "dit":
            # Every block embeds timestep and label itself (norm1.emb) and runs its adaLN-Zero linear;
            # the final layer embeds them once more with block 0's embedder, then proj_out_1.
            blocks = sum(_mlp(b.norm1.emb.timestep_embedder) + _lin(b.norm1.linear) for b in model.transformer_blocks)
            final += _mlp(model.transformer_blocks[0].norm1.emb.timestep_embedder) + _lin(model.proj_out_1)
            return patch + blocks + final
        # PixArt: one adaLN-single for all blocks (each block only adds its scale_shift_table).
        emb = model.adaln_single.emb
        cond = _mlp(emb.timestep_embedder)
        if emb.use_additional_conditions:  # resolution (2 values) and aspect ratio (1) per sample
            cond += 2 * _mlp(emb.resolution_embedder) + _mlp(emb.aspect_ratio_embedder)
        return patch + cond + _lin(model.adaln_single.linear) + final

    def constant_macs(self, model: nn.Module) -> int:
        t = self.text_tokens
        macs = sum(t * (_lin(b.attn2.to_k) + _lin(b.attn2.to_v)) for b in model.transformer_blocks
                   if b.attn2 is not None)
        cap = getattr(model, "caption_projection", None)
        if cap is not None:
            macs += t * (_lin(cap.linear_1) + _lin(cap.linear_2))
        return macs


def input_producers(blk: nn.Module) -> dict[str, nn.LayerNorm]:
    """Branch -> the LayerNorm whose output `BasicTransformerBlock.forward` (diffusers 0.42) feeds to that
    branch alone, through element-wise modulation only (positional embeddings inside a block are refused):

    - "ada_norm_zero" (DiT): `norm1` is AdaLayerNormZero, which also computes the gates, so its inner
      `norm1.norm` (the LayerNorm it modulates) feeds attn1; `norm2` feeds attn2; `norm3` feeds ff.
    - "ada_norm_single" (PixArt): `norm1` feeds attn1 and `norm2` feeds ff; attn2 reads the residual
      stream itself (no norm), so it has no producer.
    Other norm types (AdaLayerNorm, AdaLayerNormContinuous with their own embeddings) get none.
    """
    kind = getattr(blk, "norm_type", None)
    if kind == "ada_norm_zero":
        found = {"attn1": getattr(blk.norm1, "norm", None), "attn2": blk.norm2 if blk.attn2 is not None else None,
                 "ff": blk.norm3}
    elif kind == "ada_norm_single":
        found = {"attn1": blk.norm1, "ff": blk.norm2}
    else:
        return {}
    return {name: m for name, m in found.items() if isinstance(m, nn.LayerNorm)}


def _check_supported(model: nn.Module) -> None:
    """Refuse the block variants whose computation the branches above would not describe."""
    from diffusers.models.activations import GELU

    for i, blk in enumerate(model.transformer_blocks):
        if getattr(blk, "_chunk_size", None) is not None:
            raise ValueError(f"transformer_blocks.{i} runs its feed-forward in chunks, which would call the ff "
                             "branch several times per step; call set_chunk_feed_forward(None) on every block")
        if not isinstance(blk.ff.net[0], GELU) or len(blk.ff.net) < 3 or not isinstance(blk.ff.net[2], nn.Linear):
            raise ValueError(f"transformer_blocks.{i}.ff uses {type(blk.ff.net[0]).__name__}; calicache caches the "
                             "GELU feed-forward of DiT and PixArt (activation_fn 'gelu' or 'gelu-approximate')")
        if blk.only_cross_attention or getattr(blk, "pos_embed", None) is not None:
            raise ValueError(f"transformer_blocks.{i} is not a DiT/PixArt block (cross-only attention or "
                             "positional embeddings inside the block)")
        for name in ("attn1", "attn2"):
            attn = getattr(blk, name)
            if attn is None:
                continue
            proc = type(attn.processor).__name__
            if proc not in _PROCESSORS:  # e.g. FusedAttnProcessor2_0 runs one to_qkv instead of to_q/to_k/to_v
                raise ValueError(
                    f"transformer_blocks.{i}.{name} uses {proc}; calicache calibrates to_q/to_k/to_v/to_out as "
                    "separate layers with diffusers' default processors: call unfuse_qkv_projections() or "
                    "set_default_attn_processor() before apply_cache")
