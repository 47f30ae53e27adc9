"""Pass rates with their uncertainty, the cost-quality frontier, and the cheapest policy that
meets a target pass rate (one model, or a stated random mix of two).

A policy is judged on the lower bound of each model's Wilson interval, not on its observed
rate: 9 passes out of 10 is not evidence of a 0.9 model, and choosing on point estimates picks
the lucky small samples. Mixing two models with shares s and 1 - s gives, in expectation, the
same mix of their pass rates and costs, so every policy worth stating lies on the lower convex
hull of cost against (lower-bound) pass rate.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

__all__ = ["Interval", "Measured", "Policy", "cheapest_policy", "frontier", "lower_hull", "wilson"]


@dataclass(frozen=True, slots=True)
class Interval:
    """A confidence interval for a pass rate."""

    low: float
    high: float

    def __str__(self) -> str:
        return f"[{self.low:.2f}, {self.high:.2f}]"


def wilson(successes: int, n: int, confidence: float = 0.95) -> Interval:
    """The Wilson score interval of `successes` out of `n` (sound at 0 and n, unlike p ± z·se)."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, got {confidence}")
    if n == 0:
        return Interval(0.0, 1.0)  # nothing measured: anything is possible
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    z2n = z * z / n
    center = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / n + z2n / (4 * n)) / (1 + z2n)
    # At the ends the bound is exact (0 of n: low 0; n of n: high 1), not a rounding error away.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return Interval(low, high)


@dataclass(frozen=True, slots=True)
class Measured:
    """One model measured on one node: calls scored, how many passed, mean cost per call."""

    model: str
    n: int
    successes: int
    cost: float

    @property
    def rate(self) -> float:
        return self.successes / self.n if self.n else 0.0

    def interval(self, confidence: float = 0.95) -> Interval:
        return wilson(self.successes, self.n, confidence)


def frontier(points: Iterable[Measured]) -> list[Measured]:
    """The models no cheaper model matches on pass rate, cheapest first (ties: fewer calls out)."""
    ordered = sorted((p for p in points if p.n > 0), key=lambda p: (p.cost, -p.rate, -p.n))
    out: list[Measured] = []
    for p in ordered:
        if not out or p.rate > out[-1].rate:
            out.append(p)
    return out


def _cross(o: tuple[float, float], a: tuple[float, float], b: tuple[float, float]) -> float:
    return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])


def lower_hull(points: Iterable[Measured], confidence: float = 0.95) -> list[Measured]:
    """The models on the lower convex hull of cost against lower-bound pass rate, by rising
    rate: for any target between two of them, mixing those two is the cheapest way to it."""
    best: dict[float, Measured] = {}
    for p in points:
        if p.n == 0:
            continue
        q = p.interval(confidence).low
        if q not in best or p.cost < best[q].cost:
            best[q] = p
    chain: list[tuple[tuple[float, float], Measured]] = []
    for q in sorted(best):
        xy = (q, best[q].cost)
        while len(chain) >= 2 and _cross(chain[-2][0], chain[-1][0], xy) <= 0:
            chain.pop()
        chain.append((xy, best[q]))
    # A model above a cheaper one of a higher bound is never worth choosing: keep the rising part.
    cheapest = min(range(len(chain)), key=lambda i: (chain[i][0][1], -chain[i][0][0]), default=0)
    return [m for _, m in chain[cheapest:]]


@dataclass(frozen=True, slots=True)
class Policy:
    """What to route a node to: models with the share of calls each gets (shares sum to 1)."""

    shares: tuple[tuple[str, float], ...]
    expected_cost: float  # per call
    assured_rate: float  # the shares' mix of lower-bound pass rates: at least the target

    def describe(self) -> str:
        if len(self.shares) == 1:
            return f"{self.shares[0][0]} (pass >= {self.assured_rate:.2f}, ${self.expected_cost:.6f}/call)"
        # A small share is shown as such (0.4%), never rounded to 0% (nor its partner to 100%).
        mix = " + ".join(f"{share:.0%} {model}" if 0.01 <= share <= 0.99
                         else f"{share:.1%} {model}" for model, share in self.shares)
        return f"{mix} (pass >= {self.assured_rate:.2f}, ${self.expected_cost:.6f}/call)"


def cheapest_policy(points: Sequence[Measured], target: float,
                    confidence: float = 0.95) -> Policy | None:
    """The cheapest policy whose lower-bound pass rate meets `target`: one model, or a random
    mix of the two hull models on either side of it. None when no measured model reaches it."""
    if not 0.0 <= target <= 1.0:
        raise ValueError(f"target pass rate must be between 0 and 1, got {target}")
    hull = lower_hull(points, confidence)
    lows = [m.interval(confidence).low for m in hull]
    for i, (m, q) in enumerate(zip(hull, lows, strict=True)):
        if q < target:
            continue
        if i == 0 or q == target:
            return Policy(((m.model, 1.0),), m.cost, q)
        below, q_below = hull[i - 1], lows[i - 1]
        share = (target - q_below) / (q - q_below)  # of the stronger model
        cost = (1 - share) * below.cost + share * m.cost
        return Policy(((below.model, 1 - share), (m.model, share)), cost, target)
    return None
