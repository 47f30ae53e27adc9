"""A run's events as server-sent events: replayed from the event log, then live, never missed.

Every logged event is a frame with `id: <event id>`. A client that reconnects with
`Last-Event-ID` (or asks `?after=<id>`) gets exactly the events after that id. The stream
subscribes to the bus first, then replays the log, then follows: a live event wakes it and
the log is read after the last id sent (so the frames are the log's, in its order, each
once, whichever process wrote them), and the log is read again every `poll` seconds (a
NOTIFY lost between workers, or SQLite shared by several processes, cannot stall it).

An event the database could not take yet (`"id": None`) is sent at once without an `id:`
line; once written, its id follows as an id-only frame (no data: the client's last event
id moves on, no event fires). `: keep-alive` comments go out after `heartbeat` idle
seconds. The stream ends with a `status` event (no id) once the run stops: after its
`run_finished`, or at once after the replay when it had already stopped.
"""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime, timezone
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from ..events import Event, EventLogLike
from ..runner import Runner
from ..statuses import RunStatus

__all__ = ["ACTIVE", "parse_after", "sse"]

ACTIVE = frozenset({RunStatus.PENDING, RunStatus.QUEUED, RunStatus.RUNNING})
"""A run in one of these still has events to come."""

_GRACE = 2.0  # s a stopped run's stream waits for its run_finished to reach the log


def parse_after(query: str | None, header: str | None) -> int | None:
    """The id to replay after, from `?after=` (first) or `Last-Event-ID`; ValueError (one
    line, naming the fix) if it is not a non-negative integer."""
    for name, value in (("after", query), ("Last-Event-ID", header)):
        if value is None or (name == "Last-Event-ID" and not value.strip()):
            continue
        try:
            after = int(value.strip())
        except ValueError:
            raise ValueError(f"{name} {value[:40]!r} is not an event id: give the integer id "
                             "of the last event received (or omit it)") from None
        if after < 0:
            raise ValueError(f"{name} {after} is negative: event ids start at 1 (omit it, "
                             "or give 0, to replay every event)")
        return after
    return None


def _frame(event: Event) -> bytes:
    head = f"id: {event['id']}\n" if event.get("id") is not None else ""
    return f"{head}event: {event['event']}\ndata: {json.dumps(event, default=str)}\n\n".encode()


def _key(event: Event) -> str:
    """An event's content without its id (an unlogged event and its logged copy match)."""
    return json.dumps({k: v for k, v in event.items() if k != "id"}, sort_keys=True,
                      default=str)


class _Follower:
    """The state of one stream: the last id sent, the unlogged events sent, the end."""

    def __init__(self, runner: Runner, log: EventLogLike, run_id: str, after: int) -> None:
        self.runner, self.log, self.run_id = runner, log, run_id
        self.last = after
        self.unlogged: set[str] = set()
        self.finished: str | None = None  # the status of the run_finished sent last
        self.stopped_since: float | None = None

    def take_unlogged(self, event: Event) -> list[bytes]:
        key = _key(event)
        if key in self.unlogged:
            return []
        self.unlogged.add(key)
        self._note(event)
        return [_frame(event)]

    async def catch_up(self) -> list[bytes]:
        """The frames of the logged events after the last one sent."""
        frames: list[bytes] = []
        while True:
            events = await self.log.read(self.run_id, self.last)
            for e in events:
                self.last = max(self.last, int(e["id"]))
                key = _key(e)
                if key in self.unlogged:  # sent live before it was written: just its id
                    self.unlogged.discard(key)
                    frames.append(f"id: {e['id']}\n\n".encode())
                    continue
                self._note(e)
                frames.append(_frame(e))
            if len(events) < 1000:
                return frames

    def _note(self, event: Event) -> None:
        if event["event"] == "run_finished":
            self.finished = str(event.get("status"))
        elif self.finished is not None:  # a later event: the run went on (resumed)
            self.finished = None

    async def stop_status(self) -> str | None:
        """The status to end with, or None while the run goes on (or its run_finished may
        still be on its way to the log)."""
        row = await self.runner.ledger.get_run(self.run_id)
        if row.status in ACTIVE:
            self.stopped_since = None
            return None
        if self.finished is not None:
            return str(row.status)
        now = time.monotonic()
        if self.stopped_since is None:
            self.stopped_since = now
        # Stopped without a run_finished (cancelled in the queue), or it is not logged yet.
        return str(row.status) if now - self.stopped_since >= _GRACE else None


def _status_frame(run_id: str, status: str) -> bytes:
    return _frame({"id": None, "run_id": run_id, "event": "status", "status": status})


async def sse(runner: Runner, run_id: str, status: str, request: Request, *,
              after: int | None = None, heartbeat: float = 15.0,
              poll: float = 1.0) -> AsyncIterator[bytes]:
    """The frames of run `run_id` (its status `status` when the client connected)."""
    log = runner.events.log
    async with runner.events.queue(run_id) as queue:  # first: nothing published is missed
        yield _status_frame(run_id, status)
        if log is None:
            async for frame in _live_only(queue, run_id, request, heartbeat):
                yield frame
            return
        follower = _Follower(runner, log, run_id, after or 0)
        for frame in await follower.catch_up():
            yield frame
        if status not in ACTIVE:
            end = await follower.stop_status()
            if end is not None:  # it had stopped: the replay was all
                yield _status_frame(run_id, end)
                return
        sent = next_poll = time.monotonic()
        while True:
            now = time.monotonic()
            timeout = max(0.0, min(sent + heartbeat, next_poll) - now)
            frames: list[bytes] = []
            read = False
            try:
                items = [await asyncio.wait_for(queue.get(), timeout)]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for e in items:
                    if e.get("id") is None:
                        frames += follower.take_unlogged(e)
                    else:
                        read = True  # logged (maybe truncated by the relay): read the log
            except asyncio.TimeoutError:
                pass
            polling = time.monotonic() >= next_poll
            if read or polling:
                frames += await follower.catch_up()
            if frames:
                yield b"".join(frames)
                sent = time.monotonic()
            if polling or follower.finished is not None:
                next_poll = time.monotonic() + poll
                end = await follower.stop_status()
                if end is not None:
                    yield _status_frame(run_id, end)
                    return
            if time.monotonic() - sent >= heartbeat:
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
                sent = time.monotonic()


async def _live_only(queue: asyncio.Queue[Event], run_id: str, request: Request,
                     heartbeat: float) -> AsyncIterator[bytes]:
    """A bus without a log: its live events as they come (nothing to replay)."""
    while True:
        try:
            event: dict[str, Any] = await asyncio.wait_for(queue.get(), heartbeat)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                return
            yield b": keep-alive\n\n"
            continue
        yield _frame(event)
        if event["event"] == "run_finished":
            yield _status_frame(run_id, str(event.get("status")))
            return
