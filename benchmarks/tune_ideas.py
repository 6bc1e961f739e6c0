"""What could lift `calicache tune` at a tight budget (issue #19 item 1): the calibrated forecast of
order 1 and 2 (rank 0: TaylorSeer per branch), on FORA periods, on TaylorSeer's own schedule and on
listed full calls packed into the early calls (`CacheSchedule.spread`), with CD factors and TCC
factors, against diffusers TaylorSeer, every row at the most full calls the budget allows.

    python benchmarks/tune_ideas.py --steps 20 --budget 0.35 --num 64 --seed 2 --out docs/benchmarks/tune_ideas.json

Scored as PSNR against the uncached run on `--num` seeds of `--seed` (2: disjoint from tune's tuning
seeds, 1, and from the held-out seeds of the frontier, 0), so what is learnt here is not fitted to
either set.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

import calicache
from calicache.bench.peers import Peer, run_peer
from calicache.bench.report import markdown_table
from calicache.metrics.fidelity import psnr
from calicache.tuning import Candidate, make_tuner
from calicache.tuning.score import Reference
from calicache.tuning.space import cache_config


def taylorseer_calls(steps: int, period: int) -> tuple[int, ...]:
    """diffusers TaylorSeer's full calls with disable_cache_before_step=1: call 0, then (s - 2) % period == 0."""
    return (0, *(s for s in range(1, steps) if (s - 2) % period == 0))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--budget", type=float, default=0.35)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--ranks", default="0,4")
    p.add_argument("--powers", default="1,1.25,1.5,2")
    p.add_argument("--peer-periods", default="3,4,5", help="diffusers TaylorSeer intervals ('': none)")
    p.add_argument("--schedules", default="period,taylorseer,spread", help="which schedule families to try")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/benchmarks/tune_ideas.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model = calicache.load_model(args.model)
    cfg = getattr(model, "calicache_defaults", {}).get("cfg_scale", 1.0)
    steps = args.steps
    # Factors (CD, rank 48) and the MACs table; its reference (2 seeds of seed 1) is not used.
    tuner = make_tuner(model, steps, num=2, seed=1, cfg_scale=cfg, methods=("fora", "forecast"), progress=False)
    limit = args.budget * tuner.costs.uncached
    held = Reference(tuner.runner, args.num, args.seed)

    def thinned(c: Candidate) -> Candidate | None:
        """A calls list that fits: its last calls dropped until it does (None: not even two left)."""
        calls = list(c.calls)
        while len(calls) > 2 and not tuner.feasible(replace(c, calls=tuple(calls)), limit):
            calls.pop()
        c = replace(c, calls=tuple(calls))
        return c if tuner.feasible(c, limit) else None

    # schedule name -> the base candidate at the most full calls that fit (None: none fits)
    families = args.schedules.split(",")
    shapes = {"FORA period": lambda c: tuner.tightest(replace(c, period=2), limit)} if "period" in families else {}
    if "taylorseer" in families:
        shapes.update({f"TaylorSeer's calls, interval {q}": lambda c, q=q: thinned(
            replace(c, period=0, calls=taylorseer_calls(steps, q))) for q in (3, 4, 5)})
    if "spread" in families:
        shapes.update({f"spread, power {w:g}": lambda c, w=w: tuner.densest(c, w, limit)
                       for w in (float(v) for v in args.powers.split(","))})
    rows = []
    for r in (int(v) for v in args.ranks.split(",")):
        for factors in (("cd",) if r == 0 else ("cd", "tcc")):
            for order in (1, 2):
                for name, make in shapes.items():
                    c = make(Candidate("forecast", 2, rank=r, weight=1.0, factors="cd", order=order))
                    if c is None:
                        continue
                    if factors == "tcc":
                        period = c.period or max(2, round(steps / len(c.calls)))
                        key = f"tcc-p{period}"
                        if key not in tuner.factors:
                            tuner.factors[key] = tuner.make_tcc(period)
                        c = replace(c, factors=key)
                    value = held.score(cache_config(c, tuner.factors))
                    rows.append({"schedule": name, "configuration": c.label(), "rank": r, "order": order,
                                 "factors": factors, "macs_ratio": round(tuner.costs.macs(c) / tuner.costs.uncached, 4),
                                 "psnr": round(value, 3)})
                    print(rows[-1], flush=True)
    for q in (int(v) for v in args.peer_periods.split(",") if v):
        res = run_peer(model, Peer("taylorseer", q), args.num, steps, cfg, seed=args.seed, progress=False)
        ratio = res.macs["total"] / tuner.costs.uncached
        rows.append({"schedule": f"TaylorSeer interval {q}", "configuration": res.variant.name, "rank": None,
                     "order": 1, "factors": "peer", "macs_ratio": round(ratio, 4),
                     "psnr": round(float(psnr(res.images, held.images)), 3), "within_budget": ratio <= args.budget})
        print(rows[-1], flush=True)
    print(f"\n## Ideas at budget {args.budget:g}, {steps} steps, guidance {cfg}: PSNR on {args.num} seeds "
          f"(seed {args.seed})\n")
    print(markdown_table(sorted(rows, key=lambda r: -r["psnr"]),
                         [("configuration", "configuration", ""), ("schedule", "schedule", ""),
                          ("factors", "factors", ""), ("order", "order", ""),
                          ("macs_ratio", "MACs / uncached", ".3f"), ("psnr", "PSNR dB", ".2f")]))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "steps": steps, "budget": args.budget,
                                          "num": args.num, "seed": args.seed, "rows": rows,
                                          "seconds": round(time.perf_counter() - t0)}, indent=2))


if __name__ == "__main__":
    main()
