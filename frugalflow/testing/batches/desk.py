"""The emulator's batch desk: provider batches as jobs with a scripted life.

Each wire format (`openai`, `anthropic`, `gemini` beside this module) registers its routes
here and keeps its own shapes; the desk holds what they share: the batches, their scripted
end (after `delay` seconds, or when a test calls `release`), per-item failures, expiry, a
whole batch refused, cancellation, and the answers (the emulator's own, as a synchronous
call would get them). `paid` counts the items answered per custom id, so a test can say
that no item was ever paid twice.

    emu.batches.script("openai", delay=None, fail_items={2}, item_error="server_error")
    ... the client submits ...
    emu.batches.release()            # every waiting batch ends now

Faults on the batch routes themselves (a 503, or the batch created and its answer lost to
a reset or a hang): `emu.batches.fault("anthropic", "reset_after")` (see `faults`).
"""

from __future__ import annotations

import itertools
import re
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..answers import shape
from ..dialects import DIALECTS, Context
from .faults import DESK_FAULTS, DeskFault, LostAnswer, unavailable

if TYPE_CHECKING:
    from ..emulator import ProviderEmulator
    from ..http1 import Connection, HttpRequest

__all__ = ["BatchDesk", "BatchScript", "DeskFault", "EmulatedBatch", "ItemOutcome", "Handler"]

Handler = Callable[["HttpRequest", "Connection", "re.Match[str]"], Awaitable[bool]]
"""A route's handler: (request, connection, path match) -> whether the connection stays."""

BATCH_STATES = ("in_progress", "ended", "expired", "failed", "cancelled")


@dataclass
class BatchScript:
    """How the next matching batches live (see `BatchDesk.script`)."""

    provider: str
    model: str | None = None
    delay: float | None = 0.0
    """Seconds from creation until the batch ends; None: until `BatchDesk.release`."""
    fail_items: frozenset[int] = frozenset()
    """1-based positions of the items answered with `item_error`."""
    item_error: str = "server_error"
    filtered_items: frozenset[int] = frozenset()
    """1-based positions answered with a 200 the content filter stopped (OpenAI's
    finish_reason content_filter, Anthropic's stop_reason refusal, Gemini's SAFETY)."""
    expire: bool = False
    """The batch ends `expired`: only its first `answered` items were answered."""
    answered: int = 0
    fail: bool = False
    """The whole batch is refused (failed validation): no item is answered."""
    times: int | None = 1
    """How many batches it applies to (None: every one until cleared)."""
    hits: int = 0

    def matches(self, provider: str, model: str) -> bool:
        return (self.provider == provider and (self.model is None or self.model == model)
                and (self.times is None or self.hits < self.times))


@dataclass
class ItemOutcome:
    """One item's answer as the provider would report it: an HTTP status and its body
    (the full synchronous answer, or the provider's error payload), or not answered
    (`status` None: the batch expired or was cancelled first)."""

    custom_id: str
    status: int | None
    body: dict[str, Any] | None
    error_kind: str | None = None


@dataclass
class EmulatedBatch:
    id: str
    provider: str
    model: str
    requests: list[tuple[str, dict[str, Any]]]
    """(custom id, request body) per line, in order."""
    metadata: dict[str, Any]
    script: BatchScript | None
    created_at: float
    state: str = "in_progress"
    """in_progress, ended, expired, failed or cancelled."""
    ended_at: float | None = None
    cancel_requested: bool = False
    results: list[ItemOutcome] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    """What a wire format keeps of its own (an input file id, a display name...)."""

    @property
    def done(self) -> bool:
        return self.state != "in_progress"

    def counts(self) -> tuple[int, int, int]:
        """(total, succeeded, errored) items."""
        ok = sum(1 for r in self.results if r.status == 200)
        bad = sum(1 for r in self.results if r.status is not None and r.status != 200)
        return len(self.requests), ok, bad


class BatchDesk:
    """Every batch the emulator holds, across its wire formats."""

    def __init__(self, emulator: ProviderEmulator, clock: Callable[[], float] = time.time) -> None:
        self.emulator = emulator
        self.clock = clock
        self.batches: dict[str, EmulatedBatch] = {}
        self.scripts: list[BatchScript] = []
        self.faults: list[DeskFault] = []
        self.files: dict[str, tuple[str, bytes, dict[str, Any]]] = {}
        """OpenAI-style uploaded files: id -> (purpose, content, metadata)."""
        self.paid: Counter[str] = Counter()
        """Items answered (so billed) per custom id."""
        self._routes: list[tuple[str, re.Pattern[str], Handler, str | None]] = []
        self._ids = itertools.count(1)
        self._lock = threading.RLock()
        self._registered = False

    # -- scripting -------------------------------------------------------------------------

    def script(self, provider: str, *, model: str | None = None, delay: float | None = 0.0,
               fail_items: Iterable[int] = (), item_error: str = "server_error",
               filtered_items: Iterable[int] = (), expire: bool = False, answered: int = 0,
               fail: bool = False, times: int | None = 1) -> BatchScript:
        """How the next `times` batches of `provider` (and `model`) live."""
        s = BatchScript(provider, model, delay, frozenset(fail_items), item_error,
                        frozenset(filtered_items), expire, answered, fail, times)
        with self._lock:
            self.scripts.append(s)
        return s

    def clear(self) -> None:
        with self._lock:
            self.scripts.clear()
            self.faults.clear()

    def fault(self, provider: str, kind: str, *, op: str = "create", times: int | None = 1,
              hang_seconds: float = 30.0) -> DeskFault:
        """A fault for the next `times` requests of `provider`'s route `op` (`create`, or
        OpenAI's `upload`); kinds: `unavailable`, `reset_after`, `timeout_after`."""
        if kind not in DESK_FAULTS:
            raise ValueError(f"unknown batch desk fault {kind!r}; known: {', '.join(DESK_FAULTS)}")
        f = DeskFault(provider, kind, op, times, hang_seconds)
        with self._lock:
            self.faults.append(f)
        return f

    def _take_fault(self, provider: str, op: str | None) -> DeskFault | None:
        with self._lock:
            f = next((f for f in self.faults if f.matches(provider, op)), None)
            if f is not None:
                f.hits += 1
            return f

    def release(self, batch_id: str | None = None) -> None:
        """End a waiting batch now (every in-progress batch without `batch_id`)."""
        with self._lock:
            for b in list(self.batches.values()):
                if (batch_id is None or b.id == batch_id) and not b.done:
                    self._end(b)

    # -- the batches -----------------------------------------------------------------------

    def new_id(self, prefix: str) -> str:
        return f"{prefix}{self.emulator.seed:x}{next(self._ids):06d}"

    def create(self, provider: str, model: str, requests: list[tuple[str, dict[str, Any]]],
               metadata: dict[str, Any] | None = None, *, prefix: str = "batch_") -> EmulatedBatch:
        with self._lock:
            script = next((s for s in self.scripts if s.matches(provider, model)), None)
            if script is not None:
                script.hits += 1
            b = EmulatedBatch(self.new_id(prefix), provider, model, requests,
                              dict(metadata or {}), script, self.clock())
            self.batches[b.id] = b
            if script is not None and script.fail:
                b.state, b.ended_at = "failed", b.created_at
            elif script is None or script.delay == 0:
                self._end(b)
            return b

    def get(self, batch_id: str) -> EmulatedBatch | None:
        """The batch, its state brought up to now (a batch whose delay passed ends)."""
        with self._lock:
            b = self.batches.get(batch_id)
            if b is not None and not b.done and b.script is not None \
                    and b.script.delay is not None \
                    and self.clock() >= b.created_at + b.script.delay:
                self._end(b)
            return b

    def listed(self, provider: str) -> list[EmulatedBatch]:
        with self._lock:
            ids = [b.id for b in self.batches.values() if b.provider == provider]
        return [b for b in (self.get(i) for i in ids) if b is not None]

    def cancel(self, batch_id: str) -> EmulatedBatch | None:
        """Cancel a batch: items not answered yet never will be (nor are they paid)."""
        with self._lock:
            b = self.get(batch_id)
            if b is not None and not b.done:
                b.cancel_requested = True
                b.state, b.ended_at = "cancelled", self.clock()
                b.results = [ItemOutcome(cid, None, None) for cid, _ in b.requests]
            return b

    def _end(self, b: EmulatedBatch) -> None:
        script = b.script
        results: list[ItemOutcome] = []
        for i, (cid, body) in enumerate(b.requests, 1):
            if script is not None and script.expire and i > script.answered:
                results.append(ItemOutcome(cid, None, None))
                continue
            if script is not None and i in script.fail_items:
                results.append(self._error(b, body, script.item_error, cid))
                continue
            filtered = script is not None and i in script.filtered_items
            status, payload = self.answer(b.provider, b.model, body, filtered=filtered)
            results.append(ItemOutcome(cid, status, payload))
            if status == 200:
                self.paid[cid] += 1
        b.results = results
        b.state = "expired" if script is not None and script.expire else "ended"
        b.ended_at = self.clock()

    def _error(self, b: EmulatedBatch, body: dict[str, Any], kind: str, cid: str) -> ItemOutcome:
        dialect = DIALECTS[b.provider]
        ctx = self._context(b.provider, b.model, body)
        status, payload = dialect.error(kind, ctx, None, 0)
        return ItemOutcome(cid, status, payload, kind)

    def _context(self, provider: str, model: str, body: dict[str, Any]) -> Context:
        model = model if provider == "gemini" else str(body.get("model", model))
        return Context(provider, model, False, body, self.emulator._next_id(), int(time.time()),
                       include_usage=False, sse=True)

    def answer(self, provider: str, model: str, body: dict[str, Any], *,
               filtered: bool = False) -> tuple[int, dict[str, Any]]:
        """The synchronous answer to one request body: (200, the provider's full response;
        `filtered`: stopped by the content filter), or (400, its error) for a body it
        cannot read."""
        dialect = DIALECTS[provider]
        ctx = self._context(provider, model, body)
        try:
            ask = dialect.parse(body)
        except (KeyError, TypeError, AttributeError, IndexError):
            return dialect.error("invalid_request", ctx, None, 0)
        answer = self.emulator._answer(ctx, ask, False)
        if filtered:
            answer = shape(answer, ctx, "filtered", None)
        return 200, dialect.full(ctx, answer)

    # -- serving ---------------------------------------------------------------------------

    def route(self, method: str, pattern: str, *,
              op: str | None = None) -> Callable[[Handler], Handler]:
        """Register a handler for `method` on paths matching `pattern` (fullmatch); `op`
        names it for faults (`create`, `upload`)."""
        def add(handler: Handler) -> Handler:
            self._routes.append((method, re.compile(pattern), handler, op))
            return handler
        return add

    def _register_formats(self) -> None:
        if self._registered:
            return
        self._registered = True
        import importlib

        for name in ("openai", "anthropic", "gemini"):
            try:
                module = importlib.import_module(f"{__package__}.{name}")
            except ModuleNotFoundError as e:  # a wire format not written yet
                if e.name != f"{__package__}.{name}":
                    raise
                continue
            module.register(self)

    async def serve(self, req: HttpRequest, conn: Connection) -> bool | None:
        """Answer a batch route (whether the connection stays), or None: not one."""
        self._register_formats()
        path = req.path.rstrip("/")
        for method, pattern, handler, op in self._routes:
            if req.method == method and (m := pattern.fullmatch(path)) is not None:
                provider = path.split("/")[1]  # /openai/..., /anthropic/..., /gemini/...
                fault = self._take_fault(provider, op) if op is not None else None
                if fault is None:
                    return await handler(req, conn, m)
                if fault.kind == "unavailable":
                    return await unavailable(conn, provider)
                return await handler(req, LostAnswer(conn, fault), m)
        return None
