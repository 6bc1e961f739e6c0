"""diffusers' `SD3Transformer2DModel` (Stable Diffusion 3 / 3.5, MMDiT): joint transformer blocks.

Every `JointTransformerBlock` (`transformer_blocks.i`) has the branches
- `attn`: joint attention over [image; text] tokens; one call returns (image output, text output), each
  gated by its own gate, so the tuple is cached pre-gate as one branch. Linears: to_q, to_k, to_v,
  to_out.0 on the N image rows; add_q_proj, add_k_proj, add_v_proj, to_add_out on the T text rows.
  The last block is `context_pre_only`: its text stream ends in the attention (no to_add_out, no
  ff_context); the attention's raw text output is part of the cached tuple, unused by the block.
- `attn2` (SD3.5's dual-attention blocks only): image self-attention on the second adaLN output.
- `ff` (image rows) and `ff_context` (text rows, all blocks but the last): GELU(tanh) feed-forwards.

Run constants: `context_embedder` (the CLIP+T5 sequence projected to the width) depends on the prompt
only. The pooled projection (`time_text_embed.text_embedder`, one row per sample), the timestep embedder
and the adaLN linears are paid at every call. StableDiffusion3Pipeline doubles the batch for guidance
and passes the flow-matching timestep in 0..1000.
"""

from __future__ import annotations

from torch import nn

from .base import BranchSpec, LinearSpec
from .common import (
    IMAGE_PROJECTIONS,
    TransformerAdapter,
    attention_linears,
    check_linear_ff,
    check_processor,
    embedder_macs,
    feed_forward_branch,
    joint_attention_branch,
    linear_macs,
)

# StableDiffusion3Pipeline: 77 CLIP tokens + 256 T5 tokens (max_sequence_length) in one sequence.
SD3_TEXT_TOKENS = 333
_PROCESSORS = ("JointAttnProcessor2_0",)


class SD3Adapter(TransformerAdapter):
    """Adapter for SD3Transformer2DModel; `tokens` default to the config's sample size / patch, squared."""

    default_text_tokens = SD3_TEXT_TOKENS

    def __init__(self, model: nn.Module, tokens: int | None = None, text_tokens: int | None = None):
        super().__init__(model, tokens, text_tokens)
        for i, blk in enumerate(model.transformer_blocks):
            p = f"transformer_blocks.{i}"
            if blk._chunk_size is not None:
                raise ValueError(f"{p} runs its feed-forward in chunks, which would call the ff branch several "
                                 "times per step; call disable_forward_chunking() on the transformer")
            for name in ("attn", "attn2"):
                if getattr(blk, name, None) is not None:
                    check_processor(f"{p}.{name}", getattr(blk, name), _PROCESSORS)
            for name in ("ff", "ff_context"):
                if getattr(blk, name, None) is not None:
                    check_linear_ff(f"{p}.{name}", getattr(blk, name))

    def branches(self, model: nn.Module) -> list[BranchSpec]:
        n, t = self.tokens, self.text_tokens
        out = []
        for i, blk in enumerate(model.transformer_blocks):
            p = f"transformer_blocks.{i}"
            out.append(joint_attention_branch(f"{p}.attn", blk.attn, n, t))
            if blk.attn2 is not None:
                a2 = blk.attn2
                out.append(BranchSpec(name=f"{p}.attn2", module=a2, tokens=n, attention_dim=a2.to_q.out_features,
                                      linears=attention_linears(f"{p}.attn2", a2, IMAGE_PROJECTIONS, n)
                                      + [LinearSpec(f"{p}.attn2.to_out.0", a2.to_out[0])]))
            out.append(feed_forward_branch(f"{p}.ff", blk.ff, n))
            if blk.ff_context is not None:
                out.append(feed_forward_branch(f"{p}.ff_context", blk.ff_context, t))
        return out

    def check_call(self, args: tuple, kwargs: dict) -> None:
        """`skip_layers` (skip-layer guidance's extra pass) runs some blocks not at all: their branches would
        miss the calls their cache counts on and serve outputs of another pass at the next."""
        skip = self.arg("skip_layers", args, kwargs)
        if skip is not None and len(skip):
            raise ValueError("SD3Transformer2DModel(skip_layers=...): skipping blocks is not supported with a "
                             "calicache cache (the skipped blocks' branches miss the calls their cache counts); "
                             "call without skip_layers, or remove_cache(transformer) to use skip-layer guidance "
                             "uncached")

    def constant_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.context_embedder]

    def constant_macs(self, model: nn.Module) -> int:
        return self.text_tokens * linear_macs(model.context_embedder)

    def base_macs(self, model: nn.Module) -> int:
        cfg = model.config
        emb = model.time_text_embed
        cond = embedder_macs(emb.timestep_embedder) + embedder_macs(emb.text_embedder)
        adaln = sum(linear_macs(b.norm1.linear) + linear_macs(b.norm1_context.linear) for b in model.transformer_blocks)
        adaln += linear_macs(model.norm_out.linear)
        patch = cfg.in_channels * cfg.patch_size ** 2 * model.inner_dim  # the patch embedding conv, per token
        return cond + adaln + self.tokens * (patch + linear_macs(model.proj_out))

