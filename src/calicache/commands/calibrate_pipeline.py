"""ICC calibration of a text-to-image transformer (PixArt, FLUX, SD3, Wan, Qwen-Image):
`calicache calibrate --pipeline DIR --prompt-embeds FILE`.

The prompts come as precomputed embeddings (the file `calicache sample --prompt-embeds` reads), so the
T5 text encoder is never loaded. `--svd cd` samples from noise with the pipeline's scheduler and
measures every pair of consecutive calls; `--svd ca` noises clean latents (`--latents FILE`, or images
from `--data` encoded with the pipeline's VAE) paired row by row with the embeddings. The factor file is
tied to the transformer's weights: `calicache sample --pipeline DIR --method icc --factors OUT`.
FLUX, SD3, Wan and Qwen-Image (`calibration/flow_text.py`): embeddings keyed as the pipeline's arguments,
`--latents` in the layout the pipeline's `latents` argument takes, `--height/--width/--num-frames` for
every pipeline call; `--cfg-scale` as `calicache sample --pipeline` reads it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from .. import distributed
from ..adapters import transformer_family
from ..calibration.flow_text import FORMATS
from ..data.prompts import load_tensor_file
from .macs import _is_pixart_folder
from .sample_pipeline import GUIDANCE, SCHEDULERS, add_size_arguments, call_tokens, load_pipeline, size_kwargs


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("text-to-image (PixArt)")
    g.add_argument("--pipeline", default=None,
                   help="text-to-image/video pipeline folder (PixArt-alpha/Sigma, FLUX, SD3, Wan, Qwen-Image; "
                        "save_pretrained layout): calibrate its transformer; no text encoder is loaded. A PixArt "
                        "transformer folder works as --model DIR")
    g.add_argument("--prompt-embeds", default=None,
                   help="PixArt: .safetensors or .pt with prompt_embeds (P, T, D) and prompt_attention_mask (P, T) "
                        "(and negative_prompt_embeds / negative_prompt_attention_mask for --cfg-scale > 1); the other "
                        "families: the keys `calicache sample --prompt-embeds` reads for them")
    g.add_argument("--latents", default=None,
                   help="--svd ca: .safetensors or .pt with `latents`, the clean latents of the captioned images in "
                        "the layout the pipeline's `latents` argument takes (PixArt, SD3: (N, C, H, W) VAE latents x "
                        "scaling_factor; FLUX, Qwen-Image: packed (N, tokens, C); Wan: (N, C, F, H, W)); row i "
                        "pairs with prompt row i")
    g.add_argument("--scheduler", choices=["pipeline", *SCHEDULERS], default="pipeline",
                   help="PixArt: the sampler the statistics follow: the folder's scheduler (DPM-Solver++(2M) for a "
                        "transformer folder) or DDIM / DPM-Solver++(2M) built from its config")
    add_size_arguments(g)


def wanted(args: argparse.Namespace) -> bool:
    """Whether the calibrate command was asked for a PixArt transformer rather than a calicache DiT."""
    if args.pipeline is not None:
        return True
    model = Path(str(args.model))
    if model.is_dir() and _is_pixart_folder(model):
        return True
    if args.prompt_embeds is not None or args.latents is not None:
        raise ValueError("--prompt-embeds and --latents calibrate PixArt: give --pipeline DIR (or a PixArt "
                         "transformer folder as --model)")
    return False


def load_latents(path: str | Path) -> torch.Tensor:
    """`latents` from a safetensors file or a torch file (a dict with `latents`, or the tensor itself)."""
    data = load_tensor_file(path, "latents", "the clean latents as {'latents': tensor (N, C, H, W)}")
    latents = data.get("latents") if isinstance(data, dict) else data
    if not isinstance(latents, torch.Tensor):
        found = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{path} must hold a tensor named `latents` (found {found})")
    return latents.float()


def _load(args: argparse.Namespace):
    """(pipeline or None, transformer) from --pipeline or a --model folder (a pipeline or a transformer folder)."""
    folder = Path(args.pipeline or args.model)
    if (folder / "model_index.json").is_file():
        pipe = load_pipeline(folder, text_encoder=False)
        if type(pipe).__name__ not in ("PixArtAlphaPipeline", "PixArtSigmaPipeline") \
                and transformer_family(pipe.transformer) is None:
            raise ValueError(f"{folder} holds a {type(pipe).__name__}; --pipeline calibration is for PixArt, FLUX, "
                             "SD3, Wan and Qwen-Image (DiT folders calibrate as --model DIR, converted to calicache's "
                             "DiT)")
        return pipe, pipe.transformer
    if args.pipeline is not None:
        raise FileNotFoundError(f"{folder}: no model_index.json; give a pipeline folder written by save_pretrained "
                                "(a transformer folder goes to --model)")
    from diffusers import PixArtTransformer2DModel

    sub = "transformer" if (folder / "transformer" / "config.json").is_file() else None
    try:
        model = PixArtTransformer2DModel.from_pretrained(str(folder), subfolder=sub, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{folder}: diffusers cannot load this PixArt transformer ({e})") from e
    return None, model.eval()


def _default_guidance(pipe, model) -> float:
    """The pipeline's default guidance_scale (FLUX.1-dev: 3.5), for a bare transformer FluxPipeline's."""
    import inspect

    import diffusers

    cls = type(pipe) if pipe is not None else getattr(diffusers, FORMATS[transformer_family(model)][0])
    return float(inspect.signature(cls.__call__).parameters["guidance_scale"].default)


def _scheduler(args: argparse.Namespace, pipe):
    if args.scheduler == "pipeline":
        return None  # calibrate_text: the pipeline's scheduler, else DPM-Solver++(2M)
    import diffusers

    cls = getattr(diffusers, SCHEDULERS[args.scheduler])
    return cls.from_config(pipe.scheduler.config) if pipe is not None else cls()


def run(args: argparse.Namespace) -> int:
    from ..cache.macs import count_macs
    from ..cache.methods import ICCConfig
    from ..cache.svd import parse_rank
    from ..calibration.text import TEXT_SVD_METHODS, calibrate_text
    from .common import setup

    setup(args)
    if distributed.launched():
        raise ValueError("calibrate --pipeline runs in one process (its statistics are not split over ranks); "
                         "start it without torchrun")
    if args.svd not in TEXT_SVD_METHODS:
        raise ValueError(f"--svd {args.svd} is not available for PixArt; choose one of {TEXT_SVD_METHODS}")
    if args.method != "icc":
        raise ValueError("calibrating a PixArt pipeline makes ICC factors (--method icc); GOC steps are found on "
                         "calicache DiTs")
    if args.period != 2 or args.forecast_weight != 1.0 or args.threshold != 0.0:
        raise ValueError("--period, --forecast-weight and --threshold belong to GOC / CF calibration of calicache "
                         "DiTs; PixArt's ICC factors do not depend on them")
    if args.sampler != "ddim" or args.spacing != "adm":
        raise ValueError("--sampler and --spacing belong to calicache's DiT sampler; a pipeline follows "
                         "--scheduler pipeline|ddim|dpmpp_2m")
    if args.svd == "ca" and (args.latents is None) == (args.data is None):
        raise ValueError("--svd ca needs the clean latents of the calibration pairs: --latents FILE, or --data "
                         "(images encoded by the pipeline's VAE), one per prompt of --prompt-embeds")
    if args.svd != "ca" and (args.latents is not None or args.data is not None):
        raise ValueError(f"--latents / --data are CA's calibration set; --svd {args.svd} does not use them")
    if args.svd != "plain" and args.prompt_embeds is None:
        raise ValueError(f"--svd {args.svd} on a PixArt transformer needs --prompt-embeds FILE (the T5 embeddings "
                         "of the calibration captions); --svd plain needs none")
    cfg_scale = 1.0 if args.cfg_scale is None else args.cfg_scale
    pipe, model = _load(args)
    family = transformer_family(model)
    size = size_kwargs(args, family)
    if family is not None and (args.scheduler != "pipeline" or args.data is not None):
        raise ValueError("--scheduler and --data apply to PixArt; FLUX, SD3, Wan and Qwen-Image calibrate on their "
                         "flow-matching scheduler, CA from --latents")
    if family is not None and args.cfg_scale is None and GUIDANCE[family][0] == "guidance_scale" \
            and not GUIDANCE[family][1]:
        cfg_scale = _default_guidance(pipe, model)  # FLUX's distilled guidance is conditioning, not CFG
    embeds = None
    if args.prompt_embeds is not None and family is None:
        from ..data.prompts import load_prompt_embeds, text_width

        embeds = load_prompt_embeds(args.prompt_embeds, cfg_scale > 1, text_width(model))
    elif args.prompt_embeds is not None:
        from ..calibration.flow_text import flow_embeddings

        embeds = flow_embeddings(family, args.prompt_embeds, cfg_scale > 1 and GUIDANCE[family][1])
        if not GUIDANCE[family][1]:  # FLUX: --cfg-scale is the guidance embedding, handed to the pipeline
            size["guidance_scale"], cfg_scale = cfg_scale, 1.0
    latents = load_latents(args.latents) if args.latents is not None else None
    images = None
    if args.data is not None:
        from ..calibration.inputs import load_images

        images, _ = load_images(args.data, args.data_dir)
    seen: dict[str, int] = {}  # image tokens of the real calls, for the MACs report

    def observe(module, a, kw):
        seen["tokens"] = call_tokens(module, a[0] if a else kw["hidden_states"])

    handle = model.register_forward_pre_hook(observe, with_kwargs=True)
    t0 = time.perf_counter()
    try:
        factors = calibrate_text(pipe if pipe is not None else model, embeds, latents=latents, images=images,
                                 svd=args.svd, rank=parse_rank(args.rank), num=args.num, batch_size=args.batch_size,
                                 steps=args.steps, scheduler=_scheduler(args, pipe), scale=args.scale, seed=args.seed,
                                 cfg_scale=cfg_scale, vae=args.vae,
                                 pipeline_kwargs=size if family is not None else None, progress=True)
    finally:
        handle.remove()
    wall = time.perf_counter() - t0
    factors.save(args.out)
    meta = factors.meta
    text_tokens = None if embeds is None else embeds["prompt_embeds"].shape[1]  # the MACs at this prompt length
    macs = count_macs(model, ICCConfig(svd=args.svd, factors=factors), steps=2, text_tokens=text_tokens,
                      tokens=seen.get("tokens") if family is not None else None)
    ranks = list(factors.ranks().values())
    report = {
        "method": "icc", "pipeline": args.pipeline, "model": None if args.pipeline else str(args.model),
        "out": args.out, "svd": args.svd, "scale": args.scale, "data": meta["data"],
        "prompt_embeds": args.prompt_embeds, "latents": args.latents, "images": args.data, "num": meta["num"],
        "steps": meta["steps"], "scheduler": meta["sampler"], "seed": args.seed, "cfg_scale": cfg_scale,
        "rank_min": min(ranks), "rank_max": max(ranks),
        "rank_mean": round(sum(ranks) / len(ranks), 2), "text_tokens": text_tokens,
        "calibrated_call_macs": macs["per_call"][1], "full_call_macs": macs["full_call"],
        "calibrated_call_share": round(macs["per_call"][1] / macs["full_call"], 4),
        "model_hash": meta["model_hash"], "wall_seconds": round(wall, 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"wrote {args.svd.upper()} factors of {type(model).__name__} (ranks {min(ranks)}-{max(ranks)}, a "
              f"calibrated call costs {report['calibrated_call_share']:.1%} of a full call) to {args.out} in "
              f"{wall:.1f}s")
    return 0
