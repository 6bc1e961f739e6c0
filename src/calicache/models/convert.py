"""Weights between the original DiT layout (calicache's `DiT`) and diffusers' `DiTTransformer2DModel`.

The two compute the same network except for two runtime settings of diffusers (facts measured
against facebookresearch/DiT, see docs/diffusers.md):
- the timestep features: diffusers builds `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`
  in every block's `norm1.emb`, i.e. frequencies exp(-ln(1e4) i / 127); the original divides by 128
  (shift 0). That is ~5% relative on the output at t = 500-999.
- the LayerNorm before the MLP (`norm3`) uses the config's `norm_eps`, default 1e-5; the original 1e-6.

`to_diffusers` sets both to the original's values. `norm_eps` is a config field and is saved with
`save_pretrained`; the timestep shift is a constructor constant of diffusers, so a folder reloaded
with `DiTTransformer2DModel.from_pretrained` is back at shift 1 — call `match_original_timesteps`
after loading, or load the folder with `calicache.load_model`.

Layout differences: diffusers splits the fused `qkv` into `to_q/to_k/to_v`, gives every block its
own copy of the timestep and label embedders (the original has one, shared), and recomputes the
fixed position embedding instead of storing it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .dit import DiT, DiTConfig, get_2d_sincos_pos_embed

if TYPE_CHECKING:
    from diffusers import DiTTransformer2DModel

ORIGINAL_NORM_EPS = 1e-6
# facebookresearch/DiT's EMA update runs over every parameter, the fixed sin-cos pos_embed included, so a
# trained checkpoint's embedding drifts from it by float32 rounding (1.3e-5 after 4,353 steps). Sin-cos
# values lie in [-1, 1]; an embedding further than this from them is another embedding, not drift.
POS_EMBED_DRIFT = 1e-3

# What `to_diffusers` changes, and what a saved folder cannot carry (printed by `calicache convert`).
TO_DIFFUSERS_NOTES = (
    "set norm_eps=1e-6 in the diffusers config (diffusers' default 1e-5; the original DiT uses 1e-6)",
    "set downscale_freq_shift=0 on every block's timestep projection (diffusers' DiT uses 1, the original 0). "
    "save_pretrained cannot store this: DiTTransformer2DModel.from_pretrained(folder) rebuilds it with shift 1, "
    "which changes outputs by ~5% at t=500-999. After loading, call "
    "calicache.models.convert.match_original_timesteps(model), or load the folder with calicache.load_model(folder)",
)

# Per-block parameters: original name -> diffusers name (suffixes .weight and .bias both map).
_BLOCK_LINEARS = {
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
# Shared modules of the original; diffusers keeps one copy under each block's `norm1.emb`.
_EMBEDDERS = {
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
}
_LABEL_TABLE = ("y_embedder.embedding_table.weight", "norm1.emb.class_embedder.embedding_table.weight")
_TOP_LINEARS = {
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.adaLN_modulation.1": "proj_out_1",
    "final_layer.linear": "proj_out_2",
}


def _diffusers_cls():
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError as e:
        raise RuntimeError("diffusers is not installed; `pip install diffusers` to convert to or from it") from e
    return DiTTransformer2DModel


def original_to_diffusers_state(state: Mapping[str, torch.Tensor], depth: int) -> dict[str, torch.Tensor]:
    """Rename an original-layout state dict to diffusers' keys (pos_embed is dropped: diffusers recomputes it)."""
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in _TOP_LINEARS.items():
        for p in ("weight", "bias"):
            out[f"{theirs}.{p}"] = state[f"{ours}.{p}"]
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for ours, theirs in _BLOCK_LINEARS.items():
            for p in ("weight", "bias"):
                out[f"{dst}{theirs}.{p}"] = state[f"{src}{ours}.{p}"]
        for p in ("weight", "bias"):
            # The fused qkv output is [q; k; v] along dim 0 (the original reshapes it as (3, heads, d)).
            for name, part in zip(("to_q", "to_k", "to_v"), state[f"{src}attn.qkv.{p}"].chunk(3, dim=0)):
                out[f"{dst}attn1.{name}.{p}"] = part.clone()
            for ours, theirs in _EMBEDDERS.items():
                out[f"{dst}{theirs}.{p}"] = state[f"{ours}.{p}"].clone()
        out[f"{dst}{_LABEL_TABLE[1]}"] = state[_LABEL_TABLE[0]].clone()
    return out


def _check_shared_embedders(dstate: Mapping[str, torch.Tensor], depth: int) -> None:
    """Every block's embedders must equal block 0's: the original DiT has only one."""
    names = [f"{theirs}.{p}" for theirs in _EMBEDDERS.values() for p in ("weight", "bias")] + [_LABEL_TABLE[1]]
    for i in range(1, depth):
        for name in names:
            a, b = dstate[f"transformer_blocks.0.{name}"], dstate[f"transformer_blocks.{i}.{name}"]
            if not torch.equal(a, b):
                diff = (a.float() - b.float()).abs().max().item()
                raise ValueError(
                    f"diffusers block {i} has its own {name} (max |difference| to block 0: {diff:.3g}). "
                    "The original DiT layout has one timestep/label embedder shared by all blocks, so this "
                    "model cannot be converted without changing what it computes; use it through diffusers "
                    "or fine-tune it with shared embedders"
                )


def diffusers_to_original_state(dstate: Mapping[str, torch.Tensor], depth: int,
                                pos_embed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Rename a diffusers DiT state dict to the original keys; refuses per-block embedders that differ."""
    _check_shared_embedders(dstate, depth)
    out: dict[str, torch.Tensor] = {"pos_embed": pos_embed}
    for ours, theirs in _TOP_LINEARS.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = dstate[f"{theirs}.{p}"]
    for p in ("weight", "bias"):
        for ours, theirs in _EMBEDDERS.items():
            out[f"{ours}.{p}"] = dstate[f"transformer_blocks.0.{theirs}.{p}"]
    out[_LABEL_TABLE[0]] = dstate[f"transformer_blocks.0.{_LABEL_TABLE[1]}"]
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for ours, theirs in _BLOCK_LINEARS.items():
            for p in ("weight", "bias"):
                out[f"{dst}{ours}.{p}"] = dstate[f"{src}{theirs}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn.qkv.{p}"] = torch.cat([dstate[f"{src}attn1.{n}.{p}"] for n in ("to_q", "to_k", "to_v")])
    return out


def match_original_timesteps(dmodel: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Set every block's timestep projection to the original DiT's frequencies (shift 0), in place."""
    for block in dmodel.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0
    return dmodel


def diffusers_differences(dmodel: DiTTransformer2DModel) -> list[str]:
    """Where a diffusers DiT's runtime settings differ from the original DiT's (empty when they match).

    The weights do not depend on these settings; calicache's DiT always runs the original's.
    """
    notes = []
    shifts = {float(b.norm1.emb.time_proj.downscale_freq_shift) for b in dmodel.transformer_blocks}
    if shifts != {0.0}:
        notes.append(
            f"this diffusers model embeds timesteps with downscale_freq_shift={sorted(shifts)}; calicache's DiT uses "
            "the original DiT's (0). Weights from facebookresearch/DiT were trained with 0, so calicache reproduces "
            "the original; a model trained inside diffusers with shift 1 would differ by ~5% at t=500-999"
        )
    eps = float(dmodel.config.norm_eps)
    if eps != ORIGINAL_NORM_EPS:
        notes.append(f"this diffusers model uses norm_eps={eps:g} before the MLP; calicache's DiT uses the "
                     f"original's {ORIGINAL_NORM_EPS:g} (a ~3e-6 relative effect)")
    return notes


def sincos_pos_embed(config: DiTConfig) -> torch.Tensor:
    """The fixed 2-D sin-cos position embedding a DiT of `config` starts with, (1, T, D)."""
    grid = config.input_size // config.patch_size
    return torch.from_numpy(get_2d_sincos_pos_embed(config.hidden_size, grid)).float().unsqueeze(0)


def pos_embed_drift(model: DiT, fixed: torch.Tensor | None = None) -> float:
    """Largest |difference| between the model's pos_embed and the fixed sin-cos one (EMA drift)."""
    fixed = sincos_pos_embed(model.config) if fixed is None else fixed
    return (model.pos_embed.detach().float() - fixed.detach().float().to(model.pos_embed.device)).abs().max().item()


def with_sincos_pos_embed(model: DiT) -> DiT:
    """A copy of `model` with its pos_embed reset to the exact sin-cos embedding (what diffusers computes)."""
    import copy

    exact = copy.deepcopy(model)
    with torch.no_grad():
        exact.pos_embed.copy_(sincos_pos_embed(model.config).to(exact.pos_embed))
    return exact.eval()


def to_diffusers(model: DiT) -> DiTTransformer2DModel:
    """A diffusers `DiTTransformer2DModel` computing what `model` computes (the original DiT).

    Sets `norm_eps=1e-6` and the timestep shift 0 (see TO_DIFFUSERS_NOTES: the shift is not saved).
    """
    cls = _diffusers_cls()
    c = model.config
    if c.mlp_ratio != 4.0:
        raise ValueError(f"mlp_ratio {c.mlp_ratio} cannot be expressed in diffusers' DiT, whose MLP is 4x wide")
    if c.class_dropout_prob <= 0:
        raise ValueError(
            "this DiT has no null-class row (class_dropout_prob=0), but diffusers' DiT always has one "
            "(class dropout 0.1); only models trained with label dropout can be converted"
        )
    dmodel = cls(
        num_attention_heads=c.num_heads,
        attention_head_dim=c.hidden_size // c.num_heads,
        in_channels=c.in_channels,
        out_channels=c.out_channels,
        num_layers=c.depth,
        sample_size=c.input_size,
        patch_size=c.patch_size,
        num_embeds_ada_norm=c.num_classes,
        activation_fn="gelu-approximate",
        attention_bias=True,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
        norm_eps=ORIGINAL_NORM_EPS,
    )
    param, dparam = next(model.parameters()), next(dmodel.parameters())
    if (param.device, param.dtype) != (dparam.device, dparam.dtype):
        dmodel.to(device=param.device, dtype=param.dtype)
    drift = pos_embed_drift(model, dmodel.pos_embed.pos_embed)
    if drift > POS_EMBED_DRIFT:
        raise ValueError(
            f"this DiT's pos_embed differs from the fixed 2-D sin-cos embedding by up to {drift:.3g} (more than the "
            f"{POS_EMBED_DRIFT:g} an EMA of it drifts by); diffusers recomputes that embedding and does not store "
            "it, so a model with another position embedding cannot be converted"
        )
    state = original_to_diffusers_state(model.state_dict(), c.depth)
    dmodel.load_state_dict(state, strict=True)
    return match_original_timesteps(dmodel.eval())


def _config_from_diffusers(dmodel: DiTTransformer2DModel) -> DiTConfig:
    dc = dmodel.config
    if getattr(dc, "norm_type", None) != "ada_norm_zero" or getattr(dc, "patch_size", None) is None:
        raise ValueError(
            f"{type(dmodel).__name__} with norm_type={getattr(dc, 'norm_type', None)!r} is not a DiT; "
            "calicache converts class-conditional adaLN-Zero DiTs (DiTTransformer2DModel) only"
        )
    wrong = {k: (getattr(dc, k, None), v) for k, v in
             {"activation_fn": "gelu-approximate", "attention_bias": True, "norm_elementwise_affine": False}.items()
             if getattr(dc, k, v) != v}
    if wrong:
        raise ValueError("this diffusers DiT differs from the original architecture: "
                         + ", ".join(f"{k}={a!r} (original: {b!r})" for k, (a, b) in wrong.items()))
    hidden = dc.num_attention_heads * dc.attention_head_dim
    out_channels = dc.out_channels or dc.in_channels
    if out_channels not in (dc.in_channels, 2 * dc.in_channels):
        raise ValueError(f"out_channels {out_channels} is neither in_channels {dc.in_channels} (eps only) nor "
                         "twice it (eps and learned variance), as the original DiT has")
    inner = dmodel.transformer_blocks[0].ff.net[2].in_features
    rows = dmodel.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
    return DiTConfig(
        input_size=dc.sample_size,
        patch_size=dc.patch_size,
        in_channels=dc.in_channels,
        hidden_size=hidden,
        depth=dc.num_layers,
        num_heads=dc.num_attention_heads,
        mlp_ratio=inner / hidden,
        # diffusers fixes label dropout at 0.1; the table has a null row exactly when dropout > 0.
        class_dropout_prob=0.1 if rows > dc.num_embeds_ada_norm else 0.0,
        num_classes=dc.num_embeds_ada_norm,
        learn_sigma=out_channels == 2 * dc.in_channels,
    )


def from_diffusers(dmodel: DiTTransformer2DModel) -> DiT:
    """calicache's DiT (original layout and computation) from a diffusers DiT with shared embedders."""
    cfg = _config_from_diffusers(dmodel)
    param = next(dmodel.parameters())
    model = DiT(cfg).to(device=param.device, dtype=param.dtype)
    # The fixed position embedding is the one DiT's initialisation computes (diffusers does not store it).
    state = diffusers_to_original_state(dmodel.state_dict(), cfg.depth, model.pos_embed.detach().clone())
    model.load_state_dict(state, strict=True)
    return model.eval()


def _model_folder(folder: Path) -> tuple[Path, str | None]:
    """The folder and subfolder holding the transformer's config.json (a model or a whole pipeline)."""
    if (folder / "config.json").is_file():
        return folder, None
    if (folder / "transformer" / "config.json").is_file():
        return folder, "transformer"
    raise FileNotFoundError(
        f"{folder}: no config.json (nor transformer/config.json); not a diffusers model folder. "
        "Write one with DiTTransformer2DModel.save_pretrained or `calicache convert --to FOLDER`"
    )


def read_diffusers_dit(folder: str | os.PathLike) -> DiTTransformer2DModel:
    """A diffusers DiT loaded from a `save_pretrained` folder (or a DiTPipeline folder), as diffusers loads it."""
    folder = Path(folder)
    root, sub = _model_folder(folder)
    config_path = root / (sub or "") / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: unreadable config ({e}); re-save the model") from e
    name = config.get("_class_name")
    if name not in ("DiTTransformer2DModel", "Transformer2DModel"):
        raise ValueError(f"{config_path}: {name} is not a DiT; calicache loads DiTTransformer2DModel folders")
    weights = root / (sub or "")
    bins = sorted(weights.glob("diffusion_pytorch_model*.bin"))
    if bins and not any(weights.glob("diffusion_pytorch_model*.safetensors")):
        from ..tensorfile import read_torch

        for b in bins:  # diffusers' own message for a refused pickle only says "unable to load"
            read_torch(b, "re-save the model with save_pretrained(folder, safe_serialization=True)")
    cls = _diffusers_cls()
    try:
        # low_cpu_mem_usage=False: the plain load path, which needs no `accelerate`.
        return cls.from_pretrained(str(root), subfolder=sub, low_cpu_mem_usage=False).eval()
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{folder}: diffusers cannot load this folder ({e}); the weights may be missing "
                         "or truncated") from e


def load_diffusers_dit(folder: str | os.PathLike) -> DiT:
    """calicache's DiT, in eval mode, from a diffusers DiT folder (model or pipeline)."""
    return from_diffusers(read_diffusers_dit(folder))
