"""Run events in this process: an in-process publish/subscribe bus the runner feeds.

Events are plain dicts (`id`, `run_id`, `event`, `at`, then the event's fields): run and
node starts and ends, and every model attempt. With an event log (the Runner's: ff_events,
`frugalflow.persistence.event_log`) an event reaches subscribers once it is written, with its
`id`; `"id": None` marks one delivered live but not (yet) in the log (the database is away;
it is written, with an id, when it is back), or published on a bus without a log. A relay
(`frugalflow.scale.relay`) shares them with the other processes of the database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from typing import Any, Protocol, TypeAlias

from .persistence.scrub import scrub
from .persistence.tables import utcnow
from .usage import Attempt

__all__ = ["Event", "EventBus", "EventLogLike", "EventRelay", "attempt_event"]

_log = logging.getLogger("frugalflow")

Event: TypeAlias = dict[str, Any]
"""One run event: `id` (its id in the event log, None if not logged), `run_id`, `event`
(its kind), `at` (ISO time), then the kind's fields."""


class EventRelay(Protocol):
    """Carries this process's events to the other processes (PostgresEventRelay)."""

    def send(self, event: Event) -> None: ...


class EventLogLike(Protocol):
    """Where a bus writes its events before delivering them (`EventLog`)."""

    deliver: Callable[[Event], None]

    def append(self, event: Event) -> None: ...

    async def flush(self, timeout: float = 30.0) -> bool: ...

    async def drain(self, timeout: float = 30.0) -> bool: ...

    async def close(self, timeout: float = 5.0) -> None: ...

    async def read(self, run_id: str, after: int = 0, *, limit: int = 1000) -> list[Event]: ...

    async def last(self, run_id: str) -> Event | None: ...


def attempt_event(a: Attempt) -> dict[str, Any]:
    """The fields of an `attempt` event: one model call, its error scrubbed of secrets."""
    u = a.usage
    return {
        "node": a.node, "model": a.model, "provider": a.provider, "outcome": a.outcome,
        "error_class": a.error_class, "error": scrub(a.error) if a.error else None,
        "action": a.action, "fallback_from": a.fallback_from, "cost_usd": a.cost_usd,
        "latency_ms": round(a.latency_ms, 2), "call_id": a.call_id, "task_id": a.task_id,
        "try_number": a.try_number, "route_reason": a.route_reason,
        "started_at": datetime.fromtimestamp(a.started_at, timezone.utc).isoformat(),
        "input_tokens": u.input_tokens if u else 0, "output_tokens": u.output_tokens if u else 0,
        "usage_estimated": a.usage_estimated,
        # The service tier it was made and priced on (None: standard), and for a batch
        # answer its parked request: what the viewer tags, and how a late answer is told.
        "tier": a.tier, "batch_item_id": a.batch_item_id,
    }


class EventBus:
    """In-process publish/subscribe of run events (`subscribe(run_id)` or all runs)."""

    def __init__(self, maxsize: int = 1000, *, log: EventLogLike | None = None) -> None:
        self._subs: list[tuple[str | None, asyncio.Queue[Event]]] = []
        self._maxsize = maxsize

        self.relay: EventRelay | None = None
        """Set to a PostgresEventRelay to share events with every process of the database."""
        self.log = log
        """The event log events are written to before delivery (None: delivered at once)."""
        if log is not None:
            log.deliver = self.dispatch

    def publish(self, run_id: str, kind: str, **data: Any) -> None:
        """Publish one event of run `run_id`. Never blocks and never raises for the log's
        sake: with a log, it is delivered once written (or at once, `"id": None`, while the
        database is away)."""
        event: Event = {"id": None, "run_id": run_id, "event": kind,
                        "at": utcnow().isoformat(), **data}
        if self.log is not None and run_id:
            try:
                self.log.append(event)
                return
            except Exception:  # no running loop (a thread), a value scrub cannot read...
                _log.warning("frugalflow: event %s of run %s not logged; delivered live",
                             kind, run_id, exc_info=True)
        self.dispatch(event)

    def dispatch(self, event: Event) -> None:
        """Hand `event` to this process's subscribers and to the relay."""
        self.deliver(event)
        if self.relay is not None:
            self.relay.send(event)

    async def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every event published so far reached its subscribers."""
        return True if self.log is None else await self.log.flush(timeout)

    def deliver(self, event: Event) -> None:
        """Hand `event` to this process's subscribers."""
        run_id = event.get("run_id")
        for rid, queue in list(self._subs):
            if rid is None or rid == run_id:
                with contextlib.suppress(asyncio.QueueFull):  # a slow consumer loses events
                    queue.put_nowait(event)

    @contextlib.asynccontextmanager
    async def subscribe(self, run_id: str | None = None
                        ) -> AsyncIterator[AsyncIterator[Event]]:
        """`async with bus.subscribe(id) as events: async for e in events: ...`"""
        async with self.queue(run_id) as queue:

            async def iterate() -> AsyncIterator[Event]:
                while True:
                    yield await queue.get()

            yield iterate()

    @contextlib.asynccontextmanager
    async def queue(self, run_id: str | None = None) -> AsyncIterator[asyncio.Queue[Event]]:
        """The events as an asyncio.Queue (safe to `wait_for(queue.get(), t)`)."""
        queue: asyncio.Queue[Event] = asyncio.Queue(self._maxsize)
        entry = (run_id, queue)
        self._subs.append(entry)
        try:
            yield queue
        finally:
            self._subs.remove(entry)
