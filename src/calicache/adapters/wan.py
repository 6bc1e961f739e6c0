"""diffusers' `WanTransformer3DModel` (Wan 2.1 text-to-video): video tokens with self-attention,
cross-attention to the prompt and a feed-forward in every block.

Every `WanTransformerBlock` (`blocks.i`) has three branches over the N video tokens (frames x patches):
- `attn1`: self-attention with 3-D rotary embeddings; linears to_q, to_k, to_v, to_out.0; gated by gate_msa.
- `attn2`: cross-attention to the T prompt tokens, added to the residual without a gate. Only the query
  side is calibrated (to_q, to_out.0): its keys and values come from the prompt alone.
- `ffn`: GELU(tanh) feed-forward (net.0.proj, net.2), gated by c_gate_msa.

Run constants: the prompt projection `condition_embedder.text_embedder` and every block's
`attn2.to_k` / `attn2.to_v` (the RMS norm on the keys is recomputed on the stored projections; it has no
MACs). The timestep embedder and the shared modulation `condition_embedder.time_proj` (6C per sample; each
block only adds its own scale_shift_table) are the per-call base. WanPipeline runs guidance as two
separate passes per step, which `apply_cache(pipe)` gives separate caches (`cache/pipeline.py`).
"""

from __future__ import annotations

import math

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
    linear_macs,
)

# WanPipeline pads the UMT5 prompt to 512 tokens; its default video (81 frames at 480 x 832) is
# 21 latent frames of 60 x 104 latents, patches (1, 2, 2): 21 x 30 x 52 tokens.
WAN_TEXT_TOKENS = 512
WAN_TOKENS = 21 * 30 * 52
_PROCESSORS = ("WanAttnProcessor",)


class WanAdapter(TransformerAdapter):
    """Adapter for WanTransformer3DModel (text-to-video); `tokens` are video tokens per sample."""

    default_text_tokens = WAN_TEXT_TOKENS
    default_tokens = WAN_TOKENS

    def __init__(self, model: nn.Module, tokens: int | None = None, text_tokens: int | None = None):
        super().__init__(model, tokens, text_tokens)
        if model.config.image_dim is not None or model.config.added_kv_proj_dim is not None:
            raise ValueError("calicache caches Wan's text-to-video transformer; this one also attends to image "
                             "embeddings (image-to-video: image_dim / added_kv_proj_dim), which it does not support")
        for i, blk in enumerate(model.blocks):
            check_processor(f"blocks.{i}.attn1", blk.attn1, _PROCESSORS)
            check_processor(f"blocks.{i}.attn2", blk.attn2, _PROCESSORS)
            check_linear_ff(f"blocks.{i}.ffn", blk.ffn)

    def branches(self, model: nn.Module) -> list[BranchSpec]:
        n, t = self.tokens, self.text_tokens
        out = []
        for i, blk in enumerate(model.blocks):
            p = f"blocks.{i}"
            a1, a2 = blk.attn1, blk.attn2
            out += [
                BranchSpec(name=f"{p}.attn1", module=a1, tokens=n, attention_dim=a1.to_q.out_features,
                           linears=attention_linears(f"{p}.attn1", a1, IMAGE_PROJECTIONS + ("to_out.0",), n)),
                BranchSpec(name=f"{p}.attn2", module=a2, tokens=n, attention_dim=a2.to_q.out_features, kv_tokens=t,
                           linears=[LinearSpec(f"{p}.attn2.to_q", a2.to_q),
                                    LinearSpec(f"{p}.attn2.to_out.0", a2.to_out[0])]),
                feed_forward_branch(f"{p}.ffn", blk.ffn, n),
            ]
        return out

    def constant_modules(self, model: nn.Module) -> list[nn.Module]:
        mods = [model.condition_embedder.text_embedder]
        for blk in model.blocks:
            mods += [blk.attn2.to_k, blk.attn2.to_v]
        return mods

    def constant_macs(self, model: nn.Module) -> int:
        kv = sum(linear_macs(b.attn2.to_k) + linear_macs(b.attn2.to_v) for b in model.blocks)
        return self.text_tokens * (embedder_macs(model.condition_embedder.text_embedder) + kv)

    def base_macs(self, model: nn.Module) -> int:
        cfg, emb = model.config, model.condition_embedder
        patch = cfg.in_channels * math.prod(cfg.patch_size) * model.patch_embedding.out_channels
        cond = embedder_macs(emb.time_embedder) + linear_macs(emb.time_proj)
        return cond + self.tokens * (patch + linear_macs(model.proj_out))
