"""Count multiply-accumulates of one sampling run (per sample, the papers' convention).

Prints total, per_call, full_call, total_with_cfg, speedup and cached_ratio. A registry name is
counted on the meta device (no weights, no memory); a checkpoint path counts that model.
"""

from __future__ import annotations

import argparse
import json

import torch

from ..metrics.macs import count_macs
from ..models.dit import DIT_MODELS, create_model
from ..models.io import load_model
from .common import add_cache_arguments, cache_config_from_args, parse_arch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="DiT-XL/2", help="registry name, shipped name or checkpoint path")
    p.add_argument("--arch", default=None, help="architecture for checkpoints (registry name or JSON overrides)")
    p.add_argument("--steps", type=int, default=20, help="model calls of the run")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="> 1 doubles the batch in total_with_cfg")
    add_cache_arguments(p)
    p.add_argument("--json", action="store_true", help="print the whole dict as JSON")


def run(args: argparse.Namespace) -> int:
    config = cache_config_from_args(args)
    if args.model in DIT_MODELS:
        with torch.device("meta"):
            model = create_model(args.model)
    else:
        model = load_model(args.model, parse_arch(args.arch))
    macs = count_macs(model, config, args.steps, args.cfg_scale)
    if args.json:
        print(json.dumps(macs))
    else:
        print(f"{args.model}, {args.steps} calls, method {args.method}: {macs['total'] / 1e9:.2f} GMACs per sample "
              f"(full call {macs['full_call'] / 1e9:.2f} G, {macs['speedup']:.2f}x fewer than uncached, "
              f"{macs['cached_ratio']:.0%} of branch computations served from the cache)")
    return 0
