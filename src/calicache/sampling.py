"""`calicache.sample`: batched, seeded class-conditional sampling over any sampler."""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .cache.state import cache_run, get_engine
from .diffusion.guidance import guided_model_fn
from .diffusion.samplers import SAMPLERS
from .diffusion.schedule import Schedule


def sample_generator(seed: int, index: int, *stream: int) -> torch.Generator:
    """The generator of one sample: its draws depend only on (seed, index) and the `stream` tag
    (calibration passes its own, so its draws never repeat sampling's noise)."""
    state = np.random.SeedSequence([int(seed), int(index), *map(int, stream)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def _class_labels(classes: Sequence[int] | int | None, num: int, num_classes: int) -> torch.Tensor:
    if classes is None:
        labels = [i % num_classes for i in range(num)]
    elif isinstance(classes, (int, np.integer)):
        labels = [int(classes)] * num
    else:
        try:
            labels = [operator.index(c) for c in classes]  # 1.7 is not a class; int() would make it 1
        except TypeError:
            raise ValueError(f"class labels must be integers, got {list(classes)[:5]}") from None
        if len(labels) == 0:
            raise ValueError("classes is empty; give one class, one per sample, or None")
        labels = [labels[i % len(labels)] for i in range(num)]
    bad = [c for c in labels if not 0 <= c < num_classes]
    if bad:
        raise ValueError(f"class labels {sorted(set(bad))[:5]} are outside 0..{num_classes - 1}")
    return torch.tensor(labels, dtype=torch.long)


FALLBACK_STEPS = 50


def default_steps(model: nn.Module, steps: int | None = None) -> int:
    """`steps` if given, else the steps the model recommends (stored with shipped and saved models),
    else 50: the one default of sampling and of the calibrations that must match it."""
    if steps is not None:
        return steps
    return int(dict(getattr(model, "calicache_defaults", {}) or {}).get("steps", FALLBACK_STEPS))


def _finite_number(x: object) -> bool:
    return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(x, bool) and math.isfinite(x)


class NonFiniteSamplesError(ValueError):
    """Sampling produced NaN or infinite values; the message names the likely source."""


def _tensors(obj: object, name: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors held by `obj` (attributes, dicts, lists, tuples), a few levels deep."""
    if isinstance(obj, torch.Tensor):
        yield name, obj
    elif depth < 4 and isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{name}[{k!r}]", depth + 1)
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{name}[{i}]", depth + 1)
    elif depth < 4 and hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)):
        for k, v in vars(obj).items():
            yield from _tensors(v, f"{name}.{k}", depth + 1)


def nonfinite_sources(model: nn.Module, cfg_scale: float = 1.0, noise: torch.Tensor | None = None) -> list[str]:
    """Why sampling `model` may give NaN or inf: non-finite weights, cache settings or factors,
    a guidance scale or noise far outside their usual range (most likely first)."""
    found = []
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        found.append(f"the model's weights contain NaN or inf ({', '.join(bad[:3])}): the checkpoint is damaged; "
                     "re-create or re-download it")
    engine = get_engine(model)
    if engine is not None:
        config = getattr(engine, "config", None)
        fields = vars(config) if config is not None and hasattr(config, "__dict__") else {}
        bad = [f"{k}={v}" for k, v in fields.items() if isinstance(v, float) and not math.isfinite(v)]
        if bad:
            found.append(f"the cache settings are not finite ({', '.join(bad)})")
        bad = [n for obj_name in ("method", "config") for n, t in _tensors(getattr(engine, obj_name, None), obj_name)
               if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            found.append(f"the cache's factors or statistics contain NaN or inf ({', '.join(bad[:3])}): re-create "
                         "the factor file with `calicache calibrate`")
    if not math.isfinite(cfg_scale) or cfg_scale > 100:
        found.append(f"the guidance scale cfg_scale={cfg_scale} (usual: 1-10) amplifies the model's output")
    if noise is not None and noise.numel():
        peak = noise.abs().max().item()
        if not math.isfinite(peak) or peak > 100:
            found.append(f"the noise reaches |x| = {peak:.3g}; x_T should be standard normal (|x| below ~6)")
    return found


def _nonfinite_error(model: nn.Module, cfg_scale: float, noise: torch.Tensor | None,
                     first: int) -> NonFiniteSamplesError:
    sources = nonfinite_sources(model, cfg_scale, noise)
    engine = get_engine(model)
    method = getattr(getattr(engine, "config", None), "method", None)
    if not sources:
        sources = ["the cache method's weights or factors (--forecast-weight, --goc-weight, --factors)" if
                   method not in (None, "none") else "the model itself (its outputs overflow)",
                   "the guidance scale (--cfg-scale)", "the noise"]
        hint = " Sample again with --method none to see whether caching causes it." if method not in (None, "none") \
            else ""
    else:
        hint = ""
    return NonFiniteSamplesError(f"sampling produced NaN or infinite values (batch starting at sample {first}); "
                                 f"likely source: {'; '.join(sources)}.{hint}")


def model_calls(steps: int, sampler: str = "ddim") -> int:
    """Model calls of one sampling run (every calicache sampler calls the model once per step)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    return steps


def _watch_finite(fn: Callable) -> tuple[Callable, list[torch.Tensor]]:
    """`fn` that also records, per step and on the device, whether its output is finite (no sync)."""
    flags: list[torch.Tensor] = []

    def watched(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out = fn(x, t)
        flags.append(torch.isfinite(out).all())
        return out

    return watched, flags


def _check_finite(flags: list[torch.Tensor]) -> None:
    """One device read per run (the images are read back right after it anyway)."""
    ok = torch.stack(flags)
    if not bool(ok.all()):
        first = int((~ok).nonzero()[0])
        raise ValueError(f"the model returned NaN or infinite values at step {first} of this run; check the "
                         "model's weights, the noise and the guidance scale")


@torch.inference_mode()
def sample(
    model: nn.Module,
    num: int,
    steps: int,
    sampler: str = "ddim",
    cfg_scale: float = 1.0,
    classes: Sequence[int] | int | None = None,
    seed: int = 0,
    batch_size: int | None = None,
    spacing: str = "adm",
    noise: torch.Tensor | None = None,
    eta: float = 0.0,
    cfg_channels: int | None = None,
    progress: bool = False,
    clip_denoised: bool | None = None,
    start: int = 0,
) -> torch.Tensor:
    """Sample `num` images (N, C, H, W) in model space: the global indices start..start+num-1.

    Sample i has class `classes[i]` (default i % num_classes) and noise drawn from its own
    generator seeded by (seed, i), so it depends only on (seed, i) and not on the batching.
    `noise` gives x_T for all N instead. Each batch is one cache run of `steps` model calls.
    `start` lets several processes sample disjoint index ranges of one job (calicache.shards).

    The model's outputs are checked for NaN/inf on the device at every step and read once per
    batch (no model call waits on the device); a non-finite output raises with its step.

    `clip_denoised=None` follows the model's recommended settings (stored with saved models; the
    shipped model and models without a setting do not clip x0); True clamps x0 to [-1, 1] as ADM does.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {sorted(SAMPLERS)}")
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1 (or None for one batch), got {batch_size}")
    if start < 0:
        raise ValueError(f"start must be >= 0 (the first global sample index), got {start}")
    if not _finite_number(cfg_scale) or cfg_scale < 1.0:
        raise ValueError(f"cfg_scale must be >= 1 and finite (1 = no guidance), got {cfg_scale}")
    if not _finite_number(eta) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1] (0 = deterministic DDIM, 1 = DDPM-like), got {eta}")
    cfg = model.config
    if cfg_scale != 1.0 and cfg.class_dropout_prob <= 0:
        # Without label dropout the embedding table has no null-class row to guide against.
        raise ValueError("this model was trained without label dropout, so it has no null class for "
                         "classifier-free guidance; sample with cfg_scale=1")
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    if noise is not None and tuple(noise.shape) != (num, *shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}; expected {(num, *shape)}")
    if noise is not None and not torch.isfinite(noise).all():
        raise ValueError("noise contains NaN or infinite values")
    schedule = Schedule.create(steps, spacing)
    clip = bool(getattr(model, "calicache_defaults", {}).get("clip_denoised", False)
                if clip_denoised is None else clip_denoised)
    labels = _class_labels(classes, start + num, cfg.num_classes)[start:]  # classes follow the global index
    batch_size = batch_size or num
    device = next(model.parameters()).device
    sampler_fn = SAMPLERS[sampler]
    was_training = model.training
    model.eval()
    out = []
    bar = tqdm(total=num, desc=f"sampling ({sampler}, {steps} steps)", disable=not progress)
    try:
        for first in range(0, num, batch_size):
            idx = range(first, min(num, first + batch_size))
            gens = [sample_generator(seed, start + i) for i in idx]
            if noise is None:
                x = torch.stack([torch.randn(shape, generator=g) for g in gens])
            else:
                x = noise[first : first + len(idx)].float().clone()
            x = x.to(device)

            def noise_fn(like: torch.Tensor, gens=gens) -> torch.Tensor:
                return torch.stack([torch.randn(like.shape[1:], generator=g) for g in gens]).to(like)

            y = labels[first : first + len(idx)].to(device)
            fn, finite = _watch_finite(guided_model_fn(model, y, cfg.num_classes, cfg_scale, cfg_channels))
            extra = {"eta": eta} if sampler == "ddim" else {}
            extra["clip_denoised"] = clip
            x_T = x
            # Calls go from the noisiest kept timestep down: host-side numbers, so no model call reads one.
            timesteps = [float(t) for t in schedule.timesteps[::-1]]
            try:
                with cache_run(model, model_calls(steps, sampler), timesteps):
                    x = sampler_fn(fn, x, schedule, noise_fn=noise_fn, **extra)
                _check_finite(finite)
            except (ValueError, RuntimeError) as e:  # the per-run finiteness check or one in the engine/sampler
                if not any(word in str(e) for word in ("NaN", "infinite", "non-finite")):
                    raise
                raise _nonfinite_error(model, cfg_scale, x_T, start + first) from e
            if not torch.isfinite(x).all():  # once per batch, after sampling
                raise _nonfinite_error(model, cfg_scale, x_T, start + first)
            out.append(x.cpu())
            bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return torch.cat(out)
