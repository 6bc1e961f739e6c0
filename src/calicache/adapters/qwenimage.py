"""diffusers' `QwenImageTransformer2DModel` (Qwen-Image): double-stream MMDiT blocks.

Every `QwenImageTransformerBlock` (`transformer_blocks.i`) has three branches:
- `attn`: joint attention over [text; image] tokens; one call returns (image output, text output), each
  gated by its own gate, so the tuple is cached pre-gate as one branch. Linears: to_q, to_k, to_v,
  to_out.0 on the N image rows; add_q_proj, add_k_proj, add_v_proj, to_add_out on the T text rows.
- `img_mlp` (image rows) and `txt_mlp` (text rows): GELU(tanh) feed-forwards.

Run constants: the prompt's RMS norm and projection (`txt_norm`, `txt_in`) depend on the prompt only.
The timestep embedder, each block's modulation linears (`img_mod.1`, `txt_mod.1`, 6C per sample each)
and `norm_out` are the per-call base. QwenImagePipeline passes `timestep / 1000` and runs true CFG as two
separate passes, which `apply_cache(pipe)` gives separate caches (`cache/pipeline.py`).
"""

from __future__ import annotations

from torch import nn

from .base import BranchSpec
from .common import (
    TransformerAdapter,
    check_linear_ff,
    check_processor,
    embedder_macs,
    feed_forward_branch,
    joint_attention_branch,
    linear_macs,
)

# Qwen-Image's pipeline keeps the prompt's own length (up to 1024 tokens); 1328 x 1328 px -> 83 x 83
# latent patches of 2 x 2: 6889 image tokens.
QWEN_TEXT_TOKENS = 256
QWEN_TOKENS = 83 * 83
_PROCESSORS = ("QwenDoubleStreamAttnProcessor2_0",)


class QwenImageAdapter(TransformerAdapter):
    """Adapter for QwenImageTransformer2DModel; `tokens` image tokens, `text_tokens` prompt tokens."""

    default_text_tokens = QWEN_TEXT_TOKENS
    default_tokens = QWEN_TOKENS

    def __init__(self, model: nn.Module, tokens: int | None = None, text_tokens: int | None = None):
        super().__init__(model, tokens, text_tokens)
        cfg = model.config
        if cfg.guidance_embeds or getattr(cfg, "zero_cond_t", False) or getattr(cfg, "use_additional_t_cond", False):
            raise ValueError("calicache caches Qwen-Image's text-to-image transformer; this config uses guidance "
                             "embeddings, zero_cond_t or additional timestep conditions (edit/layered variants)")
        for i, blk in enumerate(model.transformer_blocks):
            check_processor(f"transformer_blocks.{i}.attn", blk.attn, _PROCESSORS)
            check_linear_ff(f"transformer_blocks.{i}.img_mlp", blk.img_mlp)
            check_linear_ff(f"transformer_blocks.{i}.txt_mlp", blk.txt_mlp)

    def branches(self, model: nn.Module) -> list[BranchSpec]:
        n, t = self.tokens, self.text_tokens
        out = []
        for i, blk in enumerate(model.transformer_blocks):
            p = f"transformer_blocks.{i}"
            out += [joint_attention_branch(f"{p}.attn", blk.attn, n, t),
                    feed_forward_branch(f"{p}.img_mlp", blk.img_mlp, n),
                    feed_forward_branch(f"{p}.txt_mlp", blk.txt_mlp, t)]
        return out

    def constant_modules(self, model: nn.Module) -> list[nn.Module]:
        return [model.txt_norm, model.txt_in]

    def constant_macs(self, model: nn.Module) -> int:
        return self.text_tokens * linear_macs(model.txt_in)

    def base_macs(self, model: nn.Module) -> int:
        cond = embedder_macs(model.time_text_embed.timestep_embedder)
        mods = sum(linear_macs(b.img_mod[1]) + linear_macs(b.txt_mod[1]) for b in model.transformer_blocks)
        mods += linear_macs(model.norm_out.linear)
        return cond + mods + self.tokens * (linear_macs(model.img_in) + linear_macs(model.proj_out))
