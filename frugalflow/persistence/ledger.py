"""The run ledger: runs, node executions and every model attempt, and the questions finance
and operations ask of them ("what did this run cost, per node and model?")."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, TypeVar

from sqlalchemy import Text, case, cast, func, select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..exceptions import (
    ErrorClass,
    LeaseError,
    RunNotFoundError,
    RunStateError,
    StoreUnavailableError,
    UserError,
)
from ..statuses import Outcome
from ..usage import Attempt
from .scrub import scrub, scrub_exact
from .store import Store, unfenced
from .tables import AttemptRow, CheckpointWriteRow, NodeRunRow, RouterRow, RunRow, utcnow

__all__ = ["CallOutcome", "CostRow", "Ledger", "RunRecord", "scrub"]

_RUNS = RunRow.__table__  # type: ignore[attr-defined]
_NODES = NodeRunRow.__table__  # type: ignore[attr-defined]
_ATTEMPTS = AttemptRow.__table__  # type: ignore[attr-defined]
_WRITES = CheckpointWriteRow.__table__  # type: ignore[attr-defined]

GroupBy = Literal["node", "model", "provider", "flow", "day", "run"]
_R = TypeVar("_R")


@dataclass
class CostRow:
    key: str
    cost_usd: float
    calls: int
    attempts: int
    input_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class CallOutcome:
    """One model call and its input, as `Ledger.outcomes` reads it for learned routing."""

    node: str
    text: str
    model: str
    category: str | None
    outcome: Outcome
    error_class: ErrorClass | None
    feedback: bool | None


@dataclass
class RunRecord:
    """A run with its node executions and model attempts."""

    run: RunRow
    nodes: list[NodeRunRow] = field(default_factory=list)
    attempts: list[AttemptRow] = field(default_factory=list)

    def cost_by(self, key: Literal["node", "model", "provider"]) -> dict[str, float]:
        out: dict[str, float] = {}
        for a in self.attempts:
            k = getattr(a, key)
            out[k] = out.get(k, 0.0) + a.cost_usd
        return out


class Ledger:
    """Writes and reads the run ledger in a Store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Attempt rows whose write failed (database unreachable past the retries), per run,
        # in order: written before the run's next ledger write, at its end or release.
        self._unwritten: dict[str, list[dict[str, Any]]] = {}
        self._flushing: dict[str, asyncio.Lock] = {}

    # -- writes --------------------------------------------------------------------

    async def create_run(
        self,
        run_id: str,
        flow: str,
        input: Any,
        *,
        budget_usd: float | None = None,
        status: str = "pending",
        principal: str | None = None,
    ) -> RunRow:
        await self.store.setup()
        row = RunRow(id=run_id, flow=flow, status=status, input=_as_dict(scrub(input)),
                     budget_usd=budget_usd, principal=principal)
        try:
            async with self.store.write() as conn:
                await conn.execute(_RUNS.insert().values(**_values(row)))
        except IntegrityError:
            raise RunStateError(
                f"a run with id {run_id!r} already exists; resume it or use another id",
                run_id=run_id,
            ) from None
        return row

    async def update_run(self, run_id: str, **changes: Any) -> None:
        changes["updated_at"] = utcnow()
        if changes.get("status") in ("succeeded", "failed", "cancelled"):
            changes.setdefault("finished_at", changes["updated_at"])
        if "error" in changes and changes["error"] is not None:
            changes["error"] = _storable(scrub(str(changes["error"]))[:4000])
        if changes.get("pending_resume") is not None:  # a user's answer: kept as given
            changes["pending_resume"] = scrub_exact(changes["pending_resume"])

        async def once() -> None:
            async with self.store.write() as conn:
                await conn.execute(update(_RUNS).where(_RUNS.c.id == run_id).values(**changes))

        await self.store.retrying(once, what=f"update of run {run_id}")

    async def node_started(self, task_id: str, run_id: str, node: str,
                           holder: str | None = None) -> None:
        async def once() -> None:
            async with self.store.write() as conn:
                await _upsert_node(conn, self.store, task_id, run_id, node, holder)

        await self.store.retrying(once, what=f"node row of run {run_id}")

    async def node_finished(
        self, task_id: str, *, status: str = "done", error: str | None = None
    ) -> None:
        await self.store.retrying(lambda: self._node_finished(task_id, status, error),
                                  what=f"node row {task_id}")

    async def _node_finished(self, task_id: str, status: str, error: str | None) -> None:
        async with self.store.write() as conn:
            cost = (
                await conn.execute(
                    select(func.coalesce(func.sum(_ATTEMPTS.c.cost_usd), 0.0)).where(
                        _ATTEMPTS.c.task_id == task_id
                    )
                )
            ).scalar_one()
            await conn.execute(
                update(_NODES).where(_NODES.c.id == task_id).values(
                    status=status, finished_at=utcnow(), cost_usd=float(cost),
                    error=_storable(scrub(error)[:2000]) if error else None,
                )
            )

    async def close_nodes(self, run_id: str, *, recheck: bool = False) -> int:
        """Settle the node rows of `run_id` that no executor will finish (left `running` by
        a crashed, cancelled or stopped executor): `done` when the task's writes reached the
        checkpoint (its work is kept and never re-executed), else `abandoned` (the work was
        lost; if the run goes on, the node runs again as a new task). Tasks checkpointed by
        another saver than `SQLModelSaver` cannot be told apart and count as abandoned.
        `recheck`: also rows marked `done` whose writes never reached the checkpoint (the
        database failed while they were written): they become `abandoned`, since the node
        runs again on resume. Returns how many rows changed."""
        saved = (select(_WRITES.c.task_id)
                 .where(_WRITES.c.thread_id == run_id, _WRITES.c.task_id == _NODES.c.id)
                 .exists())
        cost = (select(func.coalesce(func.sum(_ATTEMPTS.c.cost_usd), 0.0))
                .where(_ATTEMPTS.c.task_id == _NODES.c.id).scalar_subquery())

        async def once() -> int:
            n = 0
            async with self.store.write() as conn:
                result = await conn.execute(
                    update(_NODES)
                    .where(_NODES.c.run_id == run_id, _NODES.c.status == "running")
                    .values(status=case((saved, "done"), else_="abandoned"),
                            finished_at=utcnow(), cost_usd=cost))
                n += int(result.rowcount or 0)
                # Calls written down but never answered in the ledger: their executor died
                # or stopped mid-call. They may have been paid: settle them at their estimate.
                pending = (await conn.execute(
                    select(func.coalesce(func.sum(_ATTEMPTS.c.cost_usd), 0.0)).where(
                        _ATTEMPTS.c.run_id == run_id, _ATTEMPTS.c.outcome == "pending"))
                ).scalar_one()
                result = await conn.execute(
                    update(_ATTEMPTS).where(_ATTEMPTS.c.run_id == run_id,
                                            _ATTEMPTS.c.outcome == "pending")
                    .values(outcome="abandoned", error_class="abandoned",
                            error="its executor stopped before the answer was recorded; "
                                  "tokens and cost are estimates"))
                if result.rowcount and pending:
                    await conn.execute(update(_RUNS).where(_RUNS.c.id == run_id).values(
                        cost_usd=_RUNS.c.cost_usd + pending, updated_at=utcnow()))
                if recheck:
                    result = await conn.execute(
                        update(_NODES)
                        .where(_NODES.c.run_id == run_id, _NODES.c.status == "done", ~saved)
                        .values(status="abandoned",
                                error="its checkpoint write failed; it runs again on resume"))
                    n += int(result.rowcount or 0)
            return n

        return await self.store.retrying(once, what=f"node rows of run {run_id}")

    async def record_attempt(self, attempt: Attempt, *, flow: str | None = None) -> None:
        """Write one attempt and add its cost to its run, in one transaction.

        A paid call is never dropped: when the database stays unreachable past the retries,
        the row is kept in memory and written (in order, without duplicates) before the
        run's next attempt row, by `flush_attempts` (the runner calls it at each node event,
        before the run's end is recorded and before its lease is released); this raises
        StoreUnavailableError meanwhile."""
        values = _attempt_values(attempt, flow)
        key = attempt.run_id or ""
        if not self._unwritten.get(key):
            tries = 0

            async def once() -> None:
                nonlocal tries
                tries += 1  # a retry checks first whether the dropped try had committed
                await self._insert_attempt(values, check=tries > 1)

            try:
                await self.store.retrying(once, what="attempt row")
                return
            except LeaseError:
                # Another executor took the run over, but this call was paid: its row is a
                # fact about money spent, recorded whoever holds the lease.
                with unfenced():
                    await self.store.retrying(lambda: self._insert_attempt(values, check=True),
                                              what="attempt row")
                return
            except StoreUnavailableError:
                self._unwritten.setdefault(key, []).append(values)
                raise
        self._unwritten[key].append(values)
        await self.flush_attempts(attempt.run_id)

    def unwritten(self, run_id: str | None = None) -> int:
        """How many attempt rows of `run_id` (None: of every run) wait to be written."""
        if run_id is None:
            return sum(len(rows) for rows in self._unwritten.values())
        return len(self._unwritten.get(run_id, ()))

    async def flush_attempts(self, run_id: str | None = None) -> int:
        """Write the attempt rows of `run_id` (None: of every run) kept while the database
        was unreachable; raises StoreUnavailableError (keeping the rest) if it still is.
        Returns how many were written."""
        keys = [run_id or ""] if run_id is not None else list(self._unwritten)
        written = 0
        for key in keys:
            if not self._unwritten.get(key):
                continue
            lock = self._flushing.setdefault(key, asyncio.Lock())
            # One writer per run: rows in order, none twice. Unfenced: a paid call is
            # recorded even if another executor took the run over meanwhile.
            async with lock, _unfenced_async():
                rows = self._unwritten.get(key, [])
                while rows:
                    values = rows[0]
                    await self.store.retrying(
                        lambda v=values: self._insert_attempt(v, check=True),  # type: ignore[misc]
                        what="kept attempt row")
                    rows.pop(0)
                    written += 1
                if not rows:
                    self._unwritten.pop(key, None)
                    self._flushing.pop(key, None)
        return written

    async def record_intent(self, attempt: Attempt, *, flow: str | None = None) -> None:
        """Write a call down before it is sent (outcome `pending`, estimated tokens and cost),
        so that a call whose answer never reaches the ledger (the process died) is still
        accounted for: `record_attempt` later fills the same row with what happened, and
        `close_nodes` settles a row left pending as `abandoned` at its estimated cost.
        Unfenced (money is about to be spent whoever holds the lease), retried within the
        lease like every write; when the database stays away it raises
        StoreUnavailableError and the call is not sent: nothing is spent that cannot be
        recorded (the run pauses and resumes when the database is back)."""
        values = _attempt_values(attempt, flow)
        tries = 0

        async def once() -> None:
            nonlocal tries
            tries += 1
            with unfenced():
                async with self.store.write() as conn:
                    if tries > 1 and (await conn.execute(select(_ATTEMPTS.c.id).where(
                            _ATTEMPTS.c.call_id == values["call_id"],
                            _ATTEMPTS.c.try_number == values["try_number"],
                            _ATTEMPTS.c.model == values["model"]).limit(1))).first():
                        return  # the try that lost its connection had committed
                    await conn.execute(_ATTEMPTS.insert().values(**values))

        await self.store.retrying(once, what="call written down before it is sent")

    async def _insert_attempt(self, values: dict[str, Any], *, check: bool) -> None:
        """Insert the attempt row, or fill the row its call was written down in; `check`
        is kept for callers that retry (the lookup below also finds an earlier try)."""
        async with self.store.write() as conn:
            found = (await conn.execute(
                select(_ATTEMPTS.c.id, _ATTEMPTS.c.outcome, _ATTEMPTS.c.cost_usd).where(
                    _ATTEMPTS.c.call_id == values["call_id"],
                    _ATTEMPTS.c.try_number == values["try_number"],
                    _ATTEMPTS.c.model == values["model"]).limit(1))).first()
            added = values["cost_usd"]
            if found is None:
                await conn.execute(_ATTEMPTS.insert().values(**values))
            elif found.outcome in UNSETTLED:
                await conn.execute(
                    update(_ATTEMPTS).where(_ATTEMPTS.c.id == found.id).values(**values))
                if found.outcome == "abandoned":  # its estimate was added to the run already
                    added -= found.cost_usd or 0.0
            else:
                return  # an earlier try of this write committed before its connection dropped
            if values["run_id"] and added:
                await conn.execute(
                    update(_RUNS).where(_RUNS.c.id == values["run_id"]).values(
                        cost_usd=_RUNS.c.cost_usd + added, updated_at=utcnow()
                    )
                )

    # -- reads ---------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRow:
        await self.store.setup()

        async def once() -> Any:
            async with self.store.read() as conn:
                return (await conn.execute(_select_runs().where(_RUNS.c.id == run_id))).first()

        row = await self.store.retrying(once, what=f"read of run {run_id}")
        if row is None:
            raise RunNotFoundError(f"no run {run_id!r} in {self.store!r}", run_id=run_id)
        return _run_row(row._mapping)

    async def run_record(self, run_id: str) -> RunRecord:
        """The run with its node executions and attempts, in order."""
        run = await self.get_run(run_id)
        async with self.store.read() as conn:
            nodes = (
                await conn.execute(
                    select(_NODES).where(_NODES.c.run_id == run_id).order_by(_NODES.c.started_at)
                )
            ).all()
            attempts = (
                await conn.execute(
                    select(_ATTEMPTS).where(_ATTEMPTS.c.run_id == run_id).order_by(_ATTEMPTS.c.id)
                )
            ).all()
        return RunRecord(
            run,
            [NodeRunRow.model_validate(dict(r._mapping)) for r in nodes],
            [AttemptRow.model_validate(dict(r._mapping)) for r in attempts],
        )

    async def list_runs(
        self, *, flow: str | None = None, status: str | None = None, limit: int = 50,
        updated_before: datetime | None = None, principal: str | None = None,
    ) -> list[RunRow]:
        """Runs, newest first; `updated_before`: only those untouched since then;
        `principal`: only those it started."""
        await self.store.setup()
        q = _select_runs().order_by(_RUNS.c.created_at.desc()).limit(limit)
        if principal is not None:
            q = q.where(_RUNS.c.principal == principal)
        if flow:
            q = q.where(_RUNS.c.flow == flow)
        if status:
            q = q.where(_RUNS.c.status == status)
        if updated_before is not None:
            q = q.where(_RUNS.c.updated_at < updated_before)
        async with self.store.read() as conn:
            rows = (await conn.execute(q)).all()
        return [_run_row(r._mapping) for r in rows]

    async def costs(
        self,
        by: GroupBy = "model",
        *,
        run_id: str | None = None,
        flow: str | None = None,
        since: datetime | None = None,
    ) -> list[CostRow]:
        """Spend grouped by node, model, provider, flow, run or day, dearest first."""
        await self.store.setup()
        if by == "day":
            key = func.date(_ATTEMPTS.c.started_at) if self.store.is_sqlite else func.to_char(
                _ATTEMPTS.c.started_at, "YYYY-MM-DD")
        elif by == "run":
            key = _ATTEMPTS.c.run_id
        elif by in ("node", "model", "provider", "flow"):
            key = _ATTEMPTS.c[by]
        else:
            raise ValueError(f"costs(by={by!r}): use node, model, provider, flow, run or day")
        ok = (_ATTEMPTS.c.outcome == "ok").cast(_ATTEMPTS.c.try_number.type)
        q = (
            select(
                key.label("k"),
                func.sum(_ATTEMPTS.c.cost_usd),
                func.sum(ok),
                func.count(),
                func.sum(_ATTEMPTS.c.input_tokens),
                func.sum(_ATTEMPTS.c.output_tokens),
            )
            .group_by(key)
            .order_by(func.sum(_ATTEMPTS.c.cost_usd).desc())
        )
        if run_id:
            q = q.where(_ATTEMPTS.c.run_id == run_id)
        if flow:
            q = q.where(_ATTEMPTS.c.flow == flow)
        if since:
            q = q.where(_ATTEMPTS.c.started_at >= since)
        async with self.store.read() as conn:
            rows = (await conn.execute(q)).all()
        return [
            CostRow(str(k), float(c or 0), int(n or 0), int(a or 0), int(i or 0), int(o or 0))
            for k, c, n, a, i, o in rows
        ]

    async def replayable(self, run_id: str, node: str | None, call_key: str) -> Any:
        """The recorded answer of a completed call (run, node, key), or None."""
        from langchain_core.messages import messages_from_dict

        q = (select(_ATTEMPTS.c.response)
             .where(_ATTEMPTS.c.run_id == run_id, _ATTEMPTS.c.call_key == call_key,
                    _ATTEMPTS.c.outcome == "ok")
             .order_by(_ATTEMPTS.c.id.desc()).limit(1))

        async def once() -> Any:
            async with self.store.read() as conn:
                return (await conn.execute(q)).first()

        row = await self.store.retrying(once, what="replay lookup")
        if row is None or row.response is None:
            return None
        (message,) = messages_from_dict([row.response])
        return message

    # -- outcomes and routers (learned routing) ------------------------------------

    async def feedback(self, call_id: str, good: bool) -> int:
        """Record explicit feedback on a call's answer; returns the rows updated."""
        async with self.store.write() as conn:
            result = await conn.execute(
                update(_ATTEMPTS).where(_ATTEMPTS.c.call_id == call_id,
                                        _ATTEMPTS.c.outcome == "ok").values(feedback=good))
        return int(result.rowcount or 0)

    async def run_feedback(self, run_id: str, good: bool, *, node: str | None = None,
                           call_id: str | None = None) -> int:
        """Record feedback on the answers of a run: one call (`call_id`), or every answer of
        `node` in the run. Routers trained afterwards learn from it. Returns the answers
        marked; raises UserError when neither is given or nothing matches."""
        if (node is None) == (call_id is None):
            raise UserError("feedback names exactly one of node or call_id: which answer "
                            "was good or bad")
        await self.get_run(run_id)  # RunNotFoundError names the id
        where = [_ATTEMPTS.c.run_id == run_id, _ATTEMPTS.c.outcome == "ok"]
        where.append(_ATTEMPTS.c.node == node if node is not None
                     else _ATTEMPTS.c.call_id == call_id)
        async with self.store.write() as conn:
            result = await conn.execute(update(_ATTEMPTS).where(*where).values(feedback=good))
        n = int(result.rowcount or 0)
        if n == 0:
            what = f"node {node!r}" if node is not None else f"call {call_id!r}"
            raise UserError(f"run {run_id!r} has no answer from {what}; see its calls with "
                            f"`frugalflow runs show {run_id}`")
        return n

    async def outcomes(
        self, *, flow: str | None = None, node: str | None = None
    ) -> list[CallOutcome]:
        """Every model call with its input text, oldest first: what routers train on
        (`frugalflow.learning.examples_from` says which calls count as a success)."""
        await self.store.setup()
        c = _ATTEMPTS.c
        q = (select(c.node, c.prompt, c.model, c.category, c.outcome, c.error_class, c.feedback)
             .where(c.prompt.is_not(None)))
        if flow:
            q = q.where(c.flow == flow)
        if node:
            q = q.where(c.node == node)
        async with self.store.read() as conn:
            rows = (await conn.execute(q.order_by(c.id))).all()
        return [
            CallOutcome(node=r.node, text=r.prompt, model=r.model, category=r.category,
                        outcome=Outcome(r.outcome), feedback=r.feedback,
                        error_class=ErrorClass(r.error_class) if r.error_class else None)
            for r in rows
        ]

    async def save_router(self, name: str, router: Any, *, examples: int = 0,
                          metrics: dict[str, Any] | None = None) -> int:
        """Store a trained router as the next version of `name`; returns the version."""
        table = RouterRow.__table__  # type: ignore[attr-defined]
        await self.store.setup()
        async with self.store.write() as conn:
            current = (await conn.execute(
                select(func.max(table.c.version)).where(table.c.name == name))).scalar()
            version = int(current or 0) + 1
            await conn.execute(table.insert().values(
                name=name, version=version, blob=router.to_bytes(), examples=examples,
                metrics=metrics or {}, created_at=utcnow()))
        return version

    async def router_version(self, name: str) -> int | None:
        """The newest stored version of router `name` (None: none stored)."""
        table = RouterRow.__table__  # type: ignore[attr-defined]
        await self.store.setup()
        async with self.store.read() as conn:
            v = (await conn.execute(
                select(func.max(table.c.version)).where(table.c.name == name))).scalar()
        return int(v) if v is not None else None

    async def load_router(
        self, name: str, version: int | None = None, *, decode: Callable[[bytes], _R]
    ) -> _R | None:
        """Version `version` (default: the newest) of router `name`, or None; `decode`
        turns the stored bytes into the router (`LearnedRouter.from_bytes`)."""
        table = RouterRow.__table__  # type: ignore[attr-defined]
        await self.store.setup()
        q = select(table.c.blob).where(table.c.name == name)
        q = (q.where(table.c.version == version) if version is not None
             else q.order_by(table.c.version.desc()).limit(1))
        async with self.store.read() as conn:
            row = (await conn.execute(q)).first()
        if row is None:
            return None
        # Decoding a large router is CPU work: keep it off the event loop.
        return await asyncio.to_thread(decode, row.blob)

    async def routers(self) -> list[dict[str, Any]]:
        """Every stored router version (name, version, examples, metrics, created_at)."""
        table = RouterRow.__table__  # type: ignore[attr-defined]
        await self.store.setup()
        async with self.store.read() as conn:
            rows = (await conn.execute(
                select(table.c.name, table.c.version, table.c.examples, table.c.metrics,
                       table.c.created_at).order_by(table.c.name, table.c.version))).all()
        return [dict(r._mapping) for r in rows]

    async def all_attempts(self, run_ids: Sequence[str] | None = None) -> list[AttemptRow]:
        q = select(_ATTEMPTS).order_by(_ATTEMPTS.c.id)
        if run_ids is not None:
            q = q.where(_ATTEMPTS.c.run_id.in_(list(run_ids)))
        async with self.store.read() as conn:
            rows = (await conn.execute(q)).all()
        return [AttemptRow.model_validate(dict(r._mapping)) for r in rows]


async def _upsert_node(
    conn: AsyncConnection, store: Store, task_id: str, run_id: str, node: str,
    holder: str | None,
) -> None:
    values = {"id": task_id, "run_id": run_id, "node": node, "status": "running",
              "started_at": utcnow(), "holder": holder}
    if store.is_sqlite:
        from sqlalchemy.dialects.sqlite import insert
    else:
        from sqlalchemy.dialects.postgresql import insert  # type: ignore[assignment]
    stmt = insert(_NODES).values(**values)
    await conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["id"],
            set_={"status": "running", "started_at": values["started_at"], "finished_at": None,
                  "holder": holder},
        )
    )


@asynccontextmanager
async def _unfenced_async() -> AsyncIterator[None]:
    with unfenced():
        yield


UNSETTLED = ("pending", "abandoned")
"""Outcomes of calls written down before they were sent whose answer the ledger lacks."""


def _attempt_values(attempt: Attempt, flow: str | None) -> dict[str, Any]:
    """The ff_attempts row of `attempt` (without its id)."""
    usage = attempt.usage
    row = AttemptRow(
        run_id=attempt.run_id, task_id=attempt.task_id, call_id=attempt.call_id, flow=flow,
        node=attempt.node, model=attempt.model, provider=attempt.provider,
        try_number=attempt.try_number, outcome=attempt.outcome,
        error_class=attempt.error_class,
        error=scrub(attempt.error)[:2000] if attempt.error else None,
        action=attempt.action, fallback_from=attempt.fallback_from,
        input_tokens=usage.input_tokens if usage else 0,
        output_tokens=usage.output_tokens if usage else 0,
        cache_read_tokens=usage.cache_read_tokens if usage else 0,
        cost_usd=attempt.cost_usd, latency_ms=attempt.latency_ms,
        started_at=datetime.fromtimestamp(attempt.started_at, timezone.utc),
        call_key=attempt.call_key, route_reason=attempt.route_reason,
        prompt=scrub(attempt.prompt)[:4000] if attempt.prompt else None,
        category=attempt.category, usage_estimated=attempt.usage_estimated,
        # The answer is replayed on resume: kept as given, except exact key values.
        response=(scrub_exact(_message_json(attempt.response))
                  if attempt.response is not None else None),
    )
    values = {k: _storable(v) for k, v in _values(row).items()}
    values.pop("id", None)
    return values


def _message_json(message: Any) -> dict[str, Any]:
    from langchain_core.messages import message_to_dict

    plain: dict[str, Any] = json.loads(json.dumps(message_to_dict(message), default=str))
    return plain


def _values(row: Any) -> dict[str, Any]:
    return {c.name: getattr(row, _attr(c.name)) for c in row.__table__.columns}


def _attr(column: str) -> str:
    return "metadata_" if column == "metadata" else column


def _as_dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {"value": value}


_RUN_JSON = ("input", "output", "interrupts", "pending_resume")
_SURROGATE = re.compile("[\ud800-\udfff]")


def _select_runs() -> Any:
    """SELECT ff_runs with its JSON columns as text, decoded by `_run_row`: one row that
    cannot be decoded (nested past the decoder's recursion limit) breaks no read of others."""
    return select(*(cast(c, Text).label(c.name) if c.name in _RUN_JSON else c
                    for c in _RUNS.c))


def _run_row(mapping: RowMapping) -> RunRow:
    values = dict(mapping)
    for name in _RUN_JSON:
        text = values.get(name)
        if isinstance(text, str):
            try:
                values[name] = json.loads(text)
            except (ValueError, RecursionError) as e:
                gone = {"unreadable": f"the stored {name} cannot be decoded "
                                      f"({type(e).__name__})"}
                values[name] = [gone] if name == "interrupts" else gone
    return RunRow.model_validate(values)


def _storable(value: Any) -> Any:
    """`value`, with lone surrogates in a string escaped as text (`\\ud800`): the drivers
    cannot encode them, and a row that fails to write would lose a paid call."""
    if isinstance(value, str) and _SURROGATE.search(value):
        return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
    return value
