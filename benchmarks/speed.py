"""Wall time of each cache method against no cache, next to its MACs, in one process with the
configurations interleaved (median of the repeats), optionally against another calicache source
tree (the code before a change) loaded side by side under another package name.

    # DiT-XL/2, random weights (non-zero adaLN), 1 image, 10 DDIM calls, 2 threads; the plain factors
    # are computed once into --factors-file and loaded by later runs
    python benchmarks/speed.py --model DiT-XL/2 --num 1 --steps 10 --cfg-scale 1 --threads 2 \
        --factors-file /tmp/xl-plain128.safetensors
    # DiT-B/2 at the same rank ratio (width / 9), 4 images
    python benchmarks/speed.py --model DiT-B/2 --rank 85 --num 4 --steps 10 --cfg-scale 1 --threads 2
    # the shipped model at `calicache demo` settings, 1 and 2 threads, against main's tree
    git archive main src/calicache | tar -x -C /tmp/before && mv /tmp/before/src/calicache /tmp/before/calicache_before
    python benchmarks/speed.py --model fmnist-dit --threads 1,2 --before /tmp/before

Per configuration: wall seconds, speed-up over no cache (same code), the MACs-ideal speed-up
(count_macs, which counts the full-call B pass of rank-space references) and realized/ideal, a full
call's time against an uncached call's (what storing references costs), a cached call's time as a
share of a full call's beside its MACs share, and the peak cache bytes.
"""

from __future__ import annotations

import argparse
import importlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def configs(model_name: str, factors: str | None = None, rank: int = 128) -> dict[str, dict]:
    """name -> config JSON object (`config_from_dict`); the shipped model: its CD factors and GOC steps;
    a registry model: plain-SVD factors at `rank` from `factors` (see `plain_factors`)."""
    if model_name == "fmnist-dit":
        from calicache.models.io import shipped_asset

        icc = dict(period=2, svd="cd", factors=str(shipped_asset("fmnist-dit-cd.safetensors")))
        return {"none": dict(method="none"), "fora": dict(method="fora", period=2),
                "icc": dict(method="icc", **icc), "forecast": dict(method="forecast", **icc),
                "goc": dict(method="goc", period=2, steps_file=str(shipped_asset("fmnist-dit-goc20.json")))}
    icc = dict(period=2, rank=rank, factors=factors)
    return {"none": dict(method="none"), "fora": dict(method="fora", period=2),
            "icc": dict(method="icc", **icc), "forecast": dict(method="forecast", **icc)}


def plain_factors(model: torch.nn.Module, rank: int, path: Path) -> str:
    """The plain truncated SVD of every cached linear, computed once and saved as a factor file at `path`,
    so each timed run loads it instead of redoing ~100 SVDs (minutes on DiT-XL/2)."""
    from calicache import apply_cache, config_from_dict, remove_cache
    from calicache.cache import get_engine
    from calicache.cache.factors import Factors
    from calicache.cache.svd import scaled_svd

    apply_cache(model, config_from_dict(dict(method="fora", period=2)))
    try:
        engine = get_engine(model)
        specs = [s for b in engine.branches for s in b.linears]
        factors = Factors({s.name: scaled_svd(s.weight(), min(rank, s.in_features, s.out_features)) for s in specs},
                          {"svd": "plain", "model_hash": engine.model_hash()})
    finally:
        remove_cache(model)
    factors.save(path)
    return str(path)


def load(model_name: str) -> torch.nn.Module:
    from calicache import create_model, load_model

    if model_name == "fmnist-dit":
        return load_model(model_name).eval()
    torch.manual_seed(0)
    model = create_model(model_name)
    with torch.no_grad():  # a zero-initialised DiT would output exactly 0
        for n, p in model.named_parameters():
            if "adaLN_modulation" in n or "final_layer.linear" in n:
                p.normal_(0, 0.02)
    return model.eval()


def clock() -> float:
    """Per-call clock: this process's CPU time with one thread (on a shared, oversubscribed machine it
    counts only the time we ran), else wall time."""
    return time.process_time() if torch.get_num_threads() == 1 else time.perf_counter()


def timed_run(lib, model, kw: dict, args) -> dict:
    """One sampling run with `kw`; per-call times from hooks on the model (eager CPU: exact)."""
    model.__class__ = lib.models.dit.DiT  # same module code; each package recognises its own class
    lib.apply_cache(model, lib.config_from_dict(kw))
    calls: list[float] = []
    start = {}
    pre = model.register_forward_pre_hook(lambda *_: start.__setitem__("t", clock()))
    post = model.register_forward_hook(lambda *_: calls.append(clock() - start["t"]))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        lib.sample(model, args.num, args.steps, cfg_scale=args.cfg_scale, seed=0)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        engine = lib.cache.get_engine(model)
        full = [all(row) for row in engine.full_flags]
        stats = engine.stats()
        macs = lib.count_macs(model, None, args.steps)
    finally:
        pre.remove()
        post.remove()
        lib.remove_cache(model)
    full_t = [t for t, f in zip(calls, full) if f]
    cached_t = [t for t, f in zip(calls, full) if not f]
    cached_macs = [m for m, f in zip(macs["per_call"], full) if not f]
    return {"wall": wall, "cpu": cpu, "full_call": statistics.median(full_t),
            "cached_call": statistics.median(cached_t) if cached_t else None,
            "macs_total": macs["total"], "macs_full_call": macs["full_call"],
            "macs_cached_call": statistics.median(cached_macs) if cached_macs else None,
            "cache_bytes": stats["cache_bytes"]}


def summarise(runs: list[dict], base_wall: float, base_macs: int, key: str, base_call: float) -> dict:
    """`key`: the time the speed-up is taken from ("cpu" with one thread, else "wall"); `base_call`: the
    median uncached call, which a full call is compared with (ICC's full call also runs its B pass)."""
    wall = statistics.median(r[key] for r in runs)
    full_call = statistics.median(r["full_call"] for r in runs)
    row = {k: runs[0][k] for k in ("macs_total", "macs_full_call", "macs_cached_call", "cache_bytes")}
    row.update(time=key, seconds=wall, walls=[round(r["wall"], 3) for r in runs],
               cpus=[round(r["cpu"], 3) for r in runs], speedup=base_wall / wall, ideal=base_macs / row["macs_total"])
    row["realized_over_ideal"] = row["speedup"] / row["ideal"]
    row["full_call_over_uncached"] = full_call / base_call
    cached = [r["cached_call"] for r in runs if r["cached_call"] is not None]
    if cached:
        row["cached_share"] = statistics.median(cached) / full_call
        row["macs_share"] = row["macs_cached_call"] / row["macs_full_call"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="DiT-XL/2", help="a registry name (random weights) or fmnist-dit (shipped)")
    p.add_argument("--num", type=int, default=40)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--threads", default="1", help="comma-separated thread counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default=None, help="comma-separated subset of the model's configurations")
    p.add_argument("--warmup", type=int, default=1, help="1: one run of each configuration (1 sample) first")
    p.add_argument("--before", default=None, help="folder holding calicache_before/ (another source tree)")
    p.add_argument("--factors-file", default=None,
                   help="registry models: the plain factors at --rank, loaded when the file exists, else computed "
                        "and saved there (alternated processes then skip the minutes of SVDs)")
    p.add_argument("--rank", type=int, default=128,
                   help="registry models: ICC's and the forecast's plain-SVD rank (the paper's 128 on DiT-XL/2's "
                        "1152 channels, width / 9)")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args()

    import calicache
    import calicache.models.dit  # noqa: F401  (lib.models.dit below)
    from calicache.utils import keep_freed_memory, write_file

    # As the command line does (docs/speed.md); CALICACHE_KEEP_FREED_MEMORY=0 measures glibc's defaults.
    kept = keep_freed_memory()

    libs = {"after": calicache}
    if args.before:
        sys.path.insert(0, args.before)
        libs = {"before": importlib.import_module("calicache_before"), **libs}
        importlib.import_module("calicache_before.models.dit")
    model = load(args.model)
    tmp = tempfile.TemporaryDirectory()
    factors = None
    if args.model != "fmnist-dit":
        path = Path(args.factors_file or Path(tmp.name) / "plain-factors.safetensors")
        factors = str(path) if path.exists() else plain_factors(model, args.rank, path)
    kinds = configs(args.model, factors, args.rank)
    names = list(kinds)
    if args.methods:
        names = [n for n in names if n in args.methods.split(",") or n == "none"]
    out = {"model": args.model, "num": args.num, "steps": args.steps, "cfg_scale": args.cfg_scale,
           "rank": None if args.model == "fmnist-dit" else args.rank, "keep_freed_memory": kept, "rows": []}
    for threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(threads)
        for lib in libs.values() if args.warmup else ():  # warm-up: allocator, kernels, factor files
            for name in names:
                timed_run(lib, model, kinds[name], argparse.Namespace(**{**vars(args), "num": 1}))
        runs: dict[tuple[str, str], list[dict]] = {}
        for _ in range(args.repeats):  # interleaved: every configuration once per round
            for name in names:
                for tag, lib in libs.items():
                    runs.setdefault((tag, name), []).append(timed_run(lib, model, kinds[name], args))
        # One baseline for both trees (the uncached model runs the same code under either engine):
        # the pooled median of every uncached run, so the noise of one tree's few runs moves nothing.
        key = "cpu" if threads == 1 else "wall"
        base = [r for tag in libs for r in runs[(tag, "none")]]
        base_wall = statistics.median(r[key] for r in base)
        base_call = statistics.median(r["full_call"] for r in base)
        for tag in libs:
            for name in names:
                row = summarise(runs[(tag, name)], base_wall, base[0]["macs_total"], key, base_call)
                out["rows"].append({"threads": threads, "code": tag, "config": name, **row})
                print(json.dumps(out["rows"][-1]), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_file(args.out, json.dumps(out, indent=2))
    print(table(out["rows"]))


def table(rows: list[dict]) -> str:
    lines = ["| threads | code | config | seconds | speed-up | MACs ideal | realized/ideal | full call / uncached call "
             "| cached call / full call (time) | (MACs) | cache MB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        share = (f"{r['cached_share']:.2f} | {r['macs_share']:.2f}" if "cached_share" in r else "- | -")
        lines.append(f"| {r['threads']} | {r['code']} | {r['config']} | {r['seconds']:.2f} {r['time']} | "
                     f"{r['speedup']:.2f}x | {r['ideal']:.2f}x | {r['realized_over_ideal']:.2f} | "
                     f"{r['full_call_over_uncached']:.2f} | {share} | "
                     f"{r['cache_bytes'] / 2**20:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
