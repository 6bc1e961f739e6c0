"""torch.compile over a cached model: compiled == eager, graphs per run, graph breaks, and time.

    python benchmarks/compile.py --threads 1 --out docs/benchmarks/compile.json

For each method, on the shipped model at demo settings (40 samples, 20 DDIM steps, guidance 4,
period 2; ICC/forecast with the shipped CD factors, GOC with the shipped steps): the eager run, a
first compiled run (compilation included), then compiled runs timed as eager ones (median of the
repeats, interleaved with eager ones). `torch._dynamo.explain` reports the graph breaks of one
full and one cached model call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--num", type=int, default=40)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", default="inductor")
    p.add_argument("--methods", default="none,fora,icc,forecast,goc")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from speed import configs
    from torch._dynamo.utils import counters

    import calicache
    from calicache import apply_cache, config_from_dict, load_model, remove_cache, sample
    from calicache.utils import keep_freed_memory, write_file

    kept = keep_freed_memory()  # as the command line and speed.py do (docs/speed.md, "The allocator")

    model = load_model("fmnist-dit").eval()
    rows = []
    for name in args.methods.split(","):
        kw = configs("fmnist-dit")[name]

        def run(m):
            t0 = time.perf_counter()
            x = sample(m, args.num, args.steps, cfg_scale=4.0, seed=0)
            return x, time.perf_counter() - t0

        apply_cache(model, config_from_dict(kw))
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, backend=args.backend)
        eager_x, _ = run(model)
        compiled_x, first = run(compiled)
        graphs = counters["stats"]["unique_graphs"]
        eager_t, compiled_t = [], []
        for _ in range(args.repeats):
            eager_t.append(run(model)[1])
            compiled_t.append(run(compiled)[1])
        recompiled = counters["stats"]["unique_graphs"] - graphs
        breaks = explain_breaks(model, calicache)
        remove_cache(model)
        row = {"config": name, "rel_error": float((compiled_x - eager_x).norm() / eager_x.norm()),
               "graphs": graphs, "graphs_after_first_run": recompiled, "first_compiled_run_s": first,
               "eager_s": statistics.median(eager_t), "compiled_s": statistics.median(compiled_t), **breaks}
        rows.append(row)
        print(json.dumps(row), flush=True)
    base_eager = next((r["eager_s"] for r in rows if r["config"] == "none"), None)
    print("| config | rel. error vs eager | graphs per run | graph breaks per call (full, cached) | eager s | "
          "compiled s | compiled speed-up over eager none |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        vs = f"{base_eager / r['compiled_s']:.2f}x" if base_eager else "-"
        print(f"| {r['config']} | {r['rel_error']:.1e} | {r['graphs']} | {r['breaks_full']}, {r['breaks_cached']} | "
              f"{r['eager_s']:.2f} | {r['compiled_s']:.2f} | {vs} |")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_file(args.out, json.dumps({"threads": args.threads, "backend": args.backend,
                                         "keep_freed_memory": kept, "rows": rows}, indent=2))


def explain_breaks(model, calicache) -> dict:
    """Graphs, graph breaks and their reasons for call 0 (full) and call 1 (cached) of an explicit run
    (the engine's host-side bookkeeping is skipped by torch.compiler.disable, listed as a reason)."""
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([0, 1])
    out = {}
    with torch.inference_mode(), calicache.cache.cache_run(model, 20):
        for call, kind in enumerate(("full", "cached")):
            t = torch.full((2,), 999 - 50 * call)
            e = torch._dynamo.explain(model)(x, t, y)
            out[f"breaks_{kind}"] = e.graph_break_count
            out[f"explain_graphs_{kind}"] = e.graph_count
            out[f"break_reasons_{kind}"] = sorted({str(b.reason).splitlines()[0] for b in e.break_reasons})
    return out


if __name__ == "__main__":
    main()
