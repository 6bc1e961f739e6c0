"""Count multiply-accumulates of one sampling run (per sample, the papers' convention).

Prints total, per_call, full_call, total_with_cfg, speedup and cached_ratio. A registry name is
counted on the meta device (no weights, no memory); a checkpoint path counts that model. A diffusers
folder given as --pipeline (or a PixArt folder as --model) is counted as diffusers runs its transformer,
built from config.json on the meta device: a DiT block's own embedders, PixArt's cross-attention with
the prompt's keys/values computed once per run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..cache.macs import count_macs
from ..models.dit import DIT_MODELS, create_model
from ..models.io import load_model
from .common import add_cache_arguments, cache_config_from_args, parse_arch
from .sample_pipeline import diffusers_transformer_on_meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="DiT-XL/2", help="registry name, shipped name or checkpoint path")
    p.add_argument("--arch", default=None, help="architecture for checkpoints (registry name or JSON overrides)")
    p.add_argument("--steps", type=int, default=20, help="model calls of the run")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="> 1 doubles the batch in total_with_cfg")
    p.add_argument("--pipeline", default=None,
                   help="diffusers pipeline or transformer folder: count its transformer as diffusers runs it")
    p.add_argument("--tokens", type=int, default=None,
                   help="diffusers: image tokens per sample (default: the config's sample size / patch, squared)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="PixArt: prompt tokens per sample (default 120, PixArt-alpha's T5 length; Sigma uses 300)")
    add_cache_arguments(p)
    p.add_argument("--json", action="store_true", help="print the whole dict as JSON")


def run(args: argparse.Namespace) -> int:
    config = cache_config_from_args(args)
    name = args.pipeline or args.model
    if args.pipeline is not None:
        model = diffusers_transformer_on_meta(args.pipeline)
    elif args.model in DIT_MODELS:
        with torch.device("meta"):
            model = create_model(args.model)
    elif _is_pixart_folder(Path(args.model)):
        model = diffusers_transformer_on_meta(args.model)
    else:
        model = load_model(args.model, parse_arch(args.arch))
    shape = {"tokens": args.tokens, "text_tokens": args.text_tokens}
    macs = count_macs(model, config, args.steps, args.cfg_scale, **shape)
    if args.json:
        print(json.dumps(macs))
    else:
        print(f"{name}, {args.steps} calls, method {config.method}: {macs['total'] / 1e9:.2f} GMACs per sample "
              f"(full call {macs['full_call'] / 1e9:.2f} G, {macs['speedup']:.2f}x fewer than uncached, "
              f"{macs['cached_ratio']:.0%} of branch computations served from the cache)")
    return 0


def _is_pixart_folder(folder: Path) -> bool:
    """A diffusers folder whose transformer is PixArt's (calicache's DiT cannot load it; diffusers counts it)."""
    for config in (folder / "config.json", folder / "transformer" / "config.json"):
        if config.is_file():
            try:
                cfg = json.loads(config.read_text())
            except (OSError, json.JSONDecodeError):
                return False
            return cfg.get("_class_name") == "PixArtTransformer2DModel" or cfg.get("norm_type") == "ada_norm_single"
    return False
