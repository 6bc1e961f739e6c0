"""Channel statistics for CA-SVD and CD-SVD (ICC paper Sec. 3.4, Alg. 1-2), gathered by forward hooks.

For every calibrated nn.Linear module, per sample and channel: the mean over tokens of |input| and
|output| (CA, "activation"), or of |input_t1 - input_t2| and |output_t1 - output_t2| between two
consecutive sampler steps (CD, "difference"), or of |x_s - x_hat| and |y_s - y_hat| with x_hat, y_hat
the first-order forecasts from two earlier calls (CF, "forecast residual", calicache's statistic for
`method="forecast"`: what the low-rank term corrects there). As the authors' code does, each sample's vector is
min-max normalised across channels, `(m - min + 1e-6) / (max - min + 1e-6)`, so every denoising
step weighs the same; the set average is raised to alpha = 0.5 and clamped from below at max/1000.

Only running sums (one float64 vector per module and side) outlive a batch. CD (CF) keeps the one (two)
reference steps' inputs/outputs of one batch until the measuring call, as much memory as ICC's own cache
for that batch; fc2's reference input is recomputed as GELU(fc1's reference output), as ICC does.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .. import distributed
from ..adapters import LinearSpec
from ..cache.methods.forecast import first_order
from ..cache.svd import SVD_KINDS

NORM_EPS = 1e-6
ALPHA = 0.5
MAX_RATIO = 1000.0
SIDES = ("in", "out")
KINDS = tuple(k for k in SVD_KINDS if k != "plain")  # the statistics each scaled SVD weighs by
REFERENCES = {"ca": 0, "cd": 1, "cf": 2}  # reference passes before each measuring pass


def channel_magnitude(t: torch.Tensor) -> torch.Tensor:
    """(B, ..., C) -> (B, C): mean |t| over every token position, in float32."""
    t = t.detach().float().abs()
    return t.flatten(1, -2).mean(dim=1) if t.dim() > 2 else t


def minmax_normalise(m: torch.Tensor) -> torch.Tensor:
    """Per row, across channels: (m - min + 1e-6) / (max - min + 1e-6), in (0, 1]."""
    lo = m.min(dim=-1, keepdim=True).values
    hi = m.max(dim=-1, keepdim=True).values
    return (m - lo + NORM_EPS) / (hi - lo + NORM_EPS)


def finalise(mean: torch.Tensor, alpha: float = ALPHA, max_ratio: float = MAX_RATIO) -> torch.Tensor:
    """The scale vector from a set-averaged statistic: mean ** alpha, clamped below at max / max_ratio."""
    s = mean.double().clamp_min(0) ** alpha
    return s.clamp_min(float(s.max()) / max_ratio).float()


@dataclass
class _Tracked:
    name: str  # qualified module name, e.g. blocks.0.attn.qkv
    module: nn.Linear
    input_from: str | None = None  # module whose reference output gives this one's reference input
    input_fn: object = None
    x_refs: list[torch.Tensor] = field(default_factory=list)
    y_refs: list[torch.Tensor] = field(default_factory=list)
    pending: tuple[torch.Tensor | None, torch.Tensor | None] | None = None  # a rolling measure's values
    sums: dict[str, torch.Tensor] = field(default_factory=dict)


class ChannelStatistics:
    """Hooks on the calibrated linear modules of `specs`; `collect` installs them for one block of work.

    kind "ca": every hooked call records |x| and |y|. kind "cd": calls alternate between a
    reference pass (`reference()`, stores x_t2 and y_t2) and a measuring pass (records
    |x_t1 - x_t2| and |y_t1 - y_t2|, then forgets the references). kind "cf": two reference passes
    (f0, then f1) before each measuring pass s, which records the residual of the first-order
    forecast `v_f1 + forecast_k (v_f1 - v_f0)`. Calls in the `idle()` phase are not looked at.
    """

    def __init__(self, model: nn.Module, specs: list[LinearSpec], kind: str, sides: tuple[str, ...] = SIDES,
                 forecast_k: float = 1.0, exact_output: bool = False):
        if kind not in KINDS:
            raise ValueError(f"unknown statistics kind {kind!r}; choose one of {KINDS}")
        if not sides or set(sides) - set(SIDES):
            raise ValueError(f"sides must be a non-empty subset of {SIDES}, got {sides}")
        self.kind = kind
        # Measure the output the layer's own weights give for this call's input, not the output the
        # hooked call returned (under a cache that is the calibrated approximation).
        self.exact_output = exact_output
        self.forecast_k = float(forecast_k)
        self.sides = tuple(sides)
        self.phase = "measure"
        self.rolling = False
        self.count = 0
        names = {id(m): n for n, m in model.named_modules()}
        spec_module = {s.name: names[id(s.module)] for s in specs}
        self.tracked: dict[str, _Tracked] = {}
        for s in specs:
            name = spec_module[s.name]
            if name in self.tracked:
                continue
            src = spec_module[s.input_from] if s.input_from is not None and s.rows is None else None
            self.tracked[name] = _Tracked(name, s.module, src, s.input_fn if src else None)
        self.spec_module = spec_module
        # Modules whose reference output another module's reference input is computed from.
        self._feeds = {t.input_from for t in self.tracked.values() if t.input_from is not None}
        self._pending = 0  # samples seen in the current measuring pass

    # -- hooks -------------------------------------------------------------------------------
    @contextmanager
    def collect(self) -> Iterator[ChannelStatistics]:
        """Install the forward hooks; they are removed on exit, also after an error."""
        handles = [t.module.register_forward_hook(self._hook(t)) for t in self.tracked.values()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self.clear_references()

    def _hook(self, t: _Tracked):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if self.phase == "idle":
                return
            if self.phase == "reference":
                xk, yk = self._keep(t, x, output)
                if xk is not None:
                    t.x_refs.append(xk)
                if yk is not None:
                    t.y_refs.append(yk)
                return
            if self.kind == "ca":
                self._record(t, "in", x)
                self._record(t, "out", output)
                return
            if "in" in self.sides:
                x_refs = self.tracked[t.input_from].y_refs if t.input_from else t.x_refs
                if t.input_from:
                    x_refs = [t.input_fn(r) for r in x_refs]
                self._record(t, "in", x - self._predict(t, x_refs, "input"))
            if "out" in self.sides:
                if self.exact_output:
                    output = torch.nn.functional.linear(x, module.weight, module.bias)
                self._record(t, "out", output - self._predict(t, t.y_refs, "output"))
            if self.rolling:
                t.pending = self._keep(t, x, output)

        return hook

    def _keep(self, t: _Tracked, x: torch.Tensor, output: torch.Tensor
              ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Copies of this call's input/output as later references (None where none is needed): a model
        that works in place must not change the references under us."""
        xk = x.detach().clone() if "in" in self.sides and t.input_from is None else None
        yk = output.detach().clone() if "out" in self.sides or t.name in self._feeds else None
        return xk, yk

    def _predict(self, t: _Tracked, refs: list[torch.Tensor], what: str) -> torch.Tensor:
        """What the cache serves at the measured call: the last reference (CD) or the forecast (CF)."""
        if len(refs) != REFERENCES[self.kind]:
            raise RuntimeError(f"{t.name}: {len(refs)} reference {what}s, {self.kind.upper()} needs "
                               f"{REFERENCES[self.kind]}; run that many reference passes before measuring")
        return refs[0] if self.kind == "cd" else first_order(refs[1], refs[0], self.forecast_k)

    def _record(self, t: _Tracked, side: str, value: torch.Tensor) -> None:
        if side not in self.sides:
            return
        m = minmax_normalise(channel_magnitude(value))  # (B, C)
        if not torch.isfinite(m).all():
            raise ValueError(f"{t.name}: non-finite activations during calibration; check the model and the data")
        s = m.double().sum(dim=0).cpu()
        t.sums[side] = s if side not in t.sums else t.sums[side] + s
        self._pending = m.shape[0]

    # -- passes ------------------------------------------------------------------------------
    def reference(self) -> None:
        self.phase = "reference"

    def idle(self) -> None:
        self.phase = "idle"

    def measure(self, rolling: bool = False) -> None:
        """Measure the next call; `rolling`: it then also becomes the latest reference (for statistics
        over every consecutive pair of a run), taken over at `end_measure`, after all its hooks ran."""
        self.phase = "measure"
        self.rolling = rolling
        self._pending = 0

    def end_measure(self, keep_references: bool = False) -> None:
        """Close one measuring pass: count its samples and forget the references (rolling: drop the
        oldest and keep the measured call's values instead; `keep_references`: keep them for the next
        measuring pass, as a cache serves several calls from one full call)."""
        if self._pending == 0:
            raise RuntimeError("no calibrated linear was called in the measuring pass")
        self.count += self._pending
        self._pending = 0
        if keep_references:
            return
        if not self.rolling:
            self.clear_references()
            return
        for t in self.tracked.values():
            if t.pending is None:  # not called in this pass: its references stay
                continue
            xk, yk = t.pending
            t.x_refs = t.x_refs[1:] + [xk] if xk is not None else t.x_refs
            t.y_refs = t.y_refs[1:] + [yk] if yk is not None else t.y_refs
            t.pending = None

    def clear_references(self) -> None:
        for t in self.tracked.values():
            t.x_refs, t.y_refs, t.pending = [], [], None

    def all_reduce_(self) -> None:
        """Sum the running sums and the sample count over the ranks of a torch.distributed job, so that
        every rank holds the statistics of the whole calibration set (a no-op in one process)."""
        if distributed.world_size() == 1:
            return
        tensors = {"count": torch.tensor(self.count, dtype=torch.int64)}
        for t in self.tracked.values():
            for side in self.sides:  # a rank without batches has no sums yet: it adds zeros
                size = t.module.in_features if side == "in" else t.module.out_features
                t.sums.setdefault(side, torch.zeros(size, dtype=torch.float64))
                tensors[f"{t.name}/{side}"] = t.sums[side]
        distributed.all_reduce_sum_(tensors)
        self.count = int(tensors["count"])

    # -- results -----------------------------------------------------------------------------
    def means(self) -> dict[tuple[str, str], torch.Tensor]:
        """(module name, side) -> the set average of the normalised statistic (float64)."""
        if self.count == 0:
            raise ValueError("no statistics were gathered; the calibration set is empty")
        return {(t.name, side): t.sums[side] / self.count for t in self.tracked.values() for side in self.sides}

    def scales(self, specs: list[LinearSpec], alpha: float = ALPHA,
               max_ratio: float = MAX_RATIO) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """spec name -> (s_in, s_out); a side not gathered is None (unit scale).

        A module's statistic is finalised as a whole and then sliced, so q, k and v share the
        input scale and take their third of the qkv output scale (the authors' qkv statistic).
        """
        means = self.means()
        final = {key: finalise(v, alpha, max_ratio) for key, v in means.items()}
        out = {}
        for s in specs:
            mod = self.spec_module[s.name]
            s_in = final.get((mod, "in"))
            s_out = final.get((mod, "out"))
            if s_out is not None and s.rows is not None:
                s_out = s_out[s.rows]
            out[s.name] = (s_in, s_out)
        return out
