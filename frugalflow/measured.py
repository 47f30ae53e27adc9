"""Measured pass rates per node x model: a stored policy's evidence plus production verdicts.

Each node x model's pass rate is a Beta posterior: a uniform prior Beta(1, 1), plus the
policy's evaluation evidence (n cases, passes), plus the production outcomes the ledger
holds for the flow, each weighted 0.5 ** (age / half_life). The uniform prior is chosen on
purpose over one built from the catalog's benchmark scores: those are not pass rates on
*this* node's task (a benchmark score says little about a node's validator), so a
measurement starts from "unknown" and says only what was measured.

Production outcomes that count:
- an answer with user feedback (`ff_attempts.feedback`): a pass when good, a fail when bad;
- on a node whose flow declares a validator: an accepted answer is a pass, an answer the
  validator rejected (or that failed its schema) is a fail. On nodes without a validator an
  accepted answer proves nothing, so only feedback counts there.
Production alone makes a measurement once it holds `min_production` (decayed) verdicts; a
policy's evidence always does (it was stored on purpose).

Quality on measurements (`judge`): where a node x model has a measurement, the node's
quality requirement is judged on the lower bound of its 95% interval: the model is admitted
when that bound reaches the node's `Needs.target`, or, without a target, the highest of the
node's `quality` thresholds (a node asking `writing >= 0.8` asks for 80% of its answers to
pass). Elsewhere the catalog's prior judges, as without measurements.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Integer, and_, cast, func, or_, select

from .exceptions import UserError
from .persistence.tables import AttemptRow
from .policies import Choice, Policy
from .statuses import ErrorClass, Outcome

if TYPE_CHECKING:
    from .catalog import ModelSpec
    from .needs import Needs
    from .persistence.store import Store

__all__ = [
    "MeasureConfig",
    "MeasuredRate",
    "Measurements",
    "Tally",
    "beta_quantile",
    "explore_share",
    "load_measurements",
    "DEFAULT_TARGET",
    "threshold_of",
    "unknown_policy",
]

_ATTEMPTS = AttemptRow.__table__  # type: ignore[attr-defined]
_ANSWER_FAILURES = (ErrorClass.VALIDATION.value, ErrorClass.MALFORMED.value)
_BUCKETS_PER_DAY = 4  # production outcomes are weighted per 6-hour bucket of their age


@dataclass(frozen=True, slots=True)
class MeasureConfig:
    """How production outcomes are weighed, and how long a runner reuses what it loaded."""

    half_life_days: float | None = 30.0
    """An outcome this many days old counts half (None: no decay)."""
    min_production: float = 20.0
    """Production alone is a measurement from this many (decayed) verdicts on."""
    ttl: float = 30.0
    """Seconds a Runner reuses loaded measurements (a new policy version reloads at once)."""
    level: float = 0.95
    """The interval's credibility (equal-tailed)."""
    prior: tuple[float, float] = (1.0, 1.0)
    """The Beta prior's (alpha, beta): uniform."""


@dataclass(frozen=True, slots=True)
class Tally:
    """The evidence on one node x model: (weighted) passes and fails, and where from."""

    passes: float = 0.0
    fails: float = 0.0
    policy_n: int = 0
    """Of it, the stored policy's cases (never decayed)."""
    sources: tuple[str, ...] = ()

    @property
    def n(self) -> float:
        return self.passes + self.fails

    def plus(self, passes: float, fails: float, source: str, policy_n: int = 0) -> Tally:
        sources = self.sources if source in self.sources else (*self.sources, source)
        return Tally(self.passes + passes, self.fails + fails, self.policy_n + policy_n,
                     sources)


@dataclass(frozen=True, slots=True)
class MeasuredRate:
    """A node x model's measured pass rate: the Beta posterior's mean and interval."""

    n_eff: float
    mean: float
    low: float
    high: float
    source: str

    @property
    def interval(self) -> tuple[float, float]:
        return self.low, self.high

    def describe(self) -> str:
        """`measured: n=48, rate 0.94 [0.83, 0.98] (eval:abc, production)`."""
        n = f"{self.n_eff:.0f}" if abs(self.n_eff - round(self.n_eff)) < 0.05 \
            else f"{self.n_eff:.1f}"
        return (f"measured: n={n}, rate {self.mean:.2f} [{self.low:.2f}, {self.high:.2f}] "
                f"({self.source})")


def unknown_policy(name: str, stored: Collection[str]) -> UserError:
    """The one-line error for a policy name nothing is stored under."""
    return UserError(f"unknown policy {name!r} (stored: {', '.join(sorted(stored)) or 'none'}); "
                     f"store one with `frugalflow eval ... --save-policy {name}`")


DEFAULT_TARGET = 0.9
"""The pass rate a measured model must show (interval lower bound) on a node that has
quality thresholds but no `target`: the thresholds are benchmark scores, not pass rates."""


def threshold_of(needs: Needs) -> float | None:
    """The pass rate a node asks for: its `target`; `DEFAULT_TARGET` for a node with quality
    thresholds and no target; None for a node that asks no quality at all."""
    if needs.target is not None:
        return needs.target
    return DEFAULT_TARGET if needs.quality else None


def explore_share(explore: float | Mapping[str, float], node: str | None) -> float:
    """The share of a node's calls that may explore (a per-node mapping or one share)."""
    if isinstance(explore, Mapping):
        return float(explore.get(node or "", 0.0))
    return float(explore)


class Measurements:
    """What was measured of a flow's nodes: pass rates per node x model, and the policy's
    choices. Made by `load_measurements` (or `from_policy`); read-only, shared by runs."""

    def __init__(self, flow: str, tallies: Mapping[tuple[str, str], Tally], *,
                 choices: Mapping[str, Choice] | None = None, label: str | None = None,
                 config: MeasureConfig | None = None) -> None:
        self.flow = flow
        self.config = config or MeasureConfig()
        self.label = label
        """`policy <name> v<k>` (route reasons say it), None without a policy."""
        self.choices: dict[str, Choice] = dict(choices or {})
        self.loaded_at = time.monotonic()
        self._rates: dict[tuple[str, str], MeasuredRate] = {}
        self._tallies: dict[tuple[str, str], Tally] = {}
        for key, tally in tallies.items():
            if tally.policy_n > 0 or tally.n >= self.config.min_production:
                self._tallies[key] = tally
        self._nodes = {node for node, _ in self._tallies} | set(self.choices)

    @classmethod
    def from_policy(cls, policy: Policy, *, label: str | None = None,
                    config: MeasureConfig | None = None) -> Measurements:
        """A policy's evidence and choices alone (no production outcomes)."""
        return cls(policy.flow, policy_tallies(policy), choices=_choices(policy), label=label,
                   config=config)

    def covers(self, node: str | None) -> bool:
        """Whether anything was measured (or chosen) for `node`."""
        return node is not None and node in self._nodes

    def choice(self, node: str | None) -> Choice | None:
        return self.choices.get(node or "")

    def tally(self, node: str, model: str) -> Tally | None:
        return self._tallies.get((node, model))

    def rate(self, node: str | None, model: str) -> MeasuredRate | None:
        """The measured pass rate of `model` on `node`, or None: not measured (prior only)."""
        key = (node or "", model)
        hit = self._rates.get(key)
        if hit is None:
            tally = self._tallies.get(key)
            if tally is None:
                return None
            a, b = self.posterior(tally)
            tail = (1 - self.config.level) / 2
            hit = self._rates[key] = MeasuredRate(
                n_eff=tally.n, mean=a / (a + b), low=beta_quantile(tail, a, b),
                high=beta_quantile(1 - tail, a, b), source=", ".join(tally.sources))
        return hit

    def posterior(self, tally: Tally | None) -> tuple[float, float]:
        """The Beta posterior's (alpha, beta) for `tally` (the prior alone for None)."""
        a, b = self.config.prior
        return (a, b) if tally is None else (a + tally.passes, b + tally.fails)

    def judge(self, node: str | None, needs: Needs) -> Callable[[ModelSpec], list[str] | None]:
        """For `ranking.prefilter`: per model, why the measurement rejects it ([] admits),
        or None where nothing was measured (the catalog's prior judges)."""
        threshold = threshold_of(needs)
        what = "target" if needs.target is not None else "default target"

        def verdict(spec: ModelSpec) -> list[str] | None:
            rate = self.rate(node, spec.key)
            if rate is None or threshold is None:
                return None
            if rate.low >= threshold:
                return []
            return [f"measured pass rate {rate.mean:.2f} [{rate.low:.2f}, {rate.high:.2f}] "
                    f"({rate.source}): lower bound < {what} {threshold:g}"]

        return verdict

    def unproven(self, node: str | None, model: str, threshold: float) -> bool:
        """Whether `model` may still meet `threshold` on `node` without having shown it:
        not measured, or its interval straddles the threshold."""
        rate = self.rate(node, model)
        return rate is None or rate.low < threshold <= rate.high

    def thompson(self, node: str | None, options: Sequence[tuple[str, float]],
                 threshold: float, rng: random.Random) -> tuple[str, float] | None:
        """Thompson sampling: a draw from each option's posterior, cheapest first; the first
        option (model, cost) whose draw meets `threshold` with its draw, or None."""
        for model, _cost in sorted(options, key=lambda o: o[1]):
            a, b = self.posterior(self._tallies.get((node or "", model)))
            draw = rng.betavariate(a, b)
            if draw >= threshold:
                return model, draw
        return None


def policy_tallies(policy: Policy) -> dict[tuple[str, str], Tally]:
    """A policy's evidence as tallies (never decayed: a new evaluation stores a new version)."""
    out: dict[tuple[str, str], Tally] = {}
    for node, np in policy.nodes.items():
        for model, ev in np.models.items():
            if ev.n > 0:
                out[(node, model)] = Tally().plus(ev.passes, ev.n - ev.passes,
                                                  ev.source or policy.source or "policy",
                                                  policy_n=ev.n)
    return out


def _choices(policy: Policy) -> dict[str, Choice]:
    return {node: np.choice for node, np in policy.nodes.items() if np.choice is not None}


async def load_measurements(
    store: Store, flow: str, *, validated: Collection[str], policy: Policy | None = None,
    label: str | None = None, config: MeasureConfig | None = None,
    production: bool = True, now: datetime | None = None,
) -> Measurements:
    """A flow's measurements: `policy`'s evidence (when it is for `flow`) plus, with
    `production`, the ledger's verdicts (one query). `validated`: the flow's nodes that
    declare a validator (their accepted answers count as passes)."""
    config = config or MeasureConfig()
    mine = policy if policy is not None and policy.flow == flow else None
    tallies = policy_tallies(mine) if mine is not None else {}
    if production:
        for key, (passes, fails) in (await _production(store, flow, set(validated), config,
                                                       now)).items():
            tallies[key] = tallies.get(key, Tally()).plus(passes, fails, "production")
    return Measurements(flow, tallies, choices=_choices(mine) if mine is not None else None,
                        label=label if mine is not None else None, config=config)


async def _production(store: Store, flow: str, validated: set[str], config: MeasureConfig,
                      now: datetime | None) -> dict[tuple[str, str], tuple[float, float]]:
    """Per node x model, the decayed (passes, fails) the ledger's verdicts give."""
    now = now or datetime.now(timezone.utc)
    c = _ATTEMPTS.c
    # Outcomes are grouped by node, model, verdict and 6-hour bucket of age: a busy ledger
    # comes back as a few rows per pair, not one per call.
    bucket: ColumnElement[Any]
    if store.is_sqlite:
        bucket = cast(func.julianday(c.started_at) * _BUCKETS_PER_DAY, Integer)
        now_days = now.timestamp() / 86400 + 2440587.5
    else:
        bucket = func.floor(func.extract("epoch", c.started_at) / 86400 * _BUCKETS_PER_DAY)
        now_days = now.timestamp() / 86400
    verdicts = or_(c.outcome == Outcome.OK.value,
                   and_(c.outcome == Outcome.ERROR.value, c.error_class.in_(_ANSWER_FAILURES)))
    q = (select(c.node, c.model, c.outcome, c.feedback, bucket.label("bucket"),
                func.count().label("n"))
         .where(c.flow == flow, verdicts)
         .group_by(c.node, c.model, c.outcome, c.feedback, bucket))
    half = config.half_life_days
    if half is not None:  # older outcomes weigh under 0.1%: not read
        q = q.where(c.started_at >= now - timedelta(days=10 * half))
    await store.setup()
    async with store.read() as conn:
        rows = (await conn.execute(q)).all()
    out: dict[tuple[str, str], tuple[float, float]] = {}
    for r in rows:
        passed = _verdict(r.outcome, r.feedback, r.node in validated)
        if passed is None:
            continue
        age = max(now_days - (float(r.bucket) + 0.5) / _BUCKETS_PER_DAY, 0.0)
        weight = int(r.n) * (0.5 ** (age / half) if half else 1.0)
        p, f = out.get((r.node, r.model), (0.0, 0.0))
        out[(r.node, r.model)] = (p + weight, f) if passed else (p, f + weight)
    return out


def _verdict(outcome: str, feedback: bool | None, validated: bool) -> bool | None:
    """Whether a production outcome is a pass, a fail, or (None) says nothing."""
    if feedback is not None and outcome == Outcome.OK.value:
        return bool(feedback)
    if not validated:
        return None  # an answer nothing checked proves nothing
    return outcome == Outcome.OK.value


# -- the Beta distribution's quantiles (no scipy) ------------------------------------------


def beta_quantile(q: float, a: float, b: float) -> float:
    """The `q` quantile of Beta(a, b) (bisection on the regularized incomplete beta)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if _betainc(a, b, mid) < q:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    ln_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
                + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast below the mean; use the symmetry above it.
    if x < (a + 1) / (a + b + 2):
        return math.exp(ln_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(ln_front) * _betacf(b, a, 1.0 - x) / b


def _betacf(a: float, b: float, x: float) -> float:
    """The incomplete beta's continued fraction (modified Lentz)."""
    tiny = 1e-300
    qab, qap, qam = a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)),
                    -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 3e-14:
            break
    return h

