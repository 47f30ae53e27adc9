"""Spending summaries from the ledger: what model calls cost over the last days, in total and
by day, model, node, flow and service tier, with the number of calls, fallbacks and failed
attempts.

    summary = await cost_summary(runner.store, days=7, flow="support")
    summary.total.cost_usd, [(d.key, d.cost_usd) for d in summary.by_day]

Aggregated in SQL (SQLite and PostgreSQL alike) from `ff_attempts`; days are UTC days. This
is what `GET /costs` answers and what the run viewer charts.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel, Field
from sqlalchemy import ColumnElement, Integer, case, func, literal_column, select
from sqlalchemy.ext.asyncio import AsyncConnection

from .persistence.ledger import Ledger
from .persistence.store import Store
from .persistence.tables import AttemptRow, RunRow
from .statuses import Outcome
from .tiers import Tier

__all__ = ["MAX_DAYS", "CostBucket", "CostSummary", "CostTotals", "cost_summary"]

MAX_DAYS = 366
"""The longest window `cost_summary` (and `GET /costs`) summarises, in days."""

_A = AttemptRow.__table__  # type: ignore[attr-defined]
_RUNS = RunRow.__table__  # type: ignore[attr-defined]


class CostTotals(BaseModel):
    """What the attempts of a window (or of one group in it) cost and how they went."""

    cost_usd: float = Field(0.0, description="What the attempts cost, in USD.")
    calls: int = Field(0, description="Model calls (a call and its fallbacks count once).")
    attempts: int = Field(0, description="Tries of a model: a call's first try, its retries "
                                         "and fallbacks.")
    fallbacks: int = Field(0, description="Attempts that served a call on a fallback model "
                                          "(`fallback_from` set).")
    errors: int = Field(0, description="Attempts that failed (outcome `error`): each was "
                                       "retried, fell back or failed its call.")
    input_tokens: int = 0
    output_tokens: int = 0


class CostBucket(CostTotals):
    """One group of a breakdown: a day (`YYYY-MM-DD`, UTC), a model, a node, a flow or a
    service tier."""

    key: str = Field(description="The day, model, node, flow or tier this group is.")
    flow: str | None = Field(None, description="By node: the flow the node belongs to "
                                               "(nodes of different flows are apart).")
    models: dict[str, float] | None = Field(
        None, description="By day: the cost of each model that day (the models that spent).")


class CostSummary(BaseModel):
    """The spending of a window of UTC days, in total and broken down."""

    days: int = Field(description="The window's length: today (UTC) and the days before it.")
    since: datetime = Field(description="The window's start: midnight UTC, `days - 1` days "
                                        "before today.")
    until: datetime = Field(description="When the summary was made (the window's end).")
    flow: str | None = Field(None, description="Only this flow's attempts (None: all flows).")
    total: CostTotals
    by_day: list[CostBucket] = Field(description="Every day of the window, oldest first "
                                                 "(days without calls are zeros).")
    by_model: list[CostBucket] = Field(description="Dearest first.")
    by_node: list[CostBucket] = Field(description="Dearest first; `flow` names each node's "
                                                  "flow.")
    by_flow: list[CostBucket] = Field(description="Dearest first.")
    by_tier: list[CostBucket] = Field(
        default_factory=list,
        description="By service tier (`standard`, `flex`, `batch`, `off_peak`; calls "
                    "recorded without one are `standard`), dearest first.")


async def cost_summary(
    store_or_ledger: Store | Ledger,
    *,
    days: int = 30,
    flow: str | None = None,
    principal: str | None = None,
    now: datetime | None = None,
) -> CostSummary:
    """The spending of the last `days` UTC days (today included), in total and by day,
    model, node, flow and tier. `flow`: that flow only. `principal`: only the attempts of
    the runs it started (`ff_runs.principal`; attempts outside runs are then left out).
    `now`: the window's end (default: now; for reports of the past and tests).

    Raises ValueError for `days` outside 1..MAX_DAYS."""
    if isinstance(days, bool) or not isinstance(days, int) or not 1 <= days <= MAX_DAYS:
        raise ValueError(f"days={days!r}: give a whole number of days from 1 to {MAX_DAYS}")
    store = store_or_ledger.store if isinstance(store_or_ledger, Ledger) else store_or_ledger
    until = (now or datetime.now(timezone.utc)).astimezone(timezone.utc)
    since = datetime.combine(until.date() - timedelta(days=days - 1), datetime.min.time(),
                             tzinfo=timezone.utc)
    where: list[ColumnElement[bool]] = [_A.c.started_at >= since, _A.c.started_at <= until]
    if flow is not None:
        where.append(_A.c.flow == flow)
    if principal is not None:
        where.append(_A.c.run_id.in_(select(_RUNS.c.id).where(_RUNS.c.principal == principal)))
    await store.setup()
    day = (func.date(_A.c.started_at) if store.is_sqlite
           else func.to_char(func.timezone("UTC", _A.c.started_at), "YYYY-MM-DD"))
    async with store.read() as conn:
        total = await _groups(conn, [], where)
        by_day = await _groups(conn, [day], where)
        by_day_model = await _groups(conn, [day, _A.c.model], where)
        by_model = await _groups(conn, [_A.c.model], where)
        by_node = await _groups(conn, [_A.c.node, _A.c.flow], where)
        by_flow = await _groups(conn, [_A.c.flow], where)
        by_tier = await _groups(conn, [_TIER], where)
    return CostSummary(
        days=days, since=since, until=until, flow=flow,
        total=CostTotals(**total[0][1]) if total else CostTotals(),
        by_day=_every_day(since.date(), days, by_day, by_day_model),
        by_model=_dearest(by_model), by_node=_dearest(by_node, with_flow=True),
        by_flow=_dearest(by_flow), by_tier=_dearest(by_tier))


# A literal, not a bound parameter: PostgreSQL matches the GROUP BY expression to the selected
# one only when they are the same text (two parameters are two expressions to it).
_TIER = func.coalesce(_A.c.tier, literal_column(f"'{Tier.STANDARD.value}'"))
"""An attempt's tier; rows without one (standard calls, rows before schema v8) are standard."""

_Group = tuple[tuple[Any, ...], dict[str, Any]]


async def _groups(conn: AsyncConnection, keys: list[Any],
                  where: list[ColumnElement[bool]]) -> list[_Group]:
    """The totals of the attempts matching `where`, grouped by `keys` (none: one total)."""
    def count(condition: ColumnElement[bool]) -> Any:
        return func.coalesce(func.sum(case((condition, 1), else_=0)), 0)

    q = select(
        *keys,
        func.coalesce(func.sum(_A.c.cost_usd), 0.0).label("cost_usd"),
        func.count(func.distinct(_A.c.call_id)).label("calls"),
        func.count().label("attempts"),
        count(_A.c.fallback_from.is_not(None)).label("fallbacks"),
        count(_A.c.outcome == Outcome.ERROR.value).label("errors"),
        func.coalesce(func.sum(_A.c.input_tokens), 0).cast(Integer).label("input_tokens"),
        func.coalesce(func.sum(_A.c.output_tokens), 0).cast(Integer).label("output_tokens"),
    ).where(*where)
    if keys:
        q = q.group_by(*keys)
    rows = (await conn.execute(q)).all()
    n = len(keys)
    out: list[_Group] = []
    for r in rows:
        values = {"cost_usd": float(r[n]), **{name: int(r[n + i + 1]) for i, name in enumerate(
            ("calls", "attempts", "fallbacks", "errors", "input_tokens", "output_tokens"))}}
        if values["attempts"]:  # an ungrouped query over nothing answers one row of zeros
            out.append((tuple(r[:n]), values))
    return out


def _dearest(groups: list[_Group], *, with_flow: bool = False) -> list[CostBucket]:
    buckets = [CostBucket(key=str(k[0]) if k[0] is not None else "",
                          flow=k[1] if with_flow else None, **v) for k, v in groups]
    return sorted(buckets, key=lambda b: (-b.cost_usd, b.key, b.flow or ""))


def _every_day(first: date, days: int, groups: list[_Group],
               by_model: list[_Group]) -> list[CostBucket]:
    found = {str(k[0])[:10]: v for k, v in groups}
    models: dict[str, dict[str, float]] = {}
    for k, v in by_model:
        models.setdefault(str(k[0])[:10], {})[str(k[1])] = v["cost_usd"]
    keys = [(first + timedelta(days=i)).isoformat() for i in range(days)]
    return [CostBucket(key=k, models=models.get(k, {}), **found.get(k, {})) for k in keys]
