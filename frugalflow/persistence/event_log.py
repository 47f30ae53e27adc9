"""The persisted event log (ff_events): every run event written in order, with its id.

One writer task per process takes the events published since its last write and inserts
them in one transaction, in publish order, so a run's ids grow in the order its events
happened. Only then are they delivered to subscribers, with `"id": <int>`: a subscriber that
sees an id can find that event, and every earlier one of the run, in the log.

The log never blocks or fails a run. When the database cannot be reached, the waiting events
are delivered at once with `"id": None` (live, not yet logged) and kept in memory, in order;
they are written (and get their ids) when the database answers again, before any later event.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select

from ..exceptions import StoreUnavailableError
from .errors import is_transient
from .leases import unfenced
from .scrub import scrub
from .tables import EventRow

if TYPE_CHECKING:
    from .store import Store

__all__ = ["EventLog", "row_event"]

log = logging.getLogger("frugalflow")

Event = dict[str, Any]
_EVENTS = EventRow.__table__  # type: ignore[attr-defined]
_HEAD = ("id", "run_id", "event", "at")  # keys the row holds in its own columns
_MAX_BATCH = 500  # events written by one transaction at most
# A write transaction costs about as much as a run's own (2-3 ms on SQLite here) and holds
# the write lock meanwhile: the writer gathers what runs publish for up to this long (the
# ledger's deferred writes wait as long) and writes it in one transaction. Written one event
# per transaction, a 20-node durable run on SQLite took 6x as long as without the log; with
# the window, 1.2x. A flush or drain (the end of a waited-for run, close) writes at once.
_GATHER_S = 0.05


def _at(value: Any) -> datetime:
    """The event's time as a datetime (it is published as an ISO string)."""
    if isinstance(value, datetime):
        return value
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return datetime.now(timezone.utc)


def row_event(row: Any) -> Event:
    """An ff_events row as the event dict subscribers get: id, run_id, event, at, fields."""
    at: datetime = row.at
    if at.tzinfo is None:  # SQLite keeps no time zone: stored times are UTC
        at = at.replace(tzinfo=timezone.utc)
    return {"id": row.id, "run_id": row.run_id, "event": row.kind, "at": at.isoformat(),
            **(row.data or {})}


class EventLog:
    """Writes run events to ff_events in batches (one writer task per process) and hands each
    to `deliver` once written (or, the database being away, at once with `"id": None`)."""

    def __init__(self, store: Store, *, backoff_max: float = 2.0) -> None:
        self.store = store
        self.deliver: Callable[[Event], None] = lambda _e: None
        """Called with each event once it has its id (or is known to be unlogged for now)."""
        self.backoff_max = backoff_max
        self._pending: list[Event] = []  # in publish order, not yet written
        self._delivered = 0  # how many of the first _pending were already delivered unlogged
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()  # someone waits for the log: write without gathering
        self._idle = asyncio.Event()  # every event published so far reached its subscribers
        self._drained = asyncio.Event()  # every event published so far is written
        self._task: asyncio.Task[None] | None = None
        self._idle.set()
        self._drained.set()
        self._down_since: float | None = None  # monotonic time the database went away
        self.written = 0
        """Events written since this log was created (tests and the bench read it)."""

    @property
    def unwritten(self) -> int:
        """Events waiting for the database (published, not yet in ff_events)."""
        return len(self._pending)

    def append(self, event: Event) -> None:
        """Queue `event` (its data scrubbed) for the log; never blocks, never raises."""
        head = {k: event[k] for k in _HEAD if k in event}
        # JSON-safe once, here: the live event and the logged one are the same.
        fields = json.loads(json.dumps(
            scrub({k: v for k, v in event.items() if k not in _HEAD}), default=str))
        event = {**head, "id": None, **fields}
        self._attach()
        self._pending.append(event)
        if self._down_since is not None:
            # The database is away: subscribers get it now, marked unlogged (id None).
            self._delivered = len(self._pending)
            self._safe_deliver(dict(event))  # a copy: its id is set later
        else:
            self._idle.clear()
        self._drained.clear()
        self._wake.set()
        self._ensure_writer()

    def _ensure_writer(self) -> None:
        """Start the writer task if events wait and none runs in this loop."""
        self._attach()
        if self._pending and (self._task is None or self._task.done()):
            # Its own context: the writer must not inherit the fence of the run whose event
            # started it (events are written whoever holds the lease).
            with unfenced():
                self._task = asyncio.get_running_loop().create_task(self._write_loop())

    def _attach(self) -> None:
        """Bind to the running loop (a Runner may serve several `asyncio.run`s in turn: the
        writer task of a closed loop is gone with it)."""
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        self._loop, self._task = loop, None
        self._wake, self._idle, self._drained = asyncio.Event(), asyncio.Event(), asyncio.Event()
        self._urgent = asyncio.Event()
        if not self._pending:
            self._idle.set()
            self._drained.set()

    def _safe_deliver(self, event: Event) -> None:
        try:
            self.deliver(event)
        except Exception:  # a subscriber's bug never stops the log
            log.warning("frugalflow: delivering an event failed", exc_info=True)

    async def _write_loop(self) -> None:
        delay = 0.05
        while True:
            if not self._pending:
                self._idle.set()
                self._drained.set()
                self._urgent.clear()
                self._wake.clear()
                await self._wake.wait()
                continue
            if len(self._pending) < _MAX_BATCH and not self._urgent.is_set() \
                    and self._down_since is None:
                with contextlib.suppress(asyncio.TimeoutError):  # gather the run's next events
                    await asyncio.wait_for(self._urgent.wait(), _GATHER_S)
            batch = self._pending[:_MAX_BATCH]
            ids: list[int | None]
            try:
                ids = list(await self._insert(batch))
            except Exception as e:
                if not (isinstance(e, StoreUnavailableError) or is_transient(e)):
                    log.error("frugalflow: %d event(s) could not be written to the event log "
                              "and are dropped from it", len(batch), exc_info=True)
                    ids = [None] * len(batch)  # not retryable: deliver them unlogged, move on
                else:
                    self._went_down(e)
                    await self._backoff(delay)
                    delay = min(delay * 2, self.backoff_max)
                    continue
            delay = 0.05
            if self._down_since is not None:
                log.info("frugalflow: event log writing again (%d event(s) were kept)",
                         len(self._pending))
                self._down_since = None
            self._pending = self._pending[len(batch):]
            seen, self._delivered = self._delivered, max(0, self._delivered - len(batch))
            for i, (event, event_id) in enumerate(zip(batch, ids)):
                event["id"] = event_id
                if i >= seen:  # those delivered unlogged were delivered already
                    self._safe_deliver(event)
            self.written += len(batch)

    def _went_down(self, error: BaseException) -> None:
        """The database is away: deliver what waits, unlogged, and note since when."""
        if self._down_since is None:
            self._down_since = time.monotonic()
            log.warning("frugalflow: the event log cannot reach the database (%s); events are "
                        "delivered live and kept until it is back", error)
        for event in self._pending[self._delivered:]:
            self._safe_deliver(dict(event))  # a copy: its id is set later
        self._delivered = len(self._pending)
        self._idle.set()  # everything published so far has reached its subscribers

    async def _backoff(self, delay: float) -> None:
        """Wait `delay` before trying again (a new event does not make the database come
        back sooner, so it does not shorten the wait)."""
        await asyncio.sleep(delay)

    async def _insert(self, batch: Sequence[Event]) -> list[int]:
        rows = [{"run_id": e["run_id"], "kind": e["event"], "at": _at(e.get("at")),
                 "data": {k: v for k, v in e.items() if k not in _HEAD}} for e in batch]
        await self.store.setup()
        with unfenced():
            async with self.store.write() as conn:
                if self.store.is_sqlite:
                    # The write lock is ours (BEGIN IMMEDIATE): the next ids are known, and
                    # a plain executemany is several times cheaper than one with RETURNING.
                    top = (await conn.execute(select(func.max(_EVENTS.c.id)))).scalar() or 0
                    ids = list(range(int(top) + 1, int(top) + 1 + len(rows)))
                    await conn.execute(insert(_EVENTS),
                                       [{"id": i, **r} for i, r in zip(ids, rows)])
                    return ids
                # sort_by_parameter_order: the ids come back in the order of the rows, and
                # each dialect assigns them in that order (one statement, one transaction).
                result = await conn.execute(
                    insert(_EVENTS).returning(_EVENTS.c.id, sort_by_parameter_order=True), rows)
                return [int(r[0]) for r in result.all()]

    async def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event published so far has reached its subscribers (written,
        or delivered unlogged while the database is away). False on timeout."""
        return await self._wait_for(lambda: self._idle, timeout)

    async def drain(self, timeout: float = 30.0) -> bool:
        """Wait until every event published so far is written to the log. False on
        timeout (the database is still away)."""
        return await self._wait_for(lambda: self._drained, timeout)

    async def _wait_for(self, done: Callable[[], asyncio.Event], timeout: float) -> bool:
        """Write what waits at once (no gathering window) and wait for `done()` (read after
        binding to this loop, which may replace the events)."""
        self._ensure_writer()
        if self._pending:
            self._urgent.set()
        try:
            await asyncio.wait_for(done().wait(), timeout)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self, timeout: float = 5.0) -> None:
        """Write what waits (for up to `timeout` s), then stop the writer task."""
        if self._pending:
            await self.drain(timeout)  # the writer retries meanwhile
        if self._pending:
            log.error("frugalflow: %d event(s) could not be written to the event log: the "
                      "database is unreachable", len(self._pending))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def read(self, run_id: str, after: int = 0, *, limit: int = 1000) -> list[Event]:
        """The logged events of `run_id` with an id above `after`, in order (at most
        `limit`: read again after the last one for more)."""
        stmt = (select(_EVENTS).where(_EVENTS.c.run_id == run_id, _EVENTS.c.id > after)
                .order_by(_EVENTS.c.id).limit(limit))
        await self.store.setup()
        async with self.store.read() as conn:
            rows = (await conn.execute(stmt)).all()
        return [row_event(r) for r in rows]

    async def last(self, run_id: str) -> Event | None:
        """The newest logged event of `run_id` (None: none logged)."""
        stmt = (select(_EVENTS).where(_EVENTS.c.run_id == run_id)
                .order_by(_EVENTS.c.id.desc()).limit(1))
        await self.store.setup()
        async with self.store.read() as conn:
            row = (await conn.execute(stmt)).first()
        return None if row is None else row_event(row)
