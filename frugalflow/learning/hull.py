"""Routers on their lower convex hull: a stated random mix of two adjacent operating points.

A router runs at an operating point: the `target` of `choose(target=t)` or the price weight
of `choose(price_weight=lambda)`. Swept over its parameter on calibration data (inputs with
every candidate's outcome and cost), it traces a cost-quality curve. Between two operating
points a router can do no better than the curve, but a random mix of the two (each call draws
one, with stated shares) reaches any point of the chord in expectation, so the curve worth
running on is its lower convex hull (`frugalflow.evaluation.frontier.lower_hull`, judged like
a model's policy on the Wilson lower bound of the pass rate). `hull_mix` states the mix for a
target quality or cost; `choose(..., mix=...)` draws from it per call.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import TypedDict

import numpy as np
from numpy.typing import NDArray

from ..evaluation.frontier import Interval, Measured, cheapest_policy, lower_hull
from ..exceptions import UserError

__all__ = ["HullMix", "HullMixDoc", "OperatingPoint", "Rule", "default_params", "hull_mix",
           "operating_curve", "route_batch"]

Floats = NDArray[np.float64]


class Rule(StrEnum):
    """Which parameter of `choose` an operating point sets."""

    TARGET = "target"  # the cheapest model with p >= t
    PRICE_WEIGHT = "price_weight"  # the model maximising p - lambda * expected cost


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """A router run at one parameter on calibration data: calls, passes, mean cost per call."""

    param: float
    n: int
    successes: int
    cost: float

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else 0.0


class HullMixDoc(TypedDict):
    """A saved `HullMix` (inside a saved router)."""

    rule: str
    shares: list[list[float]]
    expected_cost: float
    assured_rate: float


@dataclass(frozen=True, slots=True)
class HullMix:
    """Operating points with the share of calls each gets (shares sum to 1), and what the
    mix promises on the calibration data: its mean cost per call and its lower-bound rate."""

    rule: Rule
    shares: tuple[tuple[float, float], ...]  # (param, share of calls)
    expected_cost: float
    assured_rate: float

    def __post_init__(self) -> None:
        if not self.shares or any(s < 0 for _, s in self.shares) \
                or abs(sum(s for _, s in self.shares) - 1.0) > 1e-9:
            raise UserError(f"a hull mix needs shares >= 0 that sum to 1, got {self.shares}")

    def draw(self, rng: random.Random | None = None) -> float:
        """The operating point for one call, drawn with the stated shares."""
        u = (rng or random).random()
        for param, share in self.shares:
            u -= share
            if u < 0:
                return param
        return self.shares[-1][0]

    def describe(self) -> str:
        promise = f"(pass >= {self.assured_rate:.3f}, ${self.expected_cost:.6g}/call)"
        if len(self.shares) == 1:
            return f"{self.rule}={self.shares[0][0]:.4g} {promise}"
        # A small share is shown as such (0.4%), never rounded to 0% (nor its partner to 100%).
        mix = " + ".join(f"{share:.0%} {self.rule}={param:.4g}" if 0.01 <= share <= 0.99
                         else f"{share:.1%} {self.rule}={param:.4g}"
                         for param, share in self.shares)
        return f"{mix} {promise}"

    def to_dict(self) -> HullMixDoc:
        return {"rule": str(self.rule), "shares": [[p, s] for p, s in self.shares],
                "expected_cost": self.expected_cost, "assured_rate": self.assured_rate}

    @classmethod
    def from_dict(cls, d: HullMixDoc) -> HullMix:
        try:
            shares = tuple((float(p), float(s)) for p, s in d["shares"])
            return cls(Rule(d["rule"]), shares, float(d["expected_cost"]),
                       float(d["assured_rate"]))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"not a saved hull mix ({e}): refit the router's operating point") \
                from None


def route_batch(rule: Rule, P: Floats, C: Floats, param: float) -> NDArray[np.int64]:
    """Per row, the index of the model `choose` puts first (vectorised; P and C: [n, models]).

    TARGET: the cheapest model (by expected cost) with p >= param, else the most likely one.
    PRICE_WEIGHT: the model maximising p - param * cost.
    """
    if rule is Rule.PRICE_WEIGHT:
        best: NDArray[np.int64] = np.argmax(P - param * C, axis=1).astype(np.int64)
        return best
    n = len(P)
    pick = np.full(n, -1, dtype=np.int64)
    cost_rank = np.argsort(C, axis=1, kind="stable")
    for r in range(P.shape[1]):
        j = cost_rank[:, r]
        ok = (pick < 0) & (P[np.arange(n), j] >= param)
        pick[ok] = j[ok]
    rest = pick < 0
    pick[rest] = np.argmax(P[rest], axis=1)
    return pick


def default_params(rule: Rule, C: Floats) -> Floats:
    """A sweep of the rule's parameter wide enough to reach both ends of the curve."""
    if rule is Rule.PRICE_WEIGHT:
        scale = float(C.max(axis=1).mean()) or 1.0
        return np.concatenate([[0.0], np.geomspace(1e-3, 1e3, 400) / scale])
    return np.linspace(0.0, 1.0, 401)


def operating_curve(rule: Rule, P: Floats, C: Floats, outcomes: NDArray[np.bool_],
                    paid: Floats, params: Sequence[float] | None = None) -> list[OperatingPoint]:
    """The router's operating points on calibration data.

    P: predicted P(success), C: expected cost known before the call (what the router
    routes on), outcomes: whether each model passed, paid: what each call cost; all
    [n inputs, models], the models in the same order.
    """
    if not (P.shape == C.shape == outcomes.shape == paid.shape) or P.ndim != 2 or not len(P):
        raise UserError("operating_curve: P, C, outcomes and paid need one equal [n, models] shape")
    rows = np.arange(len(P))
    out: list[OperatingPoint] = []
    for p in (default_params(rule, C) if params is None else params):
        pick = route_batch(rule, P, C, float(p))
        out.append(OperatingPoint(float(p), len(P), int(outcomes[rows, pick].sum()),
                                  float(paid[rows, pick].mean())))
    return out


@dataclass(frozen=True, slots=True)
class _Observed(Measured):
    """A measurement judged on its observed rate (its interval is the point)."""

    def interval(self, confidence: float = 0.95) -> Interval:
        return Interval(self.rate, self.rate)


def hull_mix(points: Sequence[OperatingPoint], rule: Rule, *, quality: float | None = None,
             cost: float | None = None, confidence: float | None = 0.95) -> HullMix | None:
    """The mix of one or two adjacent hull operating points for a target `quality` (the
    cheapest whose lower-bound pass rate meets it) or `cost` (the best lower-bound rate whose
    mean cost per call stays within it). `confidence=None`: judge on observed rates instead
    of lower bounds. None when no mix reaches it."""
    if (quality is None) == (cost is None):
        raise UserError("hull_mix: give exactly one of quality or cost")
    kind = Measured if confidence is not None else _Observed
    measured = [kind(str(i), p.n, p.successes, p.cost) for i, p in enumerate(points)]
    confidence = confidence if confidence is not None else 0.95  # unused by _Observed
    param = {str(i): p.param for i, p in enumerate(points)}
    if quality is not None:
        policy = cheapest_policy(measured, quality, confidence)
        if policy is None:
            return None
        return HullMix(rule, tuple((param[m], s) for m, s in policy.shares),
                       policy.expected_cost, policy.assured_rate)
    assert cost is not None
    hull = lower_hull(measured, confidence)
    affordable = [i for i, m in enumerate(hull) if m.cost <= cost]
    if not affordable:
        return None
    i = affordable[-1]
    low = hull[i].interval(confidence).low
    if i == len(hull) - 1 or hull[i].cost == cost:
        return HullMix(rule, ((param[hull[i].model], 1.0),), hull[i].cost, low)
    nxt = hull[i + 1]
    share = (cost - hull[i].cost) / (nxt.cost - hull[i].cost)  # of the dearer point
    rate = (1 - share) * low + share * nxt.interval(confidence).low
    return HullMix(rule, ((param[hull[i].model], 1 - share), (param[nxt.model], share)),
                   cost, rate)
