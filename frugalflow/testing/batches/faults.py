"""Faults on the batch desk's own routes, as real servers and networks make them:

- `unavailable`: a 503 in the provider's words, before anything is done (nothing created);
- `reset_after`: the route does its work (the batch or file is created), then the connection
  is reset (RST) instead of the answer: the provider has it, the client saw an error;
- `timeout_after`: the route does its work, then sends nothing for `hang_seconds` (or until
  the client gives up on its read timeout), then closes.

    emu.batches.fault("openai", "reset_after", op="create")   # the next batch create
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final, NoReturn

from ..dialects import DIALECTS, Context
from ..http1 import Closed, Connection

__all__ = ["DESK_FAULTS", "DeskFault", "LostAnswer", "unavailable"]

DESK_FAULTS: Final = ("unavailable", "reset_after", "timeout_after")


@dataclass
class DeskFault:
    """One scripted fault of a batch route (`BatchDesk.fault`)."""

    provider: str
    """The wire format: openai, anthropic or gemini."""
    kind: str
    op: str = "create"
    """The route it hits: `create` (a batch), `upload` (OpenAI's file upload)."""
    times: int | None = 1
    """How many requests it applies to (None: every one until cleared)."""
    hang_seconds: float = 30.0
    hits: int = 0

    def matches(self, provider: str, op: str | None) -> bool:
        return (self.provider == provider and self.op == op
                and (self.times is None or self.hits < self.times))


async def unavailable(conn: Connection, provider: str) -> bool:
    """The provider's 503, in its own words."""
    dialect = DIALECTS[provider]
    ctx = Context(provider, "", False, {}, conn.request_id(), int(time.time()),
                  include_usage=False, sse=False)
    status, payload = dialect.error("unavailable", ctx, None, 0)
    return await conn.send_json(status, payload, dialect.status_words)


class LostAnswer(Connection):
    """The connection as a route sees it when its answer never reaches the client: the
    route's work is done, then the answer is replaced by a reset or by silence."""

    def __init__(self, conn: Connection, fault: DeskFault) -> None:
        super().__init__(conn.reader, conn.writer, request_id=conn.request_id,
                         stopping=conn.stopping, chunk_delay=conn.chunk_delay)
        self.fault = fault

    async def send(self, status: int, payload: bytes, content_type: str,
                   words: dict[int, str] | None = None,
                   extra: dict[str, str] | None = None) -> NoReturn:
        if self.fault.kind == "timeout_after":
            await self.hang(self.fault.hang_seconds)
        else:
            self.reset()
        raise Closed
