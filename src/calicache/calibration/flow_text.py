"""CA / CD statistics for the flow-matching text-to-image/video transformers (FLUX, SD3, Wan, Qwen-Image)
from the prompt embeddings their pipelines take, through each family's own pipeline.

Every model call comes from the family's diffusers pipeline (built around the transformer with no text
encoders; embeddings in, latents out), so the transformer sees the prompt processing, position ids,
guidance embedding and timestep units it sees when sampling:
- CA: the pipeline is started on the batch's clean latents; at its first transformer call a pre-hook
  replaces the input by the flow-matching forward process `z = (1 - sigma) x0 + sigma eps` at a random
  step of the pipeline's own schedule (per sample, shift included) and the timestep by that step's
  (in the units the pipeline passes); the call is measured and the pipeline is stopped.
- CD: whole sampling runs from noise through the pipeline's loop, every pair of consecutive calls
  measured (`ConsecutiveCalls`), as for PixArt.
No guidance by default, as the authors calibrate (cfg_scale 1: one conditional pass). With cfg_scale > 1
CA measures the first call (SD3: the doubled [negative; positive] batch; the pipelines that run guidance
as separate passes: the conditional pass); CD needs one call per step, so those pipelines (Wan, FLUX and
Qwen-Image true CFG) calibrate CD without guidance.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..data.prompts import load_tensor_file, prompt_rows
from .calibrate import _draw, calibration_generator
from .inputs import batches
from .stats import ChannelStatistics

# transformer class -> (pipeline class, conditional keys, negative keys, guidance argument, separate passes)
FORMATS: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], str, bool]] = {
    "FluxTransformer2DModel": ("FluxPipeline", ("prompt_embeds", "pooled_prompt_embeds"),
                               ("negative_prompt_embeds", "negative_pooled_prompt_embeds"), "true_cfg_scale", True),
    "SD3Transformer2DModel": ("StableDiffusion3Pipeline", ("prompt_embeds", "pooled_prompt_embeds"),
                              ("negative_prompt_embeds", "negative_pooled_prompt_embeds"), "guidance_scale", False),
    "WanTransformer3DModel": ("WanPipeline", ("prompt_embeds",), ("negative_prompt_embeds",), "guidance_scale", True),
    "QwenImageTransformer2DModel": ("QwenImagePipeline", ("prompt_embeds", "prompt_embeds_mask"),
                                    ("negative_prompt_embeds", "negative_prompt_embeds_mask"), "true_cfg_scale", True),
}


# Dimensions of the latents the transformer takes: FLUX and Qwen-Image pack 2 x 2 patches into tokens.
LATENT_DIMS = {"FluxTransformer2DModel": 3, "SD3Transformer2DModel": 4, "WanTransformer3DModel": 5,
               "QwenImageTransformer2DModel": 3}


def flow_embeddings(family: str, prompt_embeds: Any, guidance: bool) -> dict[str, torch.Tensor]:
    """The embedding tensors (keyed as the pipeline's arguments) from a file or a dict, checked."""
    _, cond, neg, _, _ = FORMATS[family]
    source = "prompt embeddings"
    if prompt_embeds is None:
        raise ValueError(f"CA/CD calibration needs prompt embeddings: a file or dict with {', '.join(cond)} "
                         f"({'and ' + ', '.join(neg) + ' for guidance' if neg else ''}), as the pipeline's "
                         "encode_prompt returns them; or use svd='plain'")
    if not isinstance(prompt_embeds, Mapping):
        source = str(prompt_embeds)
        prompt_embeds = load_tensor_file(prompt_embeds, "prompt embeddings", f"a dict with {', '.join(cond)}")
    keys = cond + (neg if guidance else ())
    missing = [k for k in keys if not isinstance(prompt_embeds.get(k), torch.Tensor)]
    if missing:
        raise ValueError(f"{source} has no tensor {', '.join(missing)}, which this pipeline needs"
                         + (" for guidance (the embeddings of the negative or empty prompt); add them or use "
                            "cfg_scale 1" if set(missing) <= set(neg) else ""))
    out = {k: prompt_embeds[k] for k in keys}
    rows = out[cond[0]].shape[0]
    for k, v in out.items():
        if v.shape[0] not in (1, rows) or (k.startswith("negative") and v.shape[1:] != out[k[9:]].shape[1:]):
            raise ValueError(f"{source}: {k} {tuple(v.shape)} does not match prompt_embeds {tuple(out[cond[0]].shape)}"
                             " (1 or P rows; negatives shaped as the conditional ones)")
        if not torch.isfinite(v.float()).all():
            raise ValueError(f"{source}: {k} contains NaN or infinite values")
    return {k: v.long() if k.endswith("mask") else v.float() for k, v in out.items()}


def flow_runner(family: str, transformer: nn.Module, scheduler: Any, vae: Any) -> Any:
    """The family's pipeline around `transformer` and `scheduler`: no text encoders, latents out."""
    import diffusers

    cls = getattr(diffusers, FORMATS[family][0])
    params = inspect.signature(cls.__init__).parameters
    parts = {name: None for name, p in params.items() if name != "self" and p.default is inspect.Parameter.empty}
    parts.update(transformer=transformer, scheduler=scheduler, vae=vae)
    runner = cls(**parts)
    runner.set_progress_bar_config(disable=True)
    return runner


class _Stop(Exception):
    """Ends a pipeline call after the measured transformer call."""


def _guidance(family: str, cfg_scale: float) -> dict:
    return {FORMATS[family][3]: cfg_scale}


def flow_activation_statistics(family: str, runner: Any, stats: ChannelStatistics, latents: torch.Tensor,
                               embeds: dict[str, torch.Tensor], order: np.ndarray, batch_size: int, steps: int,
                               seed: int, cfg_scale: float, pipeline_kwargs: dict, progress: bool) -> None:
    """CA: one call per sample on its clean latents noised to a random step of the pipeline's schedule."""
    transformer, scheduler = runner.transformer, runner.scheduler
    if not hasattr(scheduler, "sigmas") or hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"{type(scheduler).__name__} is not a flow-matching scheduler; CA on these families noises "
                         "latents with z = (1 - sigma) x0 + sigma eps: use FlowMatchEulerDiscreteScheduler")
    dims = LATENT_DIMS[family]
    channels = latents.shape[-1] if dims == 3 else latents.shape[1]
    if latents.dim() != dims or channels != transformer.config.in_channels or latents[0].numel() == 0:
        layout = "(N, tokens, C) packed" if dims == 3 else "(N, C, H, W)" if dims == 4 else "(N, C, F, H, W)"
        raise ValueError(f"latents {tuple(latents.shape)} are not in the layout the transformer takes: {layout} with "
                         f"C = {transformer.config.in_channels}, as the pipeline's `latents` argument takes them "
                         "(with height/width in pipeline_kwargs that match)")
    state: dict = {}

    def before(module, args, kwargs):
        x, z_in, t_in = state["x"], kwargs["hidden_states"], kwargs["timestep"]
        sigmas = scheduler.sigmas.cpu().double()
        units = float(t_in.flatten()[0]) / float(scheduler.timesteps[0])  # e.g. FLUX passes timestep / 1000
        sigma = sigmas[state["index"]].view(-1, *[1] * (x.dim() - 1))
        z = ((1 - sigma) * x.double() + sigma * state["noise"].double()).to(z_in.dtype)
        t = scheduler.timesteps.cpu()[state["index"]].double() * units
        repeat = z_in.shape[0] // x.shape[0]  # the doubled batch of guidance: [negative; positive]
        kwargs = dict(kwargs, hidden_states=torch.cat([z] * repeat).to(z_in.device),
                      timestep=torch.cat([t] * repeat).to(t_in.device, t_in.dtype))
        stats.measure()
        return args, kwargs

    def after(module, args, output):
        stats.end_measure()
        raise _Stop

    handles = [transformer.register_forward_pre_hook(before, with_kwargs=True),
               transformer.register_forward_hook(after)]
    try:
        with stats.collect(), tqdm(total=len(order), desc="calibrating (CA statistics)", disable=not progress) as bar:
            for start, idx in batches(order, batch_size):
                gens = [calibration_generator(seed, start + j) for j in range(len(idx))]
                x = latents[torch.as_tensor(idx)].float()
                index, _, noise = _draw(gens, 0, steps, tuple(x.shape[1:]))
                state.update(x=x, index=index, noise=noise)
                given = {k: prompt_rows(v, idx) for k, v in embeds.items()}
                try:
                    runner(**given, latents=x.to(next(transformer.parameters()).dtype), num_inference_steps=steps,
                           output_type="latent", **_guidance(family, cfg_scale), **pipeline_kwargs)
                except _Stop:
                    pass
                else:
                    raise RuntimeError("the pipeline finished without the measured call")
                bar.update(len(idx))
    finally:
        for h in handles:
            h.remove()


def flow_difference_statistics(family: str, runner: Any, pairs: Any, embeds: dict[str, torch.Tensor],
                               order: np.ndarray, batch_size: int, steps: int, seed: int, cfg_scale: float,
                               pipeline_kwargs: dict, progress: bool) -> None:
    """CD: sampling runs from noise through the pipeline's loop; every consecutive pair of calls measured."""
    if cfg_scale > 1 and FORMATS[family][4]:
        raise ValueError(f"{FORMATS[family][0]} runs guidance as two separate passes per step, so consecutive calls "
                         "alternate between them; calibrate CD without guidance (cfg_scale 1, as the authors do)")
    with pairs.collect(), tqdm(total=len(order), desc="calibrating (CD statistics, sampling runs)",
                               disable=not progress) as bar:
        for start, idx in batches(order, batch_size):
            gens = [calibration_generator(seed, start + j) for j in range(len(idx))]
            pairs.new_run()
            runner(**{k: prompt_rows(v, idx) for k, v in embeds.items()}, num_inference_steps=steps, generator=gens,
                   output_type="latent", **_guidance(family, cfg_scale), **pipeline_kwargs)
            if pairs.calls < 2:
                raise RuntimeError(f"the sampler made {pairs.calls} transformer call(s); CD needs two in a row")
            bar.update(len(idx))
