"""Run events shared between processes through PostgreSQL LISTEN/NOTIFY (needs asyncpg).

Events carry their event-log id. NOTIFY is best effort (a payload is limited to 8000 bytes,
and events sent while a connection is down are lost): an event too big arrives as its head
with `"truncated": True`, and the service's stream reads the log for the whole of it and
for anything a lost NOTIFY did not bring (`frugalflow.service.stream`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from typing import Any


from ..events import Event, EventBus
from ..persistence.store import postgres_url

__all__ = ["PostgresEventRelay"]

log = logging.getLogger("frugalflow")


class PostgresEventRelay:
    """Shares run events between processes through PostgreSQL LISTEN/NOTIFY, so a service's
    event stream shows what workers on other machines do."""

    CHANNEL = "frugalflow_events"

    def __init__(self, url: str, bus: EventBus) -> None:
        self.dsn = postgres_url(url)
        self.bus = bus
        self.origin = uuid.uuid4().hex
        self._conn: Any = None
        self._outbox: asyncio.Queue[str] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._reconnecting: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self._connect()
        self._outbox = asyncio.Queue(10_000)
        self._sender = asyncio.create_task(self._send_loop())
        self.bus.relay = self

    async def _connect(self) -> None:
        import asyncpg

        self._conn = await asyncpg.connect(self.dsn)
        await self._conn.add_listener(self.CHANNEL, self._on_notify)
        # A dropped connection (server restart, network cut) is replaced: until then the
        # events of other processes do not arrive (the service re-reads runs every second).
        self._conn.add_termination_listener(self._on_terminated)

    def _on_terminated(self, _conn: Any) -> None:
        if self._outbox is not None and (self._reconnecting is None or self._reconnecting.done()):
            self._reconnecting = asyncio.get_running_loop().create_task(self._reconnect())

    async def _reconnect(self) -> None:
        """Connect again, with backoff, until it works (or the relay is closed)."""
        delay = 0.05
        while self._outbox is not None:
            with contextlib.suppress(Exception):
                old, self._conn = self._conn, None
                if old is not None and not old.is_closed():
                    old.terminate()
            try:
                await self._connect()
                log.info("frugalflow: event relay reconnected")
                return
            except Exception as e:  # still unreachable: try again
                log.debug("frugalflow: event relay reconnect failed: %s", e)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    def send(self, event: Event) -> None:
        if self._outbox is None:
            return
        payload = json.dumps({**event, "origin": self.origin}, default=str)
        if len(payload) > 7900:  # NOTIFY payloads are limited to 8000 bytes
            # The head only, with the id: a subscriber reads the whole event from the log.
            payload = json.dumps({k: event[k] for k in ("id", "run_id", "event", "at")
                                  if k in event} | {"origin": self.origin, "truncated": True})
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(payload)

    async def _send_loop(self) -> None:
        outbox = self._outbox
        assert outbox is not None
        while True:
            payload = await outbox.get()
            try:
                if self._conn is None or self._conn.is_closed():
                    raise ConnectionError("the event relay's connection is closed")
                await self._conn.execute("SELECT pg_notify($1, $2)", self.CHANNEL, payload)
            except Exception:  # a lost event is logged, never fatal to the run
                log.warning("frugalflow: could not relay an event", exc_info=True)
                if self._conn is None or self._conn.is_closed():
                    self._on_terminated(self._conn)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        event = json.loads(payload)
        if event.pop("origin", None) != self.origin:
            self.bus.deliver(event)

    async def close(self) -> None:
        self._outbox = None  # stops reconnecting
        for task in (self._sender, self._reconnecting):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._conn is not None:
            with contextlib.suppress(Exception):  # already dropped by the server
                await self._conn.close()
        self.bus.relay = None
