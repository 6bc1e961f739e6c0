"""Benchmark calicache's cache methods and peer caches side by side at matched compute on one model.

Every configuration samples the same seeds and classes. The grid: uncached at S steps (the reference)
and at fewer steps (equal-MACs baselines: S/4, S/3, S/2, 2S/3), FORA (periods 2, 3, 4), ICC with
plain / CA / CD factors at uniform ranks (C/18, C/9, C/4) and CA / CD with per-layer ranks under the
same MACs budgets, GOC (steps found for this model), the calibrated forecast, and the peers on the same
model: cache-dit's DBCache with and without TaylorSeer, diffusers' FirstBlockCache and TaylorSeer,
each set to FORA's share of cached calls (see docs/bench.md).

Reports MACs per sample, wall time, speed-ups, peak RSS growth, PSNR/SSIM to the uncached samples, and,
for Fashion-MNIST models, class agreement and the Frechet distance of classifier features to the test
set (Inception FID with --fid). Writes OUT/bench.md, OUT/bench.json, OUT/quality.png (quality vs MACs,
one line per family) and OUT/side_by_side.png (one MACs level).
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import torch

from ..bench.grid import FAMILIES, GridOptions, domain_inputs, plan_grid, run_grid
from ..bench.report import COLUMNS, jsonable, markdown_table, mmacs, replot, write_report
from ..bench.runs import inception_fid, score
from ..cache import load_config
from ..models.io import load_model
from ..utils import check_output
from .common import add_model_arguments, model_defaults, parse_arch, setup


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--steps", type=int, default=None, help="DDIM steps of the reference run (default 20; --quick 6)")
    p.add_argument("--num", type=int, default=None, help="samples per configuration (default 64; --quick 8)")
    p.add_argument("--out", default="runs/bench", help="output folder")
    p.add_argument("--quick", action="store_true", help="a tiny grid (one setting per family) for smoke tests")
    p.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                   help="run the peer caches (cache-dit, diffusers hooks) where installed")
    p.add_argument("--families", default=",".join(FAMILIES), help=f"comma-separated subset of {','.join(FAMILIES)}")
    p.add_argument("--factors-dir", default=None,
                   help="folder with CA/CD factor files (ca-full.safetensors, cd-full.safetensors, ...; "
                        "a previous run's OUT/factors); missing ones are calibrated on Fashion-MNIST for pixel models")
    p.add_argument("--config", default=None, help="also run this cache config file (config.save(path))")
    p.add_argument("--goc-file", default=None, help="GOC steps file for --steps at period 2 (default: found now)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance (default: the model's recommended, else 1)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per sampling run (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (calibration and the FD reference)")
    p.add_argument("--no-classifier", action="store_true", help="skip class agreement and the classifier FD")
    p.add_argument("--fid", action="store_true", help="Inception FID against --fid-ref (needs Inception weights)")
    p.add_argument("--fid-ref", default="fashion-mnist-test", help="FID reference: an npz batch or fashion-mnist-test")
    p.add_argument("--inception", default=None, help="Inception-v3 weights file for --fid")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")
    p.add_argument("--replot", action="store_true",
                   help="only redraw OUT/quality.png from OUT/bench.json (a previous run's numbers; no sampling)")
    p.set_defaults(_bench_parser=p)


def command_line(args: argparse.Namespace) -> str:
    """`calicache bench` with every option that differs from its default: the run, reproducibly."""
    parts = ["calicache", "bench"]
    for action in args._bench_parser._actions:
        if not action.option_strings or action.dest == "help":
            continue
        value = getattr(args, action.dest)
        if value == action.default and action.dest not in ("model", "steps", "num"):
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            parts.append(action.option_strings[0] if value else action.option_strings[1])
        elif action.nargs == 0:
            parts.append(action.option_strings[0])
        elif value is not None:
            parts += [action.option_strings[0], str(value)]
    return shlex.join(parts)


def _options(args: argparse.Namespace, model) -> GridOptions:
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = set(families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown --families {sorted(unknown)}; choose from {','.join(FAMILIES)}")
    if not args.peers:
        families = tuple(f for f in families if f != "peers")
    steps = args.steps if args.steps is not None else (6 if args.quick else 20)
    num = args.num if args.num is not None else (8 if args.quick else 64)
    if steps < 1 or num < 2:
        raise ValueError(f"need --steps >= 1 and --num >= 2 (a covariance needs two samples), got {steps} and {num}")
    factors_dir = Path(args.factors_dir) if args.factors_dir else None
    if factors_dir is not None and not factors_dir.is_dir():
        raise FileNotFoundError(f"--factors-dir {factors_dir} is not a folder; give a previous run's OUT/factors")
    cfg = args.cfg_scale if args.cfg_scale is not None else model_defaults(model).get("cfg_scale", 1.0)
    return GridOptions(steps=steps, num=num, cfg_scale=float(cfg), seed=args.seed, batch_size=args.batch_size,
                       quick=args.quick, families=families, factors_dir=factors_dir, goc_file=args.goc_file,
                       data_dir=args.data_dir, out=Path(args.out),
                       config=load_config(args.config) if args.config else None,
                       config_name=Path(args.config).name if args.config else "config")


def run(args: argparse.Namespace) -> int:
    if args.replot:
        print(f"wrote {replot(Path(args.out))}")
        return 0
    t_start = time.perf_counter()
    setup(args)
    model = load_model(args.model, parse_arch(args.arch))
    opts = _options(args, model)
    for name in ("bench.md", "bench.json", "quality.png", "side_by_side.png"):  # bench replaces its own reports
        check_output(opts.out / name, overwrite=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    grid = plan_grid(model, opts)
    t_runs = time.perf_counter()
    results = run_grid(model, grid, opts)
    grid.seconds["sampling"] = time.perf_counter() - t_runs
    t_metrics = time.perf_counter()
    classifier, test_images = (None, None) if args.no_classifier else domain_inputs(model, args.data_dir, grid.notes)
    fd_range = score(results, results[0], classifier, test_images)
    if args.fid:
        why = inception_fid(results, args.fid_ref, args.inception, args.data_dir)
        if why:
            grid.notes.append(why)
    grid.seconds["metrics"] = time.perf_counter() - t_metrics
    settings = (f"Model `{args.model}` (width {model.config.hidden_size}, depth {model.config.depth}), {opts.num} "
                f"samples per configuration (classes index % {model.config.num_classes}, seed {opts.seed}), DDIM "
                f"{opts.steps} steps (adm spacing), guidance {opts.cfg_scale}, {torch.get_num_threads()} CPU threads.")
    grid.seconds["total"] = time.perf_counter() - t_start
    report = write_report(opts.out, command_line(args), settings, grid.notes, results, opts.steps, opts.num,
                          grid.seconds, fd_range)
    if args.json:
        print(json.dumps(jsonable(report), indent=2))
    else:
        table = markdown_table(mmacs(report["rows"]), COLUMNS[:11])
        print(f"\n{report['command']}\n\n{table}\n\n" + "\n".join(f"note: {n}" for n in grid.notes)
              + f"\nwrote {opts.out}/bench.md, bench.json, quality.png, side_by_side.png "
              f"({grid.seconds['total']:.0f} s)")
    return 0
