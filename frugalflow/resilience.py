"""What to do when a model call fails: retry the same model, move to the next, or stop; and
the circuit breakers that stop calling a provider (or model) that keeps failing.

- `FallbackPolicy` says how often to retry the same model and how long to wait.
- `CircuitBreaker` / `BreakerRegistry` stop calls to a provider (or model) that keeps
  failing, shared by every run in the process; a half-open probe tests it after a cooldown.
  The fleet-wide variant, kept in Redis, is `frugalflow.scale.redis.RedisBreakerRegistry`.
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, cast

from .exceptions import ModelAPIError

if TYPE_CHECKING:
    from .catalog import ModelSpec

__all__ = [
    "Action",
    "BreakerRegistry",
    "BreakerState",
    "CircuitBreaker",
    "FallbackPolicy",
    "default_breakers",
    "parse_retry_after",
]


def parse_retry_after(value: str | float | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date)."""
    if value is None:
        return None
    if isinstance(value, (int, float)):
        return max(float(value), 0.0)
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(when.timestamp() - time.time(), 0.0)



class Action(Enum):
    RETRY = "retry"  # same model, after a delay
    NEXT = "next"  # next candidate
    RAISE = "raise"  # the caller's bug: no fallback


# Errors that say the provider is unhealthy; the others say nothing about its health.
HEALTH_ERRORS = frozenset({"rate_limit", "overloaded", "timeout", "connection", "incomplete",
                           "unknown"})
_RETRYABLE = frozenset({"overloaded", "timeout", "connection", "incomplete"})


@dataclass(frozen=True)
class FallbackPolicy:
    """Retries on one model before moving to the next, and the circuit breakers' settings."""

    max_retries: int = 1
    """Extra tries on the same model for overloaded/timeout/connection/incomplete errors."""
    backoff_base: float = 0.25
    backoff_max: float = 4.0
    retry_after_cap: float = 5.0
    """Honour a 429's Retry-After up to this many seconds; beyond it, move on at once."""
    timeout: float | None = 60.0
    """Seconds a single attempt may take (None: the client's own)."""
    breaker_threshold: int = 5
    breaker_cooldown: float = 30.0

    def decide(self, error: ModelAPIError, tries: int) -> tuple[Action, float]:
        """The action for `error` after `tries` retries on this model, and the delay before it."""
        cls = error.error_class
        if cls == "invalid_request":
            return Action.RAISE, 0.0
        if cls == "rate_limit":
            wait = error.retry_after
            if wait is not None and wait <= self.retry_after_cap and tries < self.max_retries:
                return Action.RETRY, wait
            return Action.NEXT, 0.0
        if cls in _RETRYABLE and tries < self.max_retries:
            delay = min(self.backoff_max, self.backoff_base * 2**tries)
            return Action.RETRY, delay * (0.5 + random.random() / 2)  # jitter: 50-100%
        return Action.NEXT, 0.0


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    DISABLED = "disabled"  # authentication failed: no calls for the rest of the process


@dataclass
class CircuitBreaker:
    """closed -> open after `threshold` consecutive failures -> half-open after `cooldown`
    (one probe call allowed) -> closed on the probe's success, open again on its failure."""

    key: str
    threshold: int = 5
    cooldown: float = 30.0
    clock: Callable[[], float] = time.monotonic
    state: BreakerState = BreakerState.CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probe_in_flight: bool = False
    reason: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def allow(self) -> bool:
        """May a call go through now? In half-open state only the first caller gets a yes."""
        if self.state is BreakerState.CLOSED:  # the common case needs no lock
            return True
        with self._lock:
            # Read again under the lock: another thread may have closed it meanwhile.
            if cast(BreakerState, self.state) is BreakerState.CLOSED:
                return True
            if self.state is BreakerState.DISABLED:
                return False
            if self.state is BreakerState.OPEN:
                if self.clock() - self.opened_at < self.cooldown:
                    return False
                self.state = BreakerState.HALF_OPEN
                self.probe_in_flight = False
            if self.probe_in_flight:
                return False
            self.probe_in_flight = True
            return True

    def record_success(self) -> None:
        if self.state is BreakerState.CLOSED and not self.failures and not self.probe_in_flight:
            return
        with self._lock:
            if self.state is BreakerState.DISABLED:
                return
            self.state = BreakerState.CLOSED
            self.failures = 0
            self.probe_in_flight = False

    def record_failure(self, reason: str = "") -> None:
        with self._lock:
            if self.state is BreakerState.DISABLED:
                return
            self.failures += 1
            self.reason = reason
            if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
                self.state = BreakerState.OPEN
                self.opened_at = self.clock()
                self.probe_in_flight = False

    def release(self) -> None:
        """A call that was allowed ended without a verdict (cancelled): free the probe slot."""
        with self._lock:
            self.probe_in_flight = False

    def disable(self, reason: str) -> None:
        with self._lock:
            self.state = BreakerState.DISABLED
            self.reason = reason

    def reset(self) -> None:
        with self._lock:
            self.state = BreakerState.CLOSED
            self.failures = 0
            self.probe_in_flight = False
            self.reason = ""


class BreakerRegistry:
    """Breakers per provider and per model, shared by every run that uses this registry."""

    def __init__(
        self,
        *,
        threshold: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_retry_after: float = 600.0,
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.max_retry_after = max_retry_after
        """A 429's Retry-After is honoured up to this many seconds (a bogus huge value must
        not bench a model for a day)."""
        self._breakers: dict[str, CircuitBreaker] = {}
        self._cooldowns: dict[str, float] = {}  # model key -> clock() until which it rests
        self._lock = threading.Lock()

    def get(self, key: str) -> CircuitBreaker:
        breaker = self._breakers.get(key)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.setdefault(
                    key, CircuitBreaker(key, self.threshold, self.cooldown, self.clock)
                )
        return breaker

    def state(self, key: str) -> BreakerState:
        b = self._breakers.get(key)
        return b.state if b else BreakerState.CLOSED

    def blocked_reason(self, spec: ModelSpec) -> str | None:
        """Why calls to `spec` are blocked right now (without taking a probe slot), or None."""
        for key in (spec.provider, spec.key):
            b = self._breakers.get(key)
            if b is None or b.state is BreakerState.CLOSED:
                continue
            if b.state is BreakerState.DISABLED:
                return f"{key} disabled: {b.reason}"
            if b.state is BreakerState.OPEN and self.clock() - b.opened_at < b.cooldown:
                return f"circuit open for {key} ({b.reason})"
            if b.state is BreakerState.HALF_OPEN and b.probe_in_flight:
                return f"circuit half-open for {key}, probe in flight"
        return None

    def acquire(self, spec: ModelSpec) -> bool:
        """Take permission for one call to `spec` (provider and model breakers both allow)."""
        provider = self.get(spec.provider)
        if not provider.allow():
            return False
        if not self.get(spec.key).allow():
            provider.release()
            return False
        return True

    def _retry_after(self, error: ModelAPIError | None) -> float | None:
        """Seconds a 429 asked us to wait (capped), or None."""
        if error is None or error.error_class != "rate_limit":
            return None
        wait = getattr(error, "retry_after", None)
        if wait is None or wait <= 0:
            return None
        return min(float(wait), self.max_retry_after)

    def note_retry_after(self, spec: ModelSpec, seconds: float) -> None:
        """No call to `spec` (this model) for `seconds` from now: a 429's Retry-After."""
        until = self.clock() + seconds
        with self._lock:
            if until > self._cooldowns.get(spec.key, 0.0):
                self._cooldowns[spec.key] = until

    def _cooldown_text(self, until: float) -> str:
        # The registry's clock may be monotonic: say the wall-clock time it ends.
        wall = time.time() + (until - self.clock())
        return "rate limited until " + time.strftime("%H:%M:%SZ", time.gmtime(wall)) + \
            f" (Retry-After, {until - self.clock():.1f} s left)"

    def cooldown_reason(self, spec: ModelSpec) -> str | None:
        """Why `spec` must not be called now because of a Retry-After, or None."""
        until = self._cooldowns.get(spec.key)
        if until is None:
            return None
        if self.clock() >= until:
            self._cooldowns.pop(spec.key, None)
            return None
        return self._cooldown_text(until)

    def record(self, spec: ModelSpec, error: ModelAPIError | None) -> None:
        wait = self._retry_after(error)
        if wait is not None:
            self.note_retry_after(spec, wait)
        provider, model = self.get(spec.provider), self.get(spec.key)
        if error is None or error.error_class not in HEALTH_ERRORS | {"auth", "malformed"}:
            # An answer, even a refusal, shows the provider is up.
            provider.record_success()
            model.record_success()
        elif error.error_class == "auth":
            provider.disable(f"authentication failed ({error.status_code or 'no status'})")
        elif error.error_class == "malformed":
            provider.record_success()
            model.record_failure("malformed")
        else:
            provider.record_failure(error.error_class)
            model.record_failure(error.error_class)

    def release(self, spec: ModelSpec) -> None:
        self.get(spec.provider).release()
        self.get(spec.key).release()

    def snapshot(self) -> dict[str, BreakerState]:
        return {k: b.state for k, b in sorted(self._breakers.items())}

    def reset(self) -> None:
        with self._lock:
            self._breakers.clear()
            self._cooldowns.clear()

    def shared_state(self) -> str:
        """'local': this registry lives in the process (no shared state to lose)."""
        return "local"

    # The routed model uses these: a shared (networked) registry overrides them.
    async def acooldown_reason(self, spec: ModelSpec) -> str | None:
        return self.cooldown_reason(spec)

    async def acheck(self) -> str:
        """The shared state's health ("ok", "unavailable" or "local"), checked now."""
        return self.shared_state()

    async def aacquire(self, spec: ModelSpec) -> bool:
        return self.acquire(spec)

    async def arecord(self, spec: ModelSpec, error: ModelAPIError | None) -> None:
        self.record(spec, error)

    async def arelease(self, spec: ModelSpec) -> None:
        self.release(spec)

    async def ablocked_reason(self, spec: ModelSpec) -> str | None:
        return self.blocked_reason(spec)

    async def astate(self, key: str) -> BreakerState:
        return self.state(key)



default_breakers = BreakerRegistry()
"""The process-wide registry every run shares unless given another."""
