"""Calibrate a model once for caching: ICC's low-rank factors (plain/CA/CD SVD) or GOC's compensation steps.

`--method icc` (default) gathers channel statistics on --num training images and writes the
scaled-SVD factors to --out (safetensors, tied to the model's weights); sample with
`calicache sample --method icc --svd cd --factors OUT`. `--method goc` finds GOC's compensated
calls from uncached runs and writes them to --out.

Under torchrun every rank computes its share of the batches, the statistics are summed over the
ranks, and rank 0 writes --out (docs/distributed.md).

PixArt (text-to-image) calibrates from prompt embeddings: `--pipeline DIR --prompt-embeds FILE`
(calibrate_pipeline, one process).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .. import distributed
from ..cache.svd import SCALES, SVD_KINDS, parse_rank
from ..diffusion.samplers import SAMPLERS
from ..diffusion.schedule import SPACINGS
from ..models.io import SHIPPED, load_model, shipped_path, weight_hash
from ..sampling import default_steps
from ..shards import settings_digest
from ..utils import check_output
from . import calibrate_pipeline
from .common import add_distributed_arguments, add_model_arguments, model_defaults, parse_arch, setup

# DiT-only options: None when not given, so that a pipeline (own scheduler, ICC only) refuses any value.
DIT_DEFAULTS = {"sampler": "ddim", "spacing": "adm", "period": 2, "forecast_weight": 1.0, "threshold": 0.0}

# Options each rank may set for itself; every other option must be the same on every rank.
RANK_LOCAL_OPTIONS = frozenset({"out", "overwrite", "json", "threads", "model", "dist_timeout", "nproc_per_node",
                                "command"})


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--method", choices=("icc", "goc"), default="icc", help="what to calibrate")
    p.add_argument("--out", required=True, help="output file (ICC: factors.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out (never a file it reads)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's recommended, "
                   "else 50; PixArt: the pipeline's, 20)")
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="DiT sampler (default: ddim)")
    p.add_argument("--spacing", choices=SPACINGS, default=None, help="DiT timestep spacing (default: adm)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num", type=int, default=None, help="calibration images (ICC, default 256) or samples (GOC, "
                   "default 32); PixArt: CA pairs or CD sampling runs (default: every prompt row)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--cfg-scale", type=float, default=None,
                   help="guidance while calibrating (ICC default 1 = none, as the authors; GOC default: the "
                        "model's recommended)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    add_distributed_arguments(p)
    g = p.add_argument_group("ICC")
    g.add_argument("--data", default=None, help="fashion-mnist (the default for DiTs), an image folder or an .npz "
                   "(arr_0 images); PixArt --svd ca: images encoded by the pipeline's VAE")
    g.add_argument("--data-dir", default=None, help="folder with the Fashion-MNIST IDX files")
    g.add_argument("--svd", choices=SVD_KINDS, default="cd",
                   help="cd: channel-difference (the paper's best), ca: channel-activation, cf: forecast residuals "
                        "(for --method forecast at sampling), plain: unscaled")
    g.add_argument("--forecast-weight", type=float, default=None,
                   help="CF: the forecast weight w the factors will be used with (default: 1)")
    g.add_argument("--scale", choices=SCALES, default="both", help="which side the CA/CD scaling weighs")
    g.add_argument("--rank", default="128", help="uniform rank (clamped to each weight) or 'full'")
    g.add_argument("--trajectory", choices=("uncached", "cached"), default="uncached",
                   help="where CD statistics are taken: uncached sampler steps (the paper), or the cached sampler's "
                        "own runs, refined over --trajectory-rounds (trajectory-consistent calibration, TCC; "
                        "ICC at --period, guidance --cfg-scale, default the model's)")
    g.add_argument("--trajectory-rounds", type=int, default=1, help="TCC rounds (each samples with the last factors)")
    g.add_argument("--trajectory-num", type=int, default=64, help="TCC: cached sampling runs per round")
    g.add_argument("--vae", default=None, help="diffusers AutoencoderKL (path or hub id) for latent models; "
                   "PixArt: encodes --data instead of the pipeline's VAE")
    p.add_argument("--period", type=int, default=None,
                   help="the FORA period sampling will use (GOC's compensation; CF's forecast distance; default: 2)")
    g = p.add_argument_group("GOC")
    g.add_argument("--threshold", type=float, default=None, help="GOC inflection threshold (default: 0)")
    calibrate_pipeline.add_arguments(p)  # --pipeline DIR --prompt-embeds FILE: PixArt (text-to-image)


def check_out(args: argparse.Namespace) -> None:
    """Before any work: --out must be a writable file path, not a folder, not one of the inputs (the
    model above all), and not an existing file unless --overwrite."""
    inputs = [v for k, v in vars(args).items() if k != "out" and isinstance(v, str) and Path(v).is_file()]
    if args.model in SHIPPED:
        inputs.append(str(shipped_path(args.model)))
    check_output(args.out, args.overwrite, "--out", inputs)


def run(args: argparse.Namespace) -> int:
    check_out(args)
    if args.nproc_per_node is not None:  # this process starts the workers, which run the same command
        return distributed.launch(args.nproc_per_node, args._argv)
    if calibrate_pipeline.wanted(args):
        return calibrate_pipeline.run(args)
    setup(args)
    # Outside torchrun both contexts do nothing; under it an error on any rank ends every rank.
    with distributed.process_group(args.dist_timeout) as world, distributed.guard():
        model = load_model(args.model, parse_arch(args.arch)).to(distributed.device())
        if world > 1:  # statistics of different runs must not be summed
            options = {k: v for k, v in vars(args).items() if k not in RANK_LOCAL_OPTIONS and not k.startswith("_")}
            distributed.check_same(settings_digest({"options": options, "weights": weight_hash(model)}),
                                   "the calibration options and model weights")
        return _calibrate(args, model, world)


def _calibrate(args: argparse.Namespace, model, world: int) -> int:
    """Every rank gathers its share and gets the same result (the factorisation of the summed
    statistics is cheap and deterministic, so no rank waits for a broadcast); rank 0 writes it."""
    defaults = model_defaults(model)
    steps = default_steps(model, args.steps)
    for name, value in DIT_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    t0 = time.perf_counter()
    if args.method == "goc":
        from ..calibration.goc import find_goc_steps

        cfg_scale = args.cfg_scale if args.cfg_scale is not None else defaults.get("cfg_scale", 1.0)
        found = find_goc_steps(model, steps, sampler=args.sampler, spacing=args.spacing, num=args.num or 32,
                               cfg_scale=cfg_scale, seed=args.seed, threshold=args.threshold, period=args.period,
                               batch_size=args.batch_size, progress=True)
        if not distributed.is_main():
            return 0
        found.save(args.out)
        report = {"method": "goc", "model": str(args.model), "out": args.out, "steps": steps,
                  "cfg_scale": cfg_scale, "threshold": found.threshold, "cosines": found.cosines,
                  "inflections": found.inflections, "compensated": found.steps,
                  "world_size": world, "wall_seconds": round(time.perf_counter() - t0, 2)}
        if args.json:
            print(json.dumps(report, indent=2))
        else:  # the per-call cosines the steps were chosen from, then where they went
            print(found.table())
            print(f"compensated calls {','.join(map(str, found.steps)) or 'none'}; wrote GOC steps to {args.out} "
                  f"in {report['wall_seconds']:.1f}s")
        return 0

    from ..cache.macs import count_macs
    from ..cache.methods import ICCConfig
    from ..calibration.calibrate import calibrate

    cached = args.trajectory == "cached"
    cfg_scale = (defaults.get("cfg_scale", 1.0) if cached else 1.0) if args.cfg_scale is None else args.cfg_scale
    factors = calibrate(model, args.data or "fashion-mnist", svd=args.svd, rank=parse_rank(args.rank),
                        num=args.num or 256,
                        batch_size=args.batch_size, steps=steps, sampler=args.sampler, spacing=args.spacing,
                        scale=args.scale, seed=args.seed, vae=args.vae, cfg_scale=cfg_scale,
                        progress=distributed.is_main(),
                        data_dir=args.data_dir, period=args.period, forecast_weight=args.forecast_weight,
                        trajectory=args.trajectory, trajectory_rounds=args.trajectory_rounds,
                        trajectory_num=args.trajectory_num)
    wall = time.perf_counter() - t0
    if not distributed.is_main():
        return 0
    factors.save(args.out)
    macs = count_macs(model, ICCConfig(svd=args.svd, factors=factors), steps=2)
    ranks = list(factors.ranks().values())
    report = {
        "method": "icc", "model": str(args.model), "out": args.out, "svd": args.svd, "scale": args.scale,
        "data": factors.meta["data"], "num": factors.meta["num"], "steps": steps, "sampler": args.sampler,
        "spacing": args.spacing, "seed": args.seed, "cfg_scale": cfg_scale,
        "trajectory": args.trajectory, **({"trajectory_rounds": args.trajectory_rounds, "period": args.period,
                                           "trajectory_num": args.trajectory_num} if cached else {}),
        "rank_min": min(ranks), "rank_max": max(ranks), "rank_mean": round(sum(ranks) / len(ranks), 2),
        "calibrated_call_macs": macs["per_call"][1], "full_call_macs": macs["full_call"],
        "calibrated_call_share": round(macs["per_call"][1] / macs["full_call"], 4),
        "world_size": world, "wall_seconds": round(wall, 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {args.svd.upper()} factors (ranks {min(ranks)}-{max(ranks)}, a calibrated call costs "
              f"{report['calibrated_call_share']:.1%} of a full call) to {args.out} in {wall:.1f}s")
    return 0
