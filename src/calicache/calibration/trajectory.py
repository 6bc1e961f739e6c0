"""Trajectory-consistent calibration (TCC; Liang, Xu, Xu, arXiv 2605.24870) for ICC's scaled SVD.

CD statistics are the channel magnitudes of the increments a calibrated call corrects, x_m - x_s
(and W (x_m - x_s) on the output side). `calibrate` takes them on uncached trajectories: noised
training images, two consecutive sampler steps. The cached sampler does not stay on those
trajectories: each calibrated call leaves a small error that shifts every later input. TCC
estimates the priors on the trajectory the cached sampler itself visits, iteratively:

- round 0: the factors of the ordinary calibration (CD on uncached steps);
- round k: sample from noise with ICC on a FORA schedule of `period` using round k-1's factors; at
  every full call keep each calibrated linear's input/output, at every cached call m record
  |x_m - x_s| and |W (x_m - x_s)| against the last full call s (the increments the cache corrects
  there, at distances 1..period-1); factor the weights with these statistics.

So each round's statistics include the shift the previous round's corrections cause. The
normalisation (per-sample min-max, alpha 0.5, clamp at max/1000) is CD's.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..adapters import BranchSpec
from ..cache import ICCConfig, apply_cache, cache_run, remove_cache
from ..cache.factors import Factors
from ..diffusion.guidance import guided_model_fn
from ..diffusion.samplers import ddim
from ..diffusion.schedule import Schedule
from .stats import ChannelStatistics


def trajectory_generator(seed: int, index: int) -> torch.Generator:
    """Generator of trajectory `index`'s noise: disjoint from sampling's (seed, index) streams."""
    state = np.random.SeedSequence([int(seed), int(index), 0x7CC]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


@torch.inference_mode()
def trajectory_statistics(model: nn.Module, factors: Factors, branches: list[BranchSpec],
                          sides: tuple[str, ...], num: int = 64, batch_size: int = 16, steps: int = 50,
                          period: int = 2, spacing: str = "adm", seed: int = 0, cfg_scale: float = 1.0,
                          progress: bool = False) -> ChannelStatistics:
    """CD statistics of every calibrated linear along `num` cached DDIM runs from noise (classes i % K)."""
    cfg = model.config
    specs = [s for b in branches for s in b.linears]
    schedule = Schedule.create(steps, spacing)
    clip = bool(getattr(model, "calicache_defaults", {}).get("clip_denoised", False))
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    stats = ChannelStatistics(model, specs, "cd", sides, exact_output=True)
    mine = distributed.split_for_rank(num, batch_size)
    was_training = model.training
    model.eval()
    apply_cache(model, ICCConfig(period=period, factors=factors))
    try:
        with stats.collect():
            bar = tqdm(total=num, desc="calibrating (cached trajectories)", disable=not progress)
            for idx in mine:
                gens = [trajectory_generator(seed, i) for i in idx]
                x = torch.stack([torch.randn(shape, generator=g) for g in gens])
                y = torch.tensor([i % cfg.num_classes for i in idx])
                fn = guided_model_fn(model, y, cfg.num_classes, cfg_scale)
                call = [-1]

                def observed(x_t: torch.Tensor, t: torch.Tensor, fn=fn, call=call) -> torch.Tensor:
                    call[0] += 1
                    full = call[0] % period == 0
                    if full:  # the cache stores this call: it is the reference of the calls up to the next
                        stats.clear_references()
                        stats.reference()
                    else:
                        stats.measure()
                    out = fn(x_t, t)
                    if not full:
                        stats.end_measure(keep_references=True)
                    return out

                with cache_run(model, steps):
                    ddim(observed, x, schedule, clip_denoised=clip)
                bar.update(len(idx))
            bar.close()
        stats.all_reduce_()
    finally:
        remove_cache(model)
        model.train(was_training)
    return stats
