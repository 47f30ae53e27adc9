"""Rate limits: keep calls under each model's requests and tokens per minute (in process).

The fleet-wide variant, counted in Redis, is `frugalflow.scale.redis.RedisRateLimiter`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .catalog import ModelSpec

__all__ = ["RateLimiter", "RateReservation"]


@dataclass
class RateReservation:
    """Room taken in a model's rate window for one call: `tokens` were estimated; `acorrect`
    replaces them with the call's actual usage."""

    key: str
    id: str
    tokens: int
    at: float
    shared: bool = False  # counted in Redis (else in this process)


class _Window:
    """One model's sliding-window log: (time, id, tokens) per request of the last minute."""

    __slots__ = ("entries", "tokens", "by_id")

    def __init__(self) -> None:
        self.entries: deque[list[Any]] = deque()
        self.tokens = 0
        self.by_id: dict[str, list[Any]] = {}

    def expire(self, edge: float) -> None:
        while self.entries and self.entries[0][0] <= edge:
            _, rid, tokens = self.entries.popleft()
            self.tokens -= tokens
            self.by_id.pop(rid, None)


class RateLimiter:
    """Keeps calls under each model's `rpm`/`tpm` (catalog fields) over any 60 seconds.

    A sliding-window log: every request of the last `window` seconds is remembered with its
    tokens, so no 60 s span ever holds more than the limit (a fixed per-minute window lets
    twice the limit through across a boundary). A call reserves its estimated tokens;
    `acorrect` puts in the actual usage once the answer is back (adds or refunds the
    difference). A call that would exceed a limit is not sent: the routed model moves to the
    next candidate at once (no 429 round trip). This one counts in this process;
    `RedisRateLimiter` counts for the whole fleet.

    Why not the `limits` library: its moving window can neither refund nor add tokens to a
    request already counted (the usage correction), checks one limit per call (rpm and tpm
    must be taken together or not at all), reads the wall clock itself (no fake clock in
    tests), and its redis-py extra pins redis<8.
    """

    window = 60.0

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._windows: dict[str, _Window] = {}
        self._lock = threading.Lock()

    def acquire(self, spec: ModelSpec, tokens: int) -> RateReservation | None:
        """Take room for one request of `tokens` (estimated), or None if over a limit."""
        now = self.clock()
        tokens = max(int(tokens), 0)
        with self._lock:
            w = self._windows.get(spec.key)
            if w is None:
                w = self._windows[spec.key] = _Window()
            w.expire(now - self.window)
            if (spec.rpm is not None and len(w.entries) + 1 > spec.rpm) or (
                spec.tpm is not None and w.tokens + tokens > spec.tpm
            ):
                return None
            res = RateReservation(spec.key, uuid.uuid4().hex, tokens, now)
            entry = [now, res.id, tokens]
            w.entries.append(entry)
            w.by_id[res.id] = entry
            w.tokens += tokens
            return res

    def correct(self, reservation: RateReservation, actual_tokens: int) -> None:
        with self._lock:
            w = self._windows.get(reservation.key)
            entry = w.by_id.get(reservation.id) if w is not None else None
            if w is None or entry is None:
                return  # already out of the window: nothing left to correct
            actual = max(int(actual_tokens), 0)
            w.tokens += actual - entry[2]
            entry[2] = actual
        reservation.tokens = actual

    def used(self, spec: ModelSpec) -> tuple[int, int]:
        """(requests, tokens) counted for `spec` in the last `window` seconds (in process)."""
        with self._lock:
            w = self._windows.get(spec.key)
            if w is None:
                return 0, 0
            w.expire(self.clock() - self.window)
            return len(w.entries), w.tokens

    def shared_state(self) -> str:
        return "local"

    async def acheck(self) -> str:
        return self.shared_state()

    async def aacquire(self, spec: ModelSpec, tokens: int) -> RateReservation | bool | None:
        """A reservation (truthy), None when over a limit, True when `spec` has no limits."""
        if spec.rpm is None and spec.tpm is None:
            return True
        return self.acquire(spec, tokens)

    async def acorrect(self, reservation: Any, actual_tokens: int) -> None:
        """Replace a reservation's estimated tokens with the call's actual usage."""
        if isinstance(reservation, RateReservation):
            self.correct(reservation, actual_tokens)
