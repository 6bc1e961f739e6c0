"""Trajectory-consistent calibration (TCC) against the paper's CD statistics (issue #19 item 4).

    python benchmarks/trajectory_calibration.py --steps 20 --periods 2,3 --ranks 8,16 --out docs/benchmarks/tcc.json

ICC on the shipped model at FORA periods, CD factors from 256 Fashion-MNIST images (uncached
steps) and TCC factors refined from them along 64 cached runs per round (guidance as sampled);
PSNR against uncached samples on held-out seeds (the TCC runs use their own noise streams).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import calicache
from calicache.bench.report import markdown_table
from calicache.cache import ICCConfig
from calicache.commands.common import model_defaults
from calicache.tuning.score import ModelRunner, Reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--periods", default="2,3")
    p.add_argument("--ranks", default="8,16")
    p.add_argument("--rounds", default="1,2")
    p.add_argument("--trajectory-num", type=int, default=64)
    p.add_argument("--num", type=int, default=64, help="held-out seeds")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/benchmarks/tcc.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = calicache.load_model(args.model)
    cfg_scale = model_defaults(model).get("cfg_scale", 1.0)
    held = Reference(ModelRunner(model, args.steps, cfg_scale), args.num, seed=0)
    rows = []
    for period in (int(v) for v in args.periods.split(",")):
        for rank in (int(v) for v in args.ranks.split(",")):
            common = dict(svd="cd", rank=rank, num=256, steps=args.steps, period=period, cfg_scale=cfg_scale)
            variants = [("CD (uncached steps)", {})] + [
                (f"TCC {k} round{'s' * (k > 1)}", dict(trajectory="cached", trajectory_rounds=k,
                                                       trajectory_num=args.trajectory_num))
                for k in (int(v) for v in args.rounds.split(","))]
            for name, extra in variants:
                t0 = time.perf_counter()
                factors = calicache.calibrate(model, "fashion-mnist", **common, **extra)
                seconds = time.perf_counter() - t0
                psnr = held.score(ICCConfig(period=period, svd="cd", factors=factors))
                rows.append({"period": period, "rank": rank, "name": name, "psnr": psnr,
                             "calibration_seconds": round(seconds, 1)})
                print(rows[-1], flush=True)
    print(f"\n## ICC, {args.steps} steps, guidance {cfg_scale}; PSNR on {args.num} held-out samples\n")
    print(markdown_table(rows, [("period", "period", ""), ("rank", "rank", ""), ("name", "statistics", ""),
                                ("psnr", "PSNR dB", ".2f"), ("calibration_seconds", "calibration s", ".0f")]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "steps": args.steps, "num": args.num,
                                          "cfg_scale": cfg_scale, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
