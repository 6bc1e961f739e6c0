"""Argument groups and set-up shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import random

import numpy as np
import torch

from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedule import SPACINGS


def add_model_arguments(p: argparse.ArgumentParser, default: str | None = "fmnist-dit") -> None:
    p.add_argument("--model", default=default, required=default is None,
                   help="shipped model name, published registry name (e.g. DiT-XL/2) or checkpoint path")
    p.add_argument("--arch", default=None,
                   help="architecture for checkpoints whose shapes cannot tell it: a registry name or JSON overrides")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's recommended)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--spacing", choices=SPACINGS, default="adm",
                   help="adm: S even steps 0..999 (the papers); leading: ddimS / diffusers DDIM")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale, 1 = none (default: the model's recommended)")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first K eps channels (3 reproduces DiT's ImageNet numbers)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--seed", type=int, default=0)


def parse_arch(text: str | None) -> str | dict | None:
    if text is None or not text.strip().startswith("{"):
        return text
    return json.loads(text)


def setup(args: argparse.Namespace) -> None:
    """Seed first, then threads: every command starts the same way."""
    seed = getattr(args, "seed", 0)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def model_defaults(model: torch.nn.Module) -> dict:
    """The recommended sampling settings stored with a shipped or saved model, if any."""
    return dict(getattr(model, "calicache_defaults", {}) or {})
