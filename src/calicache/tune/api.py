"""`calicache.tune`: the best cache configuration for a compute budget, found from the model itself."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..cache import CacheConfig, CacheSchedule
from ..cache.factors import Factors
from ..cache.pipeline import is_pipeline
from ..utils import atomic_path
from .score import ModelRunner, PipelineRunner, Reference
from .search import Evaluation, Tuner, frontier
from .space import FACTOR_METHODS, METHODS, Candidate, Space, cache_config

CONFIG_FORMAT = "calicache-config"
TCC_RUNS = 32  # cached sampling runs per TCC round inside the search


@dataclass
class TuneResult:
    """The chosen configuration, its score on tuning and held-out seeds, and what the search saw."""

    budget: float
    steps: int
    chosen: Evaluation
    heldout_psnr: float
    heldout_seeds: int
    tuning_seeds: int
    uncached_macs: int
    evaluated: list[Evaluation]
    factors: Factors | None  # the chosen candidate's factor set, truncated to its rank
    config: CacheConfig
    seconds: dict[str, float] = field(default_factory=dict)

    def report(self) -> dict:
        u = self.uncached_macs
        return {
            "budget": self.budget, "steps": self.steps, "uncached_macs": u,
            "tuning_seeds": self.tuning_seeds, "heldout_seeds": self.heldout_seeds,
            "chosen": {**self.chosen.row(u), "heldout_psnr": self.heldout_psnr},
            "frontier": [e.row(u) for e in frontier(self.evaluated)],
            "evaluated": [e.row(u) for e in sorted(self.evaluated, key=lambda e: e.macs)],
            "seconds": {k: round(v, 1) for k, v in self.seconds.items()},
        }

    def config_dict(self, factors_file: str | None) -> dict:
        """The chosen configuration as the JSON fields of a cache config file."""
        c = self.chosen.candidate
        out = {"format": CONFIG_FORMAT, "method": c.method, "schedule": c.schedule().to_dict()}
        if c.method in FACTOR_METHODS:
            out.update(rank=c.rank, svd=self.factors.meta.get("svd", "plain"), factors=factors_file)
        if c.weight is not None:
            out["weight"] = c.weight
        if c.method == "goc":
            out["steps"] = self.chosen.goc_steps
        return out

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """config.json (+ factors.safetensors), report.json and report.md in the folder `out`."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"config": out / "config.json", "report": out / "report.json", "table": out / "report.md"}
        if self.factors is not None:
            paths["factors"] = out / "factors.safetensors"
            self.factors.save(paths["factors"])
        with atomic_path(paths["config"]) as tmp:
            tmp.write_text(json.dumps(self.config_dict("factors.safetensors" if self.factors else None), indent=2))
        with atomic_path(paths["report"]) as tmp:
            tmp.write_text(json.dumps(self.report(), indent=2))
        with atomic_path(paths["table"]) as tmp:
            tmp.write_text(self.markdown())
        return paths

    def markdown(self) -> str:
        r = self.report()
        lines = [f"# tuned cache configuration: budget {self.budget:g} of uncached MACs, {self.steps} steps", "",
                 f"Chosen: **{r['chosen']['label']}**, {r['chosen']['macs_ratio']:.3f} of uncached MACs; PSNR against "
                 f"uncached {r['chosen']['psnr']:.2f} dB on {self.tuning_seeds} tuning seeds, "
                 f"{self.heldout_psnr:.2f} dB on {self.heldout_seeds} held-out seeds.", "",
                 f"Frontier on the tuning seeds ({len(self.evaluated)} configurations scored on all of them):", "",
                 "| configuration | MACs / uncached | PSNR dB |", "|---|---|---|"]
        lines += [f"| {f['label']} | {f['macs_ratio']:.3f} | {f['psnr']:.2f} |" for f in r["frontier"]]
        lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()), ""]
        return "\n".join(lines)


def load_config(path: str | os.PathLike) -> CacheConfig:
    """A cache config from a file `tune` wrote (factor paths relative to the file's folder)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"cache config file {path} does not exist; write one with `calicache tune`")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON cache config ({e})") from e
    if not isinstance(data, dict) or data.get("format") != CONFIG_FORMAT:
        raise ValueError(f"{path}: not a calicache cache config (no \"format\": \"{CONFIG_FORMAT}\")")
    kw: dict = {"schedule": CacheSchedule.from_dict(data.get("schedule", {"period": 1}))}
    method = data.get("method")
    if method in FACTOR_METHODS:
        factors = data.get("factors")
        kw.update(rank=data.get("rank"), svd=data.get("svd", "plain"),
                  factors=None if factors is None else str(path.parent / factors))
    if method == "forecast":
        kw["forecast_weight"] = data["weight"]
    if method == "goc":
        kw.update(goc_weight=data["weight"], goc_steps=data.get("steps"))
    return CacheConfig(method, **kw)


def tune(model, steps: int = 20, budget: float = 0.5, *, data="fashion-mnist", prompt_embeds: dict | None = None,
         cfg_scale: float | None = None, methods: tuple[str, ...] = METHODS, num: int = 32, heldout: int = 64,
         seed: int = 1, heldout_seed: int = 0, rank: int = 48, calibration_num: int = 256,
         trajectory: bool = True, budget_seconds: float | None = None, local: int = 24,
         batch_size: int | None = None, space: Space | None = None, tuner: Tuner | None = None,
         out: str | os.PathLike | None = None, progress: bool = True) -> TuneResult:
    """The cache configuration with the best PSNR against uncached sampling on `num` tuning seeds
    whose MACs per sample are at most `budget` x uncached (the search: tune/search.py).

    - model: calicache's DiT (calibrated on `data`, images as `calibrate` takes them; None: plain
      SVD factors) or a PixArt pipeline with `prompt_embeds` (a dict as `calibrate_text` takes).
    - methods: searched among "fora", "icc", "forecast", "goc" (GOC at period 2 only, DiT only).
    - rank: the highest rank searched (factors are made once at it); trajectory: try TCC factors.
    - budget_seconds: also require measured sampling seconds per sample <= this.
    - heldout / heldout_seed: the seeds the chosen configuration is finally scored on.
    - tuner: reuse a `Tuner` (reference, factors) from an earlier budget (see `make_tuner`).
    - out: a folder for config.json, factors.safetensors, report.json and report.md.
    """
    t0 = time.perf_counter()
    if tuner is None:
        tuner = make_tuner(model, steps, data=data, prompt_embeds=prompt_embeds, cfg_scale=cfg_scale,
                           methods=methods, num=num, seed=seed, rank=rank, calibration_num=calibration_num,
                           trajectory=trajectory, batch_size=batch_size, space=space, progress=progress)
    setup = time.perf_counter() - t0
    best, evaluated = tuner.search(budget, tuner.reference.num, local=local, budget_seconds=budget_seconds)
    searched = time.perf_counter() - t0 - setup
    held = Reference(tuner.runner, heldout, heldout_seed)
    config = cache_config(best.candidate, tuner.factors, best.goc_steps)
    heldout_psnr = held.score(config)
    factors = None
    if best.candidate.method in FACTOR_METHODS:
        f = tuner.factors[best.candidate.factors]
        factors = Factors(f.select(best.candidate.rank), {**f.meta, "rank": best.candidate.rank})
    result = TuneResult(budget, tuner.runner.steps, best, heldout_psnr, heldout, tuner.reference.num,
                        tuner.costs.uncached, evaluated, factors, config,
                        {"setup": setup, "search": searched, "heldout": time.perf_counter() - t0 - setup - searched,
                         "total": time.perf_counter() - t0})
    if out is not None:
        result.save(out)
    return result


def make_tuner(model, steps: int = 20, *, data="fashion-mnist", prompt_embeds: dict | None = None,
               cfg_scale: float | None = None, methods: tuple[str, ...] = METHODS, num: int = 32, seed: int = 1,
               rank: int = 48, calibration_num: int = 256, trajectory: bool = True, batch_size: int | None = None,
               space: Space | None = None, progress: bool = True) -> Tuner:
    """What every budget shares: the uncached reference on the tuning seeds, the factors at `rank`,
    GOC's cosine profile (see `tune` for the arguments)."""
    from ..calibration.calibrate import calibrate
    from ..calibration.goc import find_goc_steps
    from ..calibration.text import calibrate_text

    unknown = sorted(set(methods) - set(METHODS))
    if unknown or not methods:
        raise ValueError(f"methods must be some of {METHODS}, got {list(methods)}")
    for name, v in (("steps", steps), ("num", num), ("rank", rank)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    text_tokens = None
    if is_pipeline(model):
        if prompt_embeds is None:
            raise ValueError("tuning a pipeline needs prompt_embeds (the dict `calibrate_text` takes)")
        cfg = 4.5 if cfg_scale is None else cfg_scale
        runner = PipelineRunner(model, steps, prompt_embeds, cfg, batch_size)
        text_tokens = runner.text_tokens
        factors = calibrate_text(model, prompt_embeds, svd="cd", rank=rank, steps=steps, cfg_scale=cfg,
                                 progress=progress)
        methods = tuple(m for m in methods if m != "goc")  # GOC's finder samples calicache's DiT
        make_tcc = None
        cosines = None
    else:
        cfg = getattr(model, "calicache_defaults", {}).get("cfg_scale", 1.0) if cfg_scale is None else cfg_scale
        runner = ModelRunner(model, steps, cfg, batch_size=batch_size)
        svd = "plain" if data is None else "cd"
        factors = calibrate(model, data, svd=svd, rank=rank, num=calibration_num, steps=steps, progress=progress)
        make_tcc = None
        if trajectory and data is not None:
            def make_tcc(period: int) -> Factors:
                return calibrate(model, data, svd="cd", rank=rank, num=calibration_num, steps=steps, period=period,
                                 cfg_scale=cfg, trajectory="cached", trajectory_rounds=1, trajectory_num=TCC_RUNS,
                                 progress=progress)
        cosines = find_goc_steps(model, steps, num=min(num, 16), cfg_scale=cfg).cosines if "goc" in methods else None
    space = Space(methods=tuple(methods)) if space is None else replace(
        space, methods=tuple(m for m in space.methods if m in methods))
    with torch.inference_mode():
        reference = Reference(runner, num, seed)
    return Tuner(runner, reference, {"cd": factors}, space, cosines, text_tokens, progress, make_tcc)


__all__ = ["Candidate", "TuneResult", "load_config", "make_tuner", "tune"]
