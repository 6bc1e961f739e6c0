"""Tuned configurations against the bench grid and the peers at equal or lower MACs (issue #19 item 5).

    python benchmarks/tune_frontier.py --budgets 0.35,0.5,0.65 --steps 20 --num 64 --out docs/benchmarks/tune.json

One `make_tuner` (uncached reference on the tuning seeds, CD factors, GOC cosines) serves every
budget; each budget's search time is measured (wall and this process's CPU seconds). Then the
bench grid (`calicache bench`'s configurations: fewer steps, FORA, ICC plain/CA/CD, budgeted ranks,
GOC, the forecast, and the peers cache-dit DBCache with/without TaylorSeer, diffusers
FirstBlockCache and TaylorSeer) and the tuned configurations are sampled on the held-out seeds
(seed 0, disjoint from the tuning seeds) and scored against the uncached run of those seeds. For each
budget: the tuned PSNR and the best PSNR of calicache's grid and of the peers within that budget.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import calicache
from calicache.bench.grid import GridOptions, plan_grid, run_grid
from calicache.bench.peers import KINDS
from calicache.bench.report import markdown_table
from calicache.bench.runs import Variant, score
from calicache.tuning import make_tuner, tune

PEERS = set(KINDS.values()) - {KINDS["none"]}


def best_within(rows: list[dict], limit: float, peers: bool) -> dict | None:
    """The best PSNR within `limit` MACs among the peers' rows, or among calicache's grid rows."""
    fits = [r for r in rows if r["family"] not in ("uncached", "tuned", KINDS["none"])
            and r["macs_per_sample"] <= limit and (r["family"] in PEERS) == peers and r.get("psnr") is not None]
    return max(fits, key=lambda r: r["psnr"]) if fits else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-dit")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--budgets", default="0.35,0.5,0.65")
    p.add_argument("--tune-num", type=int, default=32, help="tuning seeds (seed 1)")
    p.add_argument("--num", type=int, default=64, help="held-out seeds (seed 0), the grid's seeds")
    p.add_argument("--local", type=int, default=24)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", default="runs/tune-frontier")
    p.add_argument("--out", default="docs/benchmarks/tune.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = calicache.load_model(args.model)
    cfg_scale = getattr(model, "calicache_defaults", {}).get("cfg_scale", 1.0)
    work = Path(args.work)
    budgets = [float(b) for b in args.budgets.split(",")]
    t0, c0 = time.perf_counter(), time.process_time()
    tuner = make_tuner(model, args.steps, num=args.tune_num, cfg_scale=cfg_scale)
    setup = {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}
    tuned = {}
    for b in budgets:
        t0, c0 = time.perf_counter(), time.process_time()
        result = tune(model, args.steps, b, tuner=tuner, heldout=args.num, heldout_seed=0, local=args.local,
                      out=work / f"budget-{b:g}")
        tuned[b] = (result, {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0})
        print(f"budget {b}: {result.chosen.candidate.label()} {result.heldout_psnr:.2f} dB held-out, "
              f"{tuned[b][1]['wall']:.0f} s wall, {tuned[b][1]['cpu']:.0f} s CPU", flush=True)
    opts = GridOptions(steps=args.steps, num=args.num, cfg_scale=cfg_scale, seed=0, out=work / "bench")
    opts.out.mkdir(parents=True, exist_ok=True)
    grid = plan_grid(model, opts)
    grid.variants += [Variant(f"tuned b={b:g}: {r.chosen.candidate.label()}", r.config, args.steps, "tuned")
                      for b, (r, _) in tuned.items()]
    results = run_grid(model, grid, opts)
    score(results, results[0])
    rows = [r.row() for r in results]
    uncached = results[0].macs["total"]
    table = []
    for b, (res, cost) in tuned.items():
        limit = b * uncached
        mine = next(r for r in rows if r["family"] == "tuned" and r["name"].startswith(f"tuned b={b:g}:"))
        grid_best, peer_best = best_within(rows, limit, False), best_within(rows, limit, True)
        table.append({
            "budget": b, "tuned": mine["name"].split(": ", 1)[1],
            "tuned_macs": round(mine["macs_per_sample"] / uncached, 4),
            "tuned_psnr": mine["psnr"], "grid_best": grid_best and grid_best["name"],
            "grid_psnr": grid_best and grid_best["psnr"], "peer_best": peer_best and peer_best["name"],
            "peer_psnr": peer_best and peer_best["psnr"], "tune_wall_s": round(cost["wall"]),
            "tune_cpu_s": round(cost["cpu"]), "tuning_psnr": res.chosen.score})
    print(f"\n## Tuned vs grid and peers: {args.steps} steps, guidance {cfg_scale}, PSNR on {args.num} held-out "
          f"samples (tuned on {args.tune_num} other seeds)\n")
    print(markdown_table(table, [("budget", "budget", ""), ("tuned", "tuned configuration", ""),
                                 ("tuned_macs", "MACs / uncached", ".3f"), ("tuned_psnr", "tuned dB", ".2f"),
                                 ("grid_best", "best grid config", ""), ("grid_psnr", "grid dB", ".2f"),
                                 ("peer_best", "best peer", ""), ("peer_psnr", "peer dB", ".2f"),
                                 ("tune_wall_s", "tuning wall s", ""), ("tune_cpu_s", "tuning CPU s", "")]))
    print("\nnotes:", *grid.notes, sep="\n- ")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "steps": args.steps, "num": args.num,
                                          "tune_num": args.tune_num, "setup_seconds": setup, "table": table,
                                          "rows": rows, "notes": grid.notes}, indent=2, default=str))


if __name__ == "__main__":
    main()
