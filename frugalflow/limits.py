"""Rate limits: keep calls under each model's requests and tokens per minute (in process).

`Limiter` is what the routed model needs of a rate limiter; `RateLimiter` counts in this
process, `frugalflow.scale.redis.RedisRateLimiter` for a whole fleet.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Protocol

if TYPE_CHECKING:
    from .catalog import ModelSpec

__all__ = ["Counted", "Limiter", "RateLimiter", "RateReservation"]


class Counted(Enum):
    """Where a reservation was counted."""

    NOWHERE = "nowhere"  # the model has no limits: nothing to count or correct
    PROCESS = "process"
    FLEET = "fleet"  # in Redis


@dataclass
class RateReservation:
    """Room taken in a model's rate window for one call: `tokens` were estimated; `acorrect`
    replaces them with the call's actual usage."""

    key: str
    id: str
    tokens: int
    at: float
    counted: Counted = Counted.PROCESS


class Limiter(Protocol):
    """What the routed model needs of a rate limiter: `RateLimiter` (this process) or
    `RedisRateLimiter` (the fleet)."""

    async def aacquire(self, spec: ModelSpec, tokens: int) -> RateReservation | None:
        """Room for one request of `tokens` (estimated), or None if it would exceed a limit."""
        ...

    async def acorrect(self, reservation: RateReservation, actual_tokens: int) -> None:
        """Replace a reservation's estimated tokens with the call's actual usage."""
        ...

    async def acheck(self) -> str:
        """The shared state's health ("ok", "unavailable" or "local"), checked now."""
        ...

    def shared_state(self) -> str:
        """The shared state's health as last seen ("ok", "unavailable" or "local")."""
        ...

    async def aclose(self) -> None:
        """Close the link to shared state, if any."""
        ...


class _Entry:
    """One request in a window: when, its reservation id, its tokens (corrected later)."""

    __slots__ = ("at", "id", "tokens")

    def __init__(self, at: float, rid: str, tokens: int) -> None:
        self.at, self.id, self.tokens = at, rid, tokens


class _Window:
    """One model's sliding-window log: an entry per request of the last minute."""

    __slots__ = ("entries", "tokens", "by_id")

    def __init__(self) -> None:
        self.entries: deque[_Entry] = deque()
        self.tokens = 0
        self.by_id: dict[str, _Entry] = {}

    def expire(self, edge: float) -> None:
        while self.entries and self.entries[0].at <= edge:
            old = self.entries.popleft()
            self.tokens -= old.tokens
            self.by_id.pop(old.id, None)


class RateLimiter:
    """Keeps calls under each model's `rpm`/`tpm` (catalog fields) over any 60 seconds.

    A sliding-window log: every request of the last `window` seconds is remembered with its
    tokens, so no 60 s span ever holds more than the limit (a fixed per-minute window lets
    twice the limit through across a boundary). A call reserves its estimated tokens;
    `acorrect` puts in the actual usage once the answer is back (adds or refunds the
    difference). A call that would exceed a limit is not sent: the routed model moves to the
    next candidate at once (no 429 round trip). This one counts in this process (its
    methods do no I/O; they are async to be a `Limiter`); `RedisRateLimiter` counts for the
    whole fleet.

    Why not the `limits` library: its moving window can neither refund nor add tokens to a
    request already counted (the usage correction), checks one limit per call (rpm and tpm
    must be taken together or not at all), reads the wall clock itself (no fake clock in
    tests), and its redis-py extra pins redis<8.
    """

    window: ClassVar[float] = 60.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    async def aacquire(self, spec: ModelSpec, tokens: int) -> RateReservation | None:
        now = self.clock()
        tokens = max(int(tokens), 0)
        if spec.rpm is None and spec.tpm is None:
            return RateReservation(spec.key, "", tokens, now, Counted.NOWHERE)
        with self._lock:
            w = self._windows.get(spec.key)
            if w is None:
                w = self._windows[spec.key] = _Window()
            w.expire(now - self.window)
            if (spec.rpm is not None and len(w.entries) + 1 > spec.rpm) or (
                spec.tpm is not None and w.tokens + tokens > spec.tpm
            ):
                return None
            entry = _Entry(now, uuid.uuid4().hex, tokens)
            w.entries.append(entry)
            w.by_id[entry.id] = entry
            w.tokens += tokens
            return RateReservation(spec.key, entry.id, tokens, now)

    async def acorrect(self, reservation: RateReservation, actual_tokens: int) -> None:
        if reservation.counted is not Counted.PROCESS:
            return
        with self._lock:
            w = self._windows.get(reservation.key)
            entry = w.by_id.get(reservation.id) if w is not None else None
            if w is None or entry is None:
                return  # already out of the window: nothing left to correct
            actual = max(int(actual_tokens), 0)
            w.tokens += actual - entry.tokens
            entry.tokens = actual
        reservation.tokens = actual

    def used(self, spec: ModelSpec) -> tuple[int, int]:
        """(requests, tokens) counted for `spec` in the last `window` seconds."""
        with self._lock:
            w = self._windows.get(spec.key)
            if w is None:
                return 0, 0
            w.expire(self.clock() - self.window)
            return len(w.entries), w.tokens

    def shared_state(self) -> str:
        """'local': this limiter counts in the process (no shared state to lose)."""
        return "local"

    async def acheck(self) -> str:
        return self.shared_state()

    async def aclose(self) -> None:
        """Nothing to close: the windows live in this process."""


if TYPE_CHECKING:  # the type checker proves the in-process limiter fits the seam
    _limiter: Limiter = RateLimiter()
