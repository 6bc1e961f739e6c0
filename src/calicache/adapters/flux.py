"""diffusers' `FluxTransformer2DModel` (FLUX.1): double-stream blocks, then single-stream blocks.

Double-stream block (`transformer_blocks.i`), three branches:
- `attn`: joint attention over [text; image] tokens. One call returns (image output, text output), each
  gated by its own gate (gate_msa, c_gate_msa), so the tuple is cached pre-gate as one branch. Linears:
  to_q, to_k, to_v, to_out.0 on the N image rows; add_q_proj, add_k_proj, add_v_proj, to_add_out on
  the T text rows; attention over N + T tokens.
- `ff` (image rows) and `ff_context` (text rows): GELU(tanh) feed-forwards, gated by gate_mlp / c_gate_mlp.

Single-stream block (`single_transformer_blocks.i`) over the N + T concatenated tokens:
`x + gate * proj_out(cat(attn(h), GELU(proj_mlp(h))))`, `h = adaLN(x)`. Its pre-gate branch is
proj_out's output, but no submodule computes all of it: proj_out is a linear over the concatenation of
two parallel paths. The adapter caches the three calls that make it, all under the block's schedule row:
`attn` (to_q, to_k, to_v and the attention; no output projection), `proj_mlp` and `proj_out` (each a
linear that is its own branch). At a cached call FORA serves all three, so proj_out's cached output is
exactly the cached pre-gate branch (GELU and the concatenation of the served tensors are the only work
left, no MACs); ICC calibrates the four linears, so at full rank every output is the uncached one and at
rank 0 each branch is served whole, which is FORA. Schedules that give the three different rows are
allowed and stay exact in the same sense.

Run constants: `context_embedder` (the T5 sequence projected to width C) depends on the prompt only. The
pooled CLIP projection (`time_text_embed.text_embedder`, one row per sample) is added to the timestep
embedding and is paid at every call; the timestep, the distilled guidance and the adaLN linears
(norm1, norm1_context, norm, norm_out) are the per-call base. FluxPipeline passes `timestep / 1000`
(sigmas in 0..1): the forecast's distances in timestep units are ratios, so the scale does not matter.
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

# FluxPipeline pads the T5 prompt to max_sequence_length 512.
FLUX_TEXT_TOKENS = 512
_PROCESSORS = ("FluxAttnProcessor",)


class FluxAdapter(TransformerAdapter):
    """Adapter for FluxTransformer2DModel; `tokens` (image tokens per sample, default a 1024 px image:
    4096 packed latents) and `text_tokens` (default 512) size the MACs."""

    default_text_tokens = FLUX_TEXT_TOKENS
    default_tokens = 4096

    def __init__(self, model: nn.Module, tokens: int | None = None, text_tokens: int | None = None):
        super().__init__(model, tokens, text_tokens)
        for i, blk in enumerate(model.transformer_blocks):
            check_processor(f"transformer_blocks.{i}.attn", blk.attn, _PROCESSORS)
            check_linear_ff(f"transformer_blocks.{i}.ff", blk.ff)
            check_linear_ff(f"transformer_blocks.{i}.ff_context", blk.ff_context)
        for i, blk in enumerate(model.single_transformer_blocks):
            check_processor(f"single_transformer_blocks.{i}.attn", blk.attn, _PROCESSORS)

    def branches(self, model: nn.Module) -> list[BranchSpec]:
        n, t = self.tokens, self.text_tokens
        out = []
        for i, blk in enumerate(model.transformer_blocks):
            p = f"transformer_blocks.{i}"
            out += [joint_attention_branch(f"{p}.attn", blk.attn, n, t), feed_forward_branch(f"{p}.ff", blk.ff, n),
                    feed_forward_branch(f"{p}.ff_context", blk.ff_context, t)]
        for i, blk in enumerate(model.single_transformer_blocks):
            p = f"single_transformer_blocks.{i}"
            out += [
                BranchSpec(name=f"{p}.attn", module=blk.attn, tokens=n + t, attention_dim=blk.attn.to_q.out_features,
                           linears=attention_linears(f"{p}.attn", blk.attn, IMAGE_PROJECTIONS, n + t)),
                BranchSpec(name=f"{p}.proj_mlp", module=blk.proj_mlp, tokens=n + t,
                           linears=[LinearSpec(f"{p}.proj_mlp", blk.proj_mlp)]),
                BranchSpec(name=f"{p}.proj_out", module=blk.proj_out, tokens=n + t,
                           linears=[LinearSpec(f"{p}.proj_out", blk.proj_out)]),
            ]
        return out

    def constant_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.context_embedder]

    def constant_macs(self, model: nn.Module) -> int:
        return self.text_tokens * linear_macs(model.context_embedder)

    def base_macs(self, model: nn.Module) -> int:
        emb = model.time_text_embed
        cond = embedder_macs(emb.timestep_embedder) + embedder_macs(emb.text_embedder)
        if getattr(emb, "guidance_embedder", None) is not None:  # FLUX.1-dev's distilled guidance
            cond += embedder_macs(emb.guidance_embedder)
        adaln = sum(linear_macs(b.norm1.linear) + linear_macs(b.norm1_context.linear) for b in model.transformer_blocks)
        adaln += sum(linear_macs(b.norm.linear) for b in model.single_transformer_blocks)
        adaln += linear_macs(model.norm_out.linear)
        tokens = self.tokens * (linear_macs(model.x_embedder) + linear_macs(model.proj_out))
        return cond + adaln + tokens

