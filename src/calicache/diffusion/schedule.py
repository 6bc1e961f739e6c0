"""DiT's noise schedule (linear betas, 1000 steps) and ADM-style respacing."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SPACINGS = ("adm", "leading")


def linear_betas(num_timesteps: int = 1000) -> np.ndarray:
    scale = 1000 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)


def respaced_timesteps(steps: int, spacing: str = "adm", num_timesteps: int = 1000) -> list[int]:
    """The kept timesteps, ascending.

    "adm": `space_timesteps(T, str(steps))`, S evenly spaced steps 0..T-1 rounded (the ICC and GOC
    papers' sampling); "leading": (0, 1, ..., S-1) * (T // S), diffusers' DDIMScheduler with
    timestep_spacing="leading". When S divides T this is also ADM's "ddimS" (DiT's DDIM); for other
    S, ADM picks the stride whose range has exactly S steps (or refuses) and the two differ.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if steps > num_timesteps:
        raise ValueError(f"steps {steps} exceeds the {num_timesteps} diffusion timesteps")
    if spacing == "adm":
        if steps == 1:
            return [0]
        # Accumulated exactly as ADM's space_timesteps does, so rounding ties match.
        stride, cur, kept = (num_timesteps - 1) / (steps - 1), 0.0, []
        for _ in range(steps):
            kept.append(round(cur))
            cur += stride
        return kept
    if spacing == "leading":
        return list(range(0, num_timesteps, num_timesteps // steps))[:steps]
    raise ValueError(f"unknown spacing {spacing!r}; choose one of {SPACINGS}")


@dataclass
class Schedule:
    """A (possibly respaced) diffusion: per kept step its original timestep and alpha-bar.

    Index i runs over the kept steps in ascending time; samplers walk it backwards.
    """

    timesteps: np.ndarray  # (S,) original timestep values fed to the model
    alphas_cumprod: np.ndarray  # (S,) float64
    betas: np.ndarray  # (S,) respaced betas: 1 - abar_i / abar_{i-1}

    @classmethod
    def create(cls, steps: int | None = None, spacing: str = "adm", num_timesteps: int = 1000) -> Schedule:
        base = np.cumprod(1.0 - linear_betas(num_timesteps))
        kept = list(range(num_timesteps)) if steps is None else respaced_timesteps(steps, spacing, num_timesteps)
        abar = base[kept]
        prev = np.append(1.0, abar[:-1])
        return cls(np.asarray(kept, dtype=np.int64), abar, 1.0 - abar / prev)

    def __len__(self) -> int:
        return len(self.timesteps)

    @property
    def alphas_cumprod_prev(self) -> np.ndarray:
        return np.append(1.0, self.alphas_cumprod[:-1])

    @property
    def posterior_variance(self) -> np.ndarray:
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_log_variance_clipped(self) -> np.ndarray:
        pv = self.posterior_variance
        return np.log(np.append(pv[1], pv[1:])) if len(pv) > 1 else np.log(np.maximum(pv, 1e-20))

    def q_sample(self, x0: torch.Tensor, index: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Forward process z_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps at kept-step indices."""
        abar = torch.as_tensor(self.alphas_cumprod, device=x0.device)[index].to(x0.dtype)
        abar = abar.view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise
