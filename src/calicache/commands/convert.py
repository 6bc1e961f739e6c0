"""Convert DiT weights between the original/calicache layout and a diffusers DiTTransformer2DModel folder.

--from takes anything `calicache.load_model` reads: an original DiT `.pt`, a calicache `.safetensors`,
a diffusers model (or DiTPipeline) folder, or a shipped model name. --format diffusers writes a
`save_pretrained` folder; --format calicache writes one safetensors file. Without --format, a --to
ending in .safetensors means calicache and anything else a diffusers folder. The written model is
read back and checked on one random input against an independent forward (diffusers' DiT on the
source weights vs calicache's DiT on the written ones); on a mismatch nothing is written.
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
    pos_embed_drift,
    read_diffusers_dit,
    to_diffusers,
    with_sincos_pos_embed,
)
from ..models.dit import DiT
from ..models.io import load_model, save_model, weight_hash
from ..utils import Outputs, check_output, make_temp
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
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output file (diffusers: only config.json and the weights in --to)")
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


def _refuse_mismatch(rel: float) -> None:
    if not rel < CHECK_TOLERANCE:
        raise RuntimeError(f"the written model differs from the source (relative error {rel:.3g}); nothing was "
                           "written. Please report this with the source file's config")


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


DIFFUSERS_FILES = ("config.json", "diffusion_pytorch_model.safetensors")


def _check_outputs(args: argparse.Namespace, target: Path, fmt: str) -> None:
    """Before any work: the output path must be writable, not the source, and (unless --overwrite)
    not hold the files this command writes. Other files in a --to folder are never touched."""
    inputs = [args.source] if Path(args.source).exists() else []
    if fmt == "calicache":
        check_output(target, args.overwrite, "--to", inputs)
        return
    if Path(args.source).is_dir() and target.is_dir() and os.path.samefile(args.source, target):
        raise ValueError(f"--to {target} is the --from folder; write to another folder")
    check_output(target, flag="--to", folder=True)
    for name in DIFFUSERS_FILES:
        check_output(target / name, args.overwrite, "--to", inputs)


def _independent(model: DiT, notes: list[str]):
    """diffusers' DiTTransformer2DModel on `model`'s weights: a forward written by others to check ours
    against; None (with a note) where diffusers cannot express the model."""
    try:
        dmodel = to_diffusers(model)
    except ValueError as e:
        notes.append(f"no independent check: {e}; the written file was compared with the source instead")
        return None
    return lambda x, t, y: dmodel(x, t, y).sample


def run(args: argparse.Namespace) -> int:
    setup(args)
    target = Path(args.target)
    fmt = _output_format(target, args.format)
    _check_outputs(args, target, fmt)
    notes: list[str] = []
    source = Path(args.source)
    if source.is_dir():
        dsource = read_diffusers_dit(source)
        notes += diffusers_differences(dsource)
        model = from_diffusers(dsource)
    else:
        model = load_model(args.source, parse_arch(args.arch))
    model.eval()
    drift = pos_embed_drift(model)
    exact = with_sincos_pos_embed(model) if drift > 0 else model  # what diffusers computes
    if drift > 0:
        effect = _check(model, exact)
        notes.append(f"pos_embed differs from the fixed 2-D sin-cos embedding by up to {drift:.3g} (EMA drift of "
                     f"the original training code); diffusers uses the exact embedding, which changes this model's "
                     f"output by {effect:.3g} (relative L2, one random input)")
    created = not target.exists()
    try:
        with Outputs() as outputs:
            if fmt == "diffusers":
                staging = make_temp(target, directory=True)
                try:
                    to_diffusers(model).save_pretrained(str(staging), safe_serialization=True)
                    notes += list(TO_DIFFUSERS_NOTES)
                    # The written folder through diffusers' own code vs calicache's DiT on the source weights.
                    written = match_original_timesteps(read_diffusers_dit(staging))
                    rel = _check(exact, lambda x, t, y: written(x, t, y).sample)
                    _refuse_mismatch(rel)
                    for f in sorted(staging.iterdir()):
                        os.replace(f, outputs.temp(target / f.name))
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
            else:
                tmp = save_model(model, target, outputs, converted_from=str(args.source))
                written = load_model(tmp)
                reference = _independent(model, notes)
                # calicache's DiT on the written file vs diffusers' forward on the source weights.
                rel = (_check(with_sincos_pos_embed(written), reference) if reference is not None
                       else _check(model, written))
                _refuse_mismatch(rel)
    except BaseException:
        if created and target.is_dir() and not any(target.iterdir()):
            target.rmdir()
        raise
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
