"""The run ledger: runs, node executions and every model attempt, and the questions finance
and operations ask of them ("what did this run cost, per node and model?")."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from typing import Any, Literal, TypeVar

from sqlalchemy import Text, bindparam, case, cast, func, literal_column, null, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import RowMapping
from sqlalchemy.exc import IntegrityError

from ..exceptions import (
    ErrorClass,
    LeaseError,
    RunNotFoundError,
    RunStateError,
    StoreUnavailableError,
    UserError,
)
from ..statuses import NodeStatus, Outcome, RunStatus
from ..usage import Attempt
from .batching import Write
from .leases import afenced, current_fence, unfenced
from .plans import Op, Plan, lean_op
from .scrub import scrub, scrub_exact
from .store import Store
from .tables import AttemptRow, CheckpointWriteRow, NodeRunRow, RouterRow, RunRow, utcnow

__all__ = ["CallOutcome", "CostRow", "Ledger", "RecordedCall", "RunRecord", "RunStats", "scrub"]

_RUNS = RunRow.__table__  # type: ignore[attr-defined]
_NODES = NodeRunRow.__table__  # type: ignore[attr-defined]
_ATTEMPTS = AttemptRow.__table__  # type: ignore[attr-defined]
_WRITES = CheckpointWriteRow.__table__  # type: ignore[attr-defined]

GroupBy = Literal["node", "model", "provider", "flow", "day", "run", "tier"]
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
class RunStats:
    """A run's model calls at a glance, as `Ledger.run_stats` counts them."""

    calls: int = 0
    """Model calls (each may have taken several attempts)."""
    attempts: int = 0
    fallbacks: int = 0
    """Attempts on a fallback model (`fallback_from` set: an earlier model of the call
    failed or was skipped, e.g. its breaker open), as the costs summaries count them."""
    errors: int = 0
    """Failed attempts (retried, fallen back from, or raised)."""


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


@dataclass(frozen=True, slots=True)
class RecordedCall:
    """A successful model call recorded with its request, as `Ledger.recorded_calls` reads
    it for evaluations that replay production traffic."""

    id: int
    run_id: str | None
    call_id: str
    node: str
    model: str
    started_at: datetime
    request: dict[str, Any]
    response: dict[str, Any] | None
    feedback: bool | None


@dataclass
class RunRecord:
    """A run with its node executions and model attempts."""

    run: RunRow
    nodes: list[NodeRunRow] = field(default_factory=list)
    attempts: list[AttemptRow] = field(default_factory=list)

    def cost_by(self, key: Literal["node", "model", "provider", "tier"]) -> dict[str, float]:
        """Spend per node, model, provider or service tier (an attempt without a tier was
        made before tiers existed: standard)."""
        out: dict[str, float] = {}
        for a in self.attempts:
            k: str = getattr(a, key) or "standard"  # only a tier may be unset
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
        self._task_runs: dict[str, str] = {}  # task -> run, for node_finished's batch

    # -- writes --------------------------------------------------------------------

    async def create_run(
        self,
        run_id: str,
        flow: str,
        input: Any,
        *,
        budget_usd: float | None = None,
        status: str = RunStatus.PENDING,
        principal: str | None = None,
        deadline_at: datetime | None = None,
        created_at: datetime | None = None,
    ) -> RunRow:
        await self.store.setup()
        row = RunRow(id=run_id, flow=flow, status=status, input=_as_dict(scrub(input)),
                     budget_usd=budget_usd, principal=principal, deadline_at=deadline_at,
                     created_at=created_at or utcnow())
        values = _values(row)

        def plan() -> Plan[None]:
            yield Op(_RUNS.insert().values(**values))

        try:
            await self.store.run_write(plan, key=run_id, retry=False)
        except IntegrityError:
            raise RunStateError(
                f"a run with id {run_id!r} already exists; resume it or use another id",
                run_id=run_id,
            ) from None
        return row

    async def update_run(self, run_id: str, **changes: Any) -> None:
        changes["updated_at"] = utcnow()
        if changes.get("status") in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED):
            changes.setdefault("finished_at", changes["updated_at"])
        if "error" in changes and changes["error"] is not None:
            changes["error"] = _storable(scrub(str(changes["error"]))[:4000])
        if changes.get("pending_resume") is not None:  # a user's answer: kept as given
            changes["pending_resume"] = scrub_exact(changes["pending_resume"])

        pg = not self.store.is_sqlite

        def plan() -> Plan[None]:
            yield lean_op("runs.update", _update_run_prebuilt, {**changes, "w_id": run_id},
                          pg=pg, columns=sorted(changes))

        await self.store.run_write(plan, key=run_id, what=f"update of run {run_id}")

    async def move_run(self, run_id: str, to: RunStatus, when: Iterable[RunStatus],
                       **changes: Any) -> bool:
        """Set the run's status to `to` (and `changes`) only if it is one of `when`, in one
        statement (a status another process wrote meanwhile is never overwritten); whether
        it moved."""
        changes = {**changes, "status": to, "updated_at": utcnow()}
        if to in (RunStatus.SUCCEEDED, RunStatus.FAILED, RunStatus.CANCELLED):
            changes.setdefault("finished_at", changes["updated_at"])
        stmt = (update(_RUNS)
                .where(_RUNS.c.id == run_id, _RUNS.c.status.in_([str(s) for s in when]))
                .values(**changes).returning(_RUNS.c.id))

        def plan() -> Plan[bool]:
            rows = yield Op(stmt, None, True)
            return bool(rows)

        return await self.store.run_write(plan, key=run_id, what=f"update of run {run_id}")

    async def set_trace_context(self, run_id: str, context: dict[str, str]) -> None:
        """Keep the run's W3C trace context (`traceparent`, `tracestate`): every later
        execution of the run, by any process, continues that trace. Written with the run's
        next write (the runner's `running` update follows at once): no transaction of its own."""
        carrier = {k: v for k, v in context.items() if k in ("traceparent", "tracestate")}
        params = {"trace_context": carrier, "updated_at": utcnow(), "w_id": run_id}
        pg = not self.store.is_sqlite

        def plan() -> Plan[None]:
            yield lean_op("runs.update", _update_run_prebuilt, params, pg=pg,
                          columns=["trace_context", "updated_at"])

        self.store.writer.defer(Write(plan=plan, fence=current_fence()), run_id)

    async def node_started(self, task_id: str, run_id: str, node: str,
                           holder: str | None = None) -> None:
        pg = not self.store.is_sqlite
        values = {"id": task_id, "run_id": run_id, "node": node, "status": NodeStatus.RUNNING,
                  "holder": holder, "cost_usd": 0.0, "started_at": utcnow(),
                  "finished_at": None, "error": None}  # every column: no defaults applied
        self._task_runs[task_id] = run_id

        def plan() -> Plan[None]:
            yield lean_op("nodes.upsert", partial(_upsert_node_prebuilt, pg), values, pg=pg,
                          columns=_NODE_COLUMNS)

        # Awaited: its fence check stops a run taken over by another executor before the
        # node runs (and pays). The previous node's deferred row goes in the same
        # transaction (`node_finished`).
        await self.store.run_write(plan, key=run_id, what=f"node row of run {run_id}")

    async def node_finished(
        self, task_id: str, *, status: str = NodeStatus.DONE, error: str | None = None,
        run_id: str | None = None,
    ) -> None:
        pg = not self.store.is_sqlite
        params = {"w_id": task_id, "w_status": status, "w_at": utcnow(),
                  "w_error": _storable(scrub(error)[:2000]) if error else None}

        def plan() -> Plan[None]:
            yield lean_op("nodes.finish", _finish_node_prebuilt, params, pg=pg)

        # Bookkeeping, not a promise: written with the run's next write (the next node's
        # row, its checkpoint), one transaction per step. A row a crash left `running` is
        # settled by `close_nodes` (done if the task's writes were saved).
        mapped = self._task_runs.pop(task_id, None)
        key = run_id or mapped or task_id
        self.store.writer.defer(Write(plan=plan, fence=current_fence()), key)

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

        def plan() -> Plan[int]:
            settled = yield Op(
                update(_NODES)
                .where(_NODES.c.run_id == run_id, _NODES.c.status == NodeStatus.RUNNING)
                .values(status=case((saved, NodeStatus.DONE), else_=NodeStatus.ABANDONED),
                        finished_at=utcnow(), cost_usd=cost).returning(_NODES.c.id), fetch=True)
            # Calls written down but never answered in the ledger: their executor died
            # or stopped mid-call. They may have been paid: settle them at their estimate.
            pending = (yield Op(
                select(func.coalesce(func.sum(_ATTEMPTS.c.cost_usd), 0.0)).where(
                    _ATTEMPTS.c.run_id == run_id, _ATTEMPTS.c.outcome == Outcome.PENDING),
                fetch=True))[0][0]
            abandoned = yield Op(
                update(_ATTEMPTS).where(_ATTEMPTS.c.run_id == run_id,
                                        _ATTEMPTS.c.outcome == Outcome.PENDING)
                .values(outcome=Outcome.ABANDONED, error_class=ErrorClass.ABANDONED,
                        error="its executor stopped before the answer was recorded; "
                              "tokens and cost are estimates")
                .returning(_ATTEMPTS.c.id), fetch=True)
            if abandoned and pending:
                yield Op(update(_RUNS).where(_RUNS.c.id == run_id).values(
                    cost_usd=_RUNS.c.cost_usd + pending, updated_at=utcnow()))
            rechecked = []
            if recheck:
                rechecked = yield Op(
                    update(_NODES)
                    .where(_NODES.c.run_id == run_id, _NODES.c.status == NodeStatus.DONE,
                           ~saved)
                    .values(status=NodeStatus.ABANDONED,
                            error="its checkpoint write failed; it runs again on resume")
                    .returning(_NODES.c.id), fetch=True)
            return len(settled) + len(rechecked)

        return await self.store.run_write(plan, key=run_id, what=f"node rows of run {run_id}")

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
            async with lock, afenced(None):
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

        def plan() -> Plan[None]:
            nonlocal tries
            tries += 1  # a retry checks first whether the dropped try had committed
            return _intent_plan(values, check=tries > 1, pg=not self.store.is_sqlite)

        await self.store.run_write(plan, key=values["run_id"] or "", fence=None,
                                   what="call written down before it is sent")

    async def _insert_attempt(self, values: dict[str, Any], *, check: bool) -> None:
        """Insert the attempt row, or fill the row its call was written down in (one
        transaction with the other runs' writes); `check` is kept for callers that retry
        (the plan's lookup also finds an earlier try). Not retried here."""
        pg = not self.store.is_sqlite
        await self.store.run_write(lambda: _attempt_plan(values, pg=pg), key=values["run_id"] or "",
                                   retry=False)

    # -- reads ---------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRow:
        await self.store.setup()

        def plan() -> Plan[Any]:
            rows = yield Op(_GET_RUN, {"w_id": run_id}, fetch=True)
            return rows[0] if rows else None

        row = await self.store.run_read(plan, what=f"read of run {run_id}")
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
        created_since: datetime | None = None, created_before: datetime | None = None,
    ) -> list[RunRow]:
        """Runs, newest first; `updated_before`: only those untouched since then;
        `principal`: only those it started; `created_since`/`created_before`: only those
        created in [since, before)."""
        await self.store.setup()
        q = _select_runs().order_by(_RUNS.c.created_at.desc()).limit(limit)
        if created_since is not None:
            q = q.where(_RUNS.c.created_at >= _utc(created_since))
        if created_before is not None:
            q = q.where(_RUNS.c.created_at < _utc(created_before))
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

    async def run_stats(self, run_ids: Sequence[str]) -> dict[str, RunStats]:
        """Calls, attempts, fallbacks and errors of each run, counted by the database in one
        grouped query per 500 runs; runs without attempts are absent."""
        await self.store.setup()
        c = _ATTEMPTS.c
        failed = case((c.outcome == Outcome.ERROR, 1), else_=0)
        fell_back = case((c.fallback_from.is_not(None), 1), else_=0)
        out: dict[str, RunStats] = {}
        ids = list(dict.fromkeys(run_ids))
        async with self.store.read() as conn:
            for start in range(0, len(ids), 500):  # bounded IN lists
                q = (select(c.run_id, func.count(func.distinct(c.call_id)), func.count(),
                            func.sum(fell_back), func.sum(failed))
                     .where(c.run_id.in_(ids[start:start + 500]),
                            c.outcome != Outcome.PENDING)
                     .group_by(c.run_id))
                for run_id, calls, attempts, fallbacks, errors in (await conn.execute(q)).all():
                    out[run_id] = RunStats(int(calls or 0), int(attempts or 0),
                                           int(fallbacks or 0), int(errors or 0))
        return out

    async def costs(
        self,
        by: GroupBy = "model",
        *,
        run_id: str | None = None,
        flow: str | None = None,
        since: datetime | None = None,
    ) -> list[CostRow]:
        """Spend grouped by node, model, provider, flow, run, day or service tier (`tier`:
        standard, batch, flex, off_peak; attempts recorded without one are standard),
        dearest first."""
        await self.store.setup()
        if by == "day":
            key = func.date(_ATTEMPTS.c.started_at) if self.store.is_sqlite else func.to_char(
                _ATTEMPTS.c.started_at, "YYYY-MM-DD")
        elif by == "run":
            key = _ATTEMPTS.c.run_id
        elif by == "tier":
            key = func.coalesce(_ATTEMPTS.c.tier, literal_column("'standard'"))
        elif by in ("node", "model", "provider", "flow"):
            key = _ATTEMPTS.c[by]
        else:
            raise ValueError(
                f"costs(by={by!r}): use node, model, provider, flow, run, day or tier")
        ok = (_ATTEMPTS.c.outcome == Outcome.OK).cast(_ATTEMPTS.c.try_number.type)
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
                    _ATTEMPTS.c.outcome == Outcome.OK)
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
                                        _ATTEMPTS.c.outcome == Outcome.OK).values(feedback=good))
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
        where = [_ATTEMPTS.c.run_id == run_id, _ATTEMPTS.c.outcome == Outcome.OK]
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

    async def recorded_calls(
        self, *, flow: str, node: str, since: datetime | None = None,
        until: datetime | None = None,
        pick: Callable[[list[int]], Sequence[int]] | None = None,
    ) -> list[RecordedCall]:
        """The successful calls of `node` in `flow` recorded with their request, oldest
        first, started in [since, until); `pick` chooses among their ids (a sample) before
        the requests themselves are read."""
        await self.store.setup()
        c = _ATTEMPTS.c
        where = [c.flow == flow, c.node == node, c.outcome == Outcome.OK,
                 c.request.is_not(None)]
        if since is not None:
            where.append(c.started_at >= _utc(since))
        if until is not None:
            where.append(c.started_at < _utc(until))
        async with self.store.read() as conn:
            ids = [r[0] for r in (await conn.execute(
                select(c.id).where(*where).order_by(c.id))).all()]
            if pick is not None:
                ids = sorted(set(pick(ids)))
            rows: list[Any] = []
            for start in range(0, len(ids), 500):  # bounded IN lists
                rows += (await conn.execute(
                    select(c.id, c.run_id, c.call_id, c.node, c.model, c.started_at,
                           c.request, c.response, c.feedback)
                    .where(c.id.in_(ids[start:start + 500])).order_by(c.id))).all()
        return [RecordedCall(id=r.id, run_id=r.run_id, call_id=r.call_id, node=r.node,
                             model=r.model, started_at=_aware(r.started_at) or utcnow(),
                             request=r.request,
                             response=r.response, feedback=r.feedback) for r in rows]

    async def recorded_span(self, *, flow: str, node: str | None = None
                            ) -> tuple[int, int, datetime | None, datetime | None]:
        """What `recorded_calls` can draw on, to say why a filter matched nothing: the
        successful calls of `flow` (of `node`, if given), how many of them carry their
        request, and when the first and last of those started."""
        await self.store.setup()
        c = _ATTEMPTS.c
        where = [c.flow == flow, c.outcome == Outcome.OK]
        if node is not None:
            where.append(c.node == node)
        has = c.request.is_not(None)
        q = select(func.count(), func.count(case((has, 1))),
                   func.min(case((has, c.started_at))),
                   func.max(case((has, c.started_at)))).where(*where)
        async with self.store.read() as conn:
            n, with_request, first, last = (await conn.execute(q)).one()
        return int(n or 0), int(with_request or 0), _aware(first), _aware(last)

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


def _intent_plan(values: dict[str, Any], *, check: bool, pg: bool) -> Plan[None]:
    """Insert the pending row of a call about to be sent (`check`: unless a dropped try
    did)."""
    if check and (yield _find_attempt(values, pg)):
        return
    yield lean_op("attempts.insert", lambda: _ATTEMPTS.insert(), values, pg=pg,
                  columns=list(values))


def _attempt_plan(values: dict[str, Any], *, pg: bool) -> Plan[None]:
    """Insert the attempt row or fill its pending row, and add its cost to its run."""
    found = yield _find_attempt(values, pg)
    added = values["cost_usd"]
    if not found:
        yield lean_op("attempts.insert", lambda: _ATTEMPTS.insert(), values, pg=pg,
                      columns=list(values))
    elif found[0][1] in UNSETTLED:  # (id, outcome, cost_usd)
        yield lean_op("attempts.fill", lambda: update(_ATTEMPTS).where(
            _ATTEMPTS.c.id == bindparam("w_id")), {**values, "w_id": found[0][0]}, pg=pg,
            columns=list(values))
        if found[0][1] == Outcome.ABANDONED:  # its estimate was added to the run already
            added -= found[0][2] or 0.0
    else:
        return  # an earlier try of this write committed before its connection dropped
    if values["run_id"] and added:
        yield lean_op("runs.add_cost", _add_cost_prebuilt,
                      {"w_id": values["run_id"], "w_add": added, "w_at": utcnow()}, pg=pg)


def _find_attempt(values: dict[str, Any], pg: bool) -> Op:
    """The row (id, outcome, cost_usd) of this try of this call, if written."""
    return lean_op("attempts.find", lambda: select(
        _ATTEMPTS.c.id, _ATTEMPTS.c.outcome, _ATTEMPTS.c.cost_usd).where(
        _ATTEMPTS.c.call_id == bindparam("f_call"),
        _ATTEMPTS.c.try_number == bindparam("f_try"),
        _ATTEMPTS.c.model == bindparam("f_model")),  # one row (or an earlier try's)
        {"f_call": values["call_id"], "f_try": values["try_number"],
         "f_model": values["model"]}, pg=pg, fetch=True)


# The ledger's hot statements, with parameters (compiled once per driver: `lean_op`).
_NODE_COLUMNS = ("id", "run_id", "node", "status", "holder", "cost_usd", "started_at",
                 "finished_at", "error")


def _upsert_node_prebuilt(pg: bool) -> Any:
    insert = postgresql_insert if pg else sqlite_insert
    stmt = insert(_NODES)
    return stmt.on_conflict_do_update(index_elements=["id"], set_={
        "status": stmt.excluded.status, "started_at": stmt.excluded.started_at,
        "finished_at": null(), "holder": stmt.excluded.holder})


def _finish_node_prebuilt() -> Any:
    cost = select(func.coalesce(func.sum(_ATTEMPTS.c.cost_usd), literal_column("0.0"))).where(
        _ATTEMPTS.c.task_id == bindparam("w_id")).scalar_subquery()
    return update(_NODES).where(_NODES.c.id == bindparam("w_id")).values(
        status=bindparam("w_status", type_=_NODES.c.status.type),
        finished_at=bindparam("w_at", type_=_NODES.c.finished_at.type), cost_usd=cost,
        error=bindparam("w_error", type_=_NODES.c.error.type))


def _update_run_prebuilt() -> Any:
    return update(_RUNS).where(_RUNS.c.id == bindparam("w_id"))


def _add_cost_prebuilt() -> Any:
    return update(_RUNS).where(_RUNS.c.id == bindparam("w_id")).values(
        cost_usd=_RUNS.c.cost_usd + bindparam("w_add", type_=_RUNS.c.cost_usd.type),
        updated_at=bindparam("w_at", type_=_RUNS.c.updated_at.type))


UNSETTLED = (Outcome.PENDING, Outcome.ABANDONED)
"""Outcomes of calls written down before they were sent whose answer the ledger lacks."""


def _attempt_values(attempt: Attempt, flow: str | None) -> dict[str, Any]:
    """The ff_attempts row of `attempt` (every column but its id: no defaults applied)."""
    usage = attempt.usage
    values: dict[str, Any] = dict(
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
        feedback=None, category=attempt.category, usage_estimated=attempt.usage_estimated,
        # The answer is replayed on resume: kept as given, except exact key values.
        response=(scrub_exact(_message_json(attempt.response))
                  if attempt.response is not None else None),
        reasoning_tokens=usage.reasoning_tokens if usage else None,
        # Replayed by evaluations as it was sent: kept as given, except exact key values.
        request=scrub_exact(_plain_json(attempt.request)) if attempt.request else None,
        tier=attempt.tier, batch_item_id=attempt.batch_item_id,
    )
    return {k: _storable(v) for k, v in values.items()}


def _message_json(message: Any) -> dict[str, Any]:
    from langchain_core.messages import message_to_dict

    return _plain_json(message_to_dict(message))


def _plain_json(value: dict[str, Any]) -> dict[str, Any]:
    plain: dict[str, Any] = json.loads(json.dumps(value, default=str))
    return plain


def _aware(value: Any) -> datetime | None:
    """A timestamp read back (SQLite returns naive UTC ones, or text from an aggregate)."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    moment: datetime = value
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)


def _utc(value: datetime) -> datetime:
    """`value` in UTC, the zone timestamps are stored in (naive: taken as UTC already)."""
    return value.astimezone(timezone.utc) if value.tzinfo is not None else value


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


# Built once: building a select costs more than running it (SQLAlchemy caches its SQL).
_GET_RUN = _select_runs().where(_RUNS.c.id == bindparam("w_id"))


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
