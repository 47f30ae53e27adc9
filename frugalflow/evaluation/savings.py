"""What a proposed choice would have saved: the last N days of a flow's recorded production
calls (`recent_volume`, from the ledger's answered attempts) re-priced with it (`reprice`).

Re-pricing says how each node was priced: "measured" scales what each recorded call cost by
the evaluation's measured cost per call of the proposal over that of the model that answered
it (answer lengths differ by model, and this keeps them); "catalog" prices the recorded
tokens at the proposed models' catalog prices (assumes the same answer length), used when
the evaluation did not measure the models production used.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, select

from ..exceptions import UserError
from ..policies import Choice
from ..persistence.tables import AttemptRow
from ..statuses import Outcome
from .frontier import Policy

if TYPE_CHECKING:
    from ..catalog import Catalog
    from ..persistence.ledger import Ledger

__all__ = ["Method", "ModelVolume", "NodeSavings", "NodeVolume", "Savings", "Volume",
           "money", "recent_volume", "reprice"]

_ATTEMPTS = AttemptRow.__table__  # type: ignore[attr-defined]


def money(usd: float) -> str:
    """USD readably at any size: $41, $0.33, $0.0031 (small sums keep two significant digits:
    a month of cheap calls is not "$0.00")."""
    if usd >= 10:
        return f"${usd:,.0f}"
    if usd >= 0.1:
        return f"${usd:.2f}"
    return f"${usd:.2g}" if usd else "$0"


_PER = 10_000


@dataclass(frozen=True, slots=True)
class ModelVolume:
    """The answered calls one model made for one node."""

    model: str
    calls: int
    input_tokens: int
    output_tokens: int
    cost_usd: float


@dataclass(frozen=True, slots=True)
class NodeVolume:
    """One node's answered calls in the window, per model (most calls first)."""

    node: str
    runs: int
    models: tuple[ModelVolume, ...]

    @property
    def calls(self) -> int:
        return sum(m.calls for m in self.models)

    @property
    def input_tokens(self) -> int:
        return sum(m.input_tokens for m in self.models)

    @property
    def output_tokens(self) -> int:
        return sum(m.output_tokens for m in self.models)

    @property
    def cost_usd(self) -> float:
        return sum(m.cost_usd for m in self.models)

    @property
    def main_model(self) -> str | None:
        """The model that answered most of the node's calls: what it uses now."""
        return self.models[0].model if self.models else None


@dataclass(frozen=True, slots=True)
class Volume:
    """A flow's recorded production calls over the last `days` (since `since`)."""

    flow: str
    days: float
    since: datetime
    runs: int
    nodes: dict[str, NodeVolume]

    def current(self) -> dict[str, str]:
        """Per node, the model that answered most of its calls."""
        return {k: v.main_model for k, v in self.nodes.items() if v.main_model is not None}


async def recent_volume(ledger: Ledger, *, flow: str, days: float = 30,
                        now: datetime | None = None) -> Volume:
    """The flow's answered (`ok`) calls of the last `days`, per node and model."""
    if days <= 0:
        raise UserError(f"days must be positive, got {days}: the window of calls to re-price")
    since = (now or datetime.now(timezone.utc)) - timedelta(days=days)
    c = _ATTEMPTS.c
    where = (c.flow == flow, c.outcome == Outcome.OK, c.started_at >= since)
    per_model = (select(c.node, c.model, func.count(), func.sum(c.input_tokens),
                        func.sum(c.output_tokens), func.sum(c.cost_usd))
                 .where(*where).group_by(c.node, c.model))
    per_node = select(c.node, func.count(func.distinct(c.run_id))).where(*where).group_by(c.node)
    runs = select(func.count(func.distinct(c.run_id))).where(*where)
    store = ledger.store
    await store.setup()
    async with store.read() as conn:
        model_rows = (await conn.execute(per_model)).all()
        node_runs = {str(n): int(r or 0) for n, r in (await conn.execute(per_node)).all()}
        total_runs = int((await conn.execute(runs)).scalar() or 0)
    grouped: dict[str, list[ModelVolume]] = {}
    for node, model, calls, tin, tout, cost in model_rows:
        grouped.setdefault(str(node), []).append(
            ModelVolume(str(model), int(calls), int(tin or 0), int(tout or 0), float(cost or 0)))
    nodes = {node: NodeVolume(node, node_runs.get(node, 0),
                              tuple(sorted(ms, key=lambda m: (-m.calls, m.model))))
             for node, ms in sorted(grouped.items())}
    return Volume(flow=flow, days=days, since=since, runs=total_runs, nodes=nodes)


class Method(StrEnum):
    """How a node's calls were re-priced."""

    MEASURED = "measured"  # recorded cost x measured cost ratio (proposal / model used)
    CATALOG = "catalog"  # recorded tokens at the proposal's catalog prices
    UNCHANGED = "unchanged"  # no choice for this node: as recorded


_HOW = {Method.MEASURED: "re-priced by measured cost per call",
        Method.CATALOG: "re-priced at catalog prices (same answer lengths assumed)",
        Method.UNCHANGED: "nothing re-priced"}


@dataclass(frozen=True, slots=True)
class NodeSavings:
    """One node's recorded spend (`node` None: the whole flow) and what the choice would
    have cost on the same calls; `runs` is the flow's runs in the window."""

    node: str | None
    calls: int
    runs: int
    before_usd: float
    after_usd: float
    method: Method
    current: tuple[str, ...]
    proposed: str

    @property
    def change_pct(self) -> float:
        """The change in cost, in percent (negative: a saving); 0 when nothing was spent."""
        if not self.before_usd:
            return 0.0
        return (self.after_usd - self.before_usd) / self.before_usd * 100

    def per_10k(self) -> tuple[float, float]:
        """Before and after per 10k runs of the flow (per 10k calls when no run was named)."""
        per = self.runs or self.calls
        return ((self.before_usd / per * _PER, self.after_usd / per * _PER) if per
                else (0.0, 0.0))

    def to_json(self) -> dict[str, Any]:
        before, after = self.per_10k()
        return {"node": self.node, "calls": self.calls, "runs": self.runs,
                "before_usd": self.before_usd, "after_usd": self.after_usd,
                "change_pct": self.change_pct, "per_10k": "runs" if self.runs else "calls",
                "before_per_10k_usd": before, "after_per_10k_usd": after,
                "method": str(self.method), "current": list(self.current),
                "proposed": self.proposed}


@dataclass(frozen=True, slots=True)
class Savings:
    """The flow's recorded calls of the last `days` re-priced, per node and in total."""

    flow: str
    days: float
    runs: int
    nodes: dict[str, NodeSavings]

    def for_whole_flow(self) -> NodeSavings:
        methods = {s.method for s in self.nodes.values()} - {Method.UNCHANGED}
        # Mixed methods: the total is only as good as its weakest part, catalog prices.
        method = methods.pop() if len(methods) == 1 else (
            Method.CATALOG if Method.CATALOG in methods else Method.UNCHANGED)
        proposed = sorted({s.proposed for s in self.nodes.values() if s.proposed})
        return NodeSavings(
            node=None, calls=sum(s.calls for s in self.nodes.values()), runs=self.runs,
            before_usd=sum(s.before_usd for s in self.nodes.values()),
            after_usd=sum(s.after_usd for s in self.nodes.values()), method=method,
            current=tuple(sorted({m for s in self.nodes.values() for m in s.current})),
            proposed=", ".join(proposed))

    @property
    def before_usd(self) -> float:
        return sum(s.before_usd for s in self.nodes.values())

    @property
    def after_usd(self) -> float:
        return sum(s.after_usd for s in self.nodes.values())

    def total_line(self) -> str:
        total = self.for_whole_flow()
        before, after = total.per_10k()
        per = "runs" if total.runs else "calls"
        return (f"{self.flow} (last {self.days:g} days, {total.calls} calls): "
                f"{money(total.before_usd)} -> {money(total.after_usd)} "
                f"({total.change_pct:+.0f}%), {money(before)} -> {money(after)} per 10k {per}; "
                f"{self._how()}")

    def _how(self) -> str:
        changed = {k: s.method for k, s in self.nodes.items() if s.method != Method.UNCHANGED}
        if len(set(changed.values())) <= 1:
            return _HOW[next(iter(changed.values()), Method.UNCHANGED)]
        return "re-priced per node: " + ", ".join(f"{k} {m}" for k, m in changed.items())

    def to_json(self) -> dict[str, Any]:
        total = self.for_whole_flow()
        return {"flow": self.flow, "days": self.days, "runs": self.runs,
                "before_usd": total.before_usd, "after_usd": total.after_usd,
                "change_pct": total.change_pct,
                "nodes": [s.to_json() for s in self.nodes.values()]}


Shares = tuple[tuple[str, float], ...]


def _shares(choice: Policy | Choice) -> Shares:
    """(model, share of calls) of a computed policy or a stored choice."""
    if isinstance(choice, Policy):
        return choice.shares
    return tuple(zip(choice.models, choice.shares or (1.0,), strict=True))


def _by_ratio(nv: NodeVolume, choice: Shares, measured: Mapping[str, float]) -> float | None:
    """Each recorded model's spend times proposal/measured cost; None when a model the node
    used (or a proposed one) was not measured."""
    if any(measured.get(m) is None for m, _ in choice):
        return None
    proposal = sum(s * measured[m] for m, s in choice)
    after = 0.0
    for mv in nv.models:
        cost = measured.get(mv.model)
        if not cost:  # not measured, or free in the evaluation: no ratio to scale by
            return None
        after += mv.cost_usd * proposal / cost if mv.cost_usd else mv.calls * proposal
    return after


def _by_catalog(nv: NodeVolume, choice: Shares, catalog: Catalog | None) -> float:
    if catalog is None:
        raise UserError(f"cannot re-price node {nv.node!r}: the evaluation did not measure "
                        f"{', '.join(m.model for m in nv.models)}; pass a catalog to price "
                        "its recorded tokens")
    return sum(share * catalog[model].estimate_cost(nv.input_tokens, nv.output_tokens)
               for model, share in choice)


def _describe(choice: Shares) -> str:
    if len(choice) == 1:
        return choice[0][0]
    return " + ".join(f"{s:.1%} {m}" for m, s in choice)


def reprice(volume: Volume, choices: Mapping[str | None, Policy | Choice],
            catalog: Catalog | None = None, *,
            measured: Mapping[str | None, Mapping[str, float]] | None = None) -> Savings:
    """`volume` re-priced with the choice per node (key None: every node without its own),
    a computed `Policy` or a stored policy's `Choice`.
    With `measured` (per node, model -> measured cost per call) covering the node's
    recorded models and the proposal, by measured ratio; otherwise at `catalog` prices."""
    nodes: dict[str, NodeSavings] = {}
    for name, nv in volume.nodes.items():
        chosen = choices.get(name, choices.get(None))
        current = tuple(m.model for m in nv.models)
        if chosen is None:
            nodes[name] = NodeSavings(name, nv.calls, volume.runs, nv.cost_usd, nv.cost_usd,
                                      Method.UNCHANGED, current, "")
            continue
        choice = _shares(chosen)
        costs = (measured or {}).get(name, (measured or {}).get(None, {}))
        after = _by_ratio(nv, choice, costs)
        method = Method.MEASURED
        if after is None:
            after, method = _by_catalog(nv, choice, catalog), Method.CATALOG
        nodes[name] = NodeSavings(name, nv.calls, volume.runs, nv.cost_usd, after, method,
                                  current, _describe(choice))
    return Savings(flow=volume.flow, days=volume.days, runs=volume.runs, nodes=nodes)
