"""Argument groups and set-up shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import random
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import torch

from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedule import SPACINGS
from ..images import grid, save_npz, save_png
from ..utils import atomic_path


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

    p.add_argument("--dist-timeout", type=float, default=None,
                   help="under torchrun: seconds a collective waits for a missing rank "
                        f"(default: ${distributed.TIMEOUT_ENV} or {distributed.DEFAULT_TIMEOUT:.0f})")


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


def clip_flag(args: argparse.Namespace) -> bool | None:
    return {"auto": None, "yes": True, "no": False}[getattr(args, "clip_denoised", "auto")]


def model_defaults(model: torch.nn.Module) -> dict:
    """The recommended sampling settings stored with a shipped or saved model, if any."""
    return dict(getattr(model, "calicache_defaults", {}) or {})


def add_cache_arguments(p: argparse.ArgumentParser) -> None:
    """--method, --config and every registered method's own flags (each flag once, saying who reads it)."""
    from ..cache.methods import METHODS

    g = p.add_argument_group("caching")
    g.add_argument("--method", choices=sorted(METHODS), default=None,
                   help="cache method (not given: none, or the --config file's)")
    g.add_argument("--config", default=None, help="a cache config JSON file (config.save(path)) instead of the flags")
    flags: dict[str, tuple] = {}
    for name, cls in METHODS.items():
        for a in cls.arguments:
            flags.setdefault(a.flag, (a, []))[1].append(name)
    for a, users in flags.values():
        g.add_argument(a.flag, default=None, choices=a.choices, help=f"{a.help} [{', '.join(users)}]")


def cache_config_from_args(args: argparse.Namespace):
    """The method config of --config FILE, or of --method and its flags; a flag the method does not read is an error."""
    from ..cache.methods import METHODS, load_config

    given = {a.flag for cls in METHODS.values() for a in cls.arguments if getattr(args, a.dest, None) is not None}
    if getattr(args, "config", None):
        if args.method is not None or given:
            raise ValueError(f"--config holds the whole cache config; drop {sorted(given) or ['--method']} "
                             "or drop --config")
        return load_config(args.config)
    cls = METHODS[args.method or "none"]
    foreign = sorted(given - {a.flag for a in cls.arguments})
    if foreign:
        raise ValueError(f"{', '.join(foreign)} not used by --method {cls.method}; drop it or choose a method that "
                         "reads it (see --help)")
    return cls.from_args(args)


def parse_classes(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(c) for c in text.split(",")]
    except ValueError:
        raise ValueError(f"--classes must be comma-separated integers such as 0,3,7; got {text!r}") from None


def write_sample_outputs(out: Path, images: np.ndarray, labels: np.ndarray, report: dict) -> None:
    """All three files or none: each is written under a temporary name, and all are renamed only
    once every one is complete (a folder this call created is removed again on failure)."""
    created = not out.exists()
    try:
        with ExitStack() as stack:
            tmp = {name: stack.enter_context(atomic_path(out / name))
                   for name in ("samples.npz", "grid.png", "report.json")}
            save_npz(tmp["samples.npz"], arr_0=images, arr_1=labels)
            save_png(grid(images[:64]), tmp["grid.png"])
            tmp["report.json"].write_text(json.dumps(report, indent=2))
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise
