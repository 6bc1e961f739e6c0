"""Increment-calibrated caching (Chen et al., CVPR 2025, arXiv 2505.05829, Sec. 3.3).

Every calibrated linear, at a cached call m, outputs `y_m = y_s + A (B (x_m - x_s))` where
(x_s, y_s) are its input and output at the last full call s. Everything else in the block runs
on the current values, so the block runs in order. Branches whose linears all have rank 0 are
served whole from the cache (exactly what the calibration would give, without the work).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from ...adapters import LinearSpec
from ..factors import Factors
from ..svd import SVD_KINDS, check_rank, parse_rank, scaled_svd
from .base import Argument, BranchCache, Method, MethodConfig


class CalibratedLinear:
    """One nn.Linear module with one or more calibrated row blocks (q, k, v share one B pass)."""

    def __init__(self, method: IncrementCalibration, specs: list[LinearSpec],
                 factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layer: int):
        self.method = method
        self.specs = specs
        self.layer = layer
        self.module = specs[0].module
        w = self.module.weight
        ranks = [factors[s.name][0].shape[1] for s in specs]
        self.rank_total = sum(ranks)
        self.b = torch.cat([factors[s.name][1] for s in specs]).to(w)  # (R, C_i): one pass for all blocks
        self.a = [factors[s.name][0].to(w) for s in specs]  # each (C_o_i, r_i)
        rows = [s.out_features for s in specs]
        # Equal blocks (DiT's q, k, v) go through one batched matmul.
        self.a_batched = (torch.stack([a.t() for a in self.a]) if len(specs) > 1 and len(set(ranks)) == 1
                          and len(set(rows)) == 1 else None)  # (k, r, C_o_i)
        self.ranks = ranks
        self.input_from = specs[0].input_from
        self.input_fn = specs[0].input_fn
        self.input_shared = specs[0].input_shared_with  # diffusers' to_k/to_v: to_q stores the input
        # (position, input or None when derived from another linear, output) of the last full calls.
        self.history: list[tuple[float, torch.Tensor | None, torch.Tensor]] = []

    history_len = 1  # ICC refers to the last full call only

    def input_at(self, j: int) -> torch.Tensor:
        """The stored input of history entry j (fc2's is recomputed from fc1's output)."""
        if self.input_from is not None:
            return self.input_fn(self.method.linears_by_name[self.input_from].history[j][2])
        if self.input_shared is not None:
            return self.method.linears_by_name[self.input_shared].input_at(j)
        return self.history[j][1]

    def reference(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The point (x_ref, y_ref) the increment is measured from: the last full call's values."""
        return self.input_at(-1), self.history[-1][2]

    def on_full(self, x: torch.Tensor, y: torch.Tensor) -> None:
        stored_x = None if self.input_from is not None or self.input_shared is not None else self.method.store(x)
        self.history = (self.history + [(self.method.position(), stored_x, self.method.store(y))])[-self.history_len:]

    def calibrate(self, y_ref: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
        """y_ref + A (B dx) for every row block, the addition fused into the last matmul."""
        z = F.linear(dx, self.b).reshape(-1, self.rank_total)  # (M, R): one B pass for all blocks
        y2 = y_ref.reshape(-1, y_ref.shape[-1])  # (M, C_o)
        if len(self.a) == 1:
            return torch.addmm(y2, z, self.a[0].t()).view_as(y_ref)
        if self.a_batched is not None:
            k, r, rows = self.a_batched.shape
            out = torch.baddbmm(y2.view(-1, k, rows).transpose(0, 1), z.view(-1, k, r).transpose(0, 1),
                                self.a_batched)  # (k, M, rows)
            return out.transpose(0, 1).reshape(y_ref.shape)
        parts, start, col = [], 0, 0
        for a, r in zip(self.a, self.ranks):
            rows = a.shape[0]
            parts.append(torch.addmm(y2[:, col : col + rows], z[:, start : start + r], a.t()))
            start, col = start + r, col + rows
        return torch.cat(parts, dim=-1).view_as(y_ref)

    def hook(self, forward: Callable) -> Callable:
        engine = self.method.engine

        def run(x: torch.Tensor) -> torch.Tensor:
            if engine.full[self.layer]:
                y = forward(x)
                self.on_full(x, y)
                return y
            if not self.history:
                raise RuntimeError(f"{self.specs[0].name} has no cached values at call {engine.call}; "
                                   "every layer must be full at call 0")
            x_ref, y_ref = self.reference(x)
            y_ref = y_ref.to(x.dtype)
            if self.rank_total == 0:
                return y_ref
            return self.calibrate(y_ref, x - x_ref.to(x.dtype))

        return run

    def reset(self) -> None:
        self.history = []

    def cache_bytes(self) -> int:
        return sum(t.nbytes for _, x, y in self.history for t in (x, y) if t is not None)

    def macs(self, tokens: int) -> int:
        """B pass over the input plus each block's A, per sample."""
        return tokens * (self.module.in_features * self.rank_total
                         + sum(r * s.out_features for r, s in zip(self.ranks, self.specs)))


def resolve_factors(engine, config: ICCConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Factors at the configured rank: from a file (checked against the model) or plain SVD."""
    specs = [s for b in engine.branches for s in b.linears]
    if config.factors is not None:
        factors = config.factors if isinstance(config.factors, Factors) else Factors.load(config.factors)
        factors.check(specs, engine.model_hash())
        svd = factors.meta.get("svd")
        if svd is not None and config.svd != "plain" and svd != config.svd:
            raise ValueError(f"the factor file holds {svd!r} factors but svd={config.svd!r} was asked for")
        return factors.select(config.rank)
    out = {}
    for s in specs:
        full = min(s.in_features, s.out_features)
        if config.rank == "full":
            r = full
        elif config.rank is None:
            r = min(full, max(1, round(engine.branches[0].linears[0].in_features / 9)))
        else:
            r = min(full, config.rank)
        out[s.name] = scaled_svd(s.weight(), r)
    return out


class IncrementCalibration(Method):
    linear_class = CalibratedLinear
    branch_cache_class = BranchCache  # serves branches whose linears all have rank 0

    def __init__(self, engine, config: ICCConfig):
        super().__init__(engine, config)
        factors = resolve_factors(engine, config)
        self.linears: list[CalibratedLinear] = []
        self.linears_by_name: dict[str, CalibratedLinear] = {}
        whole_branch = []
        for layer, branch in enumerate(engine.branches):
            groups: dict[int, list[LinearSpec]] = {}
            for s in branch.linears:
                groups.setdefault(id(s.module), []).append(s)
            cls = [self.linear_class(self, g, factors, layer) for g in groups.values()]
            if all(c.rank_total == 0 for c in cls):
                whole_branch.append(layer)  # rank 0 everywhere: serve the branch output itself
                continue
            for c in cls:
                engine.patch(c.module, c.hook)
                self.linears.append(c)
                for s in c.specs:
                    self.linears_by_name[s.name] = c
        self.branch_cache = self.branch_cache_class(self, whole_branch)
        self.whole_branch = set(whole_branch)
        self._macs = {layer: sum(c.macs(c.specs[0].tokens) for c in self.linears if c.layer == layer)
                      + engine.branches[layer].attention_macs()
                      for layer in range(len(engine.branches)) if layer not in self.whole_branch}
        self._macs.update({layer: self.branch_cache.macs(engine.branches[layer]) for layer in whole_branch})

    def reset(self) -> None:
        for c in self.linears:
            c.reset()
        self.branch_cache.reset()

    def cache_bytes(self) -> int:
        return sum(c.cache_bytes() for c in self.linears) + self.branch_cache.cache_bytes()

    def cached_macs(self, layer: int, call: int) -> int:
        return self._macs.get(layer, 0)


@dataclass
class ICCConfig(MethodConfig):
    """Increment-calibrated caching.

    - rank: "full", an integer (every linear), or None = the factor file's (per-layer) ranks, or
      round(width / 9) (the paper's 128 / 1152) for plain SVD without a file.
    - svd: where the factors come from: "plain" (computed from the weights when no file is given),
      "ca" / "cd" / "cf" (a factor file made by `calicache calibrate --svd KIND`).
    - factors: the factor file (or a loaded `Factors`).
    """

    method: ClassVar[str] = "icc"
    method_class: ClassVar[type] = IncrementCalibration
    arguments: ClassVar[tuple[Argument, ...]] = MethodConfig.arguments + (
        Argument("--rank", "rank", "ICC rank: an integer, 'full', or omitted = the factor file's per-layer ranks "
                 "(plain SVD without a file: width / 9)", parse_rank),
        Argument("--svd", "svd", "where ICC's factors come from", choices=SVD_KINDS),
        Argument("--factors", "factors", "factor file from `calicache calibrate`"),
    )
    files: ClassVar[tuple[str, ...]] = ("factors",)

    rank: int | str | None = None
    svd: str = "plain"
    factors: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rank(self.rank, allow_none=True)
        if self.svd not in SVD_KINDS:
            raise ValueError(f"unknown svd {self.svd!r}; choose one of {SVD_KINDS}")
        if self.factors is not None and not isinstance(self.factors, (str, os.PathLike, Factors)):
            raise ValueError(f"factors must be a factor file path or a calicache Factors, got {self.factors!r}")
        if self.svd != "plain" and self.factors is None:
            raise ValueError(f"svd={self.svd!r} needs a factor file: run `calicache calibrate --svd {self.svd}` "
                             "and pass factors=PATH (or use svd='plain')")
