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
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads; torch's choice if not given")


def add_sampling_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=None, help="sampler steps; the model's recommended (else 50) if unset")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default="ddim")
    p.add_argument("--spacing", choices=SPACINGS, default="adm",
                   help="adm: S even steps 0..999 (the papers); leading: ddimS / diffusers DDIM")
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="classifier-free guidance scale, 1 = none; the model's recommended (else 1) if not given")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first K eps channels (3 reproduces DiT's ImageNet numbers)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    p.add_argument("--clip-denoised", choices=("auto", "yes", "no"), default="auto",
                   help="clamp x0 predictions to [-1, 1] (ADM's pixel-space sampling); auto: the model's recommended")
    p.add_argument("--seed", type=int, default=0)


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
    """Options of commands that also run under torchrun (see docs/distributed.md)."""
    from .. import distributed

    p.add_argument("--nproc-per-node", type=int, default=None,
                   help="start this many worker processes on this machine (torchrun for you; gloo on CPU, one GPU "
                        "each with CUDA); see docs/distributed.md")
    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds a collective waits for a missing rank "
                        f"(default: ${distributed.TIMEOUT_ENV} or {distributed.DEFAULT_TIMEOUT:.0f})")


def json_object(text: str, flag: str, example: str) -> dict:
    """A JSON object given on the command line; anything else is an error naming the flag."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{flag}: not valid JSON ({e.msg} at character {e.pos}); give an object such as "
                         f"{example}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{flag}: expected a JSON object such as {example}, got {text!r}")
    return value


def parse_arch(text: str | None) -> str | dict | None:
    if text is None or not text.strip().startswith(("{", "[")):
        return text
    return json_object(text, "--arch", '\'{"num_heads": 6}\' or a registry name such as DiT-S/2')


def setup(args: argparse.Namespace) -> None:
    """Seed first, then threads: every command starts the same way."""
    seed = getattr(args, "seed", 0)
    if not 0 <= seed < 2**63:
        raise ValueError(f"--seed must be an integer in 0..2**63-1, got {seed}")
    if getattr(args, "threads", None) is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1 (or omitted for torch's choice), got {args.threads}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def clip_flag(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[getattr(args, "clip_denoised", "auto")]


def model_defaults(model: torch.nn.Module) -> dict:
    """The recommended sampling settings stored with a shipped or saved model, if any."""
    return dict(getattr(model, "calicache_defaults", {}) or {})


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    from ..cache.config import SCALES, SVD_KINDS
    from ..cache.methods import METHODS

    g = p.add_argument_group("caching")
    g.add_argument("--method", choices=sorted(METHODS), default="none", help="cache method")
    g.add_argument("--period", type=int, default=2, help="FORA period: call t is full when t %% period == 0")
    g.add_argument("--schedule", default=None, help="explicit gather matrix (JSON or npz) instead of --period")
    g.add_argument("--rank", default=None,
                   help="ICC rank: an integer, 'full', or omitted = the factor file's per-layer ranks "
                        "(plain SVD without a file: width / 9)")
    g.add_argument("--svd", choices=SVD_KINDS, default="plain", help="where ICC's factors come from")
    g.add_argument("--scale", choices=SCALES, default="both", help="CA/CD scaling side (for calibration)")
    g.add_argument("--factors", default=None, help="factor file from `calicache calibrate`")
    g.add_argument("--cache-dtype", default=None, choices=["float32", "float16", "bfloat16"],
                   help="dtype of cached activations (default: the model's)")
    g.add_argument("--goc-weight", type=float, default=1.2, help="GOC compensation weight w")
    g.add_argument("--goc-steps", default=None, help="GOC compensated calls, comma-separated")
    g.add_argument("--goc-file", default=None, help="GOC steps file from `calicache calibrate --method goc`")
    g.add_argument("--forecast-weight", type=float, default=1.0, help="calibrated forecast weight w")


def cache_config_from_args(args: argparse.Namespace):
    from ..cache.config import CacheConfig

    rank = args.rank
    if rank is not None and rank != "full":
        try:
            rank = int(rank)
        except ValueError as e:
            raise ValueError(f"--rank must be an integer or 'full', got {args.rank!r}") from e
    try:
        goc_steps = [int(s) for s in args.goc_steps.split(",")] if args.goc_steps else None
    except ValueError:
        raise ValueError(f"--goc-steps must be comma-separated call indices such as 3,7,12; got {args.goc_steps!r}"
                         ) from None
    if args.factors is not None and args.method not in ("icc", "forecast"):
        raise ValueError(f"--factors is used by --method icc and forecast only, not {args.method}; drop --factors "
                         "or choose one of those methods")
    return CacheConfig(method=args.method, period=args.period, schedule=args.schedule, rank=rank, svd=args.svd,
                       scale=args.scale, factors=args.factors, cache_dtype=args.cache_dtype,
                       goc_weight=args.goc_weight, goc_steps=goc_steps, goc_file=args.goc_file,
                       forecast_weight=args.forecast_weight)
