"""A run's live events as server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from ..runner import Runner
from ..statuses import FINAL_STATUSES


async def sse(runner: Runner, run_id: str, status: str, request: Request) -> AsyncIterator[bytes]:
    def frame(event: dict[str, Any]) -> bytes:
        return f"event: {event['event']}\ndata: {json.dumps(event, default=str)}\n\n".encode()

    async with runner.events.subscribe(run_id) as events:
        yield frame({"run_id": run_id, "event": "status", "status": status})
        if status in FINAL_STATUSES:
            return
        it = events.__aiter__()
        while True:
            try:
                event = await asyncio.wait_for(it.__anext__(), timeout=15.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
                continue
            yield frame(event)
            if event["event"] == "run_finished":
                return
