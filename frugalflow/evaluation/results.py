"""Durable evaluation results: one `ff_evals` row per evaluation, one `ff_eval_cells` row per cell.

A cell is written as soon as it is answered and scored, so a killed evaluation resumes
where it stopped and never pays a recorded cell again. These tables are the only place
evaluation results live: they stay apart from the production ledger (`ff_attempts`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import and_, delete, select, update

from ..exceptions import UserError
from ..persistence.scrub import scrub_json, scrub_text
from ..persistence.store import Store
from ..persistence.tables import EvalCellRow, EvalRow, utcnow
from .cases import Cell, CellOutcome

__all__ = ["EvalRecord", "EvalStatus", "EvalStore"]

_EVALS = EvalRow.__table__  # type: ignore[attr-defined]
_CELLS = EvalCellRow.__table__  # type: ignore[attr-defined]
_SURROGATE = re.compile("[\ud800-\udfff]")


class EvalStatus(StrEnum):
    """Where an evaluation stands (the stored value)."""

    RUNNING = "running"  # started, not every cell recorded (or killed while running)
    COMPLETED = "completed"  # every cell recorded
    STOPPED = "stopped"  # stopped before every cell was recorded (budget, interrupted)


@dataclass(frozen=True, slots=True)
class EvalRecord:
    """One stored evaluation (its cells are read apart: `EvalStore.cells`)."""

    id: str
    flow: str
    node: str | None
    spec: dict[str, Any]
    status: EvalStatus
    cost_usd: float
    created_at: datetime
    finished_at: datetime | None

    @property
    def stop_reason(self) -> str | None:
        """Why it stopped before every cell was recorded ("budget reached", ...)."""
        reason = self.spec.get("stop_reason")
        return str(reason) if reason else None


def _record(row: Any) -> EvalRecord:
    return EvalRecord(id=row.id, flow=row.flow, node=row.node, spec=dict(row.spec or {}),
                      status=EvalStatus(row.status), cost_usd=float(row.cost_usd or 0.0),
                      created_at=row.created_at, finished_at=row.finished_at)


def _storable(value: Any) -> Any:
    """A JSON column's value: secrets scrubbed, NULs and lone surrogates removed (the drivers
    cannot encode them, and a row that fails to write would lose a paid cell)."""
    clean = scrub_json(value)
    text = json.dumps(clean)
    if _SURROGATE.search(text):
        clean = json.loads(_SURROGATE.sub("?", text))
    return clean


def _finite(x: float | None) -> float | None:
    return x if x is None or math.isfinite(x) else None


class EvalStore:
    """Create, resume, fill and list evaluations in the run database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def create(self, eval_id: str, flow: str, node: str | None,
                     spec: Mapping[str, Any]) -> EvalRecord:
        """A new evaluation row, status running."""
        await self.store.setup()
        now = utcnow()

        async def op() -> None:
            async with self.store.write() as conn:
                exists = (await conn.execute(
                    select(_EVALS.c.id).where(_EVALS.c.id == eval_id))).first()
                if exists is None:
                    await conn.execute(_EVALS.insert().values(
                        id=eval_id, flow=flow, node=node, spec=_storable(dict(spec)),
                        status=EvalStatus.RUNNING.value, cost_usd=0.0, created_at=now))

        await self.store.retrying(op, what="evaluation create")
        return await self.get(eval_id)

    async def get(self, eval_id: str) -> EvalRecord:
        """The evaluation `eval_id`; UserError naming the fix when there is none."""
        await self.store.setup()
        async with self.store.read() as conn:
            row = (await conn.execute(select(_EVALS).where(_EVALS.c.id == eval_id))).first()
        if row is None:
            raise UserError(f"no evaluation {eval_id!r} in {self.store!r}; list them with "
                            "EvalStore.list() (or check --db)")
        return _record(row)

    async def find(self, flow: str, node: str | None, key: str) -> EvalRecord | None:
        """The newest evaluation of `flow`/`node` whose spec has identity `key`, if any."""
        for record in await self.list(flow=flow, limit=None):
            if record.node == node and record.spec.get("key") == key:
                return record
        return None

    async def resume(self, eval_id: str) -> EvalRecord:
        """Mark `eval_id` running again (its recorded cells stay as they are)."""
        record = await self.get(eval_id)
        spec = {k: v for k, v in record.spec.items() if k != "stop_reason"}

        async def op() -> None:
            async with self.store.write() as conn:
                await conn.execute(update(_EVALS).where(_EVALS.c.id == eval_id).values(
                    status=EvalStatus.RUNNING.value, finished_at=None, spec=spec))

        await self.store.retrying(op, what="evaluation resume")
        return await self.get(eval_id)

    async def record_cell(self, eval_id: str, cell: Cell) -> None:
        """Write one cell (replacing an earlier try of the same cell) and add its cost."""
        values = {
            "eval_id": eval_id, "case_id": cell.case_id, "model": cell.model,
            "repeat": cell.repeat, "outcome": cell.outcome.value, "score": _finite(cell.score),
            "reason": scrub_text(cell.reason) if cell.reason else None,
            "cost_usd": cell.cost_usd, "latency_ms": cell.latency_ms,
            "input_tokens": cell.input_tokens, "output_tokens": cell.output_tokens,
            "reasoning_tokens": cell.reasoning_tokens, "output": _storable(cell.output),
            "created_at": utcnow(),
        }
        key = and_(_CELLS.c.eval_id == eval_id, _CELLS.c.case_id == cell.case_id,
                   _CELLS.c.model == cell.model, _CELLS.c.repeat == cell.repeat)

        async def op() -> None:
            # Delete-then-insert in one transaction: safe to repeat after a lost COMMIT,
            # and the cost is added once per written cell.
            async with self.store.write() as conn:
                old = (await conn.execute(select(_CELLS.c.cost_usd).where(key))).first()
                await conn.execute(delete(_CELLS).where(key))
                await conn.execute(_CELLS.insert().values(**values))
                added = cell.cost_usd - (float(old.cost_usd) if old is not None else 0.0)
                await conn.execute(update(_EVALS).where(_EVALS.c.id == eval_id).values(
                    cost_usd=_EVALS.c.cost_usd + added))

        await self.store.retrying(op, what="evaluation cell")

    async def add_cost(self, eval_id: str, usd: float) -> None:
        """Money spent on cells that were not recorded (cut short by the budget)."""
        if usd <= 0:
            return

        async def op() -> None:
            async with self.store.write() as conn:
                await conn.execute(update(_EVALS).where(_EVALS.c.id == eval_id).values(
                    cost_usd=_EVALS.c.cost_usd + usd))

        await self.store.retrying(op, what="evaluation cost")

    async def cells(self, eval_id: str) -> list[Cell]:
        """Every recorded cell of `eval_id` (case, model, repeat order)."""
        record = await self.get(eval_id)
        nodes: Mapping[str, str] = record.spec.get("case_nodes") or {}
        async with self.store.read() as conn:
            rows = (await conn.execute(
                select(_CELLS).where(_CELLS.c.eval_id == eval_id)
                .order_by(_CELLS.c.case_id, _CELLS.c.model, _CELLS.c.repeat))).all()
        return [Cell(case_id=r.case_id, model=r.model, repeat=r.repeat,
                     outcome=CellOutcome(r.outcome), node=nodes.get(r.case_id, record.node),
                     score=r.score, reason=r.reason, cost_usd=float(r.cost_usd or 0.0),
                     latency_ms=float(r.latency_ms or 0.0), input_tokens=r.input_tokens or 0,
                     output_tokens=r.output_tokens or 0,
                     reasoning_tokens=r.reasoning_tokens or 0, output=r.output)
                for r in rows]

    async def finish(self, eval_id: str, status: EvalStatus,
                     reason: str | None = None) -> EvalRecord:
        """Set the final status (with why it stopped, if it did)."""
        record = await self.get(eval_id)
        spec = {k: v for k, v in record.spec.items() if k != "stop_reason"}
        if reason:
            spec["stop_reason"] = reason

        async def op() -> None:
            async with self.store.write() as conn:
                await conn.execute(update(_EVALS).where(_EVALS.c.id == eval_id).values(
                    status=status.value, spec=spec,
                    finished_at=utcnow() if status != EvalStatus.RUNNING else None))

        await self.store.retrying(op, what="evaluation finish")
        return await self.get(eval_id)

    async def list(self, *, flow: str | None = None, limit: int | None = 20) -> list[EvalRecord]:
        """Evaluations, newest first (of `flow` only, when given)."""
        await self.store.setup()
        q = select(_EVALS).order_by(_EVALS.c.created_at.desc(), _EVALS.c.id.desc())
        if flow is not None:
            q = q.where(_EVALS.c.flow == flow)
        if limit is not None:
            q = q.limit(limit)
        async with self.store.read() as conn:
            rows = (await conn.execute(q)).all()
        return [_record(r) for r in rows]
