"""`calicache.tune`: the best cache configuration for a compute budget, found from the model itself."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..cache import MethodConfig
from ..cache.factors import Factors
from ..cache.pipeline import is_pipeline
from ..utils import atomic_path
from .score import ModelRunner, PipelineRunner, Reference
from .search import Evaluation, Tuner, frontier
from .space import FACTOR_METHODS, METHODS, Space, cache_config

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
    config: MethodConfig
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

    def save(self, out: str | os.PathLike) -> dict[str, Path]:
        """config.json (+ factors.safetensors), report.json and report.md in the folder `out`;
        `calicache.load_config(out / "config.json")` reads the configuration back."""
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"config": out / "config.json", "report": out / "report.json", "table": out / "report.md"}
        if self.factors is not None:
            paths["factors"] = out / "factors.safetensors"
            self.factors.save(paths["factors"])
        c = self.chosen.candidate
        factors = {c.factors: self.factors} if self.factors is not None else {}
        file = str(paths["factors"]) if self.factors is not None else None
        cache_config(c, factors, self.chosen.goc_steps, file).save(paths["config"], overwrite=True)
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


def tune(model, steps: int = 20, budget: float = 0.5, *, data="fashion-mnist", prompt_embeds: dict | None = None,
         cfg_scale: float | None = None, methods: tuple[str, ...] = METHODS, num: int = 32, heldout: int = 64,
         seed: int = 1, heldout_seed: int = 0, rank: int = 48, calibration_num: int = 256,
         trajectory: bool = True, budget_seconds: float | None = None, local: int = 24,
         batch_size: int | None = None, space: Space | None = None, tuner: Tuner | None = None,
         out: str | os.PathLike | None = None, progress: bool = True) -> TuneResult:
    """The cache configuration with the best PSNR against uncached sampling on `num` tuning seeds
    whose MACs per sample are at most `budget` x uncached (the search: tuning/search.py).

    - model: calicache's DiT (calibrated on `data`, images as `calibrate` takes them; None: plain
      SVD factors) or a PixArt pipeline with `prompt_embeds` (a dict as `calibrate_text` takes).
    - methods: searched among "fora", "icc", "forecast", "goc" (GOC at period 2 only).
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


def pipeline_cosines(runner: PipelineRunner, num: int, seed: int) -> list[float | None]:
    """GOC's profile for a pipeline: per call, the mean cosine between successive changes of every branch
    output (`calibration.goc.CosineAccumulator`) over `num` uncached pipeline runs."""
    from ..adapters import get_adapter
    from ..cache.methods.base import tensors
    from ..calibration.goc import CosineAccumulator

    branches = get_adapter(runner.model, text_tokens=runner.text_tokens).branches(runner.model)
    acc = CosineAccumulator(runner.steps)
    calls = [0]

    def count(module, args, kwargs) -> None:
        calls[0] += 1

    def record(layer: int):
        return lambda module, args, out: acc.update(layer, (calls[0] - 1) % runner.steps, tensors(out)[0])

    handles = [runner.model.register_forward_pre_hook(count, with_kwargs=True)]
    try:
        handles += [b.module.register_forward_hook(record(i)) for i, b in enumerate(branches)]
        with torch.inference_mode():
            runner.images(num, seed)
    finally:
        for h in handles:
            h.remove()
    runs = -(-num // (runner.batch_size or num))
    if calls[0] != runner.steps * runs:
        raise RuntimeError(f"the pipeline made {calls[0]} transformer calls for {runs} runs of {runner.steps} steps; "
                           "GOC's profile needs one call per step (a scheduler with one model call per step)")
    return acc.cosines()


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
        make_tcc = None  # TCC's cached trajectories are sampled with calicache's DDIM on its DiT
        cosines = pipeline_cosines(runner, min(num, 16), seed) if "goc" in methods else None
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


__all__ = ["TuneResult", "make_tuner", "tune"]
