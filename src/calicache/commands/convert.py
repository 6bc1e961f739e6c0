"""Convert DiT weights between the original/calicache layout and a diffusers DiTTransformer2DModel folder.

--from takes anything `calicache.load_model` reads: an original DiT `.pt`, a calicache `.safetensors`,
a diffusers model (or DiTPipeline) folder, or a shipped model name. --format diffusers writes a
`save_pretrained` folder; --format calicache writes one safetensors file. Without --format, a --to
ending in .safetensors means calicache and anything else a diffusers folder. The written model is
read back and checked against the source on one random input; a mismatch removes it and fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from ..models.convert import (
    TO_DIFFUSERS_NOTES,
    diffusers_differences,
    from_diffusers,
    match_original_timesteps,
    read_diffusers_dit,
    to_diffusers,
)
from ..models.dit import DiT
from ..models.io import load_model, save_model, weight_hash
from .common import parse_arch, setup

FORMATS = ("diffusers", "calicache")
CHECK_TOLERANCE = 1e-4  # float32 rounding of the same network is ~1e-6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from", dest="source", required=True,
                   help="source: .pt, .safetensors, diffusers folder or shipped model name")
    p.add_argument("--to", dest="target", required=True, help="output: a folder (diffusers) or a .safetensors file")
    p.add_argument("--format", choices=FORMATS, default=None,
                   help="output format; unset: calicache for a *.safetensors --to, else diffusers")
    p.add_argument("--arch", default=None,
                   help="architecture for .pt checkpoints whose shapes cannot tell it: a registry name or JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _output_format(target: Path, fmt: str | None) -> str:
    is_file = target.suffix == ".safetensors"
    fmt = fmt or ("calicache" if is_file else "diffusers")
    if fmt == "calicache" and not is_file:
        raise ValueError(f"--to {target}: calicache format is one safetensors file; name it *.safetensors")
    if fmt == "diffusers" and target.suffix:
        raise ValueError(f"--to {target}: diffusers format is a folder; give a path without a file suffix")
    return fmt


def _check(model: DiT, forward, seed: int = 0) -> float:
    """Relative L2 difference between `model` and `forward` on one random input (t = 500, class 0)."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, c.in_channels, c.input_size, c.input_size, generator=g)
    t, y = torch.tensor([500]), torch.tensor([0])
    with torch.inference_mode():
        ref = model(x, t, y)
        out = forward(x, t, y)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _save_folder(dmodel, target: Path) -> None:
    """save_pretrained into a temporary folder beside `target`, then swap it in (no partial output)."""
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    try:
        dmodel.save_pretrained(str(tmp), safe_serialization=True)
        if target.exists():
            target.rename(old)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def run(args: argparse.Namespace) -> int:
    setup(args)
    target = Path(args.target)
    fmt = _output_format(target, args.format)
    if target.exists() and not args.overwrite:
        raise ValueError(f"{target} exists; pass --overwrite to replace it")
    notes: list[str] = []
    source = Path(args.source)
    if source.is_dir():
        dsource = read_diffusers_dit(source)
        notes += diffusers_differences(dsource)
        model = from_diffusers(dsource)
    else:
        model = load_model(args.source, parse_arch(args.arch))
    model.eval()
    if fmt == "diffusers":
        _save_folder(to_diffusers(model), target)
        notes += list(TO_DIFFUSERS_NOTES)
        written = match_original_timesteps(read_diffusers_dit(target))
        rel = _check(model, lambda x, t, y: written(x, t, y).sample)
    else:
        save_model(model, target, converted_from=str(args.source))
        rel = _check(model, load_model(target))
    if not rel < CHECK_TOLERANCE:
        (shutil.rmtree if target.is_dir() else os.remove)(target)
        raise RuntimeError(f"the written model differs from the source (relative error {rel:.3g}); "
                           "removed it. Please report this with the source file's config")
    report = {
        "from": str(args.source), "to": str(target), "format": fmt,
        "config": model.config.to_dict(), "weight_hash": weight_hash(model),
        "check_relative_error": rel, "notes": notes,
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {fmt} model to {target} (output check vs source: relative error {rel:.2e})")
        for note in notes:
            print(f"note: {note}")
    return 0
