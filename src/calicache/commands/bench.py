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
import math
import shlex
import time
from pathlib import Path

import torch

from ..bench.grid import (
    FAMILIES,
    GridOptions,
    domain_fd,
    inception_fid,
    is_fashion_mnist_model,
    pick_level,
    plan_grid,
    run_grid,
    winners,
)
from ..bench.plot import PALETTE, line_chart, side_by_side_charts
from ..bench.runs import markdown_table, score, side_by_side
from ..cache import load_config
from ..images import png_bytes
from ..models.io import load_model
from ..utils import Outputs, check_output
from .common import add_model_arguments, model_defaults, parse_arch, setup

COLUMNS = [("name", "configuration", ""), ("steps", "steps", "d"), ("mmacs", "MMACs/sample", ",.1f"),
           ("macs_speedup", "MACs speed-up", ".2f"), ("cached_ratio", "cached", ".0%"),
           ("wall_seconds", "wall s", ".2f"), ("wall_speedup", "wall speed-up", ".2f"),
           ("peak_rss_mb", "peak RSS +MB", ".1f"), ("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".4f"),
           ("class_agreement", "class agr.", ".1%"), ("fd", "FD (classifier)", ".2f"), ("fid", "FID", ".2f")]
WINNER_COLUMNS = [("level", "MACs level", ""), ("mmacs", "MMACs/sample", ",.1f"), ("candidates", "configs", "d"),
                  ("by_psnr", "best PSNR", ""), ("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".4f"),
                  ("by_fd", "best FD", ""), ("fd", "FD", ".2f")]


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


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # "inf": PSNR of the reference against itself
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v


def _mmacs(rows: list[dict]) -> list[dict]:
    """Rows with MACs in millions for the tables (the JSON keeps exact integers)."""
    return [{**r, "mmacs": r.get("macs_per_sample", r.get("macs")) / 1e6} for r in rows]


def _chart(rows: list[dict], key: str, label: str):
    families = list(dict.fromkeys(r["family"] for r in rows))
    colours = {f: PALETTE[i % len(PALETTE)] for i, f in enumerate(families)}
    series: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        if r.get(key) is not None:
            series.setdefault(r["family"], []).append((r["macs_per_sample"] / rows[0]["macs_per_sample"],
                                                       float(r[key])))
    return line_chart(series, f"{label} vs MACs", "MACs per sample / uncached", label, colours=colours)


def _markdown(command: str, settings: str, notes: list[str], rows: list[dict], wins: list[dict],
              side_level: str) -> str:
    families = list(dict.fromkeys(r["family"] for r in rows))
    columns = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in _mmacs(rows))]  # no all-n/a columns
    parts = [f"# calicache bench\n\n```\n{command}\n```\n\n{settings}\n",
             "MACs per sample follow the papers' convention (linear layers, attention matmuls, adaLN, embeddings; "
             "no guidance doubling): calicache counts its own (`count_macs`), the peers are measured with torch's "
             "flop counter on the diffusers model, which also counts diffusers' per-block copies of the "
             "timestep/label embedders. `cached` is the share of (call, branch) pairs not computed. Peak RSS is the "
             "growth of the process's resident set during the run (sampled every 5 ms; a lower bound). PSNR/SSIM "
             "are against the uncached samples of the same seeds; FD is the Frechet distance of the Fashion-MNIST "
             "classifier's features to the test set.\n"]
    if notes:
        parts.append("## Notes\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    for fam in families:
        fam_rows = sorted((r for r in rows if r["family"] == fam), key=lambda r: r["macs_per_sample"])
        parts.append(f"## {fam}\n\n{markdown_table(_mmacs(fam_rows), columns)}\n")
    parts.append("## Winner per MACs level\n\nAmong the configurations costing at most the MACs of uncached sampling "
                 f"with that many steps.\n\n{markdown_table(_mmacs(wins), WINNER_COLUMNS)}\n")
    parts.append(f"![quality vs MACs](quality.png)\n\nSide by side at {side_level}:\n\n![side by side]"
                 "(side_by_side.png)\n")
    return "\n".join(parts)


def run(args: argparse.Namespace) -> int:
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
    classifier = reference = None
    if args.no_classifier:
        pass
    elif not is_fashion_mnist_model(model):
        grid.notes.append("class agreement and classifier FD skipped: the classifier is for 28x28 one-channel "
                          "10-class (Fashion-MNIST) models")
    else:
        from ..data.fashion_mnist import load_fashion_mnist
        from ..training.classifier import load_classifier

        classifier = load_classifier()
        try:
            reference = load_fashion_mnist("test", args.data_dir)[0]
        except (FileNotFoundError, ValueError) as e:
            grid.notes.append(f"classifier FD skipped: {e}")
    score(results, results[0], classifier)
    if reference is not None:
        domain_fd(results, classifier, reference)
    if args.fid:
        why = inception_fid(results, args.fid_ref, args.inception, args.data_dir)
        if why:
            grid.notes.append(why)
    grid.seconds["metrics"] = time.perf_counter() - t_metrics
    rows = [r.row() for r in results]
    ref_macs = rows[0]["macs_per_sample"]
    levels = [(f"{r['steps']} steps", r["macs_per_sample"]) for r in rows if r["family"] == "fewer steps"]
    wins = winners(rows, levels + [(f"{opts.steps} steps (all)", ref_macs)])
    side_macs = levels[len(levels) // 2][1] if levels else ref_macs // 2
    picked = pick_level(results, side_macs)
    charts = [_chart(rows, "psnr", "PSNR dB to uncached")]
    charts.append(_chart(rows, "fd", "FD (classifier) to test set") if any(r.get("fd") is not None for r in rows)
                  else _chart(rows, "ssim", "SSIM to uncached"))
    command = command_line(args)
    settings = (f"Model `{args.model}` (width {model.config.hidden_size}, depth {model.config.depth}), {opts.num} "
                f"samples per configuration (classes index % {model.config.num_classes}, seed {opts.seed}), DDIM "
                f"{opts.steps} steps (adm spacing), guidance {opts.cfg_scale}, {torch.get_num_threads()} CPU threads.")
    side_level = f"about {side_macs / 1e6:,.1f} MMACs per sample (the reference first, then each family's closest)"
    grid.seconds["total"] = time.perf_counter() - t_start
    report = {"command": command, "settings": settings, "notes": grid.notes, "rows": rows, "winners": wins,
              "seconds": {k: round(v, 1) for k, v in grid.seconds.items()},
              "side_by_side": [r.variant.name for r in picked]}
    with Outputs() as outputs:  # the four report files are replaced together
        outputs.write(opts.out / "side_by_side.png", png_bytes(side_by_side(picked)))
        outputs.write(opts.out / "quality.png", png_bytes(side_by_side_charts(charts)))
        outputs.write(opts.out / "bench.md", _markdown(command, settings, grid.notes, rows, wins, side_level))
        outputs.write(opts.out / "bench.json", json.dumps(_jsonable(report), indent=2))
    if args.json:
        print(json.dumps(_jsonable(report), indent=2))
    else:
        table = markdown_table(_mmacs(rows), COLUMNS[:10])
        print(f"\n{command}\n\n{table}\n\n" + "\n".join(f"note: {n}" for n in grid.notes)
              + f"\nwrote {opts.out}/bench.md, bench.json, quality.png, side_by_side.png "
              f"({grid.seconds['total']:.0f} s)")
    return 0

