"""PSNR against the uncached samples for every cache method on one model (the issue tables).

    python benchmarks/fidelity_table.py --model fmnist-dit --num 100 --out docs/benchmarks/fidelity.json

Factor files are made on the fly with calicache.calibrate (Fashion-MNIST, 256 images) for plain,
CA and CD SVD at two ranks (and CA/CD scaled on the input or the output side only,
the paper's Table 4 ablation), and CF (forecast residuals, per steps and period) for the
forecast; GOC runs with the published steps (20 steps only) and with steps found by calicache's
finder. The peers cache-dit DBCache + TaylorSeer and diffusers' TaylorSeer hook run on the
converted transformer at the same cached-call share (skipped with a note when not installed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import calicache
from calicache.bench.peers import Peer, missing, run_peer
from calicache.bench.report import markdown_table
from calicache.bench.runs import Variant, run_variant, score
from calicache.cache import FORAConfig, ForecastConfig, GOCConfig, ICCConfig, NoCacheConfig
from calicache.calibration.goc import find_goc_steps
from calicache.commands.common import model_defaults


def factor_file(model, path: Path, steps: int, **kw) -> str:
    """Factors calibrated on 256 Fashion-MNIST images, made once and reused from `path`."""
    if not path.exists():
        calicache.calibrate(model, "fashion-mnist", num=256, steps=steps, **kw).save(path)
    return str(path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--num", type=int, default=100)
    p.add_argument("--runs", default="20:2,20:3,50:3", help="steps:period pairs")
    p.add_argument("--ranks", default="16,32")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default="runs/fidelity", help="folder for factor and steps files")
    p.add_argument("--out", default="docs/benchmarks/fidelity.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = calicache.load_model(args.model)
    cfg_scale = model_defaults(model).get("cfg_scale", 1.0)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ranks = [int(r) for r in args.ranks.split(",")]
    tables = {}
    for run in args.runs.split(","):
        steps, period = (int(v) for v in run.split(":"))
        factors = {}
        for svd in ("plain", "ca", "cd"):
            # one file at the highest rank; lower ranks are exact truncations of it
            f = work / f"{svd}-r{max(ranks)}-s{steps}.safetensors"
            f = factor_file(model, f, steps, svd=svd, rank=max(ranks))
            for r in ranks:
                factors[(svd, r)] = f
        variants = [Variant("no cache", NoCacheConfig(), steps, "uncached"),
                    Variant(f"FORA p={period}", FORAConfig(period=period), steps, "fora")]
        for (svd, r), f in factors.items():
            variants.append(Variant(f"ICC {svd} r{r}", ICCConfig(period=period, svd=svd, factors=f, rank=r),
                                    steps,
                                    "icc"))
        for svd in ("ca", "cd"):
            for side in ("input", "output"):
                f = work / f"{svd}-{side}-r{max(ranks)}-s{steps}.safetensors"
                f = factor_file(model, f, steps, svd=svd, rank=max(ranks), scale=side)
                variants += [Variant(f"ICC {svd} {side}-scaled r{r}", ICCConfig(period=period, svd=svd,
                                                                                  factors=str(f), rank=r),
                                     steps, "icc") for r in ranks]
        fcf = work / f"cf-r{max(ranks)}-s{steps}-p{period}.safetensors"
        fcf = factor_file(model, fcf, steps, svd="cf", rank=max(ranks), period=period)
        for (svd, r), f in list(factors.items()) + [(("cf", r), fcf) for r in ranks]:
            variants.append(Variant(f"forecast {svd} r{r}", ForecastConfig(period=period, svd=svd,
                                                                         factors=f, rank=r), steps, "forecast"))
        variants.append(Variant("forecast rank 0 (TaylorSeer-1)", ForecastConfig(period=period, rank=0),
                                steps, "forecast"))
        if period == 2 and steps == 20:
            variants.append(Variant("GOC published steps", GOCConfig(period=2), steps, "goc"))
        gf = work / f"goc-s{steps}-p{period}.json"
        if not gf.exists():
            find_goc_steps(model, steps, num=40, cfg_scale=cfg_scale, period=period).save(gf)
        variants.append(Variant("GOC found steps", GOCConfig(period=period, steps_file=str(gf)), steps, "goc"))
        results = [run_variant(model, v, args.num, cfg_scale, progress=False) for v in variants]
        for kind in ("dbcache-taylorseer", "taylorseer"):
            why = missing(kind)
            if why:
                print(f"note: skipped {kind}: {why}")
                continue
            results.append(run_peer(model, Peer(kind, period), args.num, steps, cfg_scale, progress=False))
        score(results, results[0])
        rows = [r.row() for r in results]
        tables[run] = rows
        print(f"\n## {steps} steps, period {period} ({args.num} samples, guidance {cfg_scale})\n")
        print(markdown_table(rows, [("name", "configuration", ""), ("macs_speedup", "MACs speed-up", ".2f"),
                                    ("psnr", "PSNR dB", ".2f"), ("ssim", "SSIM", ".4f")]), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "num": args.num, "tables": tables}, indent=2))


if __name__ == "__main__":
    main()
