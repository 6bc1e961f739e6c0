"""Argument groups and set-up shared by the subcommands."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import torch

from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedule import SPACINGS
from ..images import grid, npz_bytes, png_bytes
from ..utils import Outputs, check_output


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
    """All three files or none: each is written to an exclusive temporary file, and all are renamed
    together once every one is complete (the old set is put back if a rename fails; a folder this
    call created is removed again on failure)."""
    created = not out.exists()
    try:
        with Outputs() as outputs:
            outputs.write(out / "samples.npz", npz_bytes(arr_0=images, arr_1=labels))
            outputs.write(out / "grid.png", png_bytes(grid(images[:64])))
            outputs.write(out / "report.json", json.dumps(report, indent=2))
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


SAMPLE_OUTPUTS = ("samples.npz", "grid.png", "report.json")


def check_sample_outputs(args: argparse.Namespace) -> None:
    """Refuse, before any work, a --out that cannot take the sample outputs: a file, a folder that cannot
    be written, existing outputs without --overwrite, or a file the command reads."""
    out = check_output(args.out, flag="--out", folder=True)
    inputs = [v for k, v in vars(args).items() if k != "out" and isinstance(v, str) and Path(v).is_file()]
    for name in SAMPLE_OUTPUTS:
        check_output(out / name, args.overwrite, "--out", inputs)
