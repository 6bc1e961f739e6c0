"""The whole method in one run: the same seeds and classes with no cache, FORA, ICC, GOC and the
calibrated forecast, plus uncached sampling at ICC's MACs, scored against the uncached samples.

Prints a table (MACs per sample, wall time, speed-ups, PSNR/SSIM vs uncached, class agreement by
the shipped classifier) and writes OUT/demo.png (side by side), OUT/demo.md and OUT/demo.json.
On the shipped model it uses the shipped CD-SVD factors and GOC steps.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ..bench.report import markdown_table, side_by_side
from ..bench.runs import Variant, run_variant, score, warm_up
from ..cache import FORAConfig, ForecastConfig, GOCConfig, ICCConfig, NoCacheConfig, load_config
from ..cache.svd import parse_rank
from ..images import png_bytes
from ..models.io import SHIPPED, load_model, shipped_asset
from ..utils import Outputs, check_output
from .common import add_model_arguments, model_defaults, parse_arch, setup

METHODS = ("none", "fora", "icc", "goc", "forecast", "equal-macs")
COLUMNS = [("name", "configuration", ""), ("steps", "steps", "d"), ("macs_per_sample", "MACs/sample", ",.0f"),
           ("macs_speedup", "MACs speed-up", ".2f"), ("wall_seconds", "wall s", ".2f"),
           ("wall_speedup", "wall speed-up", ".2f"), ("cache_bytes", "cache bytes", ",d"),
           ("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".4f"),
           ("class_agreement", "class agreement", ".1%")]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--num", type=int, default=40, help="samples per configuration")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps")
    p.add_argument("--period", type=int, default=2, help="FORA period (2 = half the calls cached)")
    p.add_argument("--rank", default=None, help="ICC rank (default: the factor file's per-layer ranks)")
    p.add_argument("--factors", default=None, help="CD-SVD factor file (default: the shipped one)")
    p.add_argument("--goc-file", default=None, help="GOC steps file (default: the shipped one for 20 steps)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance (default: the model's recommended)")
    p.add_argument("--config", default=None,
                   help="also run this cache config file (config.save(path)) as one more row")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-classifier", action="store_true", help="skip class agreement")
    p.add_argument("--out", default="runs/demo", help="output folder")
    p.add_argument("--json", action="store_true", help="print the rows as JSON")


def _variants(args: argparse.Namespace, model, factors: str | None, goc_file: str | None) -> list[Variant]:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise ValueError(f"unknown --methods {sorted(unknown)}; choose from {METHODS}")
    rank = parse_rank(args.rank)
    svd = "cd" if factors else "plain"
    icc_kw = dict(period=args.period, rank=rank, svd=svd, factors=factors)
    s, p = args.steps, args.period
    icc_label = f"ICC {svd.upper() if factors else 'plain'}-SVD p={p}"
    out = [Variant(f"no cache, {s} steps", NoCacheConfig(), s, "uncached")]
    if "fora" in methods:
        out.append(Variant(f"FORA p={p}", FORAConfig(period=p), s, "fora"))
    if "icc" in methods or "equal-macs" in methods:
        out.append(Variant(icc_label, ICCConfig(**icc_kw), s, "icc"))
    if "goc" in methods:
        if goc_file is None and s != 20:
            print(f"demo: skipping GOC: no steps file for {s} steps (find one with `calicache calibrate --method goc "
                  f"--steps {s}`)")
        else:
            out.append(Variant(f"GOC p={p}", GOCConfig(period=p, steps_file=goc_file), s, "goc"))
    if "forecast" in methods:
        out.append(Variant(f"forecast + {icc_label[4:]}", ForecastConfig(**icc_kw), s, "forecast"))
    if args.config:
        config = load_config(args.config)
        out.append(Variant(f"{config.method} from {Path(args.config).name}", config, s, "config"))
    return out


def run(args: argparse.Namespace) -> int:
    setup(args)
    for name in ("demo.png", "demo.md", "demo.json"):  # the demo replaces its own files; checked before work
        check_output(Path(args.out) / name, overwrite=True)
    model = load_model(args.model, parse_arch(args.arch))
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else model_defaults(model).get("cfg_scale", 1.0)
    shipped = args.model in SHIPPED
    factors = args.factors or (str(shipped_asset(f"{args.model}-cd.safetensors")) if shipped else None)
    goc_file = args.goc_file
    if goc_file is None and shipped and args.steps == 20 and args.period == 2:
        goc_file = str(shipped_asset(f"{args.model}-goc20.json"))
    variants = _variants(args, model, factors, goc_file)
    kw = dict(num=args.num, cfg_scale=cfg_scale, seed=args.seed, batch_size=args.batch_size)
    warm_up(model, args.num, cfg_scale, args.batch_size)
    results = [run_variant(model, v, **kw) for v in variants]
    if "equal-macs" in args.methods.split(","):
        # Uncached sampling with as many steps as ICC's MACs buy: is caching better than just fewer steps?
        icc = next(r for r in results if r.variant.family == "icc")
        eq_steps = max(1, int(icc.macs["total"] // icc.macs["full_call"]))
        eq = Variant(f"no cache, {eq_steps} steps (ICC's MACs)", NoCacheConfig(), eq_steps, "fewer-steps")
        results.append(run_variant(model, eq, **kw))
        if "icc" not in args.methods.split(","):
            results.remove(icc)
    classifier = None
    if not args.no_classifier and model.config.num_classes == 10 and model.config.input_size == 28:
        from ..training.classifier import load_classifier

        classifier = load_classifier()
    score(results, results[0], classifier)
    rows = [r.row() for r in results]
    out = Path(args.out)
    table = markdown_table(rows, COLUMNS)
    settings = (f"model `{args.model}`, {args.num} samples (classes index % 10, seed {args.seed}), DDIM "
                f"{args.steps} steps (adm spacing), guidance {cfg_scale}, FORA period {args.period}, "
                f"{torch.get_num_threads()} CPU threads")
    md = (f"# calicache demo\n\n{settings}.\n\nPSNR/SSIM are against the uncached {args.steps}-step samples "
          f"(same seeds); MACs per sample exclude the guidance doubling.\n\n{table}\n\n![side by side](demo.png)\n")
    with Outputs() as outputs:  # the three files are replaced together
        outputs.write(out / "demo.png", png_bytes(side_by_side(results)))
        outputs.write(out / "demo.md", md)
        outputs.write(out / "demo.json", json.dumps({"settings": settings, "rows": rows}, indent=2))
    print(json.dumps(rows, indent=2) if args.json else f"\n{settings}\n\n{table}\n\nwrote {out}/demo.png, demo.md")
    return 0
