"""The benchmark grid: calicache's methods and the peers at matched compute on one model, same seeds.

`plan_grid` lays out the configurations (and makes the factor files and GOC steps they need),
`run_grid` samples them (runs.py, peers.py); runs.score adds the metrics and report.py writes the
report. `calicache bench` (commands/bench.py) strings them together.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from torch import nn
from tqdm.auto import tqdm

from ..cache import FORAConfig, ForecastConfig, GOCConfig, ICCConfig, MethodConfig, NoCacheConfig
from .peers import Peer, fbc_threshold, missing, run_peer
from .runs import PeakRSS, Result, Variant, run_variant, warm_up

FAMILIES = ("fewer-steps", "fora", "icc", "goc", "forecast", "peers")
CALIBRATED = ("ca", "cd")


@dataclass
class GridOptions:
    steps: int
    num: int
    cfg_scale: float
    seed: int = 0
    batch_size: int | None = None
    quick: bool = False
    families: tuple[str, ...] = FAMILIES
    factors_dir: Path | None = None
    goc_file: str | None = None
    data_dir: str | None = None
    out: Path = Path("runs/bench")
    config: MethodConfig | None = None  # one more configuration to run (`calicache bench --config FILE`)
    config_name: str = "config"


@dataclass
class Grid:
    variants: list[Variant]
    peers: list[Peer | tuple[str, int]]  # ("fbc", period): a FirstBlockCache whose threshold is searched at run time
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def uniform_ranks(width: int, quick: bool) -> list[int]:
    """ICC ranks C/18, C/9 and C/4 (the paper's 128 of 1152 is C/9); quick: C/9 only."""
    return sorted({max(1, round(width / d)) for d in ((9,) if quick else (18, 9, 4))})


def fewer_steps(steps: int, quick: bool) -> list[int]:
    """Uncached step counts with the MACs of S/4, S/3, S/2 and 2S/3 of the S-step run."""
    fractions = (1 / 2,) if quick else (1 / 4, 1 / 3, 1 / 2, 2 / 3)
    return sorted({max(1, round(steps * f)) for f in fractions} - {steps})


def fora_periods(quick: bool) -> tuple[int, ...]:
    return (2,) if quick else (2, 3, 4)


def cached_call_share(steps: int, period: int) -> float:
    """Share of FORA's cached calls in a run: calls t with t % period != 0."""
    return 1 - math.ceil(steps / period) / steps


def is_fashion_mnist_model(model: nn.Module) -> bool:
    """A pixel-space 28x28 one-channel 10-class DiT: Fashion-MNIST data and the shipped classifier fit it."""
    c = model.config
    return (c.input_size, c.in_channels, c.num_classes) == (28, 1, 10)


def domain_inputs(model: nn.Module, data_dir: str | None, notes: list[str]
                  ) -> tuple[nn.Module | None, np.ndarray | None]:
    """(the shipped Fashion-MNIST classifier, the test images) for in-domain scores, or Nones with a note."""
    if not is_fashion_mnist_model(model):
        notes.append("class agreement and classifier FD skipped: the classifier is for 28x28 one-channel "
                     "10-class (Fashion-MNIST) models")
        return None, None
    from ..data.fashion_mnist import load_fashion_mnist
    from ..training.classifier import load_classifier

    try:
        test_images = load_fashion_mnist("test", data_dir)[0]
    except (FileNotFoundError, ValueError) as e:
        notes.append(f"classifier FD skipped: {e}")
        test_images = None
    return load_classifier(), test_images


class FactorSource:
    """CA/CD/CF factor files: read from `factors_dir`, else calibrated now on Fashion-MNIST (pixel
    Fashion-MNIST models only) and saved under OUT/factors, so `--factors-dir OUT/factors` reuses them.
    CF factors belong to one FORA period (`cf-p2-full.safetensors`)."""

    def __init__(self, model: nn.Module, opts: GridOptions, notes: list[str]):
        self.model, self.opts, self.notes = model, opts, notes
        self.seconds = 0.0
        self._warned: set[str] = set()

    def get(self, svd: str, period: int = 2):
        from ..cache.factors import Factors
        from ..calibration.calibrate import calibrate

        kind = f"{svd}-p{period}" if svd == "cf" else svd
        name = f"{kind}-full.safetensors"
        if self.opts.factors_dir is not None and (self.opts.factors_dir / name).exists():
            return Factors.load(self.opts.factors_dir / name)
        if not is_fashion_mnist_model(self.model):
            if svd not in self._warned:
                self._warned.add(svd)
                where = f"not in --factors-dir {self.opts.factors_dir}" if self.opts.factors_dir else "no --factors-dir"
                self.notes.append(f"ICC/forecast with {svd.upper()}-SVD skipped: {name} {where}, and only pixel "
                                  "Fashion-MNIST models are calibrated on the fly (make files with "
                                  f"`calicache calibrate --svd {svd}` named like {name})")
            return None
        t0 = time.perf_counter()
        factors = calibrate(self.model, "fashion-mnist", svd=svd, rank="full",
                            num=32 if self.opts.quick else 256, steps=self.opts.steps, seed=self.opts.seed,
                            data_dir=self.opts.data_dir, progress=True, period=period)
        self.seconds += time.perf_counter() - t0
        factors.save(self.opts.out / "factors" / name)
        return factors


def _goc_file(model: nn.Module, opts: GridOptions, notes: list[str]) -> str | None:
    if opts.goc_file is not None:
        return opts.goc_file
    if opts.steps < 3:
        notes.append(f"GOC skipped: a {opts.steps}-call run has no call with two earlier changes")
        return None
    from ..calibration.goc import find_goc_steps

    found = find_goc_steps(model, opts.steps, num=min(opts.num, 4 if opts.quick else 32), cfg_scale=opts.cfg_scale,
                           seed=opts.seed, batch_size=opts.batch_size, period=2, progress=True)
    path = opts.out / f"goc{opts.steps}.json"
    found.save(path)
    return str(path)


def plan_grid(model: nn.Module, opts: GridOptions) -> Grid:
    """The configurations to run; makes the factor files and the GOC steps file they need."""
    s, fam, quick = opts.steps, set(opts.families), opts.quick
    grid = Grid([Variant(f"no cache, {s} steps", NoCacheConfig(), s, "uncached")], [])
    if "fewer-steps" in fam:
        grid.variants += [Variant(f"no cache, {k} steps", NoCacheConfig(), k, "fewer steps")
                          for k in fewer_steps(s, quick)]
    if "fora" in fam:
        grid.variants += [Variant(f"FORA p={p}", FORAConfig(period=p), s, "FORA") for p in fora_periods(quick)]
    ranks = uniform_ranks(model.config.hidden_size, quick)
    source = FactorSource(model, opts, grid.notes)
    full = {"plain": None}
    if fam & {"icc", "forecast"}:
        full.update({svd: source.get(svd) for svd in CALIBRATED if not quick or svd == "cd"})
    if "icc" in fam:
        for svd, factors in full.items():
            if svd != "plain" and factors is None:
                continue
            grid.variants += [Variant(f"ICC {svd} r={r} p=2", ICCConfig(period=2, rank=r, svd=svd,
                                                                       factors=factors), s, f"ICC {svd}")
                              for r in ranks]
    if "goc" in fam:
        t0 = time.perf_counter()
        goc_file = _goc_file(model, opts, grid.notes)
        grid.seconds["goc_steps"] = time.perf_counter() - t0
        if goc_file is not None:
            grid.variants.append(Variant("GOC p=2", GOCConfig(period=2, steps_file=goc_file), s, "GOC"))
    if "forecast" in fam:
        r = uniform_ranks(model.config.hidden_size, True)[0]
        for p in (2,) if quick else (2, 3):
            # CF factors are calibrated on the forecast's own residuals at this period.
            for svd, factors in [*full.items(), ("cf", source.get("cf", period=p))]:
                if svd == "ca" or (svd != "plain" and factors is None):
                    continue
                grid.variants.append(Variant(f"forecast {svd} r={r} p={p}", ForecastConfig(
                    period=p, rank=r, svd=svd, factors=factors), s, f"forecast {svd}"))
    if opts.config is not None:
        grid.variants.append(Variant(f"{opts.config.method} ({opts.config_name})", opts.config, s, "config"))
    grid.seconds["calibration"] = source.seconds
    if "peers" in fam:
        grid.peers = _plan_peers(model, quick, grid.notes)
    return grid


def _plan_peers(model: nn.Module, quick: bool, notes: list[str]) -> list[Peer | tuple[str, int]]:
    out: list[Peer | tuple[str, int]] = []
    for kind in ("none", "dbcache", "dbcache-taylorseer", "fbc", "taylorseer"):
        why = missing(kind)
        if why is not None:
            notes.append(f"peer {kind} skipped: {why}")
            continue
        if kind == "none":
            out.append(Peer("none"))
            continue
        if kind == "fbc" and model.config.depth < 2:
            notes.append("peer FirstBlockCache skipped: it needs at least two blocks (a head and a tail)")
            continue
        out += [(kind, p) if kind == "fbc" else Peer(kind, p) for p in fora_periods(quick)]
    return out


def run_grid(model: nn.Module, grid: Grid, opts: GridOptions) -> list[Result]:
    """Sample every configuration with the same seeds; peers that fail to attach or run become notes."""
    kw = dict(num=opts.num, cfg_scale=opts.cfg_scale, seed=opts.seed, batch_size=opts.batch_size)
    results = []
    thresholds: dict[float, int] = {}  # FirstBlockCache thresholds already run -> the period they were found for
    warm_up(model, opts.num, opts.cfg_scale, opts.batch_size)
    bar = tqdm(total=len(grid.variants) + len(grid.peers), desc="bench", unit="config")
    for v in grid.variants:
        bar.set_postfix_str(v.name)
        with PeakRSS() as mem:
            r = run_variant(model, v, progress=False, **kw)
        r.scores.update(peak_rss_mb=mem.delta_mb, macs_source="calicache.count_macs")
        results.append(r)
        bar.update(1)
    for p in grid.peers:
        search = None
        bar.set_postfix_str(p.name if isinstance(p, Peer) else f"{p[0]} ~p={p[1]}")
        try:
            if isinstance(p, tuple):  # FirstBlockCache: its only knob is a threshold, set for FORA's cached calls
                target = cached_call_share(opts.steps, p[1])
                threshold, share = fbc_threshold(model, target, opts.steps, min(opts.num, 8 if opts.quick else 16),
                                                 opts.cfg_scale, opts.seed, iters=4 if opts.quick else 7)
                if threshold in thresholds:
                    grid.notes.append(f"peer FirstBlockCache ~p={p[1]}: the threshold search found {threshold:.3g} "
                                      f"again (as for ~p={thresholds[threshold]}); not run twice")
                    bar.update(1)
                    continue
                thresholds[threshold] = p[1]
                search = {"target_cached_calls": round(target, 4), "probe_cached_calls": round(share, 4)}
                p = Peer("fbc", p[1], threshold)
            with PeakRSS() as mem:
                r = run_peer(model, p, progress=False, steps=opts.steps, **kw)
        except Exception as e:  # third-party code: a peer that cannot run here is reported, never faked
            grid.notes.append(f"peer {p.name if isinstance(p, Peer) else p[0]} failed: {type(e).__name__}: {e}")
        else:
            r.scores.update(peak_rss_mb=mem.delta_mb, macs_source=r.macs["source"],
                            cached_calls=round(r.macs["cached_calls"], 4), **(search or {}))
            results.append(r)
        bar.update(1)
    bar.close()
    return results
