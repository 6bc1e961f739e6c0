"""Classifier-free guidance in one doubled batch, as DiT's `forward_with_cfg`."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def guided_model_fn(
    model: nn.Module,
    y: torch.Tensor,
    null_class: int,
    cfg_scale: float = 1.0,
    cfg_channels: int | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A `model_fn(x, t)` for the samplers.

    With `cfg_scale == 1` the model runs once on (x, y). Otherwise the batch is doubled with the
    null class, and eps = uncond + s (cond - uncond) on the first `cfg_channels` channels (all eps
    channels by default; DiT's published ImageNet numbers guide only the first 3 of 4 latent
    channels). The variance channels are taken from the conditional half.
    """
    if cfg_scale == 1.0:
        return lambda x, t: model(x, t, y)
    y_both = torch.cat([y, torch.full_like(y, null_class)])

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        k = x.shape[1] if cfg_channels is None else cfg_channels
        if not 1 <= k <= x.shape[1]:  # more than C would silently guide the variance channels too
            raise ValueError(f"cfg_channels must be between 1 and the {x.shape[1]} eps channels, got {k}")
        out = model(torch.cat([x, x]), torch.cat([t, t]), y_both)  # (2N, C_out, H, W)
        cond, uncond = out.chunk(2)
        guided = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        return torch.cat([guided, cond[:, k:]], dim=1)

    return fn
