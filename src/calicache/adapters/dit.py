"""calicache's DiT (the original layout): branches `blocks[i].attn` and `blocks[i].mlp`, whose inputs
are `modulate(norm1(x))` and `modulate(norm2(x))`: the norms are their input producers."""

from __future__ import annotations

from ..models.dit import DiT
from .base import Adapter, BranchSpec, LinearSpec


class DiTAdapter(Adapter):
    def branches(self, model: DiT) -> list[BranchSpec]:
        c = model.config.hidden_size
        n = model.config.num_tokens
        out = []
        for i, blk in enumerate(model.blocks):
            p = f"blocks.{i}"
            qkv = blk.attn.qkv
            out.append(BranchSpec(
                name=f"{p}.attn", module=blk.attn, tokens=n, attention_dim=c, input_producer=blk.norm1,
                linears=[
                    LinearSpec(f"{p}.attn.q", qkv, slice(0, c)),
                    LinearSpec(f"{p}.attn.k", qkv, slice(c, 2 * c)),
                    LinearSpec(f"{p}.attn.v", qkv, slice(2 * c, 3 * c)),
                    LinearSpec(f"{p}.attn.proj", blk.attn.proj),
                ],
            ))
            out.append(BranchSpec(
                name=f"{p}.mlp", module=blk.mlp, tokens=n, input_producer=blk.norm2,
                linears=[
                    LinearSpec(f"{p}.mlp.fc1", blk.mlp.fc1),
                    LinearSpec(f"{p}.mlp.fc2", blk.mlp.fc2, input_from=f"{p}.mlp.fc1", input_fn=blk.mlp.act),
                ],
            ))
        return out

    def timestep(self, args: tuple, kwargs: dict):
        return args[1] if len(args) > 1 else kwargs["t"]

    def sample_input(self, args: tuple, kwargs: dict):
        return args[0] if args else kwargs["x"]

    def base_macs(self, model: DiT) -> int:
        cfg = model.config
        c, n, p = cfg.hidden_size, cfg.num_tokens, cfg.patch_size
        patch = n * cfg.in_channels * p * p * c
        t_mlp = model.t_embedder.frequency_embedding_size * c + c * c
        adaln = cfg.depth * c * 6 * c
        final = c * 2 * c + n * c * p * p * cfg.out_channels
        return patch + t_mlp + adaln + final

