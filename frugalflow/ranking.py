"""Which catalog models can take a call, in which order, and why the others cannot.

`prefilter` applies the needs that do not depend on a call's messages (capabilities,
quality, providers, latency, availability); `rank` adds the per-call ones (context window,
images, price caps, the budget left) and orders the capable models by the expected cost of
*this* call; `explain` lists every model, accepted or rejected with its reasons.

The expected cost of a call to a model is its input tokens at the input price plus the
model's estimated output tokens on the node (median, hidden reasoning included: see
`verbosity`) at the output price: measured where a run knows them (`Priced`), else the
per-model prior.

With a deadline (`rank(..., deadline_s=...)`, the seconds left until the node's deadline)
each capable model also appears once per slower, cheaper tier that can answer in time
(`frugalflow.tiers`): batch when its turnaround p90 plus a safety margin (`DEADLINE_MARGIN`
plus a standard call, so a late batch can still go synchronous) fits in the time left,
flex when its latency does, off_peak when its next cheaper window opens early enough. A
batch or flex row's expected cost adds the prior share of requests that miss
(`TierTerms.miss_rate`) times the standard cost. Without a deadline nothing changes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from langchain_core.messages import BaseMessage

from .catalog import Catalog, ModelSpec
from .exceptions import NoCapableModelError
from .needs import Needs, Unscored, estimate_tokens, has_images, unscored_reason
from .tiers import (DEADLINE_MARGIN, Margin, Tier, next_off_peak, standard_call_s, tier_prices,
                    tier_terms)
from .verbosity import TokenEstimate, Verbosity, prior_estimate

if TYPE_CHECKING:
    from .measured import Measurements

__all__ = [
    "Candidate",
    "Prefilter",
    "Priced",
    "Ranking",
    "QualityJudge",
    "explain",
    "measured_note",
    "no_capable_model_error",
    "prefilter",
    "priced",
    "rank",
]


class Candidate(NamedTuple):
    """A capable model for a call; tuples sort in routing order (cost, quality, latency)."""

    expected_cost: float
    neg_quality: float
    latency_ms: float
    order: int
    spec: ModelSpec
    tier: Tier = Tier.STANDARD
    """The service tier of this candidate (a model may be a candidate on several tiers)."""


class Ranking:
    """Capable models cheapest first, and every rejected model with its reasons.

    `rows` are the capable models in routing order. A call's ranking makes each `Candidate`
    when it is first read: a routed call that succeeds at once reads only the first.
    """

    __slots__ = ("_rows", "_order", "_static", "rejected", "input_tokens", "tier_notes")

    def __init__(self, rows: list[Candidate], rejected: list[tuple[ModelSpec, list[str]]],
                 input_tokens: int = 0,
                 tier_notes: tuple[tuple[ModelSpec, Tier, str], ...] = ()) -> None:
        self._rows: list[Candidate] | None = rows
        self._order: list[tuple[float, int]] = []  # (cost, tie-break rank) while lazy
        self._static: Prefilter | None = None
        self.rejected = rejected
        self.input_tokens = input_tokens
        self.tier_notes = tier_notes
        """With a deadline: per capable model, each tier it is offered but cannot use, and
        why (e.g. `batch: turnaround p90 4h + margin 36m + standard call 9s > 1h left`)."""

    @classmethod
    def _lazy(cls, order: list[tuple[float, int]], static: Prefilter,
              rejected: list[tuple[ModelSpec, list[str]]], input_tokens: int) -> Ranking:
        ranking = cls([], rejected, input_tokens)
        ranking._rows, ranking._order, ranking._static = None, order, static
        return ranking

    def _candidate(self, k: int) -> Candidate:
        static = self._static
        assert static is not None
        cost, tie = self._order[k]
        i = static.by_tiebreak[tie]
        _, _, _, _, _, neg_quality, latency = row = static.rows[i]
        return _new(Candidate, (cost, neg_quality, latency, i, row[0], _STANDARD))

    @property
    def rows(self) -> list[Candidate]:
        if self._rows is None:
            self._rows = [self._candidate(k) for k in range(len(self._order))]
        return self._rows

    @rows.setter
    def rows(self, value: list[Candidate]) -> None:
        self._rows = value

    @property
    def candidates(self) -> list[Candidate]:
        return self.rows

    def __len__(self) -> int:
        return len(self._rows) if self._rows is not None else len(self._order)

    def __iter__(self) -> Iterator[Candidate]:
        if self._rows is not None:
            yield from self._rows
            return
        for k in range(len(self._order)):
            if self._rows is not None:  # materialised meanwhile: the same candidates
                yield from self._rows[k:]
                return
            yield self._candidate(k)

    def first(self) -> Candidate:
        return self._rows[0] if self._rows is not None else self._candidate(0)

    def closest(self, n: int = 3) -> list[tuple[ModelSpec, list[str]]]:
        """The rejected models that miss the fewest needs (the best hint for a fix)."""
        return sorted(self.rejected, key=lambda r: (len(r[1]), r[0].estimate_cost(1000, 400)))[:n]


_STANDARD = Tier.STANDARD
_new = tuple.__new__  # a Candidate from a plain tuple, without NamedTuple's slower __new__


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
            if needs.unscored is Unscored.REJECT:
                reasons.append(unscored_reason(skill))
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


QualityJudge = Callable[[ModelSpec], list[str] | None]
"""Per model: why a measurement rejects it on the node's quality need ([]: it admits it),
or None where nothing was measured and the catalog's prior judges
(`frugalflow.measured.Measurements.judge`)."""


def _quality_judged(catalog: Catalog, needs: Needs,
                    judge: QualityJudge) -> Callable[[ModelSpec], list[str]]:
    """The static reasons with the quality need judged by `judge` where it measured."""
    bare = needs.with_(quality={}) if needs.quality else needs

    def reasons(spec: ModelSpec) -> list[str]:
        verdict = judge(spec)
        if verdict is None:
            return _static_reasons(catalog, spec, needs)
        return _static_reasons(catalog, spec, bare) + verdict

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
    prices: list[tuple[float, float]] = field(default_factory=list)
    """Per row: $/input token, and the cost of the model's prior output estimate."""
    tiebreak: list[int] = field(default_factory=list)
    """Per row: its place in (-quality, latency, catalog order), which breaks cost ties."""
    by_tiebreak: list[int] = field(default_factory=list)
    """The row at each tie-break place."""
    prior: Priced | None = None
    """The rows' prior output estimates and `prices` (what a node nothing was measured of
    uses: computed once per needs, not per run)."""
    explicit_out: bool = False
    """Whether the needs set expected_output_tokens themselves (the prior depends on it)."""


def prefilter(catalog: Catalog, needs: Needs, judge: QualityJudge | None = None) -> Prefilter:
    """Apply the static needs (capabilities, quality, providers, latency, availability).
    With `judge`, quality is judged on measurements where they exist (see `QualityJudge`)."""
    eligible: list[ModelSpec] = []
    rejected: list[tuple[ModelSpec, list[str]]] = []
    judged = _quality_judged(catalog, needs, judge) if judge is not None else None
    for spec in catalog:
        reasons = (judged(spec) if judged is not None
                   else _static_reasons(catalog, spec, needs))
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
    by_tiebreak = sorted(range(len(rows)), key=lambda i: (rows[i][5], rows[i][6], i))
    tiebreak = [0] * len(rows)
    for place, i in enumerate(by_tiebreak):
        tiebreak[i] = place
    estimates = [prior_estimate(needs, s) for s in eligible]
    prices = [(r[1], e.p50 * r[2]) for r, e in zip(rows, estimates)]
    return Prefilter(eligible, rejected, rows, min((s.window for s in eligible), default=0),
                     all(s.caps.vision for s in eligible), prices, tiebreak, by_tiebreak,
                     Priced(prices, estimates, {s.key: e for s, e in zip(eligible, estimates)}),
                     _explicit_out(needs))


def _explicit_out(needs: Needs) -> bool:
    return "expected_output_tokens" in needs.model_fields_set


@dataclass(frozen=True, slots=True)
class Priced:
    """A node's output estimate per prefiltered model, and the prices `rank` uses."""

    prices: list[tuple[float, float]]
    """Per prefiltered row: $/input token, and the cost of the estimated output (p50)."""
    estimates: list[TokenEstimate]
    """Per prefiltered row (a Candidate's `order`): the output estimate."""
    by_key: dict[str, TokenEstimate]
    """The estimates by model key (`provider/model`)."""


def priced(static: Prefilter, needs: Needs, node: str | None,
           verbosity: Verbosity | None) -> Priced:
    """The expected output of each of `static`'s models on `node` (a run computes it once
    per node; `verbosity` None: the prior)."""
    if (static.prior is not None and (verbosity is None or not verbosity.knows(node))
            and static.explicit_out == _explicit_out(needs)):
        return static.prior  # nothing measured of this node: the prior, computed once
    v = verbosity if verbosity is not None else Verbosity()
    estimates = [v.estimate(node, needs, row[0]) for row in static.rows]
    return Priced([(row[1], e.p50 * row[2]) for row, e in zip(static.rows, estimates)],
                  estimates, {row[0].key: e for row, e in zip(static.rows, estimates)})


def rank(
    catalog: Catalog,
    needs: Needs,
    messages: Sequence[BaseMessage] = (),
    *,
    tools: Sequence[Any] = (),
    budget_left: float | None = None,
    input_tokens: int | None = None,
    prefiltered: Prefilter | None = None,
    prices: Priced | None = None,
    deadline_s: float | None = None,
    now: datetime | None = None,
    margin: Margin = DEADLINE_MARGIN,
) -> Ranking:
    """Capable models for a call with `messages`, cheapest expected cost first.

    Ties are broken by quality (mean over the needed skills, else all), then latency.
    `prefiltered` is `prefilter(catalog, needs)` when the caller keeps it (per run), and
    `prices` its models' output estimates on the node (default: the prior's).

    `deadline_s`: the seconds left until the node's deadline (None: no deadline, standard
    tier only). With it each model is a candidate once per tier that can answer in time
    (`Candidate.tier`), priced at `now` (default: the current time), and `tier_notes` says
    why the other offered tiers could not be used.
    """
    static = prefiltered if prefiltered is not None else prefilter(catalog, needs)
    out_prices = prices.prices if prices is not None else static.prices
    n_in = input_tokens if input_tokens is not None else estimate_tokens(messages, tools)
    context_needed = n_in + (needs.max_output_tokens or needs.expected_output_tokens)
    # Images matter only when a capable model cannot read them.
    images = (bool(messages) and not needs.vision and not static.all_vision
              and has_images(messages))
    max_cost = needs.max_cost_per_call
    if (deadline_s is None and context_needed <= static.min_window and not images
            and max_cost is None and budget_left is None):
        # The routed call's usual case: nothing is rejected per call, only the order
        # depends on its size. Sorting (cost, tie-break place) pairs is the same order as
        # (cost, -quality, latency, catalog order), and plain tuples sort fastest.
        costs = [n_in * p_in + out for p_in, out in out_prices]
        return Ranking._lazy(sorted(zip(costs, static.tiebreak)), static,
                             list(static.rejected), n_in)
    rejected = list(static.rejected)
    ranked: list[Candidate] = []
    if deadline_s is not None:
        return _rank_by_deadline(static, prices, n_in, context_needed, images, max_cost,
                                 budget_left, deadline_s, now, margin)
    for i, (spec, p_in, _, window, vision, neg_quality, latency) in enumerate(static.rows):
        cost = n_in * p_in + out_prices[i][1]
        reasons = _call_reasons(window, vision, context_needed, images)
        reasons += _cost_reasons(cost, max_cost, budget_left)
        if reasons:
            rejected.append((spec, reasons))
        else:
            ranked.append(_new(Candidate, (cost, neg_quality, latency, i, spec, _STANDARD)))
    ranked.sort()
    return Ranking(ranked, rejected, n_in)


def _call_reasons(window: int, vision: bool, context_needed: int, images: bool) -> list[str]:
    reasons: list[str] = []
    if window < context_needed:
        reasons.append(f"context {window} < {context_needed} tokens needed")
    if images and not vision:
        reasons.append("messages hold images; no image input")
    return reasons


def _cost_reasons(cost: float, max_cost: float | None, budget_left: float | None) -> list[str]:
    reasons: list[str] = []
    if max_cost is not None and cost > max_cost:
        reasons.append(f"expected ${cost:.6f} > max_cost_per_call ${max_cost}")
    if budget_left is not None and cost > budget_left:
        reasons.append(f"expected ${cost:.6f} > budget left ${budget_left:.6f}")
    return reasons


_SLOW_TIERS = ((1, Tier.BATCH), (2, Tier.FLEX), (3, Tier.OFF_PEAK))
"""Each slower tier and the multiple of the row count its candidates' `order` is offset
by (distinct orders: two candidates never compare their specs)."""


def _rank_by_deadline(static: Prefilter, prices: Priced | None, n_in: int, context_needed: int,
                      images: bool, max_cost: float | None, budget_left: float | None,
                      left_s: float, now: datetime | None, margin: Margin) -> Ranking:
    """`rank` with a deadline: every capable model on each tier it can meet it on."""
    now = now.astimezone(UTC) if now is not None and now.tzinfo else (
        now.replace(tzinfo=UTC) if now is not None else datetime.now(UTC))
    estimates = (prices if prices is not None else static.prior or priced(
        static, Needs(), None, None)).estimates
    n = len(static.rows)
    rejected = list(static.rejected)
    ranked: list[Candidate] = []
    notes: list[tuple[ModelSpec, Tier, str]] = []
    safety = margin(left_s)
    for i, (spec, _, _, window, vision, neg_quality, latency) in enumerate(static.rows):
        reasons = _call_reasons(window, vision, context_needed, images)
        if reasons:
            rejected.append((spec, reasons))
            continue
        est = estimates[i]
        p_in, p_out = tier_prices(spec, Tier.STANDARD, now)
        standard = n_in * p_in + est.p50 * p_out
        call_s = standard_call_s(spec, est.p90)
        rows = [(standard, latency, i, _STANDARD)]
        for k, tier in _SLOW_TIERS:
            terms = tier_terms(spec, tier)
            if terms is None:
                continue
            wait_s, at = _tier_wait(spec, tier, terms.turnaround_p90_s, terms.latency_s, now)
            why = _too_late(tier, wait_s, at, now, safety, call_s, left_s)
            if why is None:
                t_in, t_out = tier_prices(spec, tier, at)
                cost = n_in * t_in + est.p50 * t_out + terms.miss_rate * standard
                if tier is Tier.OFF_PEAK and cost >= standard:
                    why = f"off_peak: ${cost:.6f} is not cheaper than now (${standard:.6f})"
                else:
                    expected_ms = (terms.turnaround_p50_s if at is None
                                   else wait_s + spec.latency_ms / 1000) * 1000
                    rows.append((cost, max(latency, expected_ms), i + n * k, tier))
            if why is not None:
                notes.append((spec, tier, why))
        kept = 0
        first_reasons: list[str] = []
        for cost, ms, order, tier in rows:
            too_dear = _cost_reasons(cost, max_cost, budget_left)
            if too_dear:
                if tier is _STANDARD:
                    first_reasons = too_dear
                else:
                    notes.append((spec, tier, f"{tier.value}: {'; '.join(too_dear)}"))
                continue
            kept += 1
            ranked.append(_new(Candidate, (cost, neg_quality, ms, order, spec, tier)))
        if not kept:
            rejected.append((spec, first_reasons))
    ranked.sort()
    return Ranking(ranked, rejected, n_in, tuple(notes))


def _tier_wait(spec: ModelSpec, tier: Tier, p90_s: float, latency_s: float | None,
               now: datetime) -> tuple[float, datetime | None]:
    """How long `tier` may take to answer (seconds), and for off_peak when its window opens."""
    if tier is Tier.OFF_PEAK:
        window = next_off_peak(spec, now)
        if window is None:
            return float("inf"), None
        return (window[0] - now).total_seconds(), window[0]
    if tier is Tier.FLEX and latency_s is not None:
        return latency_s, None
    return p90_s, None


def _too_late(tier: Tier, wait_s: float, at: datetime | None, now: datetime, safety: float,
              call_s: float, left_s: float) -> str | None:
    """Why `tier` cannot answer in the `left_s` seconds left (None: it can)."""
    if tier is Tier.OFF_PEAK and at is not None and wait_s <= 0:
        return "off_peak: in its cheaper window now (the standard row has its price)"
    if wait_s + safety + call_s <= left_s:
        return None
    tail = f"+ margin {_span(safety)} + standard call {_span(call_s)} > {_span(left_s)} left"
    if tier is Tier.BATCH:
        return f"batch: turnaround p90 {_span(wait_s)} {tail}"
    if tier is Tier.FLEX:
        return f"flex: latency up to {_span(wait_s)} {tail}"
    if at is None:
        return "off_peak: no cheaper window ahead"
    return f"off_peak: window opens {at:%H:%M} UTC (in {_span(wait_s)}) {tail}"


def _span(seconds: float) -> str:
    """`4h`, `1h30m`, `36m`, `9s`: a duration as ranking's reasons show it."""
    s = max(0, round(seconds))
    if s >= 3600:
        h, m = divmod(s // 60, 60)
        return f"{h}h{m}m" if m else f"{h}h"
    if s >= 60:
        return f"{s // 60}m"
    return f"{s}s"


def explain(
    catalog: Catalog,
    needs: Needs,
    messages: Sequence[BaseMessage] = (),
    *,
    input_tokens: int | None = None,
    budget_left: float | None = None,
    node: str | None = None,
    measured: Measurements | None = None,
    verbosity: Verbosity | None = None,
    deadline_s: float | None = None,
    now: datetime | None = None,
) -> list[dict[str, Any]]:
    """Every catalog model, accepted (with its rank and expected cost) or rejected (why),
    and what was measured of it on `node` (`measured`: "measured: n, rate, interval" or
    "prior only"); with measurements, quality is judged on them where they exist.

    Each model that passed the static needs also shows its output estimate on `node`
    (`output_tokens`, `output_tokens_p90`, `output_source`; from `verbosity`, else the prior).

    With `deadline_s` (seconds left until the node's deadline) a model has one row per tier
    it can meet the deadline on (`tier`), the first row is marked `chosen`, and each tier a
    model is offered but cannot use has a rejected row saying why (e.g. `batch: turnaround
    p90 4h + margin 36m + standard call 9s > 1h left`).
    """
    static = (prefilter(catalog, needs, measured.judge(node, needs))
              if measured is not None and measured.covers(node) else prefilter(catalog, needs))
    pr = priced(static, needs, node, verbosity)
    ranking = rank(
        catalog, needs, messages, input_tokens=input_tokens, budget_left=budget_left,
        prefiltered=static, prices=pr, deadline_s=deadline_s, now=now,
    )
    tiered = deadline_s is not None
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(ranking.candidates, 1):
        rows.append(
            {"model": c.spec.key, "accepted": True, "rank": i,
             "expected_cost_usd": c.expected_cost, "reasons": []}
            | ({"tier": c.tier.value, "chosen": i == 1} if tiered else {})
        )
    for spec, tier, why in ranking.tier_notes:
        rows.append({"model": spec.key, "accepted": False, "rank": None,
                     "expected_cost_usd": None, "reasons": [why], "tier": tier.value,
                     "chosen": False})
    for spec, reasons in ranking.rejected:
        rows.append({"model": spec.key, "accepted": False, "rank": None,
                     "expected_cost_usd": None, "reasons": reasons}
                    | ({"tier": None, "chosen": False} if tiered else {}))
    for row in rows:
        row["measured"] = measured_note(measured, node, row["model"])
    return _with_output_estimates(rows, pr)


def _with_output_estimates(rows: list[dict[str, Any]], pr: Priced) -> list[dict[str, Any]]:
    for r in rows:
        e = pr.by_key.get(r["model"])
        r["output_tokens"] = round(e.p50) if e is not None else None
        r["output_tokens_p90"] = round(e.p90) if e is not None else None
        r["output_source"] = e.source if e is not None else None
    return rows


def measured_note(measured: Measurements | None, node: str | None, model: str) -> str:
    """`measured: n=48, rate 0.94 [0.83, 0.98] (eval:abc, production)`, or `prior only`."""
    rate = measured.rate(node, model) if measured is not None else None
    return rate.describe() if rate is not None else "prior only"


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
