"""benchmarks/speed.py in alternated processes: process-wide settings (environment variables) compared
round by round, and speed-ups pooled over many paired runs on a noisy machine.

    python benchmarks/speed_processes.py --rounds 3 --out docs/benchmarks/speed-xl-processes.json \\
        --variant glibc CALICACHE_KEEP_FREED_MEMORY=0 --variant keep -- \\
        --model DiT-XL/2 --num 1 --steps 10 --cfg-scale 1 --threads 2 --methods none,icc,forecast --repeats 3 \\
        --factors-file /tmp/xl-plain128.safetensors

Each round runs speed.py once per variant (`--variant NAME [VAR=VALUE ...]`, in the order given), so
a drift of the machine falls on every variant alike. Inside a process speed.py interleaves the
configurations, so each of its repeats pairs an uncached run with a cached one taken minutes apart at
most: the speed-up of one repeat is that pair's ratio. Reported per variant and over all variants:
the median paired speed-up, its realized/ideal (count_macs) and the interquartile range of that.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from calicache.utils import write_file

HERE = Path(__file__).resolve().parent


def paired(results: list[dict]) -> dict[str, dict]:
    """Per cached configuration and thread count ("icc@2t"): the speed-up of each repeat (uncached time /
    cached time of the same repeat), pooled over `results` (speed.py JSON outputs), with its median and
    quartiles."""
    ratios: dict[str, list[float]] = {}
    ideal: dict[str, float] = {}
    share: dict[str, list[float]] = {}
    for result in results:
        for threads in sorted({r["threads"] for r in result["rows"]}):
            rows = {r["config"]: r for r in result["rows"] if r["threads"] == threads and r["code"] == "after"}
            key = "cpus" if rows["none"]["time"] == "cpu" else "walls"
            for name, row in rows.items():
                if name == "none":
                    continue
                label = f"{name}@{threads}t"
                ratios.setdefault(label, []).extend(n / c for n, c in zip(rows["none"][key], row[key]))
                ideal[label] = row["ideal"]
                if "cached_share" in row:
                    share.setdefault(label, []).append(row["cached_share"])
    out = {}
    for label, values in ratios.items():
        q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
        out[label] = {"pairs": len(values), "speedup": statistics.median(values), "ideal": ideal[label],
                      "realized_over_ideal": statistics.median(values) / ideal[label],
                      "realized_over_ideal_iqr": [q1 / ideal[label], q3 / ideal[label]],
                      "cached_share": statistics.median(share[label]) if label in share else None}
    return out


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--variant", nargs="+", action="append", metavar=("NAME", "VAR=VALUE"),
                   help="a name and the environment variables of its processes (repeat the flag per variant)")
    p.add_argument("--out", default=None, help="JSON file: every process's rows and the pooled figures")
    args = p.parse_args(argv[:split])
    speed_args = argv[split + 1:]
    variants = args.variant or [["default"]]
    for _, *env in variants:
        bad = [e for e in env if "=" not in e]
        if bad:
            p.error(f"--variant takes NAME then VAR=VALUE settings, got {bad}")
    if args.out and Path(args.out).exists():
        p.error(f"{args.out} exists; choose another --out or remove it")
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, *env in variants:
                path = Path(tmp) / f"{name}-{round_}.json"
                subprocess.run([sys.executable, str(HERE / "speed.py"), *speed_args, "--out", str(path)],
                               env={**os.environ, **dict(e.split("=", 1) for e in env)}, check=True,
                               stdout=subprocess.DEVNULL)
                runs.append({"variant": name, "round": round_, "env": env, **json.loads(path.read_text())})
                print(f"round {round_ + 1}/{args.rounds} {name}: done", flush=True)
    pooled = {name: paired([r for r in runs if r["variant"] == name]) for name, *_ in variants}
    if len(variants) > 1:
        pooled["all"] = paired(runs)
    print("| variant | config@threads | paired runs | speed-up (median) | MACs ideal | realized/ideal | (IQR) "
          "| cached call / full |")
    print("|---|---|---|---|---|---|---|---|")
    for variant, configs in pooled.items():
        for name, s in configs.items():
            lo, hi = s["realized_over_ideal_iqr"]
            share = f"{s['cached_share']:.2f}" if s["cached_share"] is not None else "-"
            print(f"| {variant} | {name} | {s['pairs']} | {s['speedup']:.2f}x | {s['ideal']:.2f}x | "
                  f"{s['realized_over_ideal']:.2f} | {lo:.2f}-{hi:.2f} | {share} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_file(args.out, json.dumps({"speed_args": speed_args, "pooled": pooled, "runs": runs}, indent=2))


if __name__ == "__main__":
    main()
