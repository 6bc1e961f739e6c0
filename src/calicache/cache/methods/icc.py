"""Increment-calibrated caching (Chen et al., CVPR 2025, arXiv 2505.05829, Sec. 3.3).

Every calibrated linear, at a cached call m, outputs `y_m = y_s + A (B (x_m - x_s))` where
(x_s, y_s) are its input and output at the last full call s, computed as `y_s + A (B x_m - z_s)`
with `z_s = B x_s` stored at the full call. Everything else in the block runs
on the current values, so the block runs in order. Branches whose linears all have rank 0 are
served whole from the cache (exactly what the calibration would give, without the work).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ...adapters import LinearSpec
from ..factors import Factors, shared_factors
from ..svd import SVD_KINDS, check_rank, parse_rank, scaled_svd
from .base import Argument, BranchCache, Method, MethodConfig, traced


class CalibratedLinear:
    """One nn.Linear module with one or more calibrated row blocks (q, k, v share one B pass).

    References live in rank space: a full call stores z = B x (M, R) next to its output y, so a
    cached call is `y_ref + A (B x - z_ref)`: one B pass, a subtraction over R columns and one
    addmm into y_ref. No input is stored (nor fc2's GELU recomputed) and nothing full-width is
    subtracted; the price is the B pass at full calls, which `full_macs` counts.
    """

    def __init__(self, method: IncrementCalibration, specs: list[LinearSpec],
                 factors: dict[str, tuple[torch.Tensor, torch.Tensor]], layer: int):
        self.method = method
        self.specs = specs
        self.layer = layer
        self.module = specs[0].module
        w = self.module.weight
        self.ranks = [factors[s.name][0].shape[1] for s in specs]
        self.rank_total = sum(self.ranks)
        self.b = torch.cat([factors[s.name][1] for s in specs]).to(w)  # (R, C_i): one pass for all blocks
        # A^T per block as a view of the (C_o_i, r_i) factor: BLAS reads the transpose without a copy.
        self.a_t = [factors[s.name][0].to(w).t() for s in specs]  # each (r_i, C_o_i)
        rows = [s.out_features for s in specs]
        cols = [0, *torch.tensor(rows).cumsum(0).tolist()]
        ranks = [0, *torch.tensor(self.ranks).cumsum(0).tolist()]
        # (output columns, rank columns, A^T) per block with a non-zero rank.
        self.blocks = [(slice(cols[i], cols[i + 1]), slice(ranks[i], ranks[i + 1]), self.a_t[i])
                       for i in range(len(specs)) if self.ranks[i] > 0]
        # (z = B x (M, R), y (M, C_o)) of the last full call. A full call only writes it (never reads
        # what was there), so a compiled full call is one graph from call 0 on.
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """B x as an (M, R) matrix: every block's rank-space coordinates in one matmul, computed as
        (B x^T)^T. A GEMM whose wide side is the M rows runs faster on CPU BLAS than one with R (often
        < 64) output columns (docs/speed.md); the result is a transposed view, which the subtraction and
        the A matmul read without a copy."""
        return torch.mm(self.b, x.reshape(-1, x.shape[-1]).t()).t()

    def on_full(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.last = self.reference(x, y)

    def reference(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What a full call keeps: z = B x (M, R) and y (M, C_o), in the cache dtype."""
        z = self.project(x) if self.rank_total else x.new_empty(0)
        return self.method.store(z), self.method.store(y.reshape(-1, y.shape[-1]))

    def correct(self, base: torch.Tensor, dz: torch.Tensor, fresh: bool) -> torch.Tensor:
        """base + A dz for every row block; base (M, C_o), dz (M, R). `fresh`: base may be written to."""
        if len(self.blocks) == 1 and self.blocks[0][0].stop - self.blocks[0][0].start == base.shape[1]:
            _, ranks, a_t = self.blocks[0]
            return base.addmm_(dz, a_t) if fresh else torch.addmm(base, dz, a_t)
        out = base if fresh else base.clone()
        for cols, ranks, a_t in self.blocks:
            out[:, cols].addmm_(dz[:, ranks], a_t)  # in place into a column view: BLAS's leading dimension
        return out

    def consumes(self) -> bool:
        """Whether this call is the references' last use (the layer's next call is full, or the run
        ends), so the output may be written into y_ref: two passes over it instead of four. Never in
        a compiled graph: the compiler fuses the passes itself, and the flag would be one more guard."""
        return not traced() and self.method.engine.last_use[self.layer] and not torch.is_grad_enabled()

    def cached(self, x: torch.Tensor) -> torch.Tensor:
        """y_ref + A (B x - z_ref), (M, C_o)."""
        z_ref, y_ref = self.last
        y_ref = y_ref.to(x.dtype)
        if not self.blocks:
            return y_ref
        return self.correct(y_ref, self.project(x).sub_(z_ref.to(x.dtype)), fresh=self.consumes())

    def hook(self, forward: Callable) -> Callable:
        engine = self.method.engine

        def run(x: torch.Tensor) -> torch.Tensor:
            if engine.full[self.layer]:
                y = forward(x)
                self.on_full(x, y)
                return y
            if self.last is None:
                raise RuntimeError(f"{self.specs[0].name} has no cached values at call {engine.call}; "
                                   "every layer must be full at call 0")
            return self.cached(x).view(*x.shape[:-1], -1)

        return run

    def reset(self) -> None:
        self.last = None

    def cache_bytes(self) -> int:
        return sum(t.nbytes for t in self.last or ())

    def macs(self, tokens: int) -> int:
        """B pass over the input plus each block's A, per sample, at a cached call."""
        return self.full_macs(tokens) + tokens * sum(r * s.out_features for r, s in zip(self.ranks, self.specs))

    def full_macs(self, tokens: int) -> int:
        """What a full call adds to the layer's own MACs: the B pass that stores z_ref, per sample."""
        return tokens * self.module.in_features * self.rank_total


def resolve_factors(engine, config: ICCConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Factors at the configured rank: from a file (checked against the model) or plain SVD; those of
    the cache this engine shares its weights with when that one has this config."""
    shared = shared_factors(engine, config)
    if shared is not None:
        return shared
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
        self._full_macs = {layer: sum(c.full_macs(c.specs[0].tokens) for c in self.linears
                                      if c.layer == layer) for layer in range(len(engine.branches))}

    def reset(self) -> None:
        for c in self.linears:
            c.reset()
        self.branch_cache.reset()

    def cache_bytes(self) -> int:
        return sum(c.cache_bytes() for c in self.linears) + self.branch_cache.cache_bytes()

    def cached_macs(self, layer: int, call: int) -> int:
        return self._macs.get(layer, 0)

    def full_macs(self, layer: int, call: int) -> int:
        return self._full_macs[layer]

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
        Argument("--factors", "factors", "factor file from `calicache calibrate`, or a shipped one by name "
                 "(fmnist-dit-cd)"),
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
