"""`calicache.calibrate`: ICC's low-rank factors for one model (paper Sec. 3.4, Alg. 1-2).

Plain SVD needs only the weights. CA-SVD, CD-SVD and CF-SVD (forecast residuals, calicache's own,
for `method="forecast"`) first gather channel statistics on a
calibration set (paper: 256 clean training images, batch 16, one pass, no guidance, labels dropped
to the null class with probability 0.1), then factor every calibrated linear with the scaled SVD.
Ranks are uniform: per-layer ranks under a MACs budget lost to uniform ranks at equal MACs on the
shipped model (docs/BENCHMARKS.md), so calibration offers none (calibration/ranks.py keeps the rules).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..adapters import BranchSpec, LinearSpec, get_adapter
from ..adapters.diffusers import diffusers_family
from ..cache.factors import Factors
from ..cache.schedule import check_period
from ..cache.state import get_engine
from ..cache.svd import SCALES, SVD_KINDS, check_rank, scaled_decomposition, truncate
from ..diffusion.guidance import guided_model_fn
from ..diffusion.samplers import SAMPLERS, ddim_step
from ..diffusion.schedule import Schedule
from ..models.io import weight_hash
from ..sampling import default_steps, sample_generator
from .inputs import DataArg, ModelSpaceBatches, batches, check_images, load_images, select
from .stats import ALPHA, MAX_RATIO, ChannelStatistics

CALIBRATION_STREAM = 0x1CC  # sample_generator's tag for calibration draws
TRAJECTORIES = ("uncached", "cached")  # where CD statistics are taken: uncached steps, or the cached sampler's
LABEL_DROP = 0.1  # the authors drop the label to the null class with DiT's training probability


def calibration_generator(seed: int, index: int) -> torch.Generator:
    """Generator of calibration sample `index`: its step, label drop and noise depend only on (seed, index)."""
    return sample_generator(seed, index, CALIBRATION_STREAM)


def _draw(gens: list[torch.Generator], low: int, high: int, shape: tuple[int, ...]
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample: a kept-step index in [low, high), a label-drop flag and the forward-process noise."""
    index = torch.stack([torch.randint(low, high, (), generator=g) for g in gens])
    drop = torch.stack([torch.rand((), generator=g) < LABEL_DROP for g in gens])
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return index, drop, noise


@torch.inference_mode()
def gather_statistics(
    model: nn.Module,
    data: DataArg,
    kind: str,
    specs: list[LinearSpec],
    sides: tuple[str, ...] = ("in", "out"),
    num: int = 256,
    batch_size: int = 16,
    steps: int = 50,
    spacing: str = "adm",
    seed: int = 0,
    vae=None,
    cfg_scale: float = 1.0,
    data_dir=None,
    progress: bool = False,
    period: int = 2,
    forecast_weight: float = 1.0,
) -> ChannelStatistics:
    """CA, CD or CF statistics of `specs` on `num` images of `data` (see `calibrate`)."""
    cfg = model.config
    # Folder images of mixed sizes are brought to the model's pixel size (SD-VAE latents: 8x the latent side).
    side = cfg.input_size * (1 if cfg.in_channels in (1, 3) else 8)
    images, labels = load_images(data, data_dir, side) if _is_spec(data) else data
    images = np.asarray(images)
    check_images(images, labels, cfg.num_classes)
    has_null = getattr(cfg, "class_dropout_prob", 0) > 0
    if labels is None and not has_null:
        raise ValueError("the images have no labels and the model has no null class; give labels with the images")
    if cfg_scale > 1 and not has_null:
        raise ValueError("cfg_scale > 1 needs a model trained with label dropout (a null class)")
    order = select(len(images), num, seed)
    inputs = ModelSpaceBatches(model, images, vae)
    schedule = Schedule.create(steps, spacing)
    # The passes before each measuring call, one sampler step apart: CD's reference at index i
    # measures at i - 1; CF's references f0 = i and f1 = i - period (idle calls between) measure at
    # f1 - 1, the first cached call after f1 on a FORA schedule of that period.
    passes = {"ca": [], "cd": ["reference"], "cf": ["reference"] + ["idle"] * (period - 1) + ["reference"]}[kind]
    if len(schedule) < len(passes) + 1:
        raise ValueError(f"{kind.upper()} statistics need {len(passes) + 1} consecutive sampler steps: "
                         f"steps must be >= {len(passes) + 1}")
    abar = torch.as_tensor(schedule.alphas_cumprod)
    timesteps = torch.as_tensor(schedule.timesteps)
    low = len(passes)  # step from index i down to i - len(passes), the measured call
    device = next(model.parameters()).device
    stats = ChannelStatistics(model, specs, kind, sides, forecast_k=forecast_weight / period)
    was_training = model.training
    model.eval()
    # Under torchrun batch j goes to rank j % world (same start indices, so the same samples as one
    # process); the sums are added up over the ranks after every rank has finished its batches.
    mine = {r.start for r in distributed.split_for_rank(len(order), batch_size)}
    desc = f"calibrating ({kind.upper()} statistics)"
    try:
        with distributed.job_progress(len(order), desc, progress) as advance, stats.collect():
            for start, idx in batches(order, batch_size):
                if start not in mine:
                    continue
                gens = [calibration_generator(seed, start + j) for j in range(len(idx))]
                x0 = inputs(idx, gens, device)
                index, drop, noise = _draw(gens, low, len(schedule), tuple(x0.shape[1:]))
                if labels is None:
                    y = torch.full((len(idx),), cfg.num_classes, dtype=torch.long)
                else:
                    y = torch.as_tensor(np.asarray(labels)[idx], dtype=torch.long)
                    if cfg_scale == 1 and has_null:
                        y = torch.where(drop, torch.full_like(y, cfg.num_classes), y)
                fn = guided_model_fn(model, y.to(device), cfg.num_classes, cfg_scale)
                z = schedule.q_sample(x0, index.to(device), noise.to(x0))
                t = timesteps[index].to(device)
                for phase in passes:
                    stats.reference() if phase == "reference" else stats.idle()
                    eps = fn(z, t)[:, : z.shape[1]]
                    z = ddim_step(z, eps, abar[index].view(-1, 1, 1, 1).to(z), abar[index - 1].view(-1, 1, 1, 1).to(z))
                    index = index - 1
                    t = timesteps[index].to(device)
                stats.measure()
                fn(z, t)
                stats.end_measure()
                advance(len(idx))
        stats.all_reduce_()
    finally:
        model.train(was_training)
    return stats


def factorize(model: nn.Module, branches: list[BranchSpec],
              scales: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]], rank: int | str = 128,
              progress: bool = False, ranks: dict[str, int] | None = None
              ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Scaled-SVD factors (A, B) of every calibrated linear of `branches`, given its (s_in, s_out) scales,
    at a uniform `rank` (clamped to each weight; "full"), or at `ranks[name]` per linear if given."""
    specs = [s for b in branches for s in b.linears]
    if ranks is None:
        ranks = {s.name: min(s.in_features, s.out_features) if rank == "full"
                 else min(rank, s.in_features, s.out_features) for s in specs}
    tensors = {}
    for s in tqdm(specs, desc="scaled SVD", disable=not progress):
        a, _, b = scaled_decomposition(s.weight(), *scales[s.name])
        tensors[s.name] = tuple(t.cpu() for t in truncate(a, b, ranks[s.name]))
    return tensors


def check_factor_args(svd: str, rank, scale: str, methods: tuple[str, ...] = SVD_KINDS) -> None:
    """The checks every calibration shares: statistics kind, scaling side, rank."""
    if svd not in methods:
        raise ValueError(f"unknown svd {svd!r}; choose one of {methods}")
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {SCALES}")
    check_rank(rank)


def _check_args(svd: str, rank, scale: str, cfg_scale: float, sampler: str, period) -> None:
    check_factor_args(svd, rank, scale)
    if cfg_scale < 1:
        raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance, the authors' calibration), got {cfg_scale}")
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if svd in ("cd", "cf") and sampler != "ddim":
        raise ValueError(f"{svd.upper()} statistics follow deterministic DDIM steps; use sampler='ddim'")
    check_period(period, " (the FORA period the forecast runs at)")


def _check_trajectory(svd: str, trajectory: str, rounds, num) -> None:
    if trajectory not in TRAJECTORIES:
        raise ValueError(f"unknown trajectory {trajectory!r}; choose one of {TRAJECTORIES}")
    if trajectory == "cached":
        if svd != "cd":
            raise ValueError(f"trajectory='cached' refines CD statistics; use svd='cd' (got {svd!r})")
        for name, v in (("trajectory_rounds", rounds), ("trajectory_num", num)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")


def calibrate(
    model: nn.Module,
    data: DataArg | None = None,
    svd: str = "cd",
    rank: int | str = 128,
    num: int = 256,
    batch_size: int = 16,
    steps: int | None = None,
    sampler: str = "ddim",
    spacing: str = "adm",
    scale: str = "both",
    seed: int = 0,
    vae=None,
    cfg_scale: float = 1.0,
    progress: bool = False,
    data_dir=None,
    period: int = 2,
    forecast_weight: float = 1.0,
    trajectory: str = "uncached",
    trajectory_rounds: int = 1,
    trajectory_num: int = 64,
) -> Factors:
    """ICC factors for `model` (save them with `.save(path)`; use with `ICCConfig(svd=..., factors=...)`).

    - data: (uint8 images (N, H, W[, C]), labels or None) or a spec ("fashion-mnist", an image
      folder, an .npz); not needed for svd="plain". Latent models encode with `vae` (a diffusers
      AutoencoderKL or its path), latents * 0.18215.
    - svd: "cd" (channel-difference, the paper's best), "ca" (channel-activation), "plain", or "cf"
      (forecast residuals |v_s - v_hat| of `method="forecast"` with `forecast_weight` on a FORA
      schedule of `period`: references at sampler steps i and i - period, measured at i - period - 1).
    - scale: "both" (default), "input" or "output" (the paper's Table 4 ablation).
    - rank: uniform rank (clamped to each weight's full rank) or "full".
    - steps / sampler / spacing: the sampling schedule the statistics are taken on: the one you will
      sample with (steps default: the model's recommended steps, as `calicache sample`, else 50).
    - cfg_scale: 1 (default) as the authors; > 1 gathers the statistics of guided calls.
    - trajectory: "uncached" (the paper's CD) or "cached" (svd="cd" only): trajectory-consistent
      calibration, `trajectory_rounds` rounds of CD statistics along `trajectory_num` runs of the
      cached sampler itself (ICC, FORA `period`, guidance `cfg_scale`), each run with the previous
      round's factors (calibration/trajectory.py).
    """
    from .._version import __version__

    _check_args(svd, rank, scale, cfg_scale, sampler, period)
    _check_trajectory(svd, trajectory, trajectory_rounds, trajectory_num)
    steps = default_steps(model, steps)
    if diffusers_family(getattr(model, "transformer", model)) == "pixart":  # images + class labels do not apply
        raise ValueError("PixArt is calibrated on prompt embeddings: use calicache.calibrate_text(transformer or "
                         "pipeline, prompt_embeds, latents=..., svd=...) or `calicache calibrate --pipeline DIR`")
    if get_engine(model) is not None:
        raise ValueError("this model has a cache attached; call remove_cache(model) before calibrating")
    branches = get_adapter(model).branches(model)
    specs = [s for b in branches for s in b.linears]
    sides = {"both": ("in", "out"), "input": ("in",), "output": ("out",)}[scale]
    if svd == "plain":
        scales = {s.name: (None, None) for s in specs}
    else:
        if data is None:
            raise ValueError(f"svd={svd!r} needs calibration images: pass data (e.g. 'fashion-mnist') "
                             "or use svd='plain'")
        stats = gather_statistics(model, data, svd, specs, sides, num=num, batch_size=batch_size, steps=steps,
                                  spacing=spacing, seed=seed, vae=vae, cfg_scale=cfg_scale, data_dir=data_dir,
                                  progress=progress, period=period, forecast_weight=forecast_weight)
        scales = stats.scales(specs)
    tensors = factorize(model, branches, scales, rank, progress)
    if trajectory == "cached":
        from .trajectory import trajectory_statistics

        for _ in range(trajectory_rounds):
            stats = trajectory_statistics(model, Factors(tensors, {"svd": svd}), branches, sides, num=trajectory_num,
                                          batch_size=batch_size, steps=steps, period=period, spacing=spacing,
                                          seed=seed, cfg_scale=cfg_scale, progress=progress)
            tensors = factorize(model, branches, stats.scales(specs), rank, progress)
    meta = {
        "method": "icc", "svd": svd, "scale": scale, "model_hash": weight_hash(model),
        "model_config": model.config.to_dict() if hasattr(model.config, "to_dict") else None,
        "rank": rank,
        "data": None if svd == "plain" else _describe(data),
        "num": None if svd == "plain" else num, "batch_size": batch_size, "steps": steps, "sampler": sampler,
        "spacing": spacing, "seed": seed, "cfg_scale": cfg_scale, "label_drop": LABEL_DROP,
        "alpha": ALPHA, "max_ratio": MAX_RATIO, "calicache_version": __version__,
        **({"period": period, "forecast_weight": forecast_weight} if svd == "cf" else {}),
        **({"trajectory": trajectory, "trajectory_rounds": trajectory_rounds, "trajectory_num": trajectory_num,
            "period": period} if trajectory == "cached" else {}),
    }
    return Factors(tensors, meta)


def _is_spec(data) -> bool:
    return isinstance(data, str) or hasattr(data, "__fspath__")


def _describe(data) -> str:
    return str(data) if _is_spec(data) else f"arrays ({len(data[0])} images)"
