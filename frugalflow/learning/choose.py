"""`choose`: the order in which to try models, from their P(success) and expected costs."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping

from ..exceptions import UserError
from .hull import HullMix, Rule

__all__ = ["choose"]


def choose(
    probs: Mapping[str, float],
    costs: Mapping[str, float],
    *,
    target: float | None = None,
    price_weight: float | None = None,
    cascade: bool = False,
    mix: HullMix | None = None,
    rng: random.Random | None = None,
) -> list[tuple[str, str]]:
    """The order in which to try the models of `probs` (see `_choose`).

    With `mix` (a router's calibrated operating points, `frugalflow.learning.hull`), this
    call's operating point is drawn from it (with `rng`) and its rule decides the first
    model: a TARGET mix replaces `target` (`price_weight`, if given, still orders the rest);
    a PRICE_WEIGHT mix replaces both. The first model's reason names the draw."""
    if mix is None:
        return _choose(probs, costs, target=target, price_weight=price_weight, cascade=cascade)
    if cascade:
        raise UserError("choose: cascade cannot be combined with a hull mix")
    param = mix.draw(rng)
    if mix.rule is Rule.TARGET:
        target = param
    else:
        target, price_weight = None, param
    order = _choose(probs, costs, target=target, price_weight=price_weight)
    if order:
        first, why = order[0]
        order[0] = (first, f"{why}; {mix.rule}={param:.4g} drawn from {mix.describe()}")
    return order


def _choose(
    probs: Mapping[str, float],
    costs: Mapping[str, float],
    *,
    target: float | None = None,
    price_weight: float | None = None,
    cascade: bool = False,
) -> list[tuple[str, str]]:
    """The order in which to try the models of `probs`, each with the reason for its place.

    - `target`: first the cheapest model whose p >= target; if none reaches it, the most
      likely model. The rest follow by `price_weight` score when given, else by cost.
    - `price_weight` (lambda, per USD): by expected value ``p - lambda * cost``, best first.
    - `cascade`: by expected cost per success, ``cost / p``, lowest first. When each answer is
      checked and a failure moves on to the next model, this order minimises the expected
      total spend until one passes (for independent outcomes: the classic optimal order of
      a sequential search).
    - none of them: by cost, cheapest first.

    Ties are broken by higher p, then by name. Every model in `probs` needs a cost.
    """
    missing = [m for m in probs if m not in costs]
    if missing:
        raise UserError(f"choose: no cost for {', '.join(sorted(missing))}")
    if target is not None and not 0.0 <= target <= 1.0:
        raise UserError(f"choose: target must be in 0..1, got {target}")
    if price_weight is not None and price_weight < 0:
        raise UserError(f"choose: price_weight must be >= 0, got {price_weight}")
    if cascade and (target is not None or price_weight is not None):
        raise UserError("choose: cascade cannot be combined with target or price_weight")
    models = list(probs)
    if cascade:
        def per_success(m: str) -> float:
            return costs[m] / probs[m] if probs[m] > 0 else math.inf

        return [(m, f"cost per success ${per_success(m):.6g} (p={probs[m]:.3f})")
                for m in sorted(models, key=lambda m: (per_success(m), costs[m], m))]

    def by_cost(m: str) -> tuple[float, float, str]:
        return (costs[m], -probs[m], m)

    def by_value(m: str) -> tuple[float, float, str]:
        assert price_weight is not None
        return (-(probs[m] - price_weight * costs[m]), costs[m], m)

    def value_reason(m: str) -> str:
        assert price_weight is not None
        v = probs[m] - price_weight * costs[m]
        return f"p - {price_weight:g}*cost = {v:.4f} (p={probs[m]:.3f})"

    rest_key = by_value if price_weight is not None else by_cost
    out: list[tuple[str, str]] = []
    if target is not None:
        able = sorted((m for m in models if probs[m] >= target), key=by_cost)
        if able:
            first = able[0]
            out.append((first, f"cheapest with p>=target ({probs[first]:.3f} >= {target:g})"))
        elif models:
            first = max(models, key=lambda m: (probs[m], -costs[m], m))
            out.append((first, f"highest p, none reaches target {target:g} (p={probs[first]:.3f})"))
        else:
            return out
        for m in sorted((m for m in models if m != first), key=rest_key):
            out.append((m, value_reason(m) if price_weight is not None
                        else f"then by cost (p={probs[m]:.3f})"))
        return out
    if price_weight is not None:
        return [(m, value_reason(m)) for m in sorted(models, key=by_value)]
    return [(m, f"by cost (p={probs[m]:.3f})") for m in sorted(models, key=by_cost)]
