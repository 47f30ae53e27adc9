"""How many output tokens a model writes on a node: measured, else a per-model prior.

A `TokenEstimate` is the median and a high quantile (p90 by default) of the output tokens a
call bills, hidden reasoning tokens included, and where the numbers come from. `Verbosity`
holds a run's estimates per node x model. Precedence, first that applies:

1. measured in production: the ledger's recent successful calls of this node and model,
   "measured (ledger, n=..)";
2. measured by an evaluation: a stored policy's evidence, "measured (eval:..)";
3. the node's own `Needs(expected_output_tokens=...)` when set explicitly, for the visible
   answer ("node setting"), plus the model's reasoning prior for reasoning models;
4. the per-model verbosity prior (frugalflow/data/verbosity.toml: relative answer length on
   MMLU-Pro, and hidden reasoning tokens), scaled from the default 400 tokens;
5. the default, 400 tokens ("node default").

Measurement wins over the node's setting: a node's number is one guess for every model,
while models given the same prompt differ by 10x (the data file's table). A node that must
not exceed a length says so with `max_output_tokens`, which bounds every estimate.
"""

from __future__ import annotations

import asyncio
import functools
import math
import time
import tomllib
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import resources
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .catalog import ModelSpec
    from .needs import Needs
    from .persistence.store import Store
    from .policies import Policy

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "HIGH_QUANTILE",
    "MIN_MEASURED",
    "TokenEstimate",
    "Verbosity",
    "VerbosityCache",
    "VerbosityPrior",
    "ledger_rows",
    "prior_estimate",
]

DEFAULT_OUTPUT_TOKENS = 400
"""What a node that says nothing expects of the median model."""
HIGH_QUANTILE = 0.9
"""The quantile budgets reserve (`TokenEstimate.p90`)."""
MIN_MEASURED = 1
"""Ledger calls of a node x model before their measurement replaces the prior (one call
says more of a model on a node than a guess made for every model; the max output keeps
the budget whatever the estimate)."""
SMALL_SAMPLE = 20
"""Below this many calls, the high quantile is at least the prior's p90/p50 spread times
the median (the quantile of a few calls understates the tail)."""
LEDGER_WINDOW = timedelta(days=14)
"""How far back the ledger is read at a run's start."""
LEDGER_ROWS = 20_000
"""The newest successful calls read at a run's start (one query per flow)."""
PER_PAIR = 500
"""The newest calls of one node x model an estimate is made of."""
CACHE_SECONDS = 60.0
"""A runner reuses a flow's estimates this long (every run's start would query otherwise)..."""
REFRESH_SECONDS = 1.0
"""... or this long once a run of the flow ended in the runner (its calls are news)."""


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    """Output tokens of one node's calls to one model, as billed (reasoning included)."""

    p50: float
    p90: float
    """The high quantile (`HIGH_QUANTILE`, p90 unless configured): what budgets reserve."""
    reasoning_p50: float = 0.0
    """The hidden reasoning part of `p50` (0 when none, or not reported)."""
    reasoning_p90: float = 0.0
    n: int = 0
    """Calls measured (0 for a prior)."""
    source: str = "node default"

    def bounded(self, limit: int | None) -> TokenEstimate:
        """This estimate with no quantile above `limit` (a node's max_output_tokens)."""
        if limit is None or self.p90 <= limit:
            return self
        return TokenEstimate(min(self.p50, limit), float(limit), min(self.reasoning_p50, limit),
                             min(self.reasoning_p90, limit), self.n, self.source)

    def describe(self) -> str:
        """e.g. `~120 out (p90 300), measured (ledger, n=40)`."""
        return f"~{self.p50:.0f} out (p90 {self.p90:.0f}), {self.source}"


# -- the prior -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VerbosityPrior:
    """The per-model prior of frugalflow/data/verbosity.toml, by catalog `quality_ref`."""

    relative: Mapping[str, float]
    """Median answer length relative to the median model."""
    reasoning: Mapping[str, float]
    """Hidden reasoning tokens per visible output token, where the file names the model."""
    spread: float = 2.5
    """p90 / p50 of answer lengths (the median over the source's models)."""
    reasoning_default: float = 3.0
    """Reasoning tokens per visible token of a reasoning model the file does not name."""

    @staticmethod
    @functools.cache
    def builtin() -> VerbosityPrior:
        text = (resources.files("frugalflow") / "data" / "verbosity.toml").read_text()
        data = tomllib.loads(text)
        meta, models = data["meta"], data.get("models", {})
        return VerbosityPrior(
            relative={k: float(v["relative"]) for k, v in models.items() if "relative" in v},
            reasoning={k: float(v["reasoning"]) for k, v in models.items() if "reasoning" in v},
            spread=float(meta["spread"]), reasoning_default=float(meta["reasoning_default"]))

    def of(self, spec: ModelSpec) -> tuple[float | None, float]:
        """(relative verbosity or None when unknown, reasoning tokens per visible token)."""
        ref = spec.quality_ref or spec.model
        reasoning = (self.reasoning.get(ref, self.reasoning_default)
                     if spec.caps.reasoning else 0.0)
        return self.relative.get(ref), reasoning


def prior_estimate(needs: Needs, spec: ModelSpec,
                   prior: VerbosityPrior | None = None) -> TokenEstimate:
    """What is expected of `spec` on a node with `needs` before anything is measured."""
    prior = prior if prior is not None else VerbosityPrior.builtin()
    relative, reasoning = prior.of(spec)
    if "expected_output_tokens" in needs.model_fields_set:
        visible, source = float(needs.expected_output_tokens), "node setting"
    elif relative is not None:
        visible, source = DEFAULT_OUTPUT_TOKENS * relative, "prior (model verbosity)"
    else:
        visible, source = float(DEFAULT_OUTPUT_TOKENS), "node default"
    if reasoning and source != "prior (model verbosity)":
        source += " + reasoning prior"
    p50 = visible * (1 + reasoning)
    estimate = TokenEstimate(p50, p50 * prior.spread, visible * reasoning,
                             visible * reasoning * prior.spread, 0, source)
    return estimate.bounded(_limit(needs, spec))


def _limit(needs: Needs, spec: ModelSpec) -> int:
    return min(needs.max_output_tokens or spec.max_output, spec.max_output)


# -- measurements -------------------------------------------------------------------------


def quantile(values: list[float], q: float) -> float:
    """The nearest-rank quantile of sorted `values` (non-empty)."""
    return values[min(len(values) - 1, max(0, math.ceil(q * len(values)) - 1))]


def measured(values: Iterable[tuple[int, int | None]], *, q: float = HIGH_QUANTILE,
             source: str = "ledger", spread: float | None = None) -> TokenEstimate | None:
    """The estimate of (output tokens, reasoning tokens or None) pairs; None when empty.
    Below `SMALL_SAMPLE` pairs the high quantile is at least `spread` (default: the prior's)
    times the median."""
    pairs = list(values)
    if not pairs:
        return None
    out = sorted(float(o) for o, _ in pairs)
    reasoning = sorted(float(r or 0) for _, r in pairs)
    p50, high = quantile(out, 0.5), quantile(out, q)
    r50, r_high = quantile(reasoning, 0.5), quantile(reasoning, q)
    if len(pairs) < SMALL_SAMPLE:
        floor = spread if spread is not None else VerbosityPrior.builtin().spread
        high, r_high = max(high, p50 * floor), max(r_high, r50 * floor)
    return TokenEstimate(p50, high, r50, r_high, len(pairs), f"measured ({source}, n={len(pairs)})")


@dataclass(frozen=True)
class Verbosity:
    """A run's output-token estimates per node x model (see the module for precedence)."""

    ledger: Mapping[tuple[str, str], TokenEstimate] = field(default_factory=dict)
    """(node, `provider/model`) -> measured in production."""
    evaluated: Mapping[tuple[str, str], TokenEstimate] = field(default_factory=dict)
    """(node, `provider/model`) -> measured by an evaluation (a stored policy's evidence)."""
    min_measured: int = MIN_MEASURED
    prior: VerbosityPrior | None = None
    _nodes: frozenset[str] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        nodes = {n for n, _ in self.ledger} | {n for n, _ in self.evaluated}
        object.__setattr__(self, "_nodes", frozenset(nodes))

    def knows(self, node: str | None) -> bool:
        """Whether `node`'s estimates differ from the built-in prior's (something of it was
        measured, or this holds its own prior)."""
        return self.prior is not None or node in self._nodes

    def estimate(self, node: str | None, needs: Needs, spec: ModelSpec) -> TokenEstimate:
        if node is not None:
            key = (node, spec.key)
            hit = self.ledger.get(key)
            if hit is not None and hit.n >= self.min_measured:
                return hit.bounded(_limit(needs, spec))
            hit = self.evaluated.get(key)
            if hit is not None:
                return hit.bounded(_limit(needs, spec))
        return prior_estimate(needs, spec, self.prior)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, str, int, int | None]], *,
                  q: float = HIGH_QUANTILE, per_pair: int = PER_PAIR) -> Verbosity:
        """From (node, model, output tokens, reasoning tokens) rows, newest first."""
        grouped: dict[tuple[str, str], list[tuple[int, int | None]]] = defaultdict(list)
        for node, model, out, reasoning in rows:
            calls = grouped[(node, model)]
            if len(calls) < per_pair:
                calls.append((out, reasoning))
        ledger = {k: e for k, v in grouped.items() if (e := measured(v, q=q)) is not None}
        return cls(ledger=ledger)

    def with_policy(self, policy: Policy) -> Verbosity:
        """These estimates plus a stored policy's measured evidence (output tokens per node x
        model, as billed: reasoning included)."""
        evaluated = dict(self.evaluated)
        for node, node_policy in policy.nodes.items():
            for model, ev in node_policy.models.items():
                if ev.output_tokens_p50 is None:
                    continue
                p90 = ev.output_tokens_p90 if ev.output_tokens_p90 is not None \
                    else ev.output_tokens_p50
                evaluated[(node, model)] = TokenEstimate(
                    ev.output_tokens_p50, p90, ev.reasoning_tokens_p50 or 0.0,
                    ev.reasoning_tokens_p90 or 0.0, ev.n,
                    f"measured ({ev.source or 'eval'}, n={ev.n})")
        return Verbosity(self.ledger, evaluated, self.min_measured, self.prior)


async def ledger_rows(store: Store, *, flow: str | None, since: datetime,
                      limit: int = LEDGER_ROWS) -> list[tuple[str, str, int, int | None]]:
    """(node, model, output tokens, reasoning tokens) of the newest successful calls."""
    from sqlalchemy import select

    from .persistence.tables import AttemptRow
    from .statuses import Outcome

    c = AttemptRow.__table__.c  # type: ignore[attr-defined]
    q = (select(c.node, c.model, c.output_tokens, c.reasoning_tokens)
         .where(c.outcome == Outcome.OK, c.started_at >= since, c.output_tokens > 0)
         .order_by(c.id.desc()).limit(limit))
    if flow is not None:
        q = q.where(c.flow == flow)
    await store.setup()
    async with store.read() as conn:
        rows = (await conn.execute(q)).all()
    return [(str(r[0]), str(r[1]), int(r[2]), r[3]) for r in rows]


class VerbosityCache:
    """A runner's estimates per flow, read from its ledger at most every `ttl` seconds, or
    every `refresh` seconds after a run of the flow ended here."""

    def __init__(self, *, q: float = HIGH_QUANTILE, ttl: float = CACHE_SECONDS,
                 refresh: float = REFRESH_SECONDS, window: timedelta = LEDGER_WINDOW) -> None:
        self.q, self.ttl, self.refresh, self.window = q, ttl, refresh, window
        self._cache: dict[str | None, tuple[float, Verbosity]] = {}
        self._ran: set[str | None] = set()

    def ran(self, flow: str | None) -> None:
        """A run of `flow` ended here: its calls are in the ledger."""
        self._ran.add(flow)

    async def get(self, store: Store, flow: str | None) -> Verbosity:
        now = time.monotonic()
        hit = self._cache.get(flow)
        if hit is not None:
            age = now - hit[0]
            if age < (self.refresh if flow in self._ran else self.ttl):
                return hit[1]
        self._ran.discard(flow)
        since = datetime.now(timezone.utc) - self.window
        rows = await ledger_rows(store, flow=flow, since=since)
        # Grouping thousands of rows is CPU work: off the event loop.
        verbosity = await asyncio.to_thread(Verbosity.from_rows, rows, q=self.q)
        self._cache[flow] = (now, verbosity)
        return verbosity

    def forget(self) -> None:
        """Read the ledger again at the next run's start."""
        self._cache.clear()
