"""Where a model call's CPU time goes, by op, for full and cached calls apart, and which source lines
make the copies (calicache's code or the model's).

    python benchmarks/profile_ops.py --num 10 --steps 20 --threads 1
    python benchmarks/profile_ops.py --methods icc --stacks      # copies by source line (slower)
    python benchmarks/profile_ops.py --methods icc --stacks --all-ops  # every op by source line

One profiled sampling run per method on the shipped model (guidance doubles the batch), after one
unprofiled warm-up run; every model call is labelled full or cached from the engine's gather flags,
and each op's self CPU time is added to the kind of the call it ran in. Shares are of the model
calls' self CPU time of that kind (the sampler's own work outside the calls is left out). A profile
is a direction, not a timing: the profiler's overhead is per op, so small ops look dearer than they are.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

# Ops that move or convert data without computing anything new.
COPY_OPS = ("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat", "aten::stack", "aten::to",
            "aten::_to_copy", "aten::index_put_", "aten::fill_", "aten::zeros_like", "aten::zero_")


def label_calls(model) -> list:
    """Hooks that wrap model call i in a record_function named `call:i` (its kind is known after the run)."""
    frames, count = [], [0]

    def enter(*_):
        frames.append(torch.autograd.profiler.record_function(f"call:{count[0]}").__enter__())
        count[0] += 1

    def leave(*_):
        frames.pop().__exit__(None, None, None)

    return [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]


def origin(event) -> str:
    """The ops a copy ran under and the innermost calicache source line (python events of with_stack)."""
    ops, parent = [], event.cpu_parent
    while parent is not None:
        if "calicache/" in parent.name:
            return " <- ".join(ops[:2] + [parent.name.split("calicache/", 1)[1]])
        if parent.name.startswith("aten::"):
            ops.append(parent.name)
        parent = parent.cpu_parent
    return " <- ".join(ops[:2] + ["?"])


def profile_method(model, kw: dict, args, lib) -> dict:
    """Self CPU time per op (and per source line of copies) in full and cached calls, summed over
    `args.repeats` profiled runs (one profiler each)."""
    lib.apply_cache(model, lib.config_from_dict(kw))
    engine = lib.cache.get_engine(model)
    by_op: dict[str, dict[str, float]] = {"full": defaultdict(float), "cached": defaultdict(float)}
    copies: dict[str, dict[str, float]] = {"full": defaultdict(float), "cached": defaultdict(float)}
    kinds: list[str] = []
    try:
        with torch.inference_mode():
            lib.sample(model, 2, args.steps, cfg_scale=args.cfg_scale, seed=0)  # warm-up
        for _ in range(args.repeats):
            handles = label_calls(model)
            try:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                            with_stack=args.stacks) as prof:
                    lib.sample(model, args.num, args.steps, cfg_scale=args.cfg_scale, seed=0)
            finally:
                for h in handles:
                    h.remove()
            run_kinds = ["full" if all(row) else "cached" for row in engine.full_flags]
            kinds += run_kinds
            for e in prof.events():
                kind, parent = None, e.cpu_parent
                while parent is not None:
                    if parent.name.startswith("call:"):
                        kind = run_kinds[int(parent.name[5:])]
                        break
                    parent = parent.cpu_parent
                if kind is None or e.name.startswith("call:"):
                    continue
                by_op[kind][e.name] += e.self_cpu_time_total
                if args.stacks and (args.all_ops or e.name in COPY_OPS) and e.self_cpu_time_total:
                    copies[kind][f"{e.name} <- {origin(e)}"] += e.self_cpu_time_total
    finally:
        lib.remove_cache(model)
    out = {"calls": {k: kinds.count(k) for k in ("full", "cached")}}
    for kind in ("full", "cached"):
        total = sum(by_op[kind].values())
        if not total:
            continue
        out[kind] = {"ms_per_call": total / 1e3 / kinds.count(kind),
                     "ops": {n: t / total for n, t in sorted(by_op[kind].items(), key=lambda x: -x[1])},
                     "copy_share": sum(t for n, t in by_op[kind].items() if n in COPY_OPS) / total}
        if args.stacks:
            out[kind]["copies_by_line"] = {n: t / total for n, t in
                                           sorted(copies[kind].items(), key=lambda x: -x[1])}
    return out


def report(name: str, row: dict, top: int) -> str:
    lines = [f"## {name}: calls {row['calls']}"]
    for kind in ("full", "cached"):
        if kind not in row:
            continue
        r = row[kind]
        lines.append(f"{kind}: {r['ms_per_call']:.1f} ms self CPU per call (profiled), copies {r['copy_share']:.1%}")
        lines += [f"  {share:6.1%}  {op}" for op, share in list(r["ops"].items())[:top]]
        for src, share in list(r.get("copies_by_line", {}).items())[:top]:
            lines.append(f"  by line {share:6.1%}  {src}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=10)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg-scale", type=float, default=4.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1, help="profiled runs per method, summed")
    p.add_argument("--methods", default="none,fora,icc,forecast,goc")
    p.add_argument("--stacks", action="store_true", help="attribute copies to source lines (with_stack)")
    p.add_argument("--all-ops", action="store_true", help="with --stacks: every op by source line, not only copies")
    p.add_argument("--top", type=int, default=12)
    p.add_argument("--out", default=None, help="JSON file for the shares")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from speed import configs

    import calicache
    import calicache.models.dit  # noqa: F401

    model = calicache.load_model("fmnist-dit").eval()
    rows = {}
    for name in args.methods.split(","):
        rows[name] = profile_method(model, configs("fmnist-dit")[name], args, calicache)
        print(report(name, rows[name], args.top), flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        settings = {k: getattr(args, k) for k in ("num", "steps", "cfg_scale", "threads", "repeats")}
        Path(args.out).write_text(json.dumps({**settings, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
