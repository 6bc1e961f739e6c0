"""The budgeted search: the cache configuration with the best PSNR against uncached sampling on
tuning seeds, among those whose MACs per sample are at most `budget` x the uncached run's.

Cost is kept down four ways:
- one uncached reference per seed set, one factor set (at the highest rank searched; lower ranks
  are exact truncations) and one GOC cosine profile, reused by every candidate;
- only MACs-feasible candidates are sampled, each schedule shape at the smallest period the
  budget allows (a cheaper period of the same shape leaves budget unspent), and as listed full
  calls (`CacheSchedule.spread`: as many as the budget allows, evenly or packed into the early calls);
- successive halving on seeds: every coarse candidate on a quarter of the seeds, the best third on
  half, the best third of those on all;
- coarse-to-fine: a local search from the best coarse candidates over single steps of period,
  warm-up, cool-down, Fn/Bn, rank, weight and forecast order, or of one listed full call (a step
  that breaks the budget is retried one period longer; steps scored on half the seeds, the best
  one on all), then TCC factors at the chosen period (a calls list: its mean spacing) where the
  method uses factors.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from tqdm.auto import tqdm

from ..cache.factors import Factors
from ..cache.methods.goc import inflection_points
from ..cache.schedule import CacheSchedule
from .score import Reference
from .space import FACTOR_METHODS, Candidate, Costs, Space, cache_config


@dataclass
class Evaluation:
    """A candidate's MACs and its PSNR (dB) and sampling seconds per seed count it was scored on."""

    candidate: Candidate
    macs: int
    goc_steps: list[int] | None = None
    psnr: dict[int, float] = field(default_factory=dict)
    seconds: dict[int, float] = field(default_factory=dict)

    @property
    def seeds(self) -> int:
        return max(self.psnr, default=0)

    @property
    def score(self) -> float:
        return self.psnr[self.seeds] if self.psnr else float("-inf")

    def row(self, uncached: int) -> dict:
        return {"label": self.candidate.label(), **self.candidate.to_dict(), "macs": self.macs,
                "macs_ratio": round(self.macs / uncached, 4), "seeds": self.seeds, "psnr": self.score,
                "seconds_per_sample": (round(self.seconds[self.seeds] / self.seeds, 4) if self.seeds else None),
                **({"goc_steps": self.goc_steps} if self.goc_steps is not None else {})}


def goc_steps_for(c: Candidate, costs: Costs, cosines: list[float | None] | None) -> list[int] | None:
    """GOC's compensated calls under the candidate's schedule: cached calls s >= 2 with no
    inflection point (from uncached runs' cosines) at s or s - 1."""
    if c.method != "goc":
        return None
    turns = set(inflection_points(cosines)) if cosines is not None else set()
    g = costs.gather(c)
    return [s for s in range(2, costs.steps) if not g[s].all() and s not in turns and s - 1 not in turns]


class Tuner:
    """Search state shared by every budget: the reference, the factors, the MACs table, the scores."""

    def __init__(self, runner, reference: Reference, factors: dict[str, Factors], space: Space,
                 goc_cosines: list[float | None] | None = None, text_tokens: int | None = None,
                 progress: bool = True, make_tcc: Callable[[int], Factors] | None = None):
        self.runner, self.reference, self.factors = runner, reference, factors
        self.costs = Costs(runner.model, runner.steps, factors, text_tokens)
        max_rank = min(min(a.shape[1] for a, _ in f.tensors.values()) for f in factors.values()) if factors else 0
        width = self.costs.branches[0].linears[0].in_features
        self.space = space.restrict(max_rank, self.costs.num_blocks, runner.steps, width)
        self.goc_cosines = goc_cosines
        self.make_tcc = make_tcc
        self.progress = progress
        self.results: dict[Candidate, Evaluation] = {}
        self.evaluations = 0

    # -- candidates ------------------------------------------------------------------------------
    def macs(self, c: Candidate) -> int | None:
        """MACs per sample, or None where the schedule cannot drive this model and run."""
        try:
            return self.costs.macs(c, goc_steps_for(c, self.costs, self.goc_cosines))
        except ValueError:
            return None

    def feasible(self, c: Candidate, limit: float) -> bool:
        m = self.macs(c)
        return m is not None and m <= limit

    def tightest(self, c: Candidate, limit: float) -> Candidate | None:
        """The candidate's shape at the smallest feasible period (None: no period fits)."""
        periods = self.space.goc_periods if c.method == "goc" else self.space.periods
        for p in sorted(periods):
            t = replace(c, period=p)
            if self.feasible(t, limit):
                return t
        return None

    def densest(self, c: Candidate, power: float, limit: float) -> Candidate | None:
        """The candidate's method and blocks on `CacheSchedule.spread(n, steps, power)` with the most
        full calls n that fit (None: not even two); calls a FORA period makes are that period."""
        steps = self.runner.steps
        for n in range(steps - 1, 1, -1):
            calls = CacheSchedule.spread(n, steps, power).calls
            t = replace(c, period=0, warmup=0, cooldown=0, calls=calls)
            if calls == tuple(range(0, steps, calls[1])):
                t = replace(t, period=calls[1], calls=())  # one key per schedule: not scored twice
            if self.feasible(t, limit):
                return t
        return None

    # -- scoring ---------------------------------------------------------------------------------
    def evaluate(self, c: Candidate, seeds: int, bar=None) -> Evaluation:
        e = self.results.get(c)
        if e is None:
            e = self.results[c] = Evaluation(c, self.macs(c), goc_steps_for(c, self.costs, self.goc_cosines))
        if seeds not in e.psnr:
            t0 = time.perf_counter()
            e.psnr[seeds] = self.reference.score(cache_config(c, self.factors, e.goc_steps), seeds)
            e.seconds[seeds] = time.perf_counter() - t0
            self.evaluations += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix_str(f"best {max(r.score for r in self.results.values()):.2f} dB")
        return e

    def _ok(self, e: Evaluation, seconds: float | None) -> bool:
        return seconds is None or e.seconds[e.seeds] / e.seeds <= seconds

    # -- the search ------------------------------------------------------------------------------
    def search(self, budget: float, num: int, keep: float = 1 / 3, starts: int = 2, local: int = 24,
               budget_seconds: float | None = None) -> tuple[Evaluation, list[Evaluation]]:
        """The best candidate within `budget` x uncached MACs (and `budget_seconds` per sample if
        given), scored on `num` tuning seeds; also every candidate scored on all `num` seeds."""
        if not 0 < budget <= 1:
            raise ValueError(f"budget is a share of the uncached run's MACs, 0 < budget <= 1; got {budget}")
        limit = budget * self.costs.uncached
        shapes = self.space.coarse("cd")
        coarse = {t for c in shapes if (t := self.tightest(c, limit)) is not None}
        if self.space.spreads and self.runner.steps > 2:
            coarse |= {t for c in shapes if c.method != "goc" and not (c.warmup or c.cooldown)
                       for p in self.space.spreads if (t := self.densest(c, p, limit)) is not None}
        if not coarse:
            raise ValueError(f"no configuration fits in {budget} of the uncached MACs at {self.runner.steps} steps; "
                             "raise the budget or the step count")
        rungs = sorted({max(1, num // 4), max(1, num // 2), num})
        pool = sorted(coarse)
        total = sum(min(len(pool), max(starts, round(len(pool) * keep ** i))) for i in range(len(rungs))) + local + 1
        bar = tqdm(total=total, desc=f"tuning (budget {budget:g})", disable=not self.progress)
        try:
            for i, n in enumerate(rungs):
                scored = [self.evaluate(c, n, bar) for c in pool]
                scored.sort(key=lambda e: e.score, reverse=True)
                if i + 1 < len(rungs):
                    pool = [e.candidate for e in scored[:max(starts, round(len(scored) * keep))]]
            best = self._local(scored[:starts], limit, num, local, bar, budget_seconds)
            best = self._trajectory(best, limit, num, bar, budget_seconds)
        finally:
            bar.close()
        full = [e for e in self.results.values() if num in e.psnr and e.macs <= limit]
        fitting = [e for e in full if self._ok(e, budget_seconds)]
        if not fitting:
            fastest = min(e.seconds[e.seeds] / e.seeds for e in self.results.values())
            raise ValueError(f"no configuration tried sampled within {budget_seconds} s per sample (the fastest took "
                             f"{fastest:.3g} s); raise --budget-seconds or lower --budget")
        # The best of everything scored on all seeds within the budget (earlier searches' too): a
        # search that reuses scores never returns less than one before it.
        return max([best, *fitting] if self._ok(best, budget_seconds) else fitting, key=lambda e: e.score), full

    def _local(self, starts: list[Evaluation], limit: float, num: int, budget_evals: int, bar,
               seconds: float | None) -> Evaluation:
        """Hill-climb from each start over single-dimension steps, at most `budget_evals` new scores:
        the moves on half the seeds, the best move on all of them, kept if it beats the current one."""
        fitting = [e for e in starts if self._ok(e, seconds)]
        best = max(fitting or starts, key=lambda e: e.score)
        half = max(1, num // 2)
        spent = 0
        for start in starts:
            current = start
            while spent < budget_evals:
                moves = []
                for n in self.space.neighbours(current.candidate):
                    if not self.feasible(n, limit):
                        if n.calls:
                            continue
                        n = replace(n, period=n.period + 1)  # rebalance: the step, one period longer
                        if n.period not in self.space.periods or not self.feasible(n, limit):
                            continue
                    if n not in self.results or num not in self.results[n].psnr:
                        moves.append(n)
                if not moves:
                    break
                scored = []
                for n in moves[: budget_evals - spent]:
                    scored.append(self.evaluate(n, half, bar))
                    spent += 1
                base = self.evaluate(current.candidate, half, bar).psnr[half]
                top = max(scored, key=lambda e: e.psnr[half])
                if top.psnr[half] <= base or spent >= budget_evals:
                    break
                top = self.evaluate(top.candidate, num, bar)
                spent += 1
                if self._ok(top, seconds) and top.score > best.score:
                    best = top
                if top.score <= current.score:
                    break
                current = top
        return best

    def _trajectory(self, best: Evaluation, limit: float, num: int, bar, seconds: float | None = None
                    ) -> Evaluation:
        """The chosen factor method again with TCC factors made at its period, kept if better."""
        c = best.candidate
        if self.make_tcc is None or c.method not in FACTOR_METHODS or c.rank == 0:
            return best  # rank 0 uses no factors
        period = c.period or max(2, round(self.runner.steps / len(c.calls)))  # a calls list: its mean spacing
        key = f"tcc-p{period}"
        if key not in self.factors:
            self.factors[key] = self.make_tcc(period)
        t = replace(c, factors=key)
        if not self.feasible(t, limit):
            return best
        e = self.evaluate(t, num, bar)
        return e if e.score > best.score and self._ok(e, seconds) else best


def frontier(evaluations: list[Evaluation]) -> list[Evaluation]:
    """The quality-vs-MACs frontier: each evaluation that no cheaper-or-equal one beats in PSNR."""
    out, top = [], float("-inf")
    for e in sorted(evaluations, key=lambda e: (e.macs, -e.score)):
        if e.score > top:
            out.append(e)
            top = e.score
    return out
