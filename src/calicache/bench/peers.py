"""Other libraries' caches on the same model, driven by calicache's sampler with the same seeds.

Every peer runs on `to_diffusers(model)` (diffusers' `DiTTransformer2DModel` computing exactly what
the DiT computes) inside `DiffusersDiT`, which gives it calicache's `forward(x, t, y)`:

- cache-dit DBCache (`pip install cache-dit`), with and without its TaylorSeer calibrator:
  `cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(...), calibrator_config=...)` on
  the bare transformer (cache-dit's registered "DiT" block adapter, transformer-only mode). F1B0: a
  cached call computes block 0 and reuses the residual of the others; `steps_computation_mask` with
  the "static" policy caches exactly the calls FORA caches at the same period.
- diffusers FirstBlockCache (`diffusers.hooks.apply_first_block_cache`): dynamic, it skips the other
  blocks while the first block's residual changes less than a threshold; the threshold is searched
  on a few samples for FORA's share of cached calls.
- diffusers TaylorSeer (`diffusers.hooks.apply_taylorseer_cache`) on every block's attention and MLP
  branch (pre-gate, as calicache caches them): first order, `cache_interval` = the period,
  `disable_cache_before_step=1` (the closest its rule comes to FORA's calls), factors in float32.

MACs per sample are measured with torch's flop counter over a run (FLOPs / 2), the fused CPU attention
kernel counted as its two matmuls; the cached share is measured by counting the branch evaluations the
transformer really computes. A peer that is not installed or cannot attach is reported, never faked.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..images import to_uint8
from ..models.convert import to_diffusers
from ..sampling import sample
from .runs import Result, Variant

KINDS = {
    "none": "diffusers, no cache",
    "dbcache": "cache-dit DBCache F1B0",
    "dbcache-taylorseer": "cache-dit DBCache F1B0 + TaylorSeer",
    "fbc": "diffusers FirstBlockCache",
    "taylorseer": "diffusers TaylorSeer",
}
_BRANCHES = (r"transformer_blocks\.\d+\.attn1", r"transformer_blocks\.\d+\.ff")  # TaylorSeer's cached modules


@dataclass(frozen=True)
class Peer:
    """One peer configuration; `period` is the FORA period whose cached calls it is matched to."""

    kind: str
    period: int = 1
    threshold: float | None = None  # FirstBlockCache only

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown peer {self.kind!r}; choose one of {sorted(KINDS)}")
        if self.kind == "fbc" and self.threshold is None:
            raise ValueError("FirstBlockCache needs a threshold (see fbc_threshold)")

    @property
    def family(self) -> str:
        return KINDS[self.kind]

    @property
    def name(self) -> str:
        if self.kind == "none":
            return self.family
        if self.kind == "fbc":
            return f"{self.family} thr={self.threshold:.3g} (~p={self.period})"
        return f"{self.family} p={self.period}"


def missing(kind: str) -> str | None:
    """Why peer `kind` cannot run here, or None."""
    try:
        import diffusers.hooks  # noqa: F401
    except ImportError:
        return "diffusers is not installed (pip install diffusers)"
    if kind.startswith("dbcache"):
        try:
            _cache_dit()
        except ImportError as e:
            return f"cache-dit is not installed or does not import ({e}); pip install 'calicache[peers]'"
    return None


def _cache_dit():
    # cache-dit logs every attach and refresh to stdout at INFO; keep stdout for our report/--json.
    os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")
    import cache_dit

    return cache_dit


class DiffusersDiT(nn.Module):
    """calicache's `forward(x, t, y)` over a diffusers `DiTTransformer2DModel` (`sample` needs only
    that, `.config` and the parameters).

    Peers keep state per sampling run, so `on_run_start` is called at the first call of every run:
    a call whose timestep is not below the previous call's (a run goes from t = 999 down).
    `context` is entered around every call (diffusers' hooks read their state from a cache context).
    """

    def __init__(self, transformer: nn.Module, config, on_run_start: Callable[[], None] | None = None,
                 context: Callable[[], object] | None = None):
        super().__init__()
        self.transformer = transformer
        self.config = config
        self.on_run_start = on_run_start
        self.context = context
        self.calls = 0
        self._prev_t: float | None = None

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        now = float(t.max())
        if (self._prev_t is None or now >= self._prev_t) and self.on_run_start is not None:
            self.on_run_start()
        self._prev_t = now
        self.calls += 1
        with self.context() if self.context is not None else nullcontext():
            return self.transformer(x, timestep=t, class_labels=y, return_dict=False)[0]


class BranchCounter:
    """Counts the branch evaluations a diffusers DiT really computes: forward pre-hooks on the last
    linear of every block's attention (attn1.to_out.0) and MLP (ff.net.2); a cached or forecast
    branch never reaches them."""

    def __init__(self, transformer: nn.Module):
        blocks = transformer.transformer_blocks
        self.branches = 2 * len(blocks)
        self.computed = 0
        self.last_block = 0  # calls on which the last block's MLP ran
        self._handles = []
        for i, block in enumerate(blocks):
            for j, linear in enumerate((block.attn1.to_out[0], block.ff.net[2])):
                last = i == len(blocks) - 1 and j == 1
                self._handles.append(linear.register_forward_pre_hook(lambda *_, last=last: self._count(last)))

    def _count(self, last: bool) -> None:
        self.computed += 1
        self.last_block += int(last)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    def shares(self, calls: int) -> tuple[float, float]:
        """(cached share of (call, branch) pairs, cached share of calls) over `calls` model calls."""
        return 1 - self.computed / (calls * self.branches), 1 - self.last_block / calls


def attach(model: nn.Module, peer: Peer, steps: int) -> DiffusersDiT:
    """A fresh diffusers copy of `model` with `peer` attached, ready for `calicache.sample`."""
    transformer = to_diffusers(model)
    if peer.kind == "none":
        return DiffusersDiT(transformer, model.config)
    if peer.kind.startswith("dbcache"):
        cache_dit = _cache_dit()
        mask = [int(t % peer.period == 0) for t in range(steps)]  # 1 = compute: FORA's full calls
        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=1, num_inference_steps=steps,
            steps_computation_mask=mask, steps_computation_policy="static",
            enable_separate_cfg=False,  # calicache guides in one doubled batch: one call per step
        )
        taylorseer = peer.kind == "dbcache-taylorseer"
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
        cache_dit.enable_cache(transformer, cache_config=config, calibrator_config=calibrator)
        # cache-dit's transformer-only context notices a new run one call late (its step counter is
        # compared before it advances), so every run starts from a refreshed context.
        return DiffusersDiT(transformer, model.config, on_run_start=lambda: cache_dit.refresh_context(transformer))
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        HookRegistry,
        TaylorSeerCacheConfig,
        apply_first_block_cache,
        apply_taylorseer_cache,
    )
    from diffusers.models.cache_utils import CacheMixin

    if peer.kind == "fbc":
        apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=peer.threshold))
    else:
        apply_taylorseer_cache(transformer, TaylorSeerCacheConfig(
            cache_interval=peer.period, disable_cache_before_step=1, max_order=1,
            taylor_factors_dtype=torch.float32, cache_identifiers=list(_BRANCHES)))
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    # DiTTransformer2DModel is not a CacheMixin, but its cache_context works on any hooked module.
    return DiffusersDiT(transformer, model.config, on_run_start=lambda: registry.reset_stateful_hooks(recurse=True),
                        context=lambda: CacheMixin.cache_context(transformer, "cond"))


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and AV of the fused CPU attention kernel, which torch's flop counter has no formula for."""
    b, h, s_q, d = query_shape
    return 2 * b * h * s_q * key_shape[-2] * (d + value_shape[-1])


@contextmanager
def flop_counter() -> Iterator[FlopCounterMode]:
    """torch's FlopCounterMode that also counts CPU attention (numerics unchanged)."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    mapping = {op: _cpu_sdpa_flops} if op is not None else {}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        yield counter


def counted_sample(model: nn.Module, num: int, steps: int, **kw) -> tuple[torch.Tensor, int]:
    """`sample(...)` under the flop counter: (samples, MACs per sample without the guidance doubling)."""
    with flop_counter() as counter:
        x = sample(model, num, steps, **kw)
    doubling = 2 if kw.get("cfg_scale", 1.0) != 1.0 else 1
    return x, counter.get_total_flops() // 2 // (num * doubling)


def fbc_threshold(model: nn.Module, target: float, steps: int, probe: int, cfg_scale: float, seed: int = 0,
                  iters: int = 7) -> tuple[float, float]:
    """FirstBlockCache's threshold whose share of cached calls on `probe` samples is closest to
    `target` (bisection in log space: a higher threshold caches more); returns (threshold, share)."""
    lo, hi = math.log(1e-3), math.log(4.0)
    best = (float("inf"), 0.0, 0.0)
    for _ in range(iters):
        threshold = math.exp((lo + hi) / 2)
        wrapper = attach(model, Peer("fbc", threshold=threshold), steps)
        counter = BranchCounter(wrapper.transformer)
        sample(wrapper, probe, steps, cfg_scale=cfg_scale, seed=seed)
        _, share = counter.shares(wrapper.calls)
        best = min(best, (abs(share - target), threshold, share))
        if share < target:
            lo = math.log(threshold)
        else:
            hi = math.log(threshold)
    return best[1], best[2]


def run_peer(model: nn.Module, peer: Peer, num: int, steps: int, cfg_scale: float, seed: int = 0,
             batch_size: int | None = None, progress: bool = True) -> Result:
    """Sample with one peer (timed, no counter), then measure its MACs with the flop counter.

    A static peer's MACs are counted on a one-sample run (its cached calls do not depend on the
    data); FirstBlockCache decides from the data, so the whole run is repeated under the counter
    (same numerics) and must reproduce the timed samples.
    """
    kw = dict(cfg_scale=cfg_scale, seed=seed, batch_size=batch_size)
    wrapper = attach(model, peer, steps)
    counter = BranchCounter(wrapper.transformer)
    t0 = time.perf_counter()
    x = sample(wrapper, num, steps, progress=progress, **kw)
    wall = time.perf_counter() - t0
    cached_ratio, cached_calls = counter.shares(wrapper.calls)
    counter.remove()
    if peer.kind == "fbc":
        again, macs = counted_sample(attach(model, peer, steps), num, steps, **kw)
        if not torch.equal(again, x):
            raise RuntimeError("FirstBlockCache made other decisions under the flop counter; its MACs are unknown")
    else:
        _, macs = counted_sample(attach(model, peer, steps), 1, steps, **kw)
    stats = {"total": int(macs), "cached_ratio": cached_ratio, "cached_calls": cached_calls,
             "source": "torch flop counter (diffusers model)"}
    return Result(Variant(peer.name, None, steps, peer.family), to_uint8(x), wall, stats, None)
