"""Quality at matched compute, with bootstrap 95% intervals: is caching better than fewer steps?

    # the full run (hours on the 2-core CPU; see docs/BENCHMARKS.md for the estimate)
    python benchmarks/quality.py --num 2000 --num-fd 5000 --out runs/quality-full
    # the reduced run (end to end in minutes)
    python benchmarks/quality.py --num 200 --num-fd 200 --ref-num 1000 --bootstrap 200 --out runs/quality-200
    # what the full run would cost here, from the reduced run's timings
    python benchmarks/quality.py --estimate runs/quality-200/quality.json --num 2000 --num-fd 5000

Configurations (shipped model, guidance = its recommended scale, DDIM adm spacing, classes index % 10,
the same noise per sample index in every configuration): uncached at `--steps` (20), FORA p=2,
ICC CD-SVD and plain SVD (rank 21 = C/9, the paper's ratio, p=2), GOC (the shipped compensation steps,
p=2), the calibrated forecast (CD, rank 21, p=2), and uncached sampling at each step count whose MACs
match a cached configuration (round(S x MACs ratio)).

Metrics: in-domain Frechet distance (the shipped Fashion-MNIST classifier's features, all
`--num-fd` samples, against the 10k test images), class agreement and its per-class split, the
classifier's IS; Inception-v3 FID, sFID, precision, recall (k = 3) on the first `--num` samples
against the Fashion-MNIST test set (statistics computed once and cached on disk; `--ref-num N`:
the first N test images only), and Inception IS when the weights have logits (`--inception`).
Intervals: `--bootstrap` resamples of the samples (reference statistics fixed), the 95% percentile
spread placed around the measured value (metrics/bootstrap.py says why);
the comparisons at matched MACs are paired (the same resample indices for both configurations,
whose sample i shares its noise and class). Samples are saved under OUT/samples and reused by a
rerun with the same settings, so an interrupted full run continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import calicache
from calicache.bench.report import markdown_table
from calicache.bench.runs import Variant, run_variant
from calicache.cache import FORAConfig, ForecastConfig, GOCConfig, ICCConfig, MethodConfig, NoCacheConfig
from calicache.cache.macs import count_macs
from calicache.data.fashion_mnist import load_fashion_mnist
from calicache.images import save_npz
from calicache.metrics.adm import NEIGHBOURS
from calicache.metrics.bootstrap import (
    FrechetBootstrap,
    PrecisionRecallBootstrap,
    centred_interval,
    resamples,
    share,
    weighted_inception_score,
)
from calicache.metrics.domain import classifier_outputs
from calicache.metrics.frechet import gaussian_stats
from calicache.metrics.inception import InceptionExtractor
from calicache.metrics.reference import FASHION_MNIST_TEST, reference_stats
from calicache.models.io import read_metadata, shipped_asset, shipped_path
from calicache.training.classifier import load_classifier

RANK = 21  # C/9 of the shipped width 192, as the shipped factor file
METRICS = ("fd", "class_agreement", "is_domain", "fid", "sfid", "precision", "recall", "is")


@dataclass
class Config:
    name: str
    config: MethodConfig
    steps: int
    family: str
    matches: str | None = None  # for "fewer steps" rows: the cached configurations with these MACs
    macs: float = 0.0
    boot: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> values over resamples
    row: dict = field(default_factory=dict)


def cached_configs(model_name: str, steps: int, goc_file: str | None) -> list[Config]:
    """The cached configurations; factor and GOC files are the shipped ones of `model_name`."""
    factors = str(shipped_asset(f"{model_name}-cd.safetensors"))
    goc = goc_file or str(shipped_asset(f"{model_name}-goc{steps}.json"))
    return [
        Config("FORA p=2", FORAConfig(period=2), steps, "FORA"),
        Config(f"ICC CD r={RANK} p=2", ICCConfig(period=2, rank=RANK, svd="cd", factors=factors), steps, "ICC CD"),
        Config(f"ICC plain SVD r={RANK} p=2", ICCConfig(period=2, rank=RANK, svd="plain"), steps, "ICC plain"),
        Config("GOC p=2", GOCConfig(period=2, steps_file=goc), steps, "GOC"),
        Config(f"forecast CD r={RANK} p=2", ForecastConfig(period=2, rank=RANK, svd="cd", factors=factors), steps,
               "forecast CD"),
    ]


def plan(model: torch.nn.Module, model_name: str, steps: int, cfg_scale: float, goc_file: str | None) -> list[Config]:
    """Uncached at `steps`, the cached configurations, and uncached runs at their matched step counts."""
    base = Config(f"no cache, {steps} steps", NoCacheConfig(), steps, "uncached")
    cached = cached_configs(model_name, steps, goc_file)
    full = count_macs(model, base.config, steps, cfg_scale)["total"]
    matched: dict[int, list[str]] = {}
    for c in cached:
        c.macs = count_macs(model, c.config, steps, cfg_scale)["total"]
        k = max(1, round(steps * c.macs / full))
        matched.setdefault(k, []).append(c.name)
    fewer = [Config(f"no cache, {k} steps", NoCacheConfig(), k, "fewer steps", ", ".join(names))
             for k, names in sorted(matched.items()) if k != steps]
    for c in [base, *fewer]:
        c.macs = count_macs(model, c.config, c.steps, cfg_scale)["total"]
    return [base, *cached, *fewer]


def get_samples(model, c: Config, args, out: Path) -> tuple[np.ndarray, float]:
    """uint8 (N, 28, 28, 3) samples of one configuration, reused from OUT/samples when they match."""
    slug = "".join(ch if ch.isalnum() else "-" for ch in c.name.lower())
    path = out / "samples" / f"{slug}.npz"
    key = json.dumps({"name": c.name, "steps": c.steps, "num": args.num_fd, "seed": args.seed,
                      "cfg": args.cfg_scale, "model": args.model_hash})
    if path.exists():
        with np.load(path) as z:
            if str(z["key"]) == key:
                return z["arr_0"], float(z["wall_seconds"])
    r = run_variant(model, Variant(c.name, c.config, c.steps, c.family), args.num_fd, args.cfg_scale, args.seed,
                    batch_size=args.batch_size, progress=True)
    save_npz(path, arr_0=r.images, arr_1=np.arange(args.num_fd) % 10, key=np.array(key),
             wall_seconds=np.array(r.wall_seconds))
    return r.images, r.wall_seconds


def interval_row(c: Config, values: dict[str, float]) -> dict:
    row = {"name": c.name, "family": c.family, "steps": c.steps, "macs_per_sample": c.macs, "matches": c.matches}
    for m, v in values.items():
        row[m] = v
        if m in c.boot:
            row[f"{m}_lo"], row[f"{m}_hi"], row[f"{m}_shift"] = centred_interval(v, c.boot[m])
    return row


def evaluate(c: Config, images: np.ndarray, ctx: dict, args) -> dict:
    """Point values of every metric for one configuration; fills c.boot with the resampled values."""
    labels = np.arange(len(images)) % 10
    logits, feats = classifier_outputs(ctx["classifier"], images, desc="classifier")
    pred = logits.argmax(1)
    values: dict = {}
    fd = ctx["fd"].fit(feats)
    agree = share(pred == labels)
    w_fd = ctx["w_fd"]
    values["fd"], c.boot["fd"] = fd(), np.array([fd(w) for w in w_fd])
    values["class_agreement"], c.boot["class_agreement"] = agree(None), np.array([agree(w) for w in w_fd])
    values["is_domain"] = weighted_inception_score(logits)
    c.boot["is_domain"] = np.array([weighted_inception_score(logits, w) for w in w_fd])
    values["per_class_agreement"] = [round(float((pred[labels == k] == k).mean()), 4) for k in range(10)]
    t0 = time.perf_counter()
    acts = ctx["inception"](images[: args.num], batch_size=args.inception_batch, desc=f"inception ({c.name})")
    values["inception_seconds"] = round(time.perf_counter() - t0, 1)
    w_inc, ref = ctx["w_inc"], ctx["ref"]
    for metric, feats_i, bootstrapper in (("fid", acts.pool, ctx["fid"]), ("sfid", acts.spatial, ctx["sfid"])):
        if bootstrapper is None:
            continue
        bootstrapper.fit(feats_i)
        values[metric], c.boot[metric] = bootstrapper(), np.array([bootstrapper(w) for w in w_inc])
    if ref.pool is not None:
        pr = PrecisionRecallBootstrap(ref.pool, acts.pool, NEIGHBOURS, ref_radii=ref.radii)
        values["precision"], c.boot["precision"] = pr.precision(None), np.array([pr.precision(w) for w in w_inc])
        values["recall"], c.boot["recall"] = pr.recall(None), np.array([pr.recall(w) for w in w_inc])
    if acts.logits is not None:
        values["is"] = weighted_inception_score(acts.logits)
        c.boot["is"] = np.array([weighted_inception_score(acts.logits, w) for w in w_inc])
    return values


def comparisons(configs: list[Config]) -> list[dict]:
    """Paired differences at matched MACs: each cached configuration minus the uncached run with its
    MACs, and ICC CD minus ICC plain SVD (negative FD/FID = the first is better)."""
    by_name = {c.name: c for c in configs}
    pairs = []
    for c in configs:
        if c.family == "fewer steps":
            pairs += [(by_name[n], c) for n in c.matches.split(", ")]
    cd = [c for c in configs if c.family == "ICC CD"]
    plain = [c for c in configs if c.family == "ICC plain"]
    if cd and plain:
        pairs.append((cd[0], plain[0]))
    rows = []
    for a, b in pairs:
        row = {"first": a.name, "second": b.name, "macs_ratio": round(a.macs / b.macs, 3)}
        for m in ("fd", "fid", "sfid"):
            if m in a.boot and m in b.boot:
                row[f"d_{m}"] = a.row[m] - b.row[m]
                row[f"d_{m}_lo"], row[f"d_{m}_hi"], _ = centred_interval(row[f"d_{m}"], a.boot[m] - b.boot[m])
        rows.append(row)
    return rows


def fmt_ci(r: dict, m: str, spec: str) -> str:
    if r.get(m) is None:
        return "n/a"
    if f"{m}_lo" not in r:
        return format(r[m], spec)
    return f"{r[m]:{spec}} [{r[m + '_lo']:{spec}}, {r[m + '_hi']:{spec}}]"


def tables(rows: list[dict], comps: list[dict]) -> str:
    show = [{"name": r["name"], "steps": r["steps"], "gmacs": r["macs_per_sample"] / 1e9,
             **{m: fmt_ci(r, m, ".3f" if m in ("class_agreement", "precision", "recall") else ".2f")
                for m in METRICS}} for r in rows]
    cols = [("name", "configuration", ""), ("steps", "steps", ""), ("gmacs", "GMACs/sample", ".3f"),
            ("fd", "in-domain FD", ""), ("class_agreement", "class agreement", ""), ("is_domain", "in-domain IS", ""),
            ("fid", "FID", ""), ("sfid", "sFID", ""), ("precision", "precision", ""), ("recall", "recall", ""),
            ("is", "Inception IS", "")]
    comp = [{"pair": f"{c['first']} - {c['second']}", "macs_ratio": c["macs_ratio"],
             **{m: fmt_ci(c, m, ".2f") for m in ("d_fd", "d_fid", "d_sfid")}} for c in comps]
    ccols = [("pair", "first - second", ""), ("macs_ratio", "MACs ratio", ".3f"), ("d_fd", "d in-domain FD", ""),
             ("d_fid", "d FID", ""), ("d_sfid", "d sFID", "")]
    return markdown_table(show, cols) + "\n\n" + markdown_table(comp, ccols)


def estimate(done: dict, num: int, num_fd: int, bootstrap: int, ref_num: int = 10000) -> dict:
    """Seconds a run at (num, num_fd, bootstrap) would take, from a finished run's timings (sampling
    and Inception scale linearly in their sample counts) and the bootstrap's cost timed now at the
    full sizes on synthetic features (it grows faster than linearly)."""
    rng = np.random.default_rng(0)
    costs = {}
    for name, n, d in (("fid", num, 2048), ("sfid", num, 2023), ("fd", num_fd, 128)):
        fb = FrechetBootstrap(np.zeros(d), np.eye(d)).fit(rng.normal(size=(n, d)))
        w = resamples(n, 2, seed=1)
        t0 = time.perf_counter()
        for row in w:
            fb(row)
        costs[name] = (time.perf_counter() - t0) / len(w)
    t0 = time.perf_counter()
    # the reference radii come from the cached reference statistics in a real run
    pr = PrecisionRecallBootstrap(rng.normal(size=(ref_num, 2048)), rng.normal(size=(num, 2048)),
                                  ref_radii=np.ones(ref_num, dtype=np.float32))
    costs["pr_setup"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    pr.recall(resamples(num, 1, seed=2)[0])
    costs["pr"] = time.perf_counter() - t0
    rows = done["rows"]
    sampling = sum(r["sampling_seconds"] for r in rows) * num_fd / done["num_fd"]
    inception_per_image = sum(r["inception_seconds"] for r in rows) / (len(rows) * done["num"])
    inception = inception_per_image * (num * len(rows) + ref_num)
    boot = len(rows) * (bootstrap * (costs["fid"] + costs["sfid"] + costs["fd"] + costs["pr"]) + costs["pr_setup"])
    return {"configurations": len(rows), "num": num, "num_fd": num_fd, "bootstrap": bootstrap,
            "seconds": {"sampling": round(sampling), "inception": round(inception), "bootstrap": round(boot),
                        "total": round(sampling + inception + boot)},
            "inception_seconds_per_image": round(inception_per_image, 3),
            "bootstrap_seconds_per_resample": {k: round(v, 3) for k, v in costs.items()},
            "from": {"num": done["num"], "num_fd": done["num_fd"], "threads": done["threads"]}}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-dit", help="a shipped model name (its factor and GOC files are used)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num", type=int, default=2000, help="samples per configuration for the Inception metrics")
    p.add_argument("--num-fd", type=int, default=5000, help="samples per configuration for the in-domain FD (>= --num)")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance (default: the model's recommended)")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for the 95% intervals")
    p.add_argument("--ref-num", type=int, default=None, help="Inception reference: the first N test images only")
    p.add_argument("--inception", default=None, help="Inception weights (a file with logits gives IS)")
    p.add_argument("--goc-file", default=None, help="GOC steps file (default: the shipped one for --steps)")
    p.add_argument("--batch-size", type=int, default=250, help="samples per sampling batch")
    p.add_argument("--inception-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="runs/quality-bench")
    p.add_argument("--estimate", default=None, metavar="QUALITY_JSON",
                   help="only estimate the run time of --num/--num-fd/--bootstrap from a finished run's quality.json")
    args = p.parse_args(argv)
    if args.estimate:
        torch.set_num_threads(args.threads)
        est = estimate(json.loads(Path(args.estimate).read_text()), args.num, args.num_fd, args.bootstrap)
        print(json.dumps(est, indent=2))
        return est
    if args.num_fd < args.num:
        raise SystemExit(f"--num-fd ({args.num_fd}) must be >= --num ({args.num}): the Inception samples are "
                         "the first --num of the in-domain ones")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "samples").mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    seconds: dict[str, float] = {}
    model = calicache.load_model(args.model)
    meta = read_metadata(shipped_path(args.model))
    args.model_hash = calicache.weight_hash(model)
    if args.cfg_scale is None:
        args.cfg_scale = float((meta.get("recommended") or {}).get("cfg_scale", 1.0))
    configs = plan(model, args.model, args.steps, args.cfg_scale, args.goc_file)

    t0 = time.perf_counter()
    classifier = load_classifier()
    test, _ = load_fashion_mnist("test")
    _, ref_feats = classifier_outputs(classifier, test, desc="classifier (test set)")
    extractor = InceptionExtractor(args.inception)
    ref_spec = FASHION_MNIST_TEST
    if args.ref_num is not None:
        ref_spec = str(out / f"fashion-mnist-test-first{args.ref_num}.npz")
        if not Path(ref_spec).exists():
            save_npz(ref_spec, arr_0=np.repeat(test[: args.ref_num, :, :, None], 3, axis=-1))
    ref = reference_stats(ref_spec, extractor, batch_size=args.inception_batch)
    seconds["reference"] = round(time.perf_counter() - t0, 1)
    ctx = {"classifier": classifier, "inception": extractor, "ref": ref,
           "fd": FrechetBootstrap(*gaussian_stats(ref_feats)),
           "fid": FrechetBootstrap(ref.mu, ref.sigma),
           "sfid": FrechetBootstrap(ref.mu_s, ref.sigma_s) if ref.mu_s is not None else None,
           "w_fd": resamples(args.num_fd, args.bootstrap, args.seed),
           "w_inc": resamples(args.num, args.bootstrap, args.seed + 1)}
    seconds.update(sampling=0.0, metrics=0.0)
    for c in configs:
        t0 = time.perf_counter()
        images, wall = get_samples(model, c, args, out)
        seconds["sampling"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        values = evaluate(c, images, ctx, args)
        seconds["metrics"] += time.perf_counter() - t0
        c.row = interval_row(c, values) | {"sampling_seconds": round(wall, 1)}
        print(json.dumps({k: v for k, v in c.row.items() if not k.endswith(("_lo", "_hi", "_shift"))}), flush=True)
    comps = comparisons(configs)
    seconds = {k: round(v, 1) for k, v in seconds.items()} | {"total": round(time.perf_counter() - t_start, 1)}
    result = {"model": args.model, "weight_hash": args.model_hash, "steps": args.steps, "cfg_scale": args.cfg_scale,
              "num": args.num, "num_fd": args.num_fd, "bootstrap": args.bootstrap, "seed": args.seed,
              "reference": {"inception": ref_spec, "inception_num": ref.num, "cache_file": ref.cache_file,
                            "from_cache": ref.from_cache, "in_domain": "fashion-mnist test (10000)"},
              "inception": extractor.describe(), "threads": args.threads, "seconds": seconds,
              "rows": [c.row for c in configs], "comparisons": comps}
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=2))
    table = tables(result["rows"], comps)
    (out / "quality.md").write_text(table + "\n")
    print(table)
    print(json.dumps({"seconds": seconds}))
    return result


if __name__ == "__main__":
    main()
