"""Quality at matched compute, with bootstrap 95% intervals: is caching better than fewer steps?

    # the full run, in as many pieces as it takes (each invocation does at most --budget-hours of work)
    python benchmarks/quality.py --num 2000 --num-fd 5000 --budget-hours 2.5 --out runs/quality-full
    # the table from whatever is finished (incomplete rows are marked), no sampling
    python benchmarks/quality.py --num 2000 --num-fd 5000 --report-only --out runs/quality-full
    # the remaining CPU time, from the finished chunks' timings
    python benchmarks/quality.py --num 2000 --num-fd 5000 --estimate --out runs/quality-full
    # two cores: two processes share the units (same folder), then the report from a whole run
    python benchmarks/quality.py --num 2000 --num-fd 5000 --shard 0/2 --out runs/quality-full &
    python benchmarks/quality.py --num 2000 --num-fd 5000 --shard 1/2 --out runs/quality-full; wait
    python benchmarks/quality.py --num 2000 --num-fd 5000 --report-only --out runs/quality-full

Configurations (`--configs`, default all; shipped model, guidance = its recommended scale, DDIM adm
spacing, classes index % classes, the same noise per sample index in every configuration): uncached
at `--steps` (20), FORA p=2, ICC CD-SVD and plain SVD (rank 21 = C/9, the paper's ratio, p=2), GOC
(the shipped compensation steps, p=2), the calibrated forecast (CD, rank 21, p=2), the best peers of
`calicache bench` at p=2 (diffusers TaylorSeer; cache-dit DBCache F1B0 + TaylorSeer), any tuned
configuration files (`--extra-config NAME=config.json`, as `calicache tune` writes them), and uncached
sampling at each step count whose MACs match a cached configuration (round(S x MACs ratio); a peer's
ratio is the torch flop counter's, against the uncached diffusers model).

Resumable: the work is cut into units of one configuration x one chunk of `--chunk` sample indices
(250); a unit stores its uint8 samples, the in-domain classifier's outputs and (for indices below
`--num`) the Inception features under OUT/chunks/CONFIG/, each file named by the hash of everything
that determines it (bench/chunks.py). A rerun of the same command skips what is there; a changed
setting (model, config or its files, steps, guidance, seed, indices, feature extractor) computes
afresh. Units run chunk index by chunk index across configurations, so an unfinished run has every
configuration at (almost) the same sample count. `--budget-hours`/`--chunks` bound one invocation.

Metrics: in-domain Frechet distance (the shipped Fashion-MNIST classifier's features, all the
finished samples up to `--num-fd`, against the 10k test images), class agreement and its per-class
split, the classifier's IS; Inception-v3 FID, sFID, precision, recall (k = 3) on the first `--num`
samples against the Fashion-MNIST test set (statistics computed once and cached on disk; `--ref-num N`:
the first N test images only), and Inception IS when the weights have logits (`--inception`).
Intervals: `--bootstrap` resamples of the samples (reference statistics fixed), the 95% percentile
spread placed around the measured value (metrics/bootstrap.py says why); the comparisons at matched
MACs are paired (the same resample indices for both configurations, whose sample i shares its noise
and class). Each configuration's resampled values are cached under OUT/boot, keyed like the chunks.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

import calicache
from calicache.bench.chunks import ChunkStore, digest
from calicache.bench.peers import Peer, attach, counted_sample, missing
from calicache.bench.report import markdown_table
from calicache.cache import (
    FORAConfig,
    ForecastConfig,
    GOCConfig,
    ICCConfig,
    MethodConfig,
    NoCacheConfig,
    apply_cache,
    load_config,
    remove_cache,
)
from calicache.cache.macs import count_macs
from calicache.data.fashion_mnist import load_fashion_mnist
from calicache.images import save_npz, to_uint8
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
from calicache.metrics.inception import Activations, InceptionExtractor
from calicache.metrics.reference import (
    FASHION_MNIST_TEST,
    ReferenceStats,
    load_reference_images,
    reference_cache_file,
    reference_stats,
)
from calicache.models.io import SHIPPED, read_metadata, shipped_asset, shipped_path
from calicache.sampling import sample
from calicache.training.classifier import load_classifier
from calicache.utils import write_file

RANK = 21  # C/9 of the shipped width 192, as the shipped factor file
CHUNK = 250
KEY_VERSION = 2  # raise when a code change alters the samples or features of unchanged settings
# (2: the hot-path merge changed the DiT token layout and the methods' arithmetic)
METRICS = ("fd", "class_agreement", "is_domain", "fid", "sfid", "precision", "recall", "is")
PEERS = {"taylorseer": Peer("taylorseer", 2), "dbcache-taylorseer": Peer("dbcache-taylorseer", 2)}
BUILT_IN = ("fora", "icc-cd", "icc-plain", "goc", "forecast-cd", *PEERS)


@dataclass
class Config:
    name: str
    ident: str  # folder name and --configs id
    family: str
    steps: int
    config: MethodConfig | None = None  # calicache's configurations
    peer: Peer | None = None  # the peers'
    matches: str | None = None  # for "fewer steps" rows: the cached configurations with these MACs
    macs: float = 0.0
    boot: dict[str, np.ndarray] = field(default_factory=dict)  # metric -> values over resamples
    row: dict = field(default_factory=dict)
    _identity: dict | None = field(default=None, repr=False)  # identity(), computed once (it hashes files)


def slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower())


def identity(c: Config) -> dict:
    """What fixes a configuration's samples besides the model, guidance, seed and indices: its config
    with the content hashes of its files (not their paths), or the peer and its libraries' versions."""
    if c._identity is None:
        c._identity = _identity(c)
    return c._identity


def _identity(c: Config) -> dict:
    if c.peer is not None:
        versions = {}
        for lib in ("diffusers", "cache-dit"):
            try:
                versions[lib] = importlib.metadata.version(lib)
            except importlib.metadata.PackageNotFoundError:
                versions[lib] = None
        return {"peer": [c.peer.kind, c.peer.period, c.peer.threshold], "versions": versions, "steps": c.steps}
    d = c.config.to_dict()
    for k in [k for k in d if f"{k}_sha256" in d]:
        del d[k]
    return {"config": d, "steps": c.steps}


def builtin_config(ident: str, model_name: str, steps: int, args) -> Config:
    """One of the built-in configurations; factor and GOC files default to the shipped ones of the model."""
    def asset(kind: str, given: str | None, filename: str) -> str:
        if given:
            return given
        try:
            return str(shipped_asset(filename))
        except FileNotFoundError:
            raise SystemExit(f"{ident} needs a {kind} file for {model_name}: pass {'--' + kind.replace(' ', '-')} "
                             f"or leave {ident} out with --configs") from None

    if ident in PEERS:
        peer = PEERS[ident]
        return Config(peer.name, ident, peer.family, steps, peer=peer)
    if ident == "fora":
        return Config("FORA p=2", ident, "FORA", steps, FORAConfig(period=2))
    if ident == "icc-plain":
        return Config(f"ICC plain SVD r={RANK} p=2", ident, "ICC plain", steps,
                      ICCConfig(period=2, rank=RANK, svd="plain"))
    if ident == "goc":
        goc = asset("goc file", args.goc_file, f"{model_name}-goc{steps}.json")
        return Config("GOC p=2", ident, "GOC", steps, GOCConfig(period=2, steps_file=goc))
    factors = asset("factors", args.factors, f"{model_name}-cd.safetensors")
    if ident == "icc-cd":
        return Config(f"ICC CD r={RANK} p=2", ident, "ICC CD", steps,
                      ICCConfig(period=2, rank=RANK, svd="cd", factors=factors))
    return Config(f"forecast CD r={RANK} p=2", ident, "forecast CD", steps,
                  ForecastConfig(period=2, rank=RANK, svd="cd", factors=factors))


def peer_macs_ratio(model: torch.nn.Module, peer: Peer, steps: int, cfg_scale: float) -> float:
    """A peer's MACs over the uncached diffusers model's (torch flop counter, one sample each)."""
    _, macs = counted_sample(attach(model, peer, steps), 1, steps, cfg_scale=cfg_scale)
    _, full = counted_sample(attach(model, Peer("none"), steps), 1, steps, cfg_scale=cfg_scale)
    return macs / full


def plan(model: torch.nn.Module, model_name: str, args) -> tuple[list[Config], list[str]]:
    """Uncached at --steps, the chosen cached configurations, and uncached runs at their matched step
    counts; also the notes of configurations left out (a peer that is not installed)."""
    steps, cfg_scale = args.steps, args.cfg_scale
    base = Config(f"no cache, {steps} steps", "uncached", "uncached", steps, NoCacheConfig())
    full = count_macs(model, base.config, steps, cfg_scale)["total"]
    cached, notes = [], []
    for ident in args.configs:
        if ident in PEERS and missing(PEERS[ident].kind):
            notes.append(f"{ident} left out: {missing(PEERS[ident].kind)}")
            continue
        cached.append(builtin_config(ident, model_name, steps, args))
    for name, path in args.extra_config:
        cached.append(Config(name, "tuned-" + slug(name), "tuned", steps, load_config(path)))
    matched: dict[int, list[str]] = {}
    for c in cached:
        if c.peer is not None:
            c.macs = peer_macs_ratio(model, c.peer, steps, cfg_scale) * full
        else:
            c.macs = count_macs(model, c.config, steps, cfg_scale)["total"]
        k = max(1, round(steps * c.macs / full))
        matched.setdefault(k, []).append(c.name)
    fewer = [Config(f"no cache, {k} steps", f"uncached-{k}", "fewer steps", k, NoCacheConfig(), matches=", ".join(n))
             for k, n in sorted(matched.items()) if k != steps]
    for c in [base, *fewer]:
        c.macs = count_macs(model, c.config, c.steps, cfg_scale)["total"]
    configs = [base, *cached, *fewer]
    idents = [c.ident for c in configs]
    if len(set(idents)) != len(idents):
        raise SystemExit(f"two configurations share a folder name ({sorted(idents)}); rename an --extra-config")
    return configs, notes


# -- the units of work ------------------------------------------------------------------------------

def ranges(total: int, chunk: int) -> list[tuple[int, int]]:
    return [(s, min(s + chunk, total)) for s in range(0, total, chunk)]


def sample_key(c: Config, start: int, end: int, args) -> dict:
    return {"v": KEY_VERSION, "model": args.model_hash, "configuration": identity(c), "cfg_scale": args.cfg_scale,
            "seed": args.seed, "sampler": "ddim", "spacing": "adm", "start": start, "end": end,
            "batch_size": min(args.batch_size, end - start)}


def feature_key(skey: dict, extractor: str) -> dict:
    return {"v": KEY_VERSION, "samples": digest(skey), "extractor": extractor}


def sample_chunk(model: torch.nn.Module, c: Config, start: int, end: int, args) -> np.ndarray:
    """uint8 (end - start, H, W, 3) samples of indices start..end-1 (noise and class follow the index)."""
    net = attach(model, c.peer, c.steps) if c.peer is not None else apply_cache(model, c.config)
    try:
        x = sample(net, end - start, c.steps, cfg_scale=args.cfg_scale, seed=args.seed, start=start,
                   batch_size=args.batch_size, progress=True)
    finally:
        if c.peer is None:
            remove_cache(model)
    return to_uint8(x)


class Clock:
    """CPU (this process, all threads) and wall seconds since creation, as npz members."""

    def __init__(self):
        self.cpu, self.wall = time.process_time(), time.perf_counter()

    def seconds(self) -> dict[str, np.ndarray]:
        return {"cpu_seconds": np.array(time.process_time() - self.cpu),
                "wall_seconds": np.array(time.perf_counter() - self.wall)}


def pieces(c: Config, start: int, end: int, args, ctx) -> list[tuple[str, dict]]:
    """(kind, key) of the files one unit leaves: samples, classifier outputs, Inception features."""
    skey = sample_key(c, start, end, args)
    out = [("samples", skey), ("classifier", feature_key(skey, ctx["classifier_id"]))]
    if start < args.num:
        out.append(("inception", feature_key(skey, ctx["inception_id"])))
    return out


def reference_key(ctx: dict) -> dict:
    return {"v": KEY_VERSION, "reference": ctx["ref_sha256"], "extractor": ctx["inception_id"]}


def inception_arrays(ctx: dict, images: np.ndarray, args, desc: str) -> dict[str, np.ndarray]:
    acts = ctx["inception"](images, batch_size=args.inception_batch, desc=desc)
    arrays = {"pool": acts.pool, "spatial": acts.spatial}
    if acts.logits is not None:
        arrays["logits"] = acts.logits
    return arrays


def unit_pieces(c: Config | None, start: int, end: int, args, ctx) -> list[tuple[str, str, dict]]:
    """(group, kind, key) of the files a unit leaves (c = None: a chunk of the Inception reference)."""
    if c is None:
        return [("reference", "inception", reference_key(ctx))]
    return [(c.ident, kind, key) for kind, key in pieces(c, start, end, args, ctx)]


def run_unit(model: torch.nn.Module, c: Config | None, start: int, end: int, store: ChunkStore, ctx: dict,
             args) -> dict:
    """Compute and store whatever of the unit is missing; returns the CPU seconds each part took."""
    if c is None:
        clock = Clock()
        arrays = inception_arrays(ctx, ctx["ref_images"][start:end], args, "inception (reference)")
        sec = clock.seconds()
        store.save("reference", "inception", start, end, reference_key(ctx), **arrays, **sec)
        return {"reference_cpu": float(sec["cpu_seconds"])}
    parts = pieces(c, start, end, args, ctx)
    todo = [(kind, key) for kind, key in parts[1:] if not store.has(c.ident, kind, start, end, key)]
    skey, times = parts[0][1], {}
    loaded = store.load(c.ident, "samples", start, end, skey)
    if loaded is None:
        clock = Clock()
        images = sample_chunk(model, c, start, end, args)
        sec = clock.seconds()
        store.save(c.ident, "samples", start, end, skey, images=images, **sec)
        times["sampling_cpu"] = float(sec["cpu_seconds"])
    else:
        images = loaded["images"]
    for kind, key in todo:
        clock = Clock()
        if kind == "classifier":  # the other kind: inception
            logits, feats = classifier_outputs(ctx["classifier"], images, desc="classifier")
            arrays = {"logits": logits, "features": feats}
        else:
            arrays = inception_arrays(ctx, images, args, f"inception ({c.name})")
        sec = clock.seconds()
        store.save(c.ident, kind, start, end, key, **arrays, **sec)
        times[f"{kind}_cpu"] = float(sec["cpu_seconds"])
    return times


def units(configs: list[Config], ctx: dict, args) -> list[tuple[Config | None, int, int]]:
    """The first chunk of every configuration (a short run times them all), the Inception reference in
    chunks (None) unless its statistics are cached, then the other chunks index by index across the
    configurations (an unfinished run has every configuration at about the same sample count)."""
    rounds = ranges(args.num_fd, args.chunk)
    ref = [] if ctx["reference_cached"]() else [(None, s, e) for s, e in ranges(len(ctx["ref_images"]), args.chunk)]
    return [(c, *rounds[0]) for c in configs] + ref + [(c, s, e) for s, e in rounds[1:] for c in configs]


def unit_done(c: Config | None, s: int, e: int, store: ChunkStore, ctx: dict, args) -> bool:
    return all(store.has(group, kind, s, e, key) for group, kind, key in unit_pieces(c, s, e, args, ctx))


def work(model: torch.nn.Module, configs: list[Config], store: ChunkStore, ctx: dict, args) -> dict:
    """Run the missing units until done, `--chunks` units or `--budget-hours` (a unit is not started
    when the longest one so far would end past the budget)."""
    t0, spent, done, stopped = time.perf_counter(), [], 0, None
    every = units(configs, ctx, args)
    if args.shard is not None:  # every n-th unit from the k-th: shards cover the run once, each at the same pace
        k, n = args.shard
        every = every[k::n]
    todo = [(c, s, e) for c, s, e in every if not unit_done(c, s, e, store, ctx, args)]
    for c, s, e in todo:
        if args.chunks is not None and done >= args.chunks:
            stopped = f"--chunks {args.chunks}"
            break
        if args.budget_hours is not None and spent and time.perf_counter() - t0 + max(spent) > args.budget_hours * 3600:
            stopped = f"--budget-hours {args.budget_hours}"
            break
        t = time.perf_counter()
        times = run_unit(model, c, s, e, store, ctx, args)
        spent.append(time.perf_counter() - t)
        done += 1
        print(json.dumps({"unit": "reference" if c is None else c.name, "indices": [s, e],
                          "wall_seconds": round(spent[-1], 1), **{k: round(v, 1) for k, v in times.items()}}),
              flush=True)
    return {"units_run": done, "units_left": len(todo) - done, "units_total": len(every), "stopped_by": stopped,
            "wall_seconds": round(time.perf_counter() - t0, 1)}


# -- the report -------------------------------------------------------------------------------------

def finished(c: Config, store: ChunkStore, ctx: dict, args) -> dict:
    """The features of the finished chunks of `c` from index 0 on (a gap ends them): classifier
    outputs up to --num-fd, Inception features up to --num, and the digests of the pieces used."""
    parts: dict[str, list] = {"classifier": [], "inception": []}
    used: list[str] = []
    for kind, total in (("classifier", args.num_fd), ("inception", args.num)):
        for s, e in ranges(args.num_fd, args.chunk):
            if s >= total:
                break
            key = dict(pieces(c, s, e, args, ctx))[kind]
            piece = store.load(c.ident, kind, s, e, key)
            if piece is None:
                break
            parts[kind].append(piece)
            used.append(digest(key))
    data = {"used": used, "n_fd": sum(len(p["features"]) for p in parts["classifier"])}
    if parts["classifier"]:
        data["logits"] = np.concatenate([p["logits"] for p in parts["classifier"]])
        data["features"] = np.concatenate([p["features"] for p in parts["classifier"]])
    inc = parts["inception"]
    data["n_inception"] = min(args.num, sum(len(p["pool"]) for p in inc))
    if inc:
        n = data["n_inception"]
        data["pool"] = np.concatenate([p["pool"] for p in inc])[:n]
        data["spatial"] = np.concatenate([p["spatial"] for p in inc])[:n]
        data["inception_logits"] = np.concatenate([p["logits"] for p in inc])[:n] if "logits" in inc[0] else None
    return data


def evaluate(c: Config, data: dict, ctx: dict, args) -> dict:
    """Point values of every metric the finished samples allow; fills c.boot with the resampled values."""
    values: dict = {}
    n, n_inc = data["n_fd"], data["n_inception"]
    weights = (lambda k, seed: resamples(k, args.bootstrap, seed)) if args.bootstrap else (lambda k, seed: [])
    if n >= 2:
        logits, pred = data["logits"], data["logits"].argmax(1)
        labels = np.arange(n) % ctx["num_classes"]
        w_fd = weights(n, args.seed)
        fd = ctx["fd"].fit(data["features"])
        agree = share(pred == labels)
        values["fd"], c.boot["fd"] = fd(), np.array([fd(w) for w in w_fd])
        values["class_agreement"], c.boot["class_agreement"] = agree(None), np.array([agree(w) for w in w_fd])
        values["is_domain"] = weighted_inception_score(logits)
        c.boot["is_domain"] = np.array([weighted_inception_score(logits, w) for w in w_fd])
        values["per_class_agreement"] = [round(float((pred[labels == k] == k).mean()), 4)
                                         for k in range(ctx["num_classes"]) if (labels == k).any()]
    ref = ctx["ref"]() if n_inc >= 2 else None
    if ref is None:
        return values
    w_inc = weights(n_inc, args.seed + 1)
    for metric, feats, bootstrapper in (("fid", data["pool"], ctx["fid"]), ("sfid", data["spatial"], ctx["sfid"])):
        if bootstrapper is None:
            continue
        bootstrapper.fit(feats)
        values[metric], c.boot[metric] = bootstrapper(), np.array([bootstrapper(w) for w in w_inc])
    if ref.pool is not None:
        pr = PrecisionRecallBootstrap(ref.pool, data["pool"], NEIGHBOURS, ref_radii=ref.radii)
        values["precision"], c.boot["precision"] = pr.precision(None), np.array([pr.precision(w) for w in w_inc])
        values["recall"], c.boot["recall"] = pr.recall(None), np.array([pr.recall(w) for w in w_inc])
    if data.get("inception_logits") is not None:
        values["is"] = weighted_inception_score(data["inception_logits"])
        c.boot["is"] = np.array([weighted_inception_score(data["inception_logits"], w) for w in w_inc])
    return values


def evaluate_cached(c: Config, data: dict, store: ChunkStore, ctx: dict, args) -> dict:
    """`evaluate`, reusing the values and resamples stored under OUT/boot for the same pieces and settings."""
    key = {"v": KEY_VERSION, "pieces": data["used"], "bootstrap": args.bootstrap, "seed": args.seed,
           "reference": ctx["reference_id"], "n": [data["n_fd"], data["n_inception"]],
           "inception_reference": ctx["ref"]() is not None}  # FID etc. come once the reference is finished
    if data["n_fd"] < 2:
        return {}
    stored = store.load("boot", c.ident, 0, data["n_fd"], key)
    if stored is not None:
        c.boot = {k.removeprefix("boot_"): v for k, v in stored.items() if k.startswith("boot_")}
        return json.loads(str(stored["values"]))
    values = evaluate(c, data, ctx, args)
    store.save("boot", c.ident, 0, data["n_fd"], key, values=np.array(json.dumps(values)),
               **{f"boot_{k}": v for k, v in c.boot.items()})
    return values


def interval_row(c: Config, values: dict, data: dict, args) -> dict:
    complete = data["n_fd"] >= args.num_fd and data["n_inception"] >= args.num
    row = {"name": c.name, "family": c.family, "steps": c.steps, "macs_per_sample": c.macs, "matches": c.matches,
           "n_fd": data["n_fd"], "n_inception": data["n_inception"], "complete": complete}
    for m, v in values.items():
        row[m] = v
        if m in c.boot and len(c.boot[m]):
            row[f"{m}_lo"], row[f"{m}_hi"], row[f"{m}_shift"] = centred_interval(v, c.boot[m])
    return row


def comparisons(configs: list[Config]) -> list[dict]:
    """Paired differences at matched MACs: each cached configuration minus the uncached run with its
    MACs, and ICC CD minus ICC plain SVD (negative FD/FID = the first is better). A metric is compared
    only when both rows rest on the same samples (an unfinished run may differ by a chunk)."""
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
        for m, n in (("fd", "n_fd"), ("fid", "n_inception"), ("sfid", "n_inception")):
            if a.row.get(m) is None or b.row.get(m) is None or a.row[n] != b.row[n]:
                continue
            row[f"d_{m}"] = a.row[m] - b.row[m]
            if len(a.boot.get(m, ())):
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
             "samples": f"{r['n_fd']} / {r['n_inception']}" + ("" if r["complete"] else " (incomplete)"),
             **{m: fmt_ci(r, m, ".3f" if m in ("class_agreement", "precision", "recall") else ".2f")
                for m in METRICS}} for r in rows]
    cols = [("name", "configuration", ""), ("steps", "steps", ""), ("gmacs", "GMACs/sample", ".3f"),
            ("samples", "samples (FD / Inception)", ""), ("fd", "in-domain FD", ""),
            ("class_agreement", "class agreement", ""), ("is_domain", "in-domain IS", ""), ("fid", "FID", ""),
            ("sfid", "sFID", ""), ("precision", "precision", ""), ("recall", "recall", ""),
            ("is", "Inception IS", "")]
    comp = [{"pair": f"{c['first']} - {c['second']}", "macs_ratio": c["macs_ratio"],
             **{m: fmt_ci(c, m, ".2f") for m in ("d_fd", "d_fid", "d_sfid")}} for c in comps]
    ccols = [("pair", "first - second", ""), ("macs_ratio", "MACs ratio", ".3f"), ("d_fd", "d in-domain FD", ""),
             ("d_fid", "d FID", ""), ("d_sfid", "d sFID", "")]
    return markdown_table(show, cols) + "\n\n" + markdown_table(comp, ccols)


def report(configs: list[Config], store: ChunkStore, ctx: dict, args) -> tuple[list[dict], list[dict]]:
    for c in configs:
        data = finished(c, store, ctx, args)
        c.row = interval_row(c, evaluate_cached(c, data, store, ctx, args), data, args)
    return [c.row for c in configs], comparisons(configs)


# -- the run time ----------------------------------------------------------------------------------

def bootstrap_seconds(num: int, num_fd: int, ref_num: int) -> dict[str, float]:
    """CPU seconds of one resample of each bootstrapped metric at the full sizes, timed now on
    synthetic features (its cost grows faster than linearly in the sample count)."""
    rng = np.random.default_rng(0)
    costs = {}
    for name, n, d in (("fid", num, 2048), ("sfid", num, 2023), ("fd", num_fd, 128)):
        fb = FrechetBootstrap(np.zeros(d), np.eye(d)).fit(rng.normal(size=(n, d)))
        w = resamples(n, 2, seed=1)
        t0 = time.process_time()
        for row in w:
            fb(row)
        costs[name] = (time.process_time() - t0) / len(w)
    t0 = time.process_time()
    pr = PrecisionRecallBootstrap(rng.normal(size=(ref_num, 2048)), rng.normal(size=(num, 2048)),
                                  ref_radii=np.ones(ref_num, dtype=np.float32))
    costs["pr_setup"] = time.process_time() - t0
    t0 = time.process_time()
    pr.recall(resamples(num, 1, seed=2)[0])
    costs["pr"] = time.process_time() - t0
    return costs


def estimate(configs: list[Config], store: ChunkStore, ctx: dict, args, boot_costs: dict | None) -> dict:
    """CPU seconds the unfinished part of the run needs, from the CPU time the finished pieces took:
    each configuration's own sampling rate (a configuration without a finished chunk: the mean
    rate per model call of the others, times its steps), the pooled classifier and Inception rates;
    plus the Inception reference statistics when they are not cached, and the bootstrap."""
    rates: dict[str, dict] = {}
    every = units(configs, ctx, args)
    if args.shard is not None:  # every n-th unit from the k-th: shards cover the run once, each at the same pace
        k, n = args.shard
        every = every[k::n]
    for c, s, e in every:
        for group, kind, key in unit_pieces(c, s, e, args, ctx):
            piece = store.load(group, kind, s, e, key, members=("cpu_seconds",))
            if piece is not None:
                r = rates.setdefault(group if kind == "samples" else kind, {"seconds": 0.0, "n": 0, "calls": 0})
                r["seconds"] += float(piece["cpu_seconds"])
                r["n"] += e - s
                r["calls"] += (e - s) * (c.steps if c is not None else 0)
    rate = {k: r["seconds"] / r["n"] for k, r in rates.items()}
    per_call = [r["seconds"] / r["calls"] for k, r in rates.items() if k not in ("classifier", "inception")]
    per_sample = {c.name: rate.get(c.ident, float(np.mean(per_call)) * c.steps if per_call else None) for c in configs}
    rate["reference"] = rate.get("inception")
    left = {"sampling": 0.0, "classifier": 0.0, "inception": 0.0, "reference": 0.0}
    for c, s, e in every:
        for group, kind, key in unit_pieces(c, s, e, args, ctx):
            if not store.has(group, kind, s, e, key):
                part = "sampling" if kind == "samples" else group if group == "reference" else kind
                r = per_sample[c.name] if kind == "samples" else rate.get(part)
                left[part] += (e - s) * (r or 0.0)
    if boot_costs:
        per = args.bootstrap * (boot_costs["fid"] + boot_costs["sfid"] + boot_costs["fd"] + boot_costs["pr"])
        left["bootstrap"] = len(configs) * (per + boot_costs["pr_setup"])
    return {"cpu_seconds_left": {k: round(v, 1) for k, v in left.items()} | {"total": round(sum(left.values()), 1)},
            "cpu_hours_left": round(sum(left.values()) / 3600, 2),
            "sampling_cpu_seconds_per_sample": {k: None if v is None else round(v, 4) for k, v in per_sample.items()},
            "classifier_cpu_seconds_per_image": None if "classifier" not in rate else round(rate["classifier"], 5),
            "inception_cpu_seconds_per_image": None if rate["reference"] is None else round(rate["reference"], 4),
            "bootstrap_cpu_seconds_per_resample": {k: round(v, 3) for k, v in (boot_costs or {}).items()},
            "units_left": sum(not unit_done(c, s, e, store, ctx, args) for c, s, e in every),
            "note": "CPU seconds of this process (1 thread); parts without a finished piece to time count 0"}


# -- the command -----------------------------------------------------------------------------------

def extra_config(text: str) -> tuple[str, str]:
    name, sep, path = text.rpartition("=")  # names may hold "=" ("FORA p=3"), paths rarely do
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: give NAME=path/to/config.json")
    return name, path


def shard(text: str) -> tuple[int, int]:
    try:
        k, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shard takes K/N (e.g. 0/2), got {text!r}") from None
    if not 0 <= k < n:
        raise argparse.ArgumentTypeError(f"--shard {text}: K must be in 0..N-1")
    return k, n


def config_list(text: str) -> list[str]:
    idents = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in idents if t not in BUILT_IN]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown configuration(s) {bad}; choose from {list(BUILT_IN)} "
                                         "(tuned ones come with --extra-config)")
    return idents


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="fmnist-dit", help="a shipped model name (its factor and GOC files are "
                   "used) or a model file (then pass --factors/--goc-file or leave those configurations out)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--num", type=int, default=2000, help="samples per configuration for the Inception metrics")
    p.add_argument("--num-fd", type=int, default=5000, help="samples per configuration for the in-domain FD (>= --num)")
    p.add_argument("--configs", type=config_list, default=list(BUILT_IN),
                   help=f"comma-separated built-in configurations (default all: {','.join(BUILT_IN)}); "
                   "the uncached runs are always included")
    p.add_argument("--extra-config", type=extra_config, action="append", default=[], metavar="NAME=CONFIG_JSON",
                   help="another cache config file to compare (repeatable), e.g. a `calicache tune` result")
    p.add_argument("--cfg-scale", type=float, default=None, help="guidance (default: the model's recommended)")
    p.add_argument("--bootstrap", type=int, default=200, help="resamples for the 95%% intervals (0: none)")
    p.add_argument("--ref-num", type=int, default=None, help="Inception reference: the first N test images only")
    p.add_argument("--domain-ref-num", type=int, default=None, help="in-domain reference: the first N test images")
    p.add_argument("--inception", default=None, help="Inception weights (a file with logits gives IS)")
    p.add_argument("--factors", default=None, help="CD factor file (default: the shipped one of --model)")
    p.add_argument("--goc-file", default=None, help="GOC steps file (default: the shipped one for --steps)")
    p.add_argument("--chunk", type=int, default=CHUNK, help="sample indices per unit of work (and stored file)")
    p.add_argument("--batch-size", type=int, default=CHUNK, help="samples per sampling batch")
    p.add_argument("--inception-batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget-hours", type=float, default=None,
                   help="start no unit that would end after this many hours (the report comes after)")
    p.add_argument("--chunks", type=int, default=None, help="run at most this many units of work")
    p.add_argument("--report-only", action="store_true", help="no sampling: the table from the finished chunks")
    p.add_argument("--no-report", action="store_true", help="only run units (the report needs the Inception "
                   "reference statistics, computed once)")
    p.add_argument("--estimate", action="store_true",
                   help="only print the CPU time the unfinished part needs, from the finished chunks' timings")
    p.add_argument("--shard", type=shard, default=None, metavar="K/N",
                   help="run only units K, K+N, K+2N, ... (N processes split the work over one --out folder; "
                   "implies --no-report: report afterwards with a run without --shard, e.g. --report-only)")
    p.add_argument("--out", default="runs/quality-bench")
    args = p.parse_args(argv)
    if args.shard is not None:
        if args.report_only or args.estimate:
            raise SystemExit("--shard only runs units; use --report-only or --estimate without it")
        args.no_report = True
    if args.num_fd < args.num:
        raise SystemExit(f"--num-fd ({args.num_fd}) must be >= --num ({args.num}): the Inception samples are "
                         "the first --num of the in-domain ones")
    for flag in ("chunk", "batch_size", "num"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1")
    if args.budget_hours is not None and args.budget_hours <= 0:
        raise SystemExit("--budget-hours must be > 0 (omit it for no limit)")
    return args


def context(model: torch.nn.Module, store: ChunkStore, args) -> dict:
    """Classifier, Inception and the (lazily computed, cached) reference statistics."""
    classifier = load_classifier()
    extractor = InceptionExtractor(args.inception)
    test, _ = load_fashion_mnist("test")
    ref_spec = FASHION_MNIST_TEST
    if args.ref_num is not None:
        ref_spec = str(store.root / f"fashion-mnist-test-first{args.ref_num}.npz")
        if not Path(ref_spec).exists():
            save_npz(ref_spec, arr_0=np.repeat(test[: args.ref_num, :, :, None], 3, axis=-1))
    domain = test[: args.domain_ref_num]
    ctx = {"classifier": classifier, "inception": extractor, "num_classes": model.config.num_classes,
           "classifier_id": calicache.weight_hash(classifier),
           "inception_id": f"{extractor.fingerprint}|fast={getattr(extractor, 'fast', False)}",
           "ref_spec": ref_spec}
    ctx["reference_id"] = {"inception": [ref_spec, args.ref_num, ctx["inception_id"]],
                           "domain": [ctx["classifier_id"], len(domain)]}
    ref_images, _, _, ctx["ref_sha256"] = load_reference_images(ref_spec)
    ctx["ref_images"] = ref_images
    cached: dict = {}

    def reference_cached() -> bool:
        return "ref" in cached or reference_cache_file(ref_spec, extractor).is_file()

    def ref() -> ReferenceStats | None:
        """The Inception reference statistics: cached ones, or from the finished reference chunks (None
        while any is missing)."""
        if "ref" not in cached:
            acts = None
            if not reference_cached():
                parts = [store.load("reference", "inception", s, e, reference_key(ctx))
                         for s, e in ranges(len(ref_images), args.chunk)]
                if any(p is None for p in parts):
                    return None
                acts = Activations(np.concatenate([p["pool"] for p in parts]),
                                   np.concatenate([p["spatial"] for p in parts]))
            r = cached["ref"] = reference_stats(ref_spec, extractor, batch_size=args.inception_batch,
                                                activations=acts)
            ctx["fid"] = FrechetBootstrap(r.mu, r.sigma)
            ctx["sfid"] = FrechetBootstrap(r.mu_s, r.sigma_s) if r.mu_s is not None else None
        return cached["ref"]

    ctx["ref"], ctx["reference_cached"] = ref, reference_cached
    dkey = {"v": KEY_VERSION, "classifier": ctx["classifier_id"],
            "images": hashlib.sha256(domain.tobytes()).hexdigest()}
    feats = store.load("reference", "classifier", 0, len(domain), dkey)
    if feats is None:
        _, f = classifier_outputs(classifier, domain, desc="classifier (test set)")
        store.save("reference", "classifier", 0, len(domain), dkey, features=f)
        feats = {"features": f}
    ctx["fd"] = FrechetBootstrap(*gaussian_stats(feats["features"]))
    return ctx


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    store = ChunkStore(args.out)
    with store.lock(shard=None if args.shard is None else "{}-of-{}".format(*args.shard)):
        model = calicache.load_model(args.model)
        try:
            meta = read_metadata(shipped_path(args.model) if args.model in SHIPPED else args.model)
        except (OSError, ValueError):
            meta = {}  # a model file without calicache's metadata: no recommended guidance
        args.model_hash = calicache.weight_hash(model)
        if args.cfg_scale is None:
            args.cfg_scale = float((meta.get("recommended") or {}).get("cfg_scale", 1.0))
        model_name = args.model if args.model in SHIPPED else Path(args.model).stem
        configs, notes = plan(model, model_name, args)
        ctx = context(model, store, args)
        if args.estimate:
            est = estimate(configs, store, ctx, args, bootstrap_seconds(args.num, args.num_fd, len(ctx["ref_images"]))
                           if args.bootstrap else None)
            print(json.dumps(est, indent=2))
            return est
        progress = None if args.report_only else work(model, configs, store, ctx, args)
        if progress is not None:
            print(json.dumps({"progress": progress}), flush=True)
        if args.no_report:
            return {"progress": progress, "notes": notes}
        t0 = time.process_time()
        rows, comps = report(configs, store, ctx, args)
        ref = ctx["ref"]()
        result = {"model": args.model, "weight_hash": args.model_hash, "steps": args.steps,
                  "cfg_scale": args.cfg_scale, "num": args.num, "num_fd": args.num_fd, "chunk": args.chunk,
                  "bootstrap": args.bootstrap, "seed": args.seed, "complete": all(r["complete"] for r in rows),
                  "reference": {"inception": ctx["ref_spec"], "inception_num": None if ref is None else ref.num,
                                "cache_file": None if ref is None else ref.cache_file,
                                "from_cache": None if ref is None else ref.from_cache,
                                "in_domain": f"fashion-mnist test (first {args.domain_ref_num or 10000})"},
                  "inception": ctx["inception"].describe(), "threads": args.threads, "progress": progress,
                  "report_cpu_seconds": round(time.process_time() - t0, 1), "notes": notes,
                  "rows": rows, "comparisons": comps}
        table = tables(rows, comps)
        write_file(store.root / "quality.json", json.dumps(result, indent=2))
        write_file(store.root / "quality.md", table + "\n")
        print(table)
        return result


if __name__ == "__main__":
    main()
