"""Sample images from a DiT (or a diffusers pipeline, --pipeline) and write samples.npz, grid.png and report.json.

samples.npz holds `arr_0` (uint8 NHWC, 3 channels, as the ADM evaluator reads it) and `arr_1`
(class labels). Every file is written under a temporary name and renamed, so a failed run
leaves no partial output.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import distributed
from ..cache import apply_cache, get_engine
from ..cache.macs import count_macs
from ..images import decode_latents, to_uint8
from ..models.io import load_model
from ..sampling import _class_labels, default_steps, sample
from . import sample_pipeline
from .common import (
    add_cache_arguments,
    add_distributed_arguments,
    add_model_arguments,
    add_sampling_arguments,
    cache_config_from_args,
    check_sample_outputs,
    clip_flag,
    model_defaults,
    parse_arch,
    parse_classes,
    setup,
    write_sample_outputs,
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    add_sampling_arguments(p)
    add_cache_arguments(p)
    p.add_argument("--num", type=int, default=16, help="number of samples")
    p.add_argument("--batch-size", type=int, default=None, help="samples per batch; all in one batch if not given")
    p.add_argument("--classes", default=None,
                   help="comma-separated class labels, repeated over the samples; index %% classes if not given")
    p.add_argument("--vae", default=None, help="diffusers AutoencoderKL (path or hub id) for latent models")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true",
                   help="replace samples.npz, grid.png and report.json in --out (nothing else there is touched)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_distributed_arguments(p)
    sample_pipeline.add_arguments(p)  # --pipeline DIR --prompt/--prompt-embeds: sampling through diffusers


def run(args: argparse.Namespace) -> int:
    check_sample_outputs(args)  # before any work: a bad --out must not cost a sampling run
    if args.nproc_per_node is not None:  # this process starts the workers, which run the same command
        return distributed.launch(args.nproc_per_node, args._argv)
    if args.pipeline is not None:
        return sample_pipeline.run(args)
    if args.prompt is not None or args.prompt_embeds is not None:
        raise ValueError("--prompt and --prompt-embeds need --pipeline DIR (a PixArt pipeline folder)")
    setup(args)
    model = load_model(args.model, parse_arch(args.arch)).to(distributed.device())  # CPU outside torchrun
    defaults = model_defaults(model)
    steps = default_steps(model, args.steps)
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else defaults.get("cfg_scale", 1.0)
    classes = parse_classes(args.classes)
    if model.config.in_channels not in (1, 3) and args.vae is None:
        raise ValueError(f"{args.model} works on {model.config.in_channels}-channel latents: pass --vae "
                         "(e.g. stabilityai/sd-vae-ft-ema) to decode them")
    config = cache_config_from_args(args)
    period = getattr(config, "period", None)
    if getattr(config, "method", "none") != "none" and period is not None and period > steps:
        raise ValueError(f"--period {period} is larger than --steps {steps}: every call would be full, so "
                         f"--method {config.method} would cache nothing; choose a period of at most {steps}")
    apply_cache(model, config)
    macs = count_macs(model, None, steps, cfg_scale)
    out = Path(args.out)
    kwargs = dict(steps=steps, sampler=args.sampler, cfg_scale=cfg_scale, classes=classes, seed=args.seed,
                  spacing=args.spacing, eta=args.eta, cfg_channels=args.cfg_channels,
                  clip_denoised=clip_flag(args))
    if distributed.launched():  # torchrun: every rank samples its batches as shards, rank 0 merges them
        from ..shards import sample_command

        result = sample_command(args, model, steps, cfg_scale, kwargs)
        if result is None:
            return 0  # only rank 0 writes the outputs
        images, labels, world, wall = result
    else:
        t0 = time.perf_counter()
        x = sample(model, args.num, batch_size=args.batch_size, progress=True, **kwargs)
        wall = time.perf_counter() - t0
        if args.vae:
            x = decode_latents(x, args.vae)
        images = to_uint8(x)
        labels = _class_labels(classes, args.num, model.config.num_classes).numpy()
        world = 1
    report = {
        "model": str(args.model), "num": args.num, "steps": steps, "sampler": args.sampler,
        "spacing": args.spacing, "cfg_scale": cfg_scale, "cfg_channels": args.cfg_channels, "eta": args.eta,
        "seed": args.seed, "batch_size": args.batch_size or args.num, "vae": args.vae,
        "model_calls_per_batch": steps, "wall_seconds": round(wall, 3),
        "threads": torch.get_num_threads(), "world_size": world,
        "method": config.method, "cache_config": config.to_dict(),
        "macs": macs, "cached_ratio": macs["cached_ratio"],
        "cache_bytes": get_engine(model).stats()["cache_bytes"],
    }
    write_sample_outputs(out, images, labels, report)
    print(json.dumps(report, indent=2) if args.json else f"wrote {args.num} samples to {out} in {wall:.1f}s")
    return 0
