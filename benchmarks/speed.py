"""Wall time and peak memory of no cache, FORA and ICC on one model, next to the MACs-ideal speed-up.

    python benchmarks/speed.py --model DiT-XL/2 --steps 10 --threads 2 --out docs/benchmarks/speed.json

Each configuration runs in a fresh process (so peak RSS is its own): random weights with
non-zero adaLN (a zero-initialised DiT would skip nothing real), one image, DDIM, no guidance.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

CONFIGS = {
    "none": dict(method="none"),
    "fora-p2": dict(method="fora", period=2),
    "icc-p2-r128": dict(method="icc", period=2, rank=128),
}


def one(model_name: str, steps: int, threads: int, name: str, repeats: int) -> dict:
    import torch

    from calicache import apply_cache, config_from_dict, count_macs, create_model, sample

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(model_name)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "adaLN_modulation" in n or "final_layer.linear" in n:
                p.normal_(0, 0.02)
    cfg = config_from_dict(CONFIGS[name])
    apply_cache(model, cfg)
    sample(model, 1, 2)  # warm-up (allocator, kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sample(model, 1, steps)
        times.append(time.perf_counter() - t0)
    macs = count_macs(model, None, steps)
    return {"config": name, "wall_seconds": min(times), "macs_total": macs["total"],
            "ideal_speedup": macs["speedup"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-XL/2")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default="docs/benchmarks/speed.json")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.one:
        r = one(args.model, args.steps, args.threads, args.one, args.repeats)
        r["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(r))
        return
    rows = []
    for name in CONFIGS:
        cmd = [sys.executable, __file__, "--model", args.model, "--steps", str(args.steps), "--threads",
               str(args.threads), "--repeats", str(args.repeats), "--one", name]
        rows.append(json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout))
        print(rows[-1], flush=True)
    base = rows[0]["wall_seconds"]
    for r in rows:
        r["realized_speedup"] = base / r["wall_seconds"]
        r["realized_over_ideal"] = r["realized_speedup"] / r["ideal_speedup"]
    out = {"model": args.model, "steps": args.steps, "threads": args.threads, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print("| config | wall s | peak RSS MB | MACs/img (G) | ideal | realized | realized/ideal |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['wall_seconds']:.1f} | {r['peak_rss_mb']:.0f} | {r['macs_total'] / 1e9:.0f} | "
              f"{r['ideal_speedup']:.2f}x | {r['realized_speedup']:.2f}x | {r['realized_over_ideal']:.2f} |")


if __name__ == "__main__":
    main()
