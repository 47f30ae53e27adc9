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

from ..statuses import BatchItemStatus, BatchStatus, RunStatus
from .leases import unfenced
from .store import Store
from .tables import BatchItemRow, BatchRow, RunRow

__all__ = ["OPEN_ITEMS", "READY_ITEMS", "ParkedLedger", "aware"]

_ITEMS = BatchItemRow.__table__  # type: ignore[attr-defined]
_BATCHES = BatchRow.__table__  # type: ignore[attr-defined]
_RUNS = RunRow.__table__  # type: ignore[attr-defined]

OPEN_ITEMS = (BatchItemStatus.QUEUED, BatchItemStatus.SUBMITTED)
"""Items still waiting for an answer (or their hour)."""
READY_ITEMS = (BatchItemStatus.SUCCEEDED, BatchItemStatus.FAILED, BatchItemStatus.EXPIRED,
               BatchItemStatus.DUE)
"""Items whose node has something to act on."""
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
        """Open items of cancelled or finished runs are abandoned; the batches whose every
        unanswered item is now abandoned (to cancel at the provider, or close unsent)."""
        async def write() -> list[str]:
            async with self.store.write() as conn:
                gone = select(_RUNS.c.id).where(_RUNS.c.status.in_(
                    [str(RunStatus.CANCELLED), str(RunStatus.SUCCEEDED)]))
                await conn.execute(update(_ITEMS).where(
                    _ITEMS.c.status.in_([str(s) for s in OPEN_ITEMS]),
                    _ITEMS.c.run_id.in_(gone)).values(
                    status=BatchItemStatus.ABANDONED, ended_at=now,
                    error="its run was cancelled or ended"))
                return await self._unwanted(conn)

        with unfenced():
            return await self.store.retrying(write, what="abandoned items")

    async def abandon_run(self, run_id: str, now: datetime) -> int:
        """Give up a run's open items (it was cancelled); how many."""
        async def write() -> int:
            async with self.store.write() as conn:
                result = await conn.execute(update(_ITEMS).where(
                    _ITEMS.c.run_id == run_id,
                    _ITEMS.c.status.in_([str(s) for s in OPEN_ITEMS])).values(
                    status=BatchItemStatus.ABANDONED, ended_at=now, error="its run was cancelled"))
            return int(result.rowcount or 0)

        with unfenced():
            return await self.store.retrying(write, what="abandoned items")

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
