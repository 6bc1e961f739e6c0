"""Tuned configurations against the bench grid and the peers at equal or lower MACs (issue #19 item 5).

    python benchmarks/tune_frontier.py --budgets 0.35,0.5,0.65 --steps 20 --num 64 --out docs/benchmarks/tune.json \
        --plot docs/benchmarks/tune.png

One `make_tuner` (uncached reference on the tuning seeds, CD factors, GOC cosines) serves every
budget; each budget's search time is measured (wall and this process's CPU seconds). Then the
bench grid (`calicache bench`'s configurations: fewer steps, FORA, ICC plain/CA/CD, budgeted ranks,
GOC, the forecast, and the peers cache-dit DBCache with/without TaylorSeer, diffusers
FirstBlockCache and TaylorSeer) and the tuned configurations are sampled on the held-out seeds
(seed 0, disjoint from the tuning seeds) and scored against the uncached run of those seeds. For each
budget: the tuned PSNR and the best PSNR of calicache's grid and of the peers within that budget.

`--grid-from OLD.json` reuses the grid and peer rows of an earlier run at the same model, steps and
held-out seeds and samples only the tuned configurations (tune's own held-out score: the same seeds,
sampler and PSNR; a full run records both as `heldout_check`). `--plot` draws quality against MACs.
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
from calicache.bench.plot import quality_figure
from calicache.bench.report import markdown_table
from calicache.bench.runs import Variant, score
from calicache.tuning import make_tuner, tune

PEERS = set(KINDS.values()) - {KINDS["none"]}


def tuned_name(budget: float, result) -> str:
    return f"tuned b={budget:g}: {result.chosen.candidate.label()}"


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
    p.add_argument("--grid-from", default=None, help="an earlier run's JSON: reuse its grid and peer rows")
    p.add_argument("--plot", default=None, help="PNG of PSNR and SSIM against MACs per sample")
    args = p.parse_args()
    old = None
    if args.grid_from is not None:
        old = json.loads(Path(args.grid_from).read_text())
        if (old["model"], old["steps"], old["num"]) != (args.model, args.steps, args.num):
            raise SystemExit(f"--grid-from {args.grid_from} is for {old['model']}, {old['steps']} steps, {old['num']} "
                             f"held-out seeds; this run asks for {args.model}, {args.steps}, {args.num}")
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
    if old is None:
        opts = GridOptions(steps=args.steps, num=args.num, cfg_scale=cfg_scale, seed=0, out=work / "bench")
        opts.out.mkdir(parents=True, exist_ok=True)
        grid = plan_grid(model, opts)
        grid.variants += [Variant(tuned_name(b, r), r.config, args.steps, "tuned") for b, (r, _) in tuned.items()]
        results = run_grid(model, grid, opts)
        score(results, results[0])
        rows, notes = [r.row() for r in results], grid.notes
        check = {f"{b:g}": [r.heldout_psnr, next(x["psnr"] for x in rows if x["name"] == tuned_name(b, r))]
                 for b, (r, _) in tuned.items()}  # tune's held-out PSNR and the grid's for the same configuration
    else:
        rows = [r for r in old["rows"] if r["family"] != "tuned"]
        rows += [{"name": tuned_name(b, r), "family": "tuned", "steps": args.steps, "macs_per_sample": r.chosen.macs,
                  "psnr": r.heldout_psnr} for b, (r, _) in tuned.items()]
        notes, check = old["notes"] + [f"grid and peer rows from {args.grid_from}"], None
    uncached = next(r["macs_per_sample"] for r in rows if r["family"] == "uncached")
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
    print("\nnotes:", *notes, sep="\n- ")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"model": args.model, "steps": args.steps, "num": args.num,
                                          "tune_num": args.tune_num, "local": args.local, "setup_seconds": setup,
                                          "table": table, "heldout_check": check, "rows": rows, "notes": notes},
                                         indent=2, default=str))
    if args.plot:
        quality_figure(rows, args.num, args.plot)


if __name__ == "__main__":
    main()
