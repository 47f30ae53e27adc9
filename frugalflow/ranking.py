"""Which catalog models can take a call, in which order, and why the others cannot.

`prefilter` applies the needs that do not depend on a call's messages (capabilities,
quality, providers, latency, availability); `rank` adds the per-call ones (context window,
images, price caps, the budget left) and orders the capable models by the expected cost of
*this* call; `explain` lists every model, accepted or rejected with its reasons.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from langchain_core.messages import BaseMessage

from .catalog import Catalog, ModelSpec
from .exceptions import NoCapableModelError
from .needs import Needs, estimate_tokens, has_images

__all__ = [
    "Candidate",
    "Prefilter",
    "Ranking",
    "explain",
    "no_capable_model_error",
    "prefilter",
    "rank",
]


class Candidate(NamedTuple):
    """A capable model for a call; tuples sort in routing order (cost, quality, latency)."""

    expected_cost: float
    neg_quality: float
    latency_ms: float
    order: int
    spec: ModelSpec


@dataclass
class Ranking:
    """Capable models cheapest first, and every rejected model with its reasons."""

    rows: list[Candidate]
    """The capable models, sorted: the routing order."""
    rejected: list[tuple[ModelSpec, list[str]]]
    input_tokens: int = 0

    @property
    def candidates(self) -> list[Candidate]:
        return self.rows

    def closest(self, n: int = 3) -> list[tuple[ModelSpec, list[str]]]:
        """The rejected models that miss the fewest needs (the best hint for a fix)."""
        return sorted(self.rejected, key=lambda r: (len(r[1]), r[0].estimate_cost(1000, 400)))[:n]


def _static_reasons(catalog: Catalog, spec: ModelSpec, needs: Needs) -> list[str]:
    reasons: list[str] = []
    why = catalog.unavailable_reason(spec)
    if why:
        reasons.append(why)
    caps = spec.caps
    if needs.tools and not caps.tool_calling:
        reasons.append("no tool calling")
    if needs.structured_output and not caps.structured_output:
        reasons.append("no structured output")
    if needs.vision and not caps.vision:
        reasons.append("no image input")
    if needs.reasoning and not caps.reasoning:
        reasons.append("no reasoning mode")
    if needs.streaming and not caps.streaming:
        reasons.append("no streaming")
    if needs.min_context and spec.window < needs.min_context:
        reasons.append(f"context {spec.window} < min_context {needs.min_context}")
    for skill, minimum in needs.quality.items():
        score = spec.quality.get(skill)
        if score is None:
            reasons.append(f"no {skill} score")
        elif score < minimum:
            reasons.append(f"quality.{skill} {score:.2f} < {minimum}")
    if needs.providers is not None and spec.provider not in needs.providers:
        reasons.append(f"provider {spec.provider} not in allowed {list(needs.providers)}")
    if spec.provider in needs.exclude_providers:
        reasons.append(f"provider {spec.provider} excluded")
    if needs.models is not None and spec.key not in needs.models:
        reasons.append("not in the node's allowed models")
    if spec.key in needs.exclude_models:
        reasons.append("model excluded")
    if needs.max_latency_ms is not None and spec.latency_ms > needs.max_latency_ms:
        reasons.append(f"latency {spec.latency_ms:.0f} ms > {needs.max_latency_ms:.0f} ms")
    return reasons


@dataclass
class Prefilter:
    """The catalog split by the needs that do not depend on a call's messages."""

    eligible: list[ModelSpec]
    rejected: list[tuple[ModelSpec, list[str]]]
    # Per eligible model: (spec, $/input token, $/output token, window, vision, -quality, latency)
    rows: list[tuple[ModelSpec, float, float, int, bool, float, float]] = field(
        default_factory=list
    )
    min_window: int = 0
    """The smallest context window of the eligible models."""
    all_vision: bool = True
    """Whether every eligible model takes images."""


def prefilter(catalog: Catalog, needs: Needs) -> Prefilter:
    """Apply the static needs (capabilities, quality, providers, latency, availability)."""
    eligible: list[ModelSpec] = []
    rejected: list[tuple[ModelSpec, list[str]]] = []
    for spec in catalog:
        reasons = _static_reasons(catalog, spec, needs)
        if reasons:
            rejected.append((spec, reasons))
        else:
            eligible.append(spec)
    skills = list(needs.quality) or None
    rows = [
        (s, s.input_price_per_mtok / 1e6, s.output_price_per_mtok / 1e6, s.window,
         s.caps.vision, -s.mean_quality(skills), s.latency_ms)
        for s in eligible
    ]
    return Prefilter(eligible, rejected, rows, min((s.window for s in eligible), default=0),
                     all(s.caps.vision for s in eligible))


def rank(
    catalog: Catalog,
    needs: Needs,
    messages: Sequence[BaseMessage] = (),
    *,
    tools: Sequence[Any] = (),
    budget_left: float | None = None,
    input_tokens: int | None = None,
    prefiltered: Prefilter | None = None,
) -> Ranking:
    """Capable models for a call with `messages`, cheapest expected cost first.

    Ties are broken by quality (mean over the needed skills, else all), then latency.
    `prefiltered` is `prefilter(catalog, needs)` when the caller keeps it (per run).
    """
    static = prefiltered if prefiltered is not None else prefilter(catalog, needs)
    n_in = input_tokens if input_tokens is not None else estimate_tokens(messages, tools)
    n_out = needs.expected_output_tokens
    context_needed = n_in + (needs.max_output_tokens or needs.expected_output_tokens)
    # Images matter only when a capable model cannot read them.
    images = (bool(messages) and not needs.vision and not static.all_vision
              and has_images(messages))
    max_cost = needs.max_cost_per_call
    new = tuple.__new__  # a Candidate from a plain tuple, without NamedTuple's slower __new__
    if (context_needed <= static.min_window and not images
            and max_cost is None and budget_left is None):
        # The routed call's usual case: nothing is rejected per call, only the order
        # depends on its size.
        rows = [new(Candidate, (n_in * p_in + n_out * p_out, neg_quality, latency, i, spec))
                for i, (spec, p_in, p_out, _, _, neg_quality, latency) in enumerate(static.rows)]
        rows.sort()  # `order` makes keys unique: specs are never compared
        return Ranking(rows, list(static.rejected), n_in)
    rejected = list(static.rejected)
    ranked: list[Candidate] = []
    for i, (spec, p_in, p_out, window, vision, neg_quality, latency) in enumerate(static.rows):
        cost = n_in * p_in + n_out * p_out
        reasons: list[str] = []
        if window < context_needed:
            reasons.append(f"context {window} < {context_needed} tokens needed")
        if images and not vision:
            reasons.append("messages hold images; no image input")
        if max_cost is not None and cost > max_cost:
            reasons.append(f"expected ${cost:.6f} > max_cost_per_call ${max_cost}")
        if budget_left is not None and cost > budget_left:
            reasons.append(f"expected ${cost:.6f} > budget left ${budget_left:.6f}")
        if reasons:
            rejected.append((spec, reasons))
        else:
            ranked.append(new(Candidate, (cost, neg_quality, latency, i, spec)))
    ranked.sort()
    return Ranking(ranked, rejected, n_in)


def explain(
    catalog: Catalog,
    needs: Needs,
    messages: Sequence[BaseMessage] = (),
    *,
    input_tokens: int | None = None,
    budget_left: float | None = None,
) -> list[dict[str, Any]]:
    """Every catalog model, accepted (with its rank and expected cost) or rejected (why)."""
    ranking = rank(
        catalog, needs, messages, input_tokens=input_tokens, budget_left=budget_left
    )
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(ranking.candidates, 1):
        rows.append(
            {"model": c.spec.key, "accepted": True, "rank": i,
             "expected_cost_usd": c.expected_cost, "reasons": []}
        )
    for spec, reasons in ranking.rejected:
        rows.append({"model": spec.key, "accepted": False, "rank": None,
                     "expected_cost_usd": None, "reasons": reasons})
    return rows


def no_capable_model_error(
    node: str | None, needs: Needs, ranking: Ranking, catalog: Catalog
) -> NoCapableModelError:
    where = f"node {node!r}" if node else "this call"
    closest = ranking.closest()
    lines = [
        f"{where}: no available model in catalog {catalog.name!r} meets its needs "
        f"({needs.describe()})."
    ]
    if closest:
        lines.append("Closest models:")
        lines += [f"  - {s.key}: {'; '.join(r)}" for s, r in closest]
    lines.append(
        "Fix: relax the need named above, configure a provider that has such a model "
        "(set its API key), or add a model to the catalog."
    )
    return NoCapableModelError(
        "\n".join(lines), node=node, rejected=[(s.key, r) for s, r in ranking.rejected]
    )
