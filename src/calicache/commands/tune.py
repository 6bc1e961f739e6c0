"""Find the best cache configuration for a compute budget: `calicache tune --budget 0.5 --out DIR`.

Searches method (FORA, ICC, the calibrated forecast, GOC at period 2), schedule (period, warm-up,
cool-down, always-full first/last blocks, or listed full calls), rank and weight for the best PSNR against uncached
sampling on --num tuning seeds, among configurations whose MACs per sample are at most --budget x
the uncached run's. Writes DIR/config.json (+ factors.safetensors), report.json (frontier, every
configuration scored, the chosen one's PSNR on --heldout other seeds) and report.md. Several
budgets (--budget 0.35,0.5,0.65) share the reference, the factors and the scores: DIR/budget-B/.

PixArt pipelines: --pipeline DIR --prompt-embeds FILE (TCC is not searched there).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..tuning.space import METHODS, Space
from .common import add_model_arguments, parse_arch, setup


def _numbers(kind: type, what: str):
    def parse(text: str) -> tuple:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{what}: comma-separated numbers, got {text!r}") from e
    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--pipeline", default=None, help="PixArt pipeline folder instead of --model (with --prompt-embeds)")
    p.add_argument("--prompt-embeds", default=None, help="PixArt: prompt embeddings file, as `calicache sample` takes")
    p.add_argument("--budget", type=_numbers(float, "--budget"), default=(0.5,),
                   help="MACs per sample as a share of uncached sampling's; comma-separated for several")
    p.add_argument("--budget-seconds", type=float, default=None,
                   help="also require measured sampling seconds per sample (at the tuning batch) <= this")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's, else 20)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance (default: the model's / pipeline's)")
    p.add_argument("--data", default="fashion-mnist", help="calibration images as `calibrate` takes them ('none': "
                   "plain SVD factors)")
    p.add_argument("--calibration-num", type=int, default=256, help="calibration images")
    p.add_argument("--methods", default=",".join(METHODS), help="methods to search, comma-separated")
    p.add_argument("--periods", type=_numbers(int, "--periods"), default=None, help="FORA periods to search")
    p.add_argument("--rank", type=int, default=48, help="the highest ICC/forecast rank searched")
    p.add_argument("--num", type=int, default=32, help="tuning seeds")
    p.add_argument("--heldout", type=int, default=64, help="held-out seeds the chosen configuration is scored on")
    p.add_argument("--seed", type=int, default=1, help="tuning seed set")
    p.add_argument("--heldout-seed", type=int, default=0, help="held-out seed set (must differ from --seed)")
    p.add_argument("--local", type=int, default=24, help="local-search evaluations after the coarse rungs")
    p.add_argument("--no-trajectory", action="store_true", help="do not try trajectory-consistent (TCC) factors")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def run(args: argparse.Namespace) -> int:
    from ..tuning import make_tuner, tune

    setup(args)
    if any(not 0 < b <= 1 for b in args.budget):
        raise ValueError(f"--budget is a share of uncached MACs, 0 < B <= 1; got {list(args.budget)}")
    if args.seed == args.heldout_seed:
        raise ValueError("--seed and --heldout-seed must differ: held-out seeds are the ones not tuned on")
    methods = tuple(m for m in args.methods.split(",") if m)
    space = Space() if args.periods is None else Space(periods=args.periods)
    common = dict(cfg_scale=args.cfg_scale, methods=methods, num=args.num, seed=args.seed, rank=args.rank,
                  batch_size=args.batch_size, space=space, progress=True)
    if args.pipeline is not None:
        from ..data.prompts import load_prompt_embeds, text_width
        from .sample_pipeline import load_pipeline

        if args.prompt_embeds is None:
            raise ValueError("--pipeline needs --prompt-embeds FILE (precomputed prompt embeddings)")
        model = load_pipeline(args.pipeline, text_encoder=False)
        cfg = 4.5 if args.cfg_scale is None else args.cfg_scale
        embeds = load_prompt_embeds(args.prompt_embeds, cfg > 1, text_width(model.transformer))
        steps = args.steps or 20
        tuner = make_tuner(model, steps, prompt_embeds=embeds, **common)
    else:
        from ..models.io import load_model

        model = load_model(args.model, parse_arch(args.arch))
        steps = args.steps or getattr(model, "calicache_defaults", {}).get("steps", 20)
        data = None if args.data == "none" else args.data
        tuner = make_tuner(model, steps, data=data, calibration_num=args.calibration_num,
                           trajectory=not args.no_trajectory, **common)
    reports = {}
    for budget in args.budget:
        out = Path(args.out) if len(args.budget) == 1 else Path(args.out) / f"budget-{budget:g}"
        result = tune(model, steps, budget, tuner=tuner, heldout=args.heldout, heldout_seed=args.heldout_seed,
                      local=args.local, budget_seconds=args.budget_seconds, out=out, progress=True)
        reports[budget] = result.report()
        if not args.json:
            c = reports[budget]["chosen"]
            print(f"budget {budget:g}: {c['label']} ({c['macs_ratio']:.3f} of uncached MACs), PSNR {c['psnr']:.2f} dB "
                  f"on {args.num} tuning seeds, {c['heldout_psnr']:.2f} dB on {args.heldout} held-out; wrote {out}")
    if args.json:
        out = reports[args.budget[0]] if len(args.budget) == 1 else {str(b): r for b, r in reports.items()}
        print(json.dumps(out, indent=2))
    return 0
