"""`calibrate_text`: ICC's CA-SVD / CD-SVD factors for a text-to-image transformer, PixArt-alpha/Sigma's
`PixArtTransformer2DModel` (bare or in its pipeline), from prompt embeddings instead of class labels.

The statistics and the scaled SVD are those of `calibrate` (ICC paper Sec. 3.4, Alg. 1-2; stats.py,
svd.py); what changes is where the model calls come from:

- CA ("activation"): each (clean latent, caption embedding) pair is noised to a random step of the
  sampler's schedule with the forward process `z = sqrt(abar) x0 + sqrt(1 - abar) eps` and the
  transformer is called once, as `calibrate` does with (image, label) pairs.
- CD ("difference"): the authors noise a clean image to a random step t2, take one sampler step to t1
  and measure the change. Without images, the trajectory itself comes from the model: every prompt's
  sampling run starts from its own seeded noise and goes through the pipeline's own denoising loop (its
  scheduler, multistep history included), and every pair of consecutive calls (t2, t1) is measured.
  The authors draw one pair per image, uniformly over the S - 1 pairs of the schedule; measuring all
  of them is the exact average over that draw, at S calls per run.

As the authors: no guidance by default (conditional calls only; cfg_scale > 1 gathers the doubled
[negative; positive] calls the pipeline makes under guidance). No caption dropout: PixArt's
training-time null caption is a learned embedding that diffusers' model does not carry.
Every sample's step and noise come from `calibration_generator(seed, index)`, so the statistics do not
depend on the batch size (up to float rounding).
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import LinearSpec, get_adapter, transformer_family
from ..adapters.diffusers import diffusers_family
from ..cache.factors import Factors
from ..cache.pipeline import is_pipeline
from ..cache.state import get_engine
from ..cache.svd import SVD_KINDS
from ..data.prompts import check_prompt_embeds, load_prompt_embeds, prompt_rows, text_width
from ..images import to_model_space
from ..models.io import weight_hash
from .calibrate import _draw, calibration_generator, check_factor_args, factorize
from .flow_text import FORMATS, flow_activation_statistics, flow_difference_statistics, flow_embeddings, flow_runner
from .inputs import batches, load_vae, select
from .stats import ALPHA, MAX_RATIO, ChannelStatistics

TEXT_SVD_METHODS = tuple(k for k in SVD_KINDS if k != "cf")  # no forecast statistics for pipelines


class ConsecutiveCalls:
    """CD statistics of every pair of consecutive transformer calls of a sampling run.

    Call j >= 1 of a run is measured against call j - 1 and is itself the reference of call j + 1
    (ChannelStatistics' rolling measure).
    """

    def __init__(self, model: nn.Module, specs: list[LinearSpec], sides: tuple[str, ...]):
        self.model = model
        self.stats = ChannelStatistics(model, specs, "cd", sides)
        self.calls = 0

    @contextmanager
    def collect(self) -> Iterator[ConsecutiveCalls]:
        """All hooks for a block of runs; removed on exit, also after an error."""
        with self.stats.collect():
            handles = [self.model.register_forward_pre_hook(self._before),
                       self.model.register_forward_hook(self._after)]
            try:
                yield self
            finally:
                for h in handles:
                    h.remove()

    def new_run(self) -> None:
        """The next call starts a new sampling run: it is compared with nothing before it."""
        self.calls = 0
        self.stats.clear_references()

    def _before(self, module: nn.Module, args: tuple) -> None:
        if self.calls == 0:
            self.stats.reference()  # the first call of a run is a reference only
        else:
            self.stats.measure(rolling=True)

    def _after(self, module: nn.Module, args: tuple, output: Any) -> None:
        if self.calls > 0:
            self.stats.end_measure()
        self.calls += 1


def _text_transformer(model_or_pipe: Any) -> tuple[nn.Module, Any, str]:
    """(transformer, pipeline or None, family) of a PixArt, FLUX, SD3, Wan or Qwen-Image transformer or pipeline
    (family "pixart" or the transformer's class name); anything else is a clear error."""
    pipe = model_or_pipe if is_pipeline(model_or_pipe) else None
    transformer = pipe.transformer if pipe is not None else model_or_pipe
    family = "pixart" if diffusers_family(transformer) == "pixart" else transformer_family(transformer)
    if family is None:
        raise ValueError(f"calibrate_text calibrates diffusers' PixArtTransformer2DModel, {', '.join(FORMATS)} (or "
                         f"their pipelines), not {type(transformer).__name__}; class-conditional DiTs use "
                         "calicache.calibrate")
    if get_engine(transformer) is not None or (pipe is not None and get_engine(pipe) is not None):
        raise ValueError("this model has a cache attached; call remove_cache(...) before calibrating")
    return transformer, pipe, family


def _embeddings(prompt_embeds: Any, guidance: bool, width: int) -> dict[str, torch.Tensor]:
    """The embedding dict from a file, a dict (the file's keys) or a bare (P, T, D) tensor (mask all ones)."""
    if prompt_embeds is None:
        raise ValueError("CA/CD calibration of a text-to-image model needs prompt embeddings: pass prompt_embeds "
                         "(a file or dict with prompt_embeds and prompt_attention_mask, as `calicache sample "
                         "--prompt-embeds` reads), or use svd='plain'")
    if isinstance(prompt_embeds, (str, os.PathLike)):
        return load_prompt_embeds(prompt_embeds, guidance, width)
    if isinstance(prompt_embeds, torch.Tensor):
        mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long) if prompt_embeds.dim() == 3 else None
        prompt_embeds = {"prompt_embeds": prompt_embeds, "prompt_attention_mask": mask}
    return check_prompt_embeds(prompt_embeds, guidance, width)


def _scheduler(pipe: Any, scheduler: Any, family: str = "pixart"):
    """A fresh copy of the sampler: `scheduler`, else the pipeline's, else DPM-Solver++(2M) (PixArt-alpha's
    pipelines ship it) or flow-matching Euler (the other families'); set_timesteps and the multistep history
    must not touch the caller's object."""
    if scheduler is None:
        if pipe is not None:
            scheduler = pipe.scheduler
        else:
            from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

            scheduler = DPMSolverMultistepScheduler() if family == "pixart" else FlowMatchEulerDiscreteScheduler()
    if family != "pixart":  # flow matching: checked where CA needs its sigmas
        return type(scheduler).from_config(scheduler.config)
    if not hasattr(scheduler, "alphas_cumprod") or not hasattr(scheduler, "set_timesteps"):
        raise ValueError(f"{type(scheduler).__name__} is not a diffusers noise scheduler with alphas_cumprod; "
                         "use DDIMScheduler or DPMSolverMultistepScheduler")
    return type(scheduler).from_config(scheduler.config)


def _check_latents(latents: torch.Tensor, transformer: nn.Module, what: str = "latents") -> None:
    cfg = transformer.config
    if not isinstance(latents, torch.Tensor) or latents.dim() != 4 or latents.shape[1] != cfg.in_channels:
        shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"{what} must be a tensor (N, {cfg.in_channels}, H, W) of clean latents (VAE latents x "
                         f"scaling_factor), got {shape}")
    if latents.shape[-1] % cfg.patch_size or latents.shape[-2] % cfg.patch_size:
        raise ValueError(f"{what} are {tuple(latents.shape[-2:])} (H, W), not multiples of the patch size "
                         f"{cfg.patch_size}")
    if not torch.isfinite(latents).all():
        raise ValueError(f"{what} contain NaN or infinite values")


class _CleanLatents:
    """Clean latents x0 (B, C, H, W) of calibration samples: given, or encoded from uint8 images by the VAE
    (posterior sample with each sample's own generator, times the VAE's scaling_factor, as PixArt decodes)."""

    def __init__(self, transformer: nn.Module, latents: torch.Tensor | None, images: np.ndarray | None, vae: Any):
        self.transformer = transformer
        self.latents = latents
        self.images = images
        self.vae = None
        if latents is not None:
            _check_latents(latents, transformer)
        else:
            if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 4 \
                    or images.shape[-1] != 3:
                got = f"{images.dtype} {images.shape}" if isinstance(images, np.ndarray) else type(images).__name__
                raise ValueError(f"images must be uint8 (N, H, W, 3), got {got}")
            if vae is None:
                raise ValueError("images need a VAE to become latents: pass vae= (or a pipeline, whose VAE is used), "
                                 "or pass latents= directly")
            self.vae = load_vae(vae)

    def __len__(self) -> int:
        return len(self.latents) if self.latents is not None else len(self.images)

    def __call__(self, idx: np.ndarray, gens: list[torch.Generator]) -> torch.Tensor:
        if self.vae is None:
            return self.latents[torch.as_tensor(idx)].float()
        vae = self.vae
        param = next(vae.parameters())
        dist = vae.encode(to_model_space(self.images[idx]).to(param)).latent_dist
        noise = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in gens]).to(dist.mean)
        x0 = ((dist.mean + dist.std * noise) * vae.config.scaling_factor).float().cpu()
        _check_latents(x0, self.transformer, "the VAE's latents")
        return x0


def _transformer_call(transformer: nn.Module, z: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                      cfg_scale: float, vae_scale_factor: int) -> None:
    """One call as PixArt's pipelines make it: the prompt rows, or [negative; positive] under guidance;
    resolution and aspect ratio (in pixels) for transformers that condition on them (PixArt-XL at 1024 px)."""
    p = next(transformer.parameters())
    emb, mask = cond["prompt_embeds"], cond["prompt_attention_mask"]
    if cfg_scale > 1:
        emb = torch.cat([cond["negative_prompt_embeds"], emb])
        mask = torch.cat([cond["negative_prompt_attention_mask"], mask])
        z, t = torch.cat([z, z]), torch.cat([t, t])
    added = {"resolution": None, "aspect_ratio": None}
    if transformer.use_additional_conditions:
        h, w = (s * vae_scale_factor for s in z.shape[-2:])
        added = {"resolution": torch.tensor([[h, w]], dtype=p.dtype, device=p.device).repeat(len(z), 1),
                 "aspect_ratio": torch.tensor([[h / w]], dtype=p.dtype, device=p.device).repeat(len(z), 1)}
    transformer(z.to(p), encoder_hidden_states=emb.to(p), encoder_attention_mask=mask.to(p.device),
                timestep=t.to(p.device), added_cond_kwargs=added, return_dict=False)


def _activation_statistics(transformer: nn.Module, stats: ChannelStatistics, x0: _CleanLatents,
                           embeds: dict[str, torch.Tensor], order: np.ndarray, batch_size: int, scheduler: Any,
                           steps: int, seed: int, cfg_scale: float, vae_scale_factor: int, progress: bool) -> None:
    if float(scheduler.init_noise_sigma) != 1.0:
        raise ValueError(f"{type(scheduler).__name__} scales its model inputs (init_noise_sigma "
                         f"{float(scheduler.init_noise_sigma)}); CA noises latents with the variance-preserving "
                         "forward process: use DDIMScheduler or DPMSolverMultistepScheduler")
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps.cpu()
    abar = scheduler.alphas_cumprod.cpu().double()
    with stats.collect(), tqdm(total=len(order), desc="calibrating (CA statistics)", disable=not progress) as bar:
        for start, idx in batches(order, batch_size):
            gens = [calibration_generator(seed, start + j) for j in range(len(idx))]
            x = x0(idx, gens)  # (B, C, H, W)
            index, _, noise = _draw(gens, 0, len(timesteps), tuple(x.shape[1:]))
            t = timesteps[index]
            a = abar[t.long()].view(-1, 1, 1, 1)
            z = (a.sqrt() * x + (1 - a).sqrt() * noise).float()  # the forward process at t
            stats.measure()
            _transformer_call(transformer, z, t, {k: prompt_rows(v, idx) for k, v in embeds.items()}, cfg_scale,
                              vae_scale_factor)
            stats.end_measure()
            bar.update(len(idx))


def _difference_statistics(transformer: nn.Module, pairs: ConsecutiveCalls, embeds: dict[str, torch.Tensor],
                           order: np.ndarray, batch_size: int, scheduler: Any, vae: Any, steps: int, seed: int,
                           cfg_scale: float, progress: bool) -> None:
    from diffusers import PixArtAlphaPipeline

    # PixArtAlphaPipeline's denoising loop (PixArt-Sigma's is the same) on our transformer and scheduler copy;
    # the embeddings are given, so no tokenizer or text encoder, and output_type="latent" never decodes.
    runner = PixArtAlphaPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer,
                                 scheduler=scheduler)
    runner.set_progress_bar_config(disable=True)
    p = next(transformer.parameters())
    with pairs.collect(), tqdm(total=len(order), desc="calibrating (CD statistics, sampling runs)",
                               disable=not progress) as bar:
        for start, idx in batches(order, batch_size):
            # The initial noise of sample i comes from its own generator (the pipeline draws one per generator).
            gens = [calibration_generator(seed, start + j) for j in range(len(idx))]
            given = {k: prompt_rows(v, idx).to(p.device, p.dtype if "embeds" in k else torch.long)
                     for k, v in embeds.items()}
            pairs.new_run()
            runner(negative_prompt=None, **given, num_inference_steps=steps, guidance_scale=cfg_scale,
                   generator=gens, output_type="latent", use_resolution_binning=False)
            if pairs.calls < 2:
                raise RuntimeError(f"the sampler made {pairs.calls} transformer call(s); CD needs two in a row")
            bar.update(len(idx))


def _gather(transformer: nn.Module, pipe: Any, svd: str, specs: list[LinearSpec], sides: tuple[str, ...],
            embeds: dict[str, torch.Tensor], latents: torch.Tensor | None, images: np.ndarray | None, vae: Any,
            num: int | None, batch_size: int, steps: int, scheduler: Any, seed: int, cfg_scale: float,
            progress: bool) -> tuple[ChannelStatistics, int, str]:
    """(statistics, samples, description of the data) of a CA or CD pass."""
    count = len(embeds["prompt_embeds"])
    pipe_vae = getattr(pipe, "vae", None)
    if svd == "cd":
        num = count if num is None else num
        pairs = ConsecutiveCalls(transformer, specs, sides)
        _difference_statistics(transformer, pairs, embeds, _run_order(count, num, seed), batch_size, scheduler,
                               pipe_vae, steps, seed, cfg_scale, progress)
        return pairs.stats, num, f"{count} prompt embeddings"
    x0 = _CleanLatents(transformer, latents, images, vae if vae is not None else pipe_vae)
    if len(x0) != count:
        raise ValueError(f"CA pairs row i of the latents with row i of prompt_embeds: got {len(x0)} latents and "
                         f"{count} prompt embeddings; give one caption embedding each")
    num = len(x0) if num is None else num
    order = select(len(x0), num, seed)
    stats = ChannelStatistics(transformer, specs, "ca", sides)
    # Pixels per latent, for the resolution a PixArt-XL at 1024 px conditions on: the VAE's, else SD's 8.
    coder = x0.vae if x0.vae is not None else pipe_vae
    vae_scale_factor = 2 ** (len(coder.config.block_out_channels) - 1) if coder is not None else 8
    _activation_statistics(transformer, stats, x0, embeds, order, batch_size, scheduler, steps, seed, cfg_scale,
                           vae_scale_factor, progress)
    return stats, num, f"{len(x0)} (latent, prompt embedding) pairs"


def calibrate_text(
    model: Any,
    prompt_embeds: Mapping[str, torch.Tensor] | torch.Tensor | str | os.PathLike | None = None,
    latents: torch.Tensor | None = None,
    images: np.ndarray | None = None,
    svd: str = "cd",
    rank: int | str = 128,
    num: int | None = None,
    batch_size: int = 16,
    steps: int | None = None,
    scheduler: Any = None,
    scale: str = "both",
    seed: int = 0,
    cfg_scale: float = 1.0,
    vae: Any = None,
    pipeline_kwargs: dict | None = None,
    progress: bool = False,
) -> Factors:
    """ICC factors for a PixArt, FLUX, SD3, Wan or Qwen-Image transformer or pipeline (save with `.save(path)`;
    sample the pipeline with `apply_cache(pipe, ICCConfig(svd=..., factors=...))`). The file is tied to the
    transformer's weights.

    FLUX, SD3, Wan, Qwen-Image (`flow_text.py`): prompt_embeds is a file or dict keyed as the pipeline's
    arguments (FLUX/SD3: prompt_embeds + pooled_prompt_embeds; Wan: prompt_embeds; Qwen-Image: prompt_embeds
    + prompt_embeds_mask; the negative_* twins for cfg_scale > 1); CA latents are in the layout the
    pipeline's `latents` argument takes (FLUX/Qwen-Image: packed); `pipeline_kwargs` (height, width,
    num_frames, FLUX's distilled guidance_scale, ...) go to every pipeline call. The default scheduler is
    the pipeline's, else flow-matching Euler. PixArt:

    - prompt_embeds: a file or dict with prompt_embeds (P, T, D) and prompt_attention_mask (P, T) (and, for
      cfg_scale > 1, negative_prompt_embeds / negative_prompt_attention_mask), the format of
      `calicache sample --prompt-embeds`; or a bare (P, T, D) tensor (all tokens valid).
    - svd="ca": latents (N, C, H, W), clean and scaled as the pipeline's latents (VAE latents x
      scaling_factor), row i paired with prompt row i (N = P); or uint8 images (N, H, W, 3) encoded with
      `vae` (default: the pipeline's). num (default N) pairs are drawn without replacement by the seed.
    - svd="cd": prompts only; num sampling runs (default P), prompts taken in a seeded order, cycled if
      num > P, each from its own noise; every consecutive pair of its `steps` calls is measured.
    - svd="plain": the weights only.
    - steps (default: the pipeline's; PixArt's 20 for a bare transformer) and scheduler (default: the
      pipeline's, else DPM-Solver++(2M)): the sampling schedule the statistics are taken on; use the one you
      will sample with.
    - rank / scale: as `calibrate`.
    """
    from .._version import __version__

    transformer, pipe, family = _text_transformer(model)
    check_factor_args(svd, rank, scale, TEXT_SVD_METHODS)
    if cfg_scale < 1:
        raise ValueError(f"cfg_scale must be >= 1 (1 = no guidance, the authors' calibration), got {cfg_scale}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if svd != "ca" and (latents is not None or images is not None):
        raise ValueError(f"latents/images are the CA calibration set; svd={svd!r} does not use them "
                         "(CD starts every sampling run from noise)")
    if svd == "ca" and (latents is None) == (images is None):
        raise ValueError("svd='ca' needs the clean latents of the calibration pairs: pass latents= (N, C, H, W) "
                         "or images= (uint8, N, H, W, 3) with a VAE, one per row of prompt_embeds")
    if family != "pixart" and images is not None:
        raise ValueError("CA on FLUX, SD3, Wan and Qwen-Image takes latents= in the layout the pipeline's `latents` "
                         "argument takes (encode the images with the pipeline's VAE first), not images=")
    steps = steps if steps is not None else _default_steps(pipe, family)
    if not isinstance(steps, int) or steps < (2 if svd == "cd" else 1):
        raise ValueError(f"steps must be an integer >= {2 if svd == 'cd' else 1} (CD compares two consecutive "
                         f"calls), got {steps!r}")
    branches = get_adapter(transformer).branches(transformer)
    specs = [s for b in branches for s in b.linears]
    sides = {"both": ("in", "out"), "input": ("in",), "output": ("out",)}[scale]
    sched = _scheduler(pipe, scheduler, family)
    data = None
    if svd == "plain":
        scales = {s.name: (None, None) for s in specs}
    else:
        if family == "pixart":
            embeds = _embeddings(prompt_embeds, cfg_scale > 1, text_width(transformer))
        else:
            embeds = flow_embeddings(family, prompt_embeds, cfg_scale > 1)
        was_training = transformer.training
        transformer.eval()
        try:
            with torch.inference_mode():
                if family == "pixart":
                    stats, num, data = _gather(transformer, pipe, svd, specs, sides, embeds, latents, images, vae,
                                               num, batch_size, steps, sched, seed, cfg_scale, progress)
                else:
                    stats, num, data = _gather_flow(family, transformer, pipe, svd, specs, sides, embeds, latents,
                                                    num, batch_size, steps, sched, seed, cfg_scale,
                                                    dict(pipeline_kwargs or {}), progress)
        finally:
            transformer.train(was_training)
        scales = stats.scales(specs)
    tensors = factorize(transformer, branches, scales, rank, progress)
    meta = {
        "method": "icc", "svd": svd, "scale": scale, "model_hash": weight_hash(transformer),
        "model_config": json.loads(transformer.to_json_string()),
        "rank": rank, "data": data,
        "num": None if svd == "plain" else num, "batch_size": batch_size, "steps": steps,
        "sampler": type(sched).__name__, "scheduler_config": json.loads(sched.to_json_string()),
        "statistics": {"plain": None, "ca": "one call on latents noised to a random step",
                       "cd": "every pair of consecutive calls of sampling runs from noise"}[svd],
        "seed": seed, "cfg_scale": cfg_scale, "label_drop": 0.0, "alpha": ALPHA, "max_ratio": MAX_RATIO,
        "calicache_version": __version__,
    }
    return Factors(tensors, meta)


def _gather_flow(family: str, transformer: nn.Module, pipe: Any, svd: str, specs: list[LinearSpec],
                 sides: tuple[str, ...], embeds: dict[str, torch.Tensor], latents: torch.Tensor | None,
                 num: int | None, batch_size: int, steps: int, scheduler: Any, seed: int, cfg_scale: float,
                 pipeline_kwargs: dict, progress: bool) -> tuple[ChannelStatistics, int, str]:
    """(statistics, samples, description of the data) of a CA or CD pass through the family's pipeline."""
    count = len(next(iter(embeds.values())))
    runner = flow_runner(family, transformer, scheduler, getattr(pipe, "vae", None))
    if svd == "cd":
        num = count if num is None else num
        pairs = ConsecutiveCalls(transformer, specs, sides)
        flow_difference_statistics(family, runner, pairs, embeds, _run_order(count, num, seed), batch_size, steps,
                                   seed, cfg_scale, pipeline_kwargs, progress)
        return pairs.stats, num, f"{count} prompt embeddings"
    if not isinstance(latents, torch.Tensor) or len(latents) != count or not torch.isfinite(latents).all():
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"CA pairs row i of the latents with row i of prompt_embeds: give {count} finite clean "
                         f"latents (the pipeline's `latents` layout), got {got}")
    num = len(latents) if num is None else num
    stats = ChannelStatistics(transformer, specs, "ca", sides)
    flow_activation_statistics(family, runner, stats, latents, embeds, select(len(latents), num, seed), batch_size,
                               steps, seed, cfg_scale, pipeline_kwargs, progress)
    return stats, num, f"{len(latents)} (latent, prompt embedding) pairs"


def _default_steps(pipe: Any, family: str = "pixart") -> int:
    """The pipeline's own default number of steps (for a bare transformer: its family pipeline's, PixArt-alpha's 20)."""
    import diffusers

    default_cls = diffusers.PixArtAlphaPipeline if family == "pixart" else getattr(diffusers, FORMATS[family][0])
    call = type(pipe).__call__ if pipe is not None else default_cls.__call__
    default = inspect.signature(call).parameters.get("num_inference_steps")
    return int(default.default) if default is not None and isinstance(default.default, int) else 20


def _run_order(count: int, num: int, seed: int) -> np.ndarray:
    """Prompt index of each of `num` sampling runs: a seeded permutation of the `count` prompts, cycled."""
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be an integer >= 1, got {num!r}")
    return np.resize(select(count, count, seed), num)
