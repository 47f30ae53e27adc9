"""The evaluation report: per node and model what was measured (pass rate with its interval,
errors, cost per call and per success, latency, tokens), the cost-quality frontier and hull,
and the cheapest policy that meets a target pass rate, with its saving on real volume.

`build_report(cells)` computes it; a `Report` prints as a rich table, states one line per
node (`summary_lines`), serialises to stable JSON (`to_json`, keys below), becomes a stored
node policy (`policy`), and draws itself (`frugalflow.evaluation.chart`; inline in notebooks).

JSON keys (`Report.to_json()`, version 1)::

    version, target, confidence, nodes: [node], savings: savings | null
    node: node (null: the whole flow), current, choice, verdict, summary, frontier, hull,
          models: [row], savings: node savings | null
    choice: models, shares, assured_pass, expected_pass, expected_cost_usd (null: none)
    row: model, cells, n, passes, errors, pass_rate, interval, error_rate,
         cost_per_call_usd, cost_per_success_usd, total_cost_usd, latency_ms_p50,
         latency_ms_p95, output_tokens_mean, reasoning_tokens_mean, output_tokens_p50,
         output_tokens_p90, reasoning_tokens_p50, reasoning_tokens_p90, on_frontier, on_hull,
         share (of calls in the choice; 0: not chosen)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from ..exceptions import UserError
from ..policies import Choice, Evidence, NodePolicy
from ..policies import Policy as NodePolicies
from .cases import Cell
from .frontier import Interval, Measured, Policy, cheapest_policy, frontier, lower_hull, wilson
from .savings import NodeSavings, Savings, Volume, money as _money, reprice

if TYPE_CHECKING:
    from rich.table import Table

    from ..catalog import Catalog

__all__ = ["JSON_VERSION", "WHOLE_FLOW", "ModelStats", "NodeReport", "Report", "build_report",
           "quantile"]

JSON_VERSION = 1
WHOLE_FLOW = "*"
"""The node name a whole-flow (end to end) evaluation is stored under in a node policy."""
_PER = 10_000  # "per 10k runs" (or calls, without recorded volume)


def quantile(values: Sequence[float], q: float) -> float | None:
    """The `q` quantile of `values`, linear between order statistics (numpy's default);
    None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


@dataclass(frozen=True, slots=True)
class ModelStats:
    """One model on one node. `n` counts scored cells (errors apart); cost per call is the
    mean over answered (scored) cells; cost per success is everything paid, errors included,
    over the passes (None when nothing passed). Latency and tokens are over answered cells."""

    node: str | None
    model: str
    cells: int
    n: int
    passes: int
    errors: int
    interval: Interval
    cost_per_call: float
    cost_per_success: float | None
    total_cost: float
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    output_tokens_mean: float | None = None
    reasoning_tokens_mean: float | None = None
    output_tokens_p50: float | None = None
    output_tokens_p90: float | None = None
    reasoning_tokens_p50: float | None = None
    reasoning_tokens_p90: float | None = None

    @property
    def rate(self) -> float:
        return self.passes / self.n if self.n else 0.0

    @property
    def error_rate(self) -> float:
        """Errors over every cell (a model that cannot answer is a cost, not a sample)."""
        return self.errors / self.cells if self.cells else 0.0

    def measured(self) -> Measured:
        return Measured(self.model, self.n, self.passes, self.cost_per_call)

    def evidence(self, source: str = "") -> Evidence:
        return Evidence(
            n=self.n, passes=self.passes, errors=self.errors, cost_usd=self.cost_per_call,
            latency_ms_p50=self.latency_ms_p50, output_tokens_p50=self.output_tokens_p50,
            output_tokens_p90=self.output_tokens_p90,
            reasoning_tokens_p50=self.reasoning_tokens_p50,
            reasoning_tokens_p90=self.reasoning_tokens_p90, source=source)

    @classmethod
    def of(cls, node: str | None, model: str, cells: Sequence[Cell],
           confidence: float = 0.95) -> ModelStats:
        answered = [c for c in cells if c.scored]
        passes = sum(c.passed for c in answered)
        total = sum(c.cost_usd for c in cells)
        latency = [c.latency_ms for c in answered]
        out = [float(c.output_tokens) for c in answered]
        thought = [float(c.reasoning_tokens) for c in answered]
        return cls(
            node=node, model=model, cells=len(cells), n=len(answered), passes=passes,
            errors=len(cells) - len(answered), interval=wilson(passes, len(answered), confidence),
            cost_per_call=_mean([c.cost_usd for c in answered]) or 0.0,
            cost_per_success=total / passes if passes else None, total_cost=total,
            latency_ms_p50=quantile(latency, 0.5), latency_ms_p95=quantile(latency, 0.95),
            output_tokens_mean=_mean(out), reasoning_tokens_mean=_mean(thought),
            output_tokens_p50=quantile(out, 0.5), output_tokens_p90=quantile(out, 0.9),
            reasoning_tokens_p50=quantile(thought, 0.5),
            reasoning_tokens_p90=quantile(thought, 0.9))

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model, "cells": self.cells, "n": self.n, "passes": self.passes,
            "errors": self.errors, "pass_rate": self.rate,
            "interval": [self.interval.low, self.interval.high], "error_rate": self.error_rate,
            "cost_per_call_usd": self.cost_per_call,
            "cost_per_success_usd": self.cost_per_success, "total_cost_usd": self.total_cost,
            "latency_ms_p50": self.latency_ms_p50, "latency_ms_p95": self.latency_ms_p95,
            "output_tokens_mean": self.output_tokens_mean,
            "reasoning_tokens_mean": self.reasoning_tokens_mean,
            "output_tokens_p50": self.output_tokens_p50,
            "output_tokens_p90": self.output_tokens_p90,
            "reasoning_tokens_p50": self.reasoning_tokens_p50,
            "reasoning_tokens_p90": self.reasoning_tokens_p90,
        }


def _share(share: float) -> str:
    """A mix's share, never shown as 0% or 100% when it is neither."""
    return f"{share:.0%}" if 0.01 <= share <= 0.99 else f"{share:.1%}"


@dataclass(frozen=True, slots=True)
class NodeReport:
    """One node (None: the whole flow): its models cheapest first, the frontier and hull
    (model keys), the chosen policy for the target (None: no model meets it at this n)."""

    node: str | None
    rows: tuple[ModelStats, ...]
    frontier: tuple[str, ...]
    hull: tuple[str, ...]
    choice: Policy | None
    target: float
    confidence: float
    current: str | None = None
    savings: NodeSavings | None = None

    @property
    def name(self) -> str:
        return self.node if self.node is not None else "(flow)"

    def row(self, model: str) -> ModelStats | None:
        return next((r for r in self.rows if r.model == model), None)

    def share(self, model: str) -> float:
        """The share of calls the choice gives `model` (0: not chosen)."""
        return dict(self.choice.shares).get(model, 0.0) if self.choice else 0.0

    @property
    def best_low(self) -> float:
        """The best lower bound any model reached (what a "no choice" is short of)."""
        return max((r.interval.low for r in self.rows if r.n), default=0.0)

    @property
    def expected_pass(self) -> float | None:
        """The choice's expected pass rate: its shares' mix of the observed rates."""
        if self.choice is None:
            return None
        rows = {r.model: r for r in self.rows}
        return sum(s * rows[m].rate for m, s in self.choice.shares)

    def verdict(self) -> str:
        """What the choice is, or why there is none."""
        if self.choice is None:
            return (f"no model meets {self.target:.2f} at this n (best lower bound "
                    f"{self.best_low:.2f}: add cases)")
        return self.choice.describe()

    def _proposal(self) -> str:
        assert self.choice is not None
        if len(self.choice.shares) == 1:
            model = self.choice.shares[0][0]
            row = self.row(model)
            assert row is not None
            return f"{model}, pass {row.rate:.2f} {row.interval}"
        mix = " + ".join(f"{_share(s)} {m}" for m, s in self.choice.shares)
        return f"{mix}, pass {self.expected_pass:.2f} (>= {self.choice.assured_rate:.2f})"

    def _cost_change(self) -> str:
        assert self.choice is not None
        if self.savings is not None:
            s = self.savings
            per = "runs" if s.runs else "calls"
            before, after = s.per_10k()
            change = f"{s.change_pct:+.0f}% cost, " if s.before_usd else ""
            return f"{change}{_money(before)} -> {_money(after)} per 10k {per}"
        after = self.choice.expected_cost * _PER
        now = self.row(self.current) if self.current else None
        if now is None or now.n == 0:
            return f"{_money(after)} per 10k calls"
        before = now.cost_per_call * _PER
        change = f"{(after - before) / before * 100:+.0f}% cost, " if before else ""
        return f"{change}{_money(before)} -> {_money(after)} per 10k calls"

    def summary_line(self) -> str:
        """"draft: a -> b, pass 0.96 [0.91, 0.98], -62% cost, $41 -> $15 per 10k runs"."""
        if self.choice is None:
            return f"{self.name}: {self.verdict()}"
        models = [m for m, _ in self.choice.shares]
        if self.current is not None and models == [self.current]:
            head = f"{self.name}: keep {self._proposal()}"
        else:
            head = (f"{self.name}: {self.current} -> {self._proposal()}" if self.current
                    else f"{self.name}: {self._proposal()}")
        return f"{head}, {self._cost_change()}"

    def choice_json(self) -> dict[str, Any] | None:
        if self.choice is None:
            return None
        return {"models": [m for m, _ in self.choice.shares],
                "shares": [s for _, s in self.choice.shares],
                "assured_pass": self.choice.assured_rate, "expected_pass": self.expected_pass,
                "expected_cost_usd": self.choice.expected_cost}

    def to_json(self) -> dict[str, Any]:
        models = []
        for r in self.rows:
            models.append(r.to_json() | {"on_frontier": r.model in self.frontier,
                                         "on_hull": r.model in self.hull,
                                         "share": self.share(r.model)})
        return {"node": self.node, "current": self.current, "choice": self.choice_json(),
                "verdict": self.verdict(), "summary": self.summary_line(),
                "frontier": list(self.frontier), "hull": list(self.hull), "models": models,
                "savings": self.savings.to_json() if self.savings else None}

    def node_policy(self, source: str = "") -> NodePolicy:
        choice = None
        if self.choice is not None:
            single = len(self.choice.shares) == 1
            choice = Choice(models=tuple(m for m, _ in self.choice.shares),
                            shares=() if single else tuple(s for _, s in self.choice.shares),
                            target=self.target, expected_pass=self.expected_pass,
                            expected_cost_usd=self.choice.expected_cost)
        return NodePolicy(models={r.model: r.evidence(source) for r in self.rows}, choice=choice)


@dataclass(frozen=True)
class Report:
    """What an evaluation found, per node: see the module docstring for its JSON."""

    rows: tuple[ModelStats, ...]
    per_node: dict[str | None, NodeReport]
    target: float
    confidence: float
    savings: Savings | None = None
    _png: list[bytes] = field(default_factory=list, repr=False, compare=False)

    def __repr__(self) -> str:  # a notebook's text form: what it says, not every field
        return "\n".join([f"Report(target={self.target}, confidence={self.confidence})",
                          *self.summary_lines()])

    def summary_lines(self) -> list[str]:
        """One line per node: the proposed move, its pass rate and its saving; with recorded
        volume, a last line for the whole flow."""
        lines = [n.summary_line() for n in self.per_node.values()]
        if self.savings is not None:
            lines.append(self.savings.total_line())
        return lines

    def to_json(self) -> dict[str, Any]:
        return {"version": JSON_VERSION, "target": self.target, "confidence": self.confidence,
                "nodes": [n.to_json() for n in self.per_node.values()],
                "savings": self.savings.to_json() if self.savings else None}

    def policy(self, flow: str, source: str | None = None) -> NodePolicies:
        """The node policy this report supports (a whole-flow evaluation is stored under
        `WHOLE_FLOW`), its evidence marked with `source` (e.g. `eval:<id>`)."""
        nodes = {(n.node if n.node is not None else WHOLE_FLOW): n.node_policy(source or "")
                 for n in self.per_node.values()}
        return NodePolicies(flow=flow, nodes=nodes, source=source)

    def rich_table(self) -> Table:
        return _rich_table(self)

    def __rich__(self) -> Table:
        return self.rich_table()

    def _repr_png_(self) -> bytes:
        """The chart, for notebooks (drawn once)."""
        if not self._png:
            from .chart import png_bytes

            self._png.append(png_bytes(self))
        return self._png[0]


def _opt(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _rich_table(report: Report) -> Table:
    from rich.table import Table

    table = Table(title=f"Evaluation: target pass {report.target:.2f} "
                        f"(lower bound of the {report.confidence:.0%} interval)")
    for name in ("node", "model", "n", "pass", "interval", "errors", "$/call", "$/success",
                 "p50 ms", "p95 ms", "out tok p50", ""):
        table.add_column(name, justify="left" if name in ("node", "model", "") else "right")
    for n in report.per_node.values():
        for r in n.rows:
            marks = []
            if n.share(r.model):
                marks.append(f"chosen {n.share(r.model):.0%}")
            if r.model == n.current:
                marks.append("current")
            marks.append("hull" if r.model in n.hull else
                         "frontier" if r.model in n.frontier else "")
            style = "bold green" if n.share(r.model) else None
            table.add_row(n.name, r.model, str(r.n), f"{r.rate:.2f}", str(r.interval),
                          f"{r.error_rate:.0%}", f"{r.cost_per_call:.6f}",
                          _opt(r.cost_per_success, ".6f"), _opt(r.latency_ms_p50, ".0f"),
                          _opt(r.latency_ms_p95, ".0f"), _opt(r.output_tokens_p50, ".0f"),
                          " ".join(m for m in marks if m), style=style)
        line = n.summary_line().removeprefix(f"{n.name}: ")
        table.add_row(n.name, line, *[""] * 10, style="italic", end_section=True)
    if report.savings is not None:
        table.caption = report.savings.total_line()
    return table


def _group(cells: Sequence[Cell]) -> dict[str | None, dict[str, list[Cell]]]:
    groups: dict[str | None, dict[str, list[Cell]]] = {}
    for c in cells:
        groups.setdefault(c.node, {}).setdefault(c.model, []).append(c)
    return groups


def _node_report(node: str | None, by_model: Mapping[str, Sequence[Cell]], *, target: float,
                 confidence: float, current: str | None) -> NodeReport:
    stats = [ModelStats.of(node, m, cs, confidence) for m, cs in by_model.items()]
    stats.sort(key=lambda r: (r.cost_per_call, -r.rate, r.model))
    points = [r.measured() for r in stats]
    return NodeReport(
        node=node, rows=tuple(stats), frontier=tuple(m.model for m in frontier(points)),
        hull=tuple(m.model for m in lower_hull(points, confidence)),
        choice=cheapest_policy(points, target, confidence), target=target,
        confidence=confidence, current=current)


def _with_savings(nodes: dict[str | None, NodeReport], volume: Volume,
                  catalog: Catalog | None) -> Savings:
    choices = {k: n.choice for k, n in nodes.items() if n.choice is not None}
    measured = {k: {r.model: r.cost_per_call for r in n.rows if r.n} for k, n in nodes.items()}
    savings = reprice(volume, choices, catalog, measured=measured)
    for key, n in nodes.items():
        node_savings = (savings.for_whole_flow() if key is None else savings.nodes.get(key))
        if n.choice is not None and node_savings is not None:
            nodes[key] = replace(n, savings=node_savings)
    return savings


def build_report(cells: Sequence[Cell], *, catalog: Catalog | None = None,
                 target: float = 0.9, confidence: float = 0.95,
                 current: Mapping[str, str] | None = None,
                 volume: Volume | None = None) -> Report:
    """The report of an evaluation's cells: per node (a cell's `node`; None: the whole flow)
    and model, the statistics, frontier, hull and cheapest policy meeting `target` (judged
    on Wilson lower bounds at `confidence`). `current` is the model each node uses now (by
    node name, `WHOLE_FLOW` for a whole-flow evaluation; default: the most-called model in
    `volume`). With a `volume` (recorded
    production calls, `savings.recent_volume`), the choices are re-priced on it."""
    if not 0.0 <= target <= 1.0:
        raise UserError(f"target pass rate must be between 0 and 1, got {target}")
    if not 0.0 < confidence < 1.0:
        raise UserError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    now = dict(volume.current() if volume is not None else {}) | dict(current or {})
    nodes: dict[str | None, NodeReport] = {}
    for node, by_model in _group(cells).items():
        nodes[node] = _node_report(node, by_model, target=target, confidence=confidence,
                                   current=now.get(node if node is not None else WHOLE_FLOW))
    savings = _with_savings(nodes, volume, catalog) if volume is not None else None
    rows = tuple(r for n in nodes.values() for r in n.rows)
    return Report(rows=rows, per_node=nodes, target=target, confidence=confidence,
                  savings=savings)
