"""Sampling through a diffusers pipeline (`calicache sample --pipeline DIR`) with calicache's caching.

DiTPipeline takes `--classes`; the text pipelines (PixArt-alpha/Sigma, FLUX, SD3, Wan, Qwen-Image) take
`--prompt` (their text encoders must be in the folder) or `--prompt-embeds FILE` with precomputed
embeddings keyed as the pipeline's arguments, in which case no text encoder is loaded at all.
`--cfg-scale` is the pipeline's guidance: `guidance_scale` (FLUX: the distilled guidance embedding; SD3,
Wan: classifier-free guidance), `true_cfg_scale` for Qwen-Image. Wan's videos are written frame by frame.
Sample i has its own noise generator seeded by (seed, i), as in
`calicache.sample`. The outputs are those of `calicache sample`: samples.npz (`arr_0` uint8 NHWC,
`arr_1` class labels or prompt indices), grid.png and report.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters import transformer_family
from ..cache import apply_cache, get_engine
from ..cache.macs import count_macs
from ..cache.pipeline import pass_engines
from ..calibration.flow_text import flow_embeddings
from ..data.prompts import load_prompt_embeds, prompt_rows, text_width
from ..sampling import NonFiniteSamplesError, _class_labels, _nonfinite_error, sample_generator
from .common import cache_config_from_args, parse_classes, setup, write_sample_outputs

SCHEDULERS = {"ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("diffusers pipelines")
    g.add_argument("--pipeline", default=None,
                   help="diffusers pipeline folder (DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline, "
                        "FluxPipeline, StableDiffusion3Pipeline, WanPipeline, QwenImagePipeline): sample through it "
                        "instead of --model; --sampler/--spacing do not apply, see --scheduler")
    g.add_argument("--prompt", action="append", default=None,
                   help="prompt (repeat the flag for several; cycled over --num); needs the text encoder(s)")
    g.add_argument("--prompt-embeds", default=None,
                   help="PixArt: .safetensors or .pt holding prompt_embeds (P, T, D) and prompt_attention_mask (P, T), "
                        "and for guidance negative_prompt_embeds / negative_prompt_attention_mask (1 or P rows). "
                        "FLUX, SD3: prompt_embeds + pooled_prompt_embeds; Wan: prompt_embeds; Qwen-Image: "
                        "prompt_embeds + prompt_embeds_mask; negative_* twins for guidance. No text encoder is loaded")
    g.add_argument("--scheduler", choices=["pipeline", *SCHEDULERS], default="pipeline",
                   help="the folder's scheduler, or DDIM / DPM-Solver++(2M) built from its config (PixArt, DiT)")
    add_size_arguments(g)


def add_size_arguments(g) -> None:
    """--height, --width, --num-frames: given to every call of a FLUX, SD3, Wan or Qwen-Image pipeline."""
    g.add_argument("--height", type=int, default=None, help="FLUX/SD3/Wan/Qwen-Image: image height in pixels "
                   "(default: the pipeline's)")
    g.add_argument("--width", type=int, default=None, help="FLUX/SD3/Wan/Qwen-Image: image width in pixels")
    g.add_argument("--num-frames", type=int, default=None, help="Wan: frames per video (default: the pipeline's 81)")


def size_kwargs(args: argparse.Namespace, family: str | None) -> dict:
    """The size arguments given, for a FLUX/SD3/Wan/Qwen-Image pipeline; an error for the others."""
    given = {k: getattr(args, k) for k in ("height", "width", "num_frames") if getattr(args, k, None) is not None}
    if given and family is None:
        raise ValueError("--height/--width/--num-frames apply to FLUX, SD3, Wan and Qwen-Image pipelines")
    if "num_frames" in given and family != "WanTransformer3DModel":
        raise ValueError("--num-frames applies to Wan pipelines")
    return given


# The guidance argument `--cfg-scale` sets, and whether guidance > 1 needs negative prompt embeddings.
GUIDANCE = {"FluxTransformer2DModel": ("guidance_scale", False), "SD3Transformer2DModel": ("guidance_scale", True),
            "WanTransformer3DModel": ("guidance_scale", True), "QwenImageTransformer2DModel": ("true_cfg_scale", True)}


def call_tokens(model: torch.nn.Module, hidden_states: torch.Tensor) -> int:
    """Image (or video) tokens per sample of a transformer call: packed (B, N, C), or patches of (B, C, [F,] H, W)."""
    if hidden_states.dim() == 3:
        return hidden_states.shape[1]
    patch = model.config.patch_size
    patch = [patch, patch] if isinstance(patch, int) else list(patch)
    return int(np.prod(hidden_states.shape[2:])) // int(np.prod(patch))


def diffusers_transformer_on_meta(folder: str | Path) -> torch.nn.Module:
    """The transformer of a diffusers model or pipeline folder, built from its config on the meta device
    (no weights read): enough to count MACs."""
    import diffusers

    folder = Path(folder)
    for sub in ("", "transformer"):
        config_path = folder / sub / "config.json"
        if config_path.is_file():
            break
    else:
        raise FileNotFoundError(f"{folder}: no config.json (nor transformer/config.json); not a diffusers folder")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path}: unreadable config ({e})") from e
    name = config.get("_class_name")
    if name == "Transformer2DModel":  # diffusers' legacy name of both; it remaps by the norm type
        name = "PixArtTransformer2DModel" if config.get("norm_type") == "ada_norm_single" else "DiTTransformer2DModel"
    from ..adapters import FAMILIES

    if name not in ("DiTTransformer2DModel", "PixArtTransformer2DModel", *FAMILIES):
        raise ValueError(f"{config_path}: {name} is not a DiT, PixArt, {', '.join(FAMILIES)} transformer")
    with torch.device("meta"):
        return getattr(diffusers, name).from_config(config)


def load_pipeline(folder: str | Path, text_encoder: bool):
    """A pipeline in eval mode on the CPU; without `text_encoder`, tokenizer and text encoder are not loaded."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError as e:
        raise RuntimeError("--pipeline needs diffusers: pip install diffusers") from e
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise FileNotFoundError(f"{folder}: no model_index.json; give a pipeline folder written by save_pretrained "
                                "(or downloaded from the hub)")
    index = json.loads((folder / "model_index.json").read_text())
    # Without text encoders: every text encoder and tokenizer component stays unloaded (None); components the
    # folder does not hold (saved as None: [null, null]) are None either way.
    extra = {k: None for k, v in index.items() if not k.startswith("_") and (
        v in (None, [None, None]) or (not text_encoder and k.startswith(("text_encoder", "tokenizer"))))}
    try:
        # low_cpu_mem_usage=False: the plain load path, which needs no `accelerate`.
        try:
            pipe = DiffusionPipeline.from_pretrained(str(folder), low_cpu_mem_usage=False, **extra)
        except ValueError as e:  # models with fp32-kept modules (Wan) load only through accelerate's path
            if "keep_in_fp32_modules" not in str(e):
                raise
            pipe = DiffusionPipeline.from_pretrained(str(folder), **extra)
    except (OSError, ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"{folder}: diffusers cannot load this pipeline ({e})") from e
    if not hasattr(pipe, "transformer"):
        raise ValueError(f"{folder} holds a {type(pipe).__name__}, which has no transformer; calicache caches "
                         "DiTPipeline, PixArt, FLUX, SD3, Wan and Qwen-Image pipelines")
    return pipe


def check_finite(pipe, images: np.ndarray, cfg_scale: float, first: int) -> None:
    """Non-finite samples are an error naming the likely source, as in `calicache sample` (the command then
    writes nothing): damaged weights of another component (the VAE), else what `sample` names."""
    if np.isfinite(images).all():
        return
    damaged = [name for name, part in pipe.components.items() if isinstance(part, torch.nn.Module)
               and part is not pipe.transformer and not all(torch.isfinite(p).all() for p in part.parameters())]
    if damaged:
        raise NonFiniteSamplesError(f"sampling produced NaN or infinite values (batch starting at sample {first}); "
                                    f"likely source: the pipeline's {', '.join(damaged)} weights contain NaN or inf: "
                                    "the folder is damaged; re-create or re-download it")
    raise _nonfinite_error(pipe.transformer, cfg_scale, None, first)


def run(args: argparse.Namespace) -> int:
    from diffusers import DiTPipeline


    setup(args)
    if args.vae is not None or args.cfg_channels is not None or getattr(args, "clip_denoised", "auto") != "auto":
        raise ValueError("--vae, --cfg-channels and --clip-denoised do not apply to --pipeline: it has its own VAE "
                         "and guidance, and its scheduler's config decides clipping")
    text = args.prompt is not None or args.prompt_embeds is not None
    if args.prompt is not None and args.prompt_embeds is not None:
        raise ValueError("give --prompt or --prompt-embeds, not both")
    pipe = load_pipeline(args.pipeline, text_encoder=args.prompt_embeds is None)
    is_dit = isinstance(pipe, DiTPipeline)
    family = transformer_family(pipe.transformer)  # None: DiT or PixArt
    size = size_kwargs(args, family)
    if is_dit and text:
        raise ValueError("DiTPipeline is class-conditional: give --classes, not prompts")
    if not is_dit and not text:
        raise ValueError(f"{type(pipe).__name__} needs --prompt TEXT or --prompt-embeds FILE")
    if not is_dit and args.classes:
        raise ValueError("--classes applies to DiTPipeline; text pipelines take --prompt / --prompt-embeds")
    if args.prompt is not None and getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"{args.pipeline} has no text encoder; pass precomputed --prompt-embeds FILE instead")
    if is_dit and args.eta:
        raise ValueError("DiTPipeline has no eta; DDIM there is deterministic")
    if family is not None and (args.eta or args.scheduler != "pipeline"):
        raise ValueError("--eta and --scheduler apply to DiT and PixArt pipelines; FLUX, SD3, Wan and Qwen-Image "
                         "sample with their own flow-matching scheduler")
    defaults = inspect.signature(type(pipe).__call__).parameters
    guidance_arg = GUIDANCE[family][0] if family is not None else "guidance_scale"
    steps = args.steps if args.steps is not None else defaults["num_inference_steps"].default
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else defaults[guidance_arg].default
    if args.scheduler != "pipeline":
        import diffusers

        pipe.scheduler = getattr(diffusers, SCHEDULERS[args.scheduler]).from_config(pipe.scheduler.config)
    model = pipe.transformer
    embeds = None
    if args.prompt_embeds is not None and family is None:
        embeds = load_prompt_embeds(args.prompt_embeds, cfg_scale > 1, text_width(model))
    elif args.prompt_embeds is not None:
        embeds = flow_embeddings(family, args.prompt_embeds, cfg_scale > 1 and GUIDANCE[family][1])
    if is_dit:
        classes = parse_classes(args.classes)
        labels = _class_labels(classes, args.num, model.config.num_embeds_ada_norm).tolist()
    else:
        count = len(args.prompt) if args.prompt is not None else embeds["prompt_embeds"].shape[0]
        labels = [i % count for i in range(args.num)]  # prompt index per sample
    apply_cache(pipe, cache_config_from_args(args))
    seen: dict[str, int] = {}

    def observe(module, a, kw):  # image and prompt tokens of the real calls, for the MACs report
        seen["tokens"] = call_tokens(module, a[0] if a else kw["hidden_states"])
        if kw.get("encoder_hidden_states") is not None:
            seen["text_tokens"] = kw["encoder_hidden_states"].shape[1]

    handle = model.register_forward_pre_hook(observe, with_kwargs=True)
    pipe.set_progress_bar_config(leave=False)
    batch_size = args.batch_size or args.num
    use_binning = getattr(model.config, "sample_size", None) in (32, 64, 128)  # PixArt's aspect-ratio bins
    images, t0 = [], time.perf_counter()
    try:
        with tqdm(total=args.num, desc=f"sampling ({type(pipe).__name__}, {steps} steps)") as bar:
            for start in range(0, args.num, batch_size):
                idx = list(range(start, min(args.num, start + batch_size)))
                common = {"num_inference_steps": steps, guidance_arg: cfg_scale, "output_type": "np",
                          "generator": [sample_generator(args.seed, i) for i in idx]}
                rows = [labels[i] for i in idx]
                if family is not None:
                    given = ({"prompt": [args.prompt[r] for r in rows]} if args.prompt is not None
                             else {k: prompt_rows(v, rows) for k, v in embeds.items()})
                    out = pipe(**given, **size, **common)
                elif is_dit:
                    out = pipe(class_labels=[labels[i] for i in idx], **common)
                elif args.prompt is not None:
                    out = pipe(prompt=[args.prompt[labels[i]] for i in idx], eta=args.eta,
                               use_resolution_binning=use_binning, **common)
                else:
                    given = {k: prompt_rows(v, rows) for k, v in embeds.items()}
                    out = pipe(negative_prompt=None, eta=args.eta, use_resolution_binning=use_binning,
                               **given, **common)
                images.append(np.asarray(out.frames if hasattr(out, "frames") else out.images))
                check_finite(pipe, images[-1], cfg_scale, start)
                bar.update(len(idx))
    finally:
        handle.remove()
    wall = time.perf_counter() - t0
    images = (np.concatenate(images).clip(0, 1) * 255).round().astype(np.uint8)
    frames = images.shape[1] if images.ndim == 5 else None  # Wan: (N, F, H, W, 3), written frame by frame
    if frames is not None:
        images = images.reshape(-1, *images.shape[2:])
    engine = get_engine(pipe)
    stats = engine.stats()
    macs = count_macs(pipe, None, stats["calls"], cfg_scale, **seen)
    report = {
        "pipeline": str(args.pipeline), "pipeline_class": type(pipe).__name__, "num": args.num, "steps": steps,
        "model_calls_per_batch": stats["calls"], "scheduler": type(pipe.scheduler).__name__,
        "cfg_scale": cfg_scale, "guidance_argument": guidance_arg, "frames_per_video": frames,
        "height": args.height, "width": args.width, "eta": args.eta, "seed": args.seed, "batch_size": batch_size,
        "classes": labels if is_dit else None, "prompt_index": None if is_dit else labels,
        "prompts": args.prompt, "prompt_embeds": args.prompt_embeds,
        "tokens": seen.get("tokens"), "text_tokens": seen.get("text_tokens"),
        "wall_seconds": round(wall, 3), "threads": torch.get_num_threads(),
        "method": engine.config.method, "cache_config": engine.config.to_dict(),
        "macs": macs, "cached_ratio": macs["cached_ratio"],
        "cache_bytes": sum(e.stats()["cache_bytes"] for e in pass_engines(pipe)),  # every guidance pass
    }
    out_dir = Path(args.out)
    write_sample_outputs(out_dir, images, np.repeat(labels, frames or 1), report)
    print(json.dumps(report, indent=2) if args.json else f"wrote {args.num} samples to {out_dir} in {wall:.1f}s")
    return 0
