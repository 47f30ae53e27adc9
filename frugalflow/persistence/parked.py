"""The ledger of parked requests: batch items and timers (`ff_batch_items`) and the provider
batches they were sent in (`ff_batches`).

A routed call on a batch tier writes its request here and its run parks; the poller
(`frugalflow.batches.poller`) groups queued items into batches, sends them, collects their
answers and wakes the runs; the node, executed again, takes its answer from here. Every
state change is one conditional UPDATE (`... WHERE status IN (...)`), so two pollers, or a
poller and a run, never both act on one item: whoever's UPDATE matched acted.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, or_, select, update

from ..statuses import BatchItemStatus, BatchStatus, Outcome, RunStatus
from ..usage import Attempt, Usage
from .leases import unfenced
from .store import Store
from .tables import AttemptRow, BatchItemRow, BatchRow, RunRow, utcnow

__all__ = ["ENDED_RUNS", "OPEN_ITEMS", "READY_ITEMS", "ParkedLedger", "aware", "late_attempt"]

_ITEMS = BatchItemRow.__table__  # type: ignore[attr-defined]
_BATCHES = BatchRow.__table__  # type: ignore[attr-defined]
_RUNS = RunRow.__table__  # type: ignore[attr-defined]
_ATTEMPTS = AttemptRow.__table__  # type: ignore[attr-defined]

OPEN_ITEMS = (BatchItemStatus.QUEUED, BatchItemStatus.SUBMITTED)
"""Items still waiting for an answer (or their hour)."""
READY_ITEMS = (BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED, BatchItemStatus.EXPIRED,
               BatchItemStatus.DUE)
"""Items whose node has something to act on."""
ENDED_RUNS = (RunStatus.CANCELLED, RunStatus.SUCCEEDED, RunStatus.FAILED,
              RunStatus.BUDGET_EXCEEDED)
"""Runs nothing waits in any more: their open items are given up (batches cancelled), their
unused answers recorded as late. (A failed or over-budget run may be resumed: its calls then
find their items abandoned and call synchronously. Interrupted and paused runs go on.)"""
_LIVE_BATCHES = (BatchStatus.SUBMITTING, BatchStatus.SUBMITTED)
_IDS_PER_QUERY = 5_000
"""Item ids bound in one `IN (...)`: PostgreSQL (asyncpg) takes at most 32,767 parameters
and SQLite 32,766 per statement, while a provider batch holds up to 50,000 (OpenAI) or
100,000 (Anthropic) requests."""


def _id_chunks(ids: Sequence[str]) -> list[list[str]]:
    return [list(ids[i:i + _IDS_PER_QUERY]) for i in range(0, len(ids), _IDS_PER_QUERY)]


def aware(value: datetime | None) -> datetime | None:
    """A stored timestamp as UTC (SQLite gives naive UTC ones back)."""
    if value is None:
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _item(mapping: Any) -> BatchItemRow:
    row = BatchItemRow.model_validate(dict(mapping))
    for name in ("created_at", "deadline_at", "fallback_at", "wake_at", "ended_at"):
        setattr(row, name, aware(getattr(row, name)))
    return row


def _batch(mapping: Any) -> BatchRow:
    row = BatchRow.model_validate(dict(mapping))
    for name in ("created_at", "submitted_at", "polled_at", "ended_at", "claimed_until"):
        setattr(row, name, aware(getattr(row, name)))
    return row


class ParkedLedger:
    """Reads and conditional writes of parked items and batches, on one Store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # -- the run's side ----------------------------------------------------------------------

    async def items_for(self, run_id: str, call_key: str) -> list[BatchItemRow]:
        """The items parked for one call of a run, oldest first."""
        async def read() -> list[BatchItemRow]:
            async with self.store.read() as conn:
                rows = (await conn.execute(
                    select(_ITEMS).where(_ITEMS.c.run_id == run_id, _ITEMS.c.call_key == call_key)
                    .order_by(_ITEMS.c.created_at, _ITEMS.c.id))).all()
            return [_item(r._mapping) for r in rows]

        return await self.store.retrying(read, what="read of parked items")

    async def park(self, item: BatchItemRow) -> None:
        """Write a new parked item (fenced by the run's lease, like its other writes)."""
        values = item.model_dump()

        async def write() -> None:
            async with self.store.write() as conn:
                exists = (await conn.execute(select(_ITEMS.c.id).where(
                    _ITEMS.c.id == item.id))).first()
                if exists is None:  # a retry whose first try committed
                    await conn.execute(_ITEMS.insert().values(**values))

        await self.store.retrying(write, what="parked item")

    async def move(self, item_id: str, to: BatchItemStatus,
                   when: Iterable[BatchItemStatus], **changes: Any) -> bool:
        """Move an item to `to` if it is in one of `when`; whether it moved."""
        changes["status"] = to
        states = [str(s) for s in when]

        async def write() -> bool:
            async with self.store.write() as conn:
                result = await conn.execute(update(_ITEMS).where(
                    _ITEMS.c.id == item_id, _ITEMS.c.status.in_(states)).values(**changes))
            return bool(result.rowcount)

        with unfenced():  # a parked item's state is the poller's and the run's alike
            return await self.store.retrying(write, what="parked item update")

    # -- the poller's side -------------------------------------------------------------------

    async def queued(self, tier: str = "batch") -> list[BatchItemRow]:
        """Items waiting to be sent in a batch (or timers waiting for their hour)."""
        async def read() -> list[BatchItemRow]:
            async with self.store.read() as conn:
                rows = (await conn.execute(select(_ITEMS).where(
                    _ITEMS.c.status == BatchItemStatus.QUEUED, _ITEMS.c.tier == tier,
                    _ITEMS.c.batch_id.is_(None)).order_by(_ITEMS.c.created_at))).all()
            return [_item(r._mapping) for r in rows]

        return await self.store.retrying(read, what="read of queued items")

    async def open_batch(self, batch: BatchRow, item_ids: Sequence[str], holder: str,
                         claim_for: timedelta, now: datetime) -> list[BatchItemRow]:
        """Write `batch` as `submitting` (claimed by `holder`) and take into it those of
        `item_ids` that no other batch took meanwhile; the items it holds."""
        batch.status, batch.holder = BatchStatus.SUBMITTING, holder
        batch.claimed_until = now + claim_for

        async def write() -> list[BatchItemRow]:
            async with self.store.write() as conn:
                if (await conn.execute(select(_BATCHES.c.id).where(
                        _BATCHES.c.id == batch.id))).first() is None:
                    # Items first: a poller that lost them all to another writes no batch.
                    for chunk in _id_chunks(item_ids):
                        await conn.execute(update(_ITEMS).where(
                            _ITEMS.c.id.in_(chunk), _ITEMS.c.batch_id.is_(None),
                            _ITEMS.c.status == BatchItemStatus.QUEUED).values(
                            batch_id=batch.id))
                    rows = (await conn.execute(select(_ITEMS).where(
                        _ITEMS.c.batch_id == batch.id).order_by(_ITEMS.c.created_at))).all()
                    if rows:
                        await conn.execute(_BATCHES.insert().values(
                            **{**batch.model_dump(), "items": len(rows)}))
                else:  # a retry whose first try committed
                    rows = (await conn.execute(select(_ITEMS).where(
                        _ITEMS.c.batch_id == batch.id).order_by(_ITEMS.c.created_at))).all()
            return [_item(r._mapping) for r in rows]

        with unfenced():
            return await self.store.retrying(write, what="new batch")

    async def batch_items(self, batch_id: str) -> list[BatchItemRow]:
        async def read() -> list[BatchItemRow]:
            async with self.store.read() as conn:
                rows = (await conn.execute(select(_ITEMS).where(
                    _ITEMS.c.batch_id == batch_id).order_by(_ITEMS.c.created_at))).all()
            return [_item(r._mapping) for r in rows]

        return await self.store.retrying(read, what="read of a batch's items")

    async def claim_batches(self, holder: str, now: datetime, claim_for: timedelta, *,
                            poll_every: timedelta, limit: int = 50) -> list[BatchRow]:
        """Batches this holder may act on now, claimed until `now + claim_for`: those being
        sent whose claim lapsed (their sender died: `find` them at the provider before
        sending again) and those sent whose last poll is older than `poll_every`."""
        async def write() -> list[BatchRow]:
            async with self.store.write() as conn:
                free = or_(_BATCHES.c.claimed_until.is_(None), _BATCHES.c.claimed_until < now)
                due = or_(_BATCHES.c.status == BatchStatus.SUBMITTING,
                          _BATCHES.c.polled_at.is_(None),
                          _BATCHES.c.polled_at <= now - poll_every)
                rows = (await conn.execute(select(_BATCHES).where(
                    _BATCHES.c.status.in_([str(s) for s in _LIVE_BATCHES]), free, due)
                    .order_by(_BATCHES.c.created_at).limit(limit))).all()
                claimed: list[BatchRow] = []
                for r in rows:
                    moved = await conn.execute(update(_BATCHES).where(
                        _BATCHES.c.id == r.id, free).values(
                        holder=holder, claimed_until=now + claim_for))
                    if moved.rowcount:
                        claimed.append(_batch(r._mapping))
            return claimed

        with unfenced():
            return await self.store.retrying(write, what="batch claims")

    async def renew_claim(self, batch_id: str, holder: str, now: datetime,
                          claim_for: timedelta) -> bool:
        """Claim a batch until `now + claim_for` if `holder` holds it or nobody does;
        whether it did (False: another poller has taken it)."""
        async def write() -> bool:
            async with self.store.write() as conn:
                result = await conn.execute(update(_BATCHES).where(
                    _BATCHES.c.id == batch_id, or_(
                        _BATCHES.c.holder == holder, _BATCHES.c.claimed_until.is_(None),
                        _BATCHES.c.claimed_until < now)).values(
                    holder=holder, claimed_until=now + claim_for))
            return bool(result.rowcount)

        with unfenced():
            return await self.store.retrying(write, what="batch claim")

    async def release_claim(self, batch_id: str, holder: str) -> None:
        """Drop `holder`'s claim on a batch (another poller's claim is left alone)."""
        async def write() -> None:
            async with self.store.write() as conn:
                await conn.execute(update(_BATCHES).where(
                    _BATCHES.c.id == batch_id, _BATCHES.c.holder == holder).values(
                    claimed_until=None))

        with unfenced():
            await self.store.retrying(write, what="batch claim")

    async def update_batch(self, batch_id: str, **changes: Any) -> None:
        async def write() -> None:
            async with self.store.write() as conn:
                await conn.execute(update(_BATCHES).where(_BATCHES.c.id == batch_id)
                                   .values(**changes))

        with unfenced():
            await self.store.retrying(write, what="batch update")

    async def set_batch_items(self, batch_id: str, to: BatchItemStatus,
                              when: Iterable[BatchItemStatus]) -> None:
        states = [str(s) for s in when]

        async def write() -> None:
            async with self.store.write() as conn:
                await conn.execute(update(_ITEMS).where(
                    _ITEMS.c.batch_id == batch_id, _ITEMS.c.status.in_(states)).values(status=to))

        with unfenced():
            await self.store.retrying(write, what="batch items update")

    async def runs_to_wake(self, now: datetime) -> list[str]:
        """Waiting runs with an item to act on: an answer or error in, a timer's hour come,
        or an open item past the time to fall back to a synchronous call."""
        async def read() -> list[str]:
            async with self.store.read() as conn:
                ready = or_(_ITEMS.c.status.in_([str(s) for s in READY_ITEMS]),
                            and_(_ITEMS.c.status.in_([str(s) for s in OPEN_ITEMS]),
                                 _ITEMS.c.fallback_at.is_not(None),
                                 _ITEMS.c.fallback_at <= now))
                rows = (await conn.execute(select(_ITEMS.c.run_id).distinct().join(
                    _RUNS, _RUNS.c.id == _ITEMS.c.run_id).where(
                    _RUNS.c.status == RunStatus.WAITING, ready))).all()
            return [r[0] for r in rows]

        return await self.store.retrying(read, what="read of runs to wake")

    async def due_timers(self, now: datetime) -> int:
        """Timers whose hour came become `due`; how many."""
        async def write() -> int:
            async with self.store.write() as conn:
                result = await conn.execute(update(_ITEMS).where(
                    _ITEMS.c.status == BatchItemStatus.QUEUED, _ITEMS.c.tier == "off_peak",
                    _ITEMS.c.wake_at <= now).values(status=BatchItemStatus.DUE))
            return int(result.rowcount or 0)

        with unfenced():
            return await self.store.retrying(write, what="due timers")

    async def abandon_ended_runs(self, now: datetime) -> list[str]:
        """Open items of runs that ended (cancelled, succeeded, failed, over budget) are
        abandoned, and answers they left unused are recorded as paid `late` attempts; the
        batches whose every unanswered item is now abandoned (to cancel at the provider, or
        close unsent)."""
        async def write() -> list[str]:
            async with self.store.write() as conn:
                gone = _ITEMS.c.run_id.in_(select(_RUNS.c.id).where(
                    _RUNS.c.status.in_([str(s) for s in ENDED_RUNS])))
                await conn.execute(update(_ITEMS).where(
                    _ITEMS.c.status.in_([str(s) for s in OPEN_ITEMS]), gone).values(
                    status=BatchItemStatus.ABANDONED, ended_at=now, error="its run ended"))
                await _unused_answers_late(conn, gone, "answered after its run had ended")
                return await self._unwanted(conn)

        with unfenced():
            return await self.store.retrying(write, what="abandoned items")

    async def abandon_run(self, run_id: str, now: datetime) -> int:
        """Give up a run's open items (it was cancelled), and record the answers it left
        unused as paid `late` attempts; how many open items were given up."""
        async def write() -> int:
            async with self.store.write() as conn:
                result = await conn.execute(update(_ITEMS).where(
                    _ITEMS.c.run_id == run_id,
                    _ITEMS.c.status.in_([str(s) for s in OPEN_ITEMS])).values(
                    status=BatchItemStatus.ABANDONED, ended_at=now, error="its run was cancelled"))
                await _unused_answers_late(conn, _ITEMS.c.run_id == run_id,
                                           "answered, but its run was cancelled")
            return int(result.rowcount or 0)

        with unfenced():
            return await self.store.retrying(write, what="abandoned items")

    async def give_up_call(self, item: BatchItemRow, now: datetime) -> float:
        """Before `item` is parked: the items parked by earlier executions of its node at
        its call's place (same run, task and position) under another call key are given up:
        the execution asks something else there now (a prompt that changed), so no answer
        of theirs is this call's. Their unused answers are recorded as paid `late`
        attempts, the rest abandoned (batches cancelled when nobody waits). The late cost
        (0: none), or -1 when there were no such items (the call may park)."""
        if item.call_position is None or item.task_id is None:
            return -1.0

        async def write() -> float:
            async with self.store.write() as conn:
                earlier = and_(_ITEMS.c.run_id == item.run_id, _ITEMS.c.task_id == item.task_id,
                               _ITEMS.c.node == item.node,
                               _ITEMS.c.call_position == item.call_position,
                               _ITEMS.c.call_key != item.call_key)
                # Any, used or given up too: a call that asked something else once (a
                # crash, its answer not replayed under its new key) never waits again.
                any_earlier = select(_ITEMS.c.id).where(earlier).limit(1)
                if (await conn.execute(any_earlier)).first() is None:
                    return -1.0
                cost = await _unused_answers_late(
                    conn, earlier, "answered, but its node asked something else when executed "
                                   "again (its prompt changed)")
                await conn.execute(update(_ITEMS).where(
                    earlier, _ITEMS.c.status.in_([str(s) for s in (*OPEN_ITEMS, *READY_ITEMS)]))
                    .values(status=BatchItemStatus.ABANDONED, ended_at=now,
                            error="its node asked something else when executed again"))
                return cost

        with unfenced():
            return await self.store.retrying(write, what="items given up")

    async def unwanted_batches(self) -> list[str]:
        """Live batches (sent, or being sent) none of whose unanswered items any run waits
        for any more."""
        async def read() -> list[str]:
            async with self.store.read() as conn:
                return await self._unwanted(conn)

        return await self.store.retrying(read, what="read of unwanted batches")

    @staticmethod
    async def _unwanted(conn: Any) -> list[str]:
        waiting = select(_ITEMS.c.batch_id).where(
            _ITEMS.c.status.in_([str(s) for s in OPEN_ITEMS]), _ITEMS.c.batch_id.is_not(None))
        abandoned = select(_ITEMS.c.batch_id).where(
            _ITEMS.c.status == BatchItemStatus.ABANDONED, _ITEMS.c.batch_id.is_not(None))
        # Being sent too: one whose send failed is closed unsent, or, found at the
        # provider after all, cancelled there.
        rows = (await conn.execute(select(_BATCHES.c.id).where(
            _BATCHES.c.status.in_([str(s) for s in _LIVE_BATCHES]), _BATCHES.c.id.in_(abandoned),
            _BATCHES.c.id.not_in(waiting)))).all()
        return [r[0] for r in rows]

    async def get_batch(self, batch_id: str) -> BatchRow | None:
        async def read() -> BatchRow | None:
            async with self.store.read() as conn:
                row = (await conn.execute(select(_BATCHES).where(
                    _BATCHES.c.id == batch_id))).first()
            return _batch(row._mapping) if row is not None else None

        return await self.store.retrying(read, what="read of a batch")

    async def all_items(self, run_id: str | None = None) -> list[BatchItemRow]:
        """Every parked item (of one run), oldest first: for tests, `explain` and the viewer."""
        async def read() -> list[BatchItemRow]:
            async with self.store.read() as conn:
                q = select(_ITEMS).order_by(_ITEMS.c.created_at, _ITEMS.c.id)
                if run_id is not None:
                    q = q.where(_ITEMS.c.run_id == run_id)
                rows = (await conn.execute(q)).all()
            return [_item(r._mapping) for r in rows]

        return await self.store.retrying(read, what="read of parked items")

    async def all_batches(self) -> list[BatchRow]:
        async def read() -> list[BatchRow]:
            async with self.store.read() as conn:
                rows = (await conn.execute(select(_BATCHES).order_by(_BATCHES.c.created_at))).all()
            return [_batch(r._mapping) for r in rows]

        return await self.store.retrying(read, what="read of batches")


async def _unused_answers_late(conn: Any, where: Any, why: str) -> float:
    """The answered items matching `where` that no call took become `abandoned`, each
    recorded as a `late` attempt with its cost (added to its run's) in the same transaction:
    paid, so in the ledger, exactly once. One whose answer a call recorded already (it
    stopped before marking the item used) is only marked used. Their cost."""
    from .ledger import _attempt_values

    rows = (await conn.execute(select(_ITEMS).where(
        _ITEMS.c.status == BatchItemStatus.SUCCEEDED, where))).all()
    recorded = 0.0
    for row in rows:
        item = _item(row._mapping)
        answered = (await conn.execute(select(_ATTEMPTS.c.id).where(
            _ATTEMPTS.c.batch_item_id == item.id).limit(1))).first() is not None
        moved = await conn.execute(update(_ITEMS).where(
            _ITEMS.c.id == item.id, _ITEMS.c.status == BatchItemStatus.SUCCEEDED).values(
            status=BatchItemStatus.USED if answered else BatchItemStatus.ABANDONED,
            error=None if answered else why))
        if answered or not moved.rowcount:
            continue
        await conn.execute(_ATTEMPTS.insert().values(
            **_attempt_values(late_attempt(item, why), item.flow)))
        if item.cost_usd:
            await conn.execute(update(_RUNS).where(_RUNS.c.id == item.run_id).values(
                cost_usd=_RUNS.c.cost_usd + item.cost_usd, updated_at=utcnow()))
        recorded += item.cost_usd
    return recorded


def late_attempt(item: BatchItemRow, why: str) -> Attempt:
    """The `late` attempt of an answered item no call used: paid, not used."""
    usage = Usage(input_tokens=item.input_tokens, output_tokens=item.output_tokens, requests=1)
    created = item.created_at or item.ended_at or utcnow()
    return Attempt(
        node=item.node, model=item.model, provider=item.provider, outcome=Outcome.LATE,
        # Try 0: not one of its call's tries (as the poller's late answers).
        call_id=item.call_id, run_id=item.run_id, task_id=item.task_id, try_number=0,
        usage=usage, cost_usd=item.cost_usd, started_at=created.timestamp(), call_key=None,
        tier=item.tier, batch_item_id=item.id, error=why)
