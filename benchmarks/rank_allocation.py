"""Per-layer ranks against uniform ranks at equal MACs (issue #19 item 2), PSNR against uncached.

    python benchmarks/rank_allocation.py --steps 20 --period 2 --ranks 8,16 --out docs/benchmarks/ranks.json

On the shipped model with CD statistics (256 Fashion-MNIST images) and ICC at a FORA period:
uniform rank r; the greedy energy-per-MAC allocation (`budget_ranks`, formerly `--rank-budget`) at
the MACs of rank r with floors of 0 (main's rule), 0.5 and 0.75 of the uniform rank; and the measured allocation
(`refine_ranks`, branch ranks moved only when PSNR on the tuning seeds improves). Every variant is
scored on held-out seeds disjoint from the tuning seeds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import calicache
from calicache.adapters import get_adapter
from calicache.bench.report import markdown_table
from calicache.cache import ICCConfig, MethodConfig, NoCacheConfig
from calicache.cache.svd import scaled_singular_values
from calicache.calibration.calibrate import factorize, gather_statistics
from calicache.calibration.ranks import branch_groups, budget_ranks, group_factors, search_branch_ranks
from calicache.commands.common import model_defaults
from calicache.tuning.score import ModelRunner, Reference


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--period", type=int, default=2)
    p.add_argument("--ranks", default="8,16")
    p.add_argument("--floors", default="0,0.5,0.75")
    p.add_argument("--tune-num", type=int, default=16, help="tuning seeds of the measured allocation")
    p.add_argument("--num", type=int, default=64, help="held-out seeds every variant is scored on")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/benchmarks/ranks.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = calicache.load_model(args.model)
    cfg_scale = model_defaults(model).get("cfg_scale", 1.0)
    runner = ModelRunner(model, args.steps, cfg_scale)
    branches = get_adapter(model).branches(model)
    specs = [s for b in branches for s in b.linears]
    stats = gather_statistics(model, "fashion-mnist", "cd", specs, num=256, steps=args.steps)
    scales = stats.scales(specs)
    energies = {s.name: scaled_singular_values(s.weight(), *scales[s.name]) ** 2 for s in specs}
    top = calicache.cache.factors.Factors(factorize(model, branches, scales, 64), {"svd": "cd"})
    tuning = Reference(runner, args.tune_num, seed=1)
    held = Reference(runner, args.num, seed=0)
    uncached = runner.macs(NoCacheConfig())
    rows = []

    def add(name: str, config: MethodConfig, extra: dict | None = None) -> None:
        macs = runner.macs(config)
        rows.append({"name": name, "macs_speedup": uncached / macs, "macs": macs,
                     "psnr": held.score(config), **(extra or {})})
        print(rows[-1], flush=True)

    groups = branch_groups(branches)
    for r in (int(v) for v in args.ranks.split(",")):
        uniform = ICCConfig(period=args.period, svd="cd", factors=top, rank=r)
        add(f"uniform r{r}", uniform)
        one = calicache.count_macs(model, uniform, 2, cfg_scale)
        fraction = one["per_call"][1] / one["full_call"]
        for floor in (float(v) for v in args.floors.split(",")):
            chosen = budget_ranks(model, branches, energies, fraction, floor)
            f = calicache.cache.factors.Factors(factorize(model, branches, scales, 0, ranks=chosen),
                                                {"svd": "cd", "rank_budget": fraction})
            ranks = f.ranks().values()
            add(f"greedy budget floor {floor} (r{min(ranks)}-{max(ranks)})",
                ICCConfig(period=args.period, svd="cd", factors=f))
        t0 = time.perf_counter()
        ranks, score, evals = search_branch_ranks(
            lambda g: tuning.score(ICCConfig(period=args.period, svd="cd",
                                               factors=group_factors(top, groups, g))),
            branches, r, step=max(1, r // 4))
        add(f"measured (r{min(ranks.values())}-{max(ranks.values())})",
            ICCConfig(period=args.period, svd="cd", factors=group_factors(top, groups, ranks)),
            {"search_evals": evals, "search_seconds": round(time.perf_counter() - t0, 1), "ranks": ranks})
    print(f"\n## ICC cd, {args.steps} steps, period {args.period}, guidance {cfg_scale}; PSNR on {args.num} "
          f"held-out samples (measured allocation tuned on {args.tune_num} other seeds)\n")
    print(markdown_table(rows, [("name", "ranks", ""), ("macs_speedup", "MACs speed-up", ".3f"),
                                ("psnr", "PSNR dB", ".2f")]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "steps": args.steps, "period": args.period,
                                          "num": args.num, "tune_num": args.tune_num, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
