"""What to do when a model call fails: retry the same model, move to the next, or stop; and
the circuit breakers that stop calling a provider (or model) that keeps failing.

- `FallbackPolicy` says how often to retry the same model and how long to wait.
- `verdict` is the one health rule: what a call's outcome says about its provider and model.
- `CircuitBreaker` is one breaker's state machine; `BreakerRegistry` keeps one per provider
  and per model, shared by every run in the process (a half-open probe tests a provider
  after its cooldown). `Breakers` is what the routed model needs of a registry; the
  fleet-wide one, kept in Redis, is `frugalflow.scale.redis.RedisBreakerRegistry`.
"""

from __future__ import annotations

import email.utils
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol, cast

from .exceptions import (
    AuthenticationError,
    ContentFilterError,
    ContextLengthError,
    IncompleteResponseError,
    InvalidRequestError,
    MalformedResponseError,
    ModelAPIError,
    ModelTimeoutError,
    ProviderConnectionError,
    ProviderOverloadedError,
    RateLimitError,
    ValidationFailedError,
)

if TYPE_CHECKING:
    from .catalog import ModelSpec

log = logging.getLogger("frugalflow")

__all__ = [
    "Action",
    "BreakerListener",
    "BreakerRegistry",
    "BreakerState",
    "Breakers",
    "CircuitBreaker",
    "FallbackPolicy",
    "Mark",
    "Verdict",
    "default_breakers",
    "parse_retry_after",
    "rest_reason",
    "verdict",
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


# Failures worth another try on the same model: the provider may answer the next time.
_RETRYABLE = (ProviderOverloadedError, ModelTimeoutError, ProviderConnectionError,
              IncompleteResponseError)


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
        if isinstance(error, InvalidRequestError):
            return Action.RAISE, 0.0
        if isinstance(error, RateLimitError):
            wait = error.retry_after
            if wait is not None and wait <= self.retry_after_cap and tries < self.max_retries:
                return Action.RETRY, wait
            return Action.NEXT, 0.0
        if isinstance(error, _RETRYABLE) and tries < self.max_retries:
            delay = min(self.backoff_max, self.backoff_base * 2**tries)
            return Action.RETRY, delay * (0.5 + random.random() / 2)  # jitter: 50-100%
        return Action.NEXT, 0.0


# -- the health rule ------------------------------------------------------------------------


class Mark(Enum):
    """What one call's outcome does to one breaker."""

    UP = "up"  # a success: closes a half-open breaker, clears the failure count
    DOWN = "down"  # a failure counted against it
    OFF = "off"  # disabled: authentication failed
    NONE = "none"  # nothing said about it


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a call's outcome says about its provider's breaker and its model's breaker."""

    provider: Mark
    model: Mark
    reason: str = ""
    """Why the failure or the disabling (shown by blocked reasons)."""
    rest: float | None = None
    """Seconds the model must rest: a 429's Retry-After (capped), or None."""


_ALL_UP = Verdict(Mark.UP, Mark.UP)

# Failures that prove the provider answered: they say nothing against its health.
_ANSWERED = (ContextLengthError, ContentFilterError, InvalidRequestError, ValidationFailedError)


def verdict(error: ModelAPIError | None, *, max_rest: float) -> Verdict:
    """The health rule every breaker registry applies (in process or in Redis): which
    outcome counts against whose breaker. `max_rest` caps a Retry-After (a bogus huge
    value must not bench a model for a day)."""
    if error is None or isinstance(error, _ANSWERED):
        return _ALL_UP  # an answer, even a refusal, shows the provider is up
    if isinstance(error, AuthenticationError):
        return Verdict(Mark.OFF, Mark.NONE,
                       f"authentication failed ({error.status_code or 'no status'})")
    if isinstance(error, MalformedResponseError):
        # The provider answered; this model's answer was unusable.
        return Verdict(Mark.UP, Mark.DOWN, error.error_class)
    rest = None
    if isinstance(error, RateLimitError) and error.retry_after and error.retry_after > 0:
        rest = min(float(error.retry_after), max_rest)
    # Rate limit, overloaded, timeout, connection, incomplete, and failures of no known class.
    return Verdict(Mark.DOWN, Mark.DOWN, error.error_class, rest)


def rest_reason(until: float, clock: Callable[[], float]) -> str:
    """The blocked reason of a model resting until `until` (on `clock`) after a Retry-After."""
    # The registry's clock may be monotonic: say the wall-clock time it ends.
    left = until - clock()
    wall = time.time() + left
    return ("rate limited until " + time.strftime("%H:%M:%SZ", time.gmtime(wall))
            + f" (Retry-After, {left:.1f} s left)")


# -- breakers -------------------------------------------------------------------------------


class BreakerState(str, Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    DISABLED = "disabled"  # authentication failed: no calls for the rest of the process


BreakerListener = Callable[[str, str, str], None]
"""Told of each breaker state change: (breaker key, state before, state after)."""


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
    on_change: BreakerListener | None = field(default=None, repr=False)
    """Called after each state change (outside the lock): metrics count them."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def _changed(self, before: BreakerState, after: BreakerState) -> None:
        if after is not before and self.on_change is not None:
            self.on_change(self.key, before.value, after.value)

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
                half_opened = True
            else:
                half_opened = False
            allowed = not self.probe_in_flight
            self.probe_in_flight = True
        if half_opened:
            self._changed(BreakerState.OPEN, BreakerState.HALF_OPEN)
        return allowed

    def record_success(self) -> None:
        if self.state is BreakerState.CLOSED and not self.failures and not self.probe_in_flight:
            return
        with self._lock:
            before = self.state
            if before is BreakerState.DISABLED:
                return
            self.state = BreakerState.CLOSED
            self.failures = 0
            self.probe_in_flight = False
        self._changed(before, BreakerState.CLOSED)

    def record_failure(self, reason: str = "") -> None:
        with self._lock:
            before = after = self.state
            if before is BreakerState.DISABLED:
                return
            self.failures += 1
            self.reason = reason
            if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
                self.state = after = BreakerState.OPEN
                self.opened_at = self.clock()
                self.probe_in_flight = False
        self._changed(before, after)

    def release(self) -> None:
        """A call that was allowed ended without a verdict (cancelled): free the probe slot."""
        with self._lock:
            self.probe_in_flight = False

    def disable(self, reason: str) -> None:
        with self._lock:
            before = self.state
            self.state = BreakerState.DISABLED
            self.reason = reason
        self._changed(before, BreakerState.DISABLED)

    def reset(self) -> None:
        with self._lock:
            self.state = BreakerState.CLOSED
            self.failures = 0
            self.probe_in_flight = False
            self.reason = ""

    def mark(self, mark: Mark, reason: str) -> None:
        """Apply one side of a `Verdict`."""
        if mark is Mark.UP:
            self.record_success()
        elif mark is Mark.DOWN:
            self.record_failure(reason)
        elif mark is Mark.OFF:
            self.disable(reason)


class Breakers(Protocol):
    """What the routed model, the service and the CLI need of a breaker registry: the
    in-process `BreakerRegistry` or the fleet's `RedisBreakerRegistry`. All async: a shared
    registry answers over the network, and no sync read may silently see only local state."""

    async def aacquire(self, spec: ModelSpec) -> bool:
        """Take permission for one call to `spec` (provider and model breakers both allow)."""
        ...

    async def arecord(self, spec: ModelSpec, error: ModelAPIError | None) -> None:
        """The call's outcome: None for an answer, else its error (see `verdict`)."""
        ...

    async def arelease(self, spec: ModelSpec) -> None:
        """A call that was allowed ended without an outcome (cancelled): free its probe slot."""
        ...

    async def ablocked_reason(self, spec: ModelSpec) -> str | None:
        """Why calls to `spec` are blocked right now (without taking a probe slot), or None."""
        ...

    async def acooldown_reason(self, spec: ModelSpec) -> str | None:
        """Why `spec` must not be called now because of a Retry-After, or None."""
        ...

    async def astate(self, key: str) -> BreakerState:
        """The state of the breaker of a provider or a model key."""
        ...

    async def areset(self) -> None:
        """Every breaker closed, every rest ended."""
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


class BreakerRegistry:
    """Breakers per provider and per model, shared by every run that uses this registry
    (kept in this process). Its methods do no I/O; they are async to be `Breakers`."""

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
        self._rests: dict[str, float] = {}  # model key -> clock() until which it rests
        self._lock = threading.Lock()
        self.listeners: list[BreakerListener] = []
        """Called as `listener(key, before, after)` on each state change of this registry's
        breakers (OpenTelemetry metrics count them); a broken one never fails a call."""

    def _changed(self, key: str, before: str, after: str) -> None:
        for listener in list(self.listeners):  # a state change is rare: copying is cheap
            try:
                listener(key, before, after)
            except Exception:  # metrics must never fail the call they observe
                log.exception("frugalflow: breaker listener %r failed", listener)

    def _get(self, key: str) -> CircuitBreaker:
        breaker = self._breakers.get(key)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.setdefault(
                    key, CircuitBreaker(key, self.threshold, self.cooldown, self.clock,
                                        on_change=self._changed)
                )
        return breaker

    async def astate(self, key: str) -> BreakerState:
        b = self._breakers.get(key)
        return b.state if b else BreakerState.CLOSED

    async def ablocked_reason(self, spec: ModelSpec) -> str | None:
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

    async def aacquire(self, spec: ModelSpec) -> bool:
        provider = self._get(spec.provider)
        if not provider.allow():
            return False
        if not self._get(spec.key).allow():
            provider.release()
            return False
        return True

    async def arest(self, spec: ModelSpec, seconds: float) -> None:
        """No call to `spec` (this model) for `seconds` from now: a 429's Retry-After."""
        until = self.clock() + seconds
        with self._lock:
            if until > self._rests.get(spec.key, 0.0):
                self._rests[spec.key] = until

    async def acooldown_reason(self, spec: ModelSpec) -> str | None:
        until = self._rests.get(spec.key)
        if until is None:
            return None
        if self.clock() >= until:
            self._rests.pop(spec.key, None)
            return None
        return rest_reason(until, self.clock)

    async def arecord(self, spec: ModelSpec, error: ModelAPIError | None) -> None:
        v = verdict(error, max_rest=self.max_retry_after)
        if v.rest is not None:
            await self.arest(spec, v.rest)
        self._get(spec.provider).mark(v.provider, v.reason)
        self._get(spec.key).mark(v.model, v.reason)

    async def arelease(self, spec: ModelSpec) -> None:
        self._get(spec.provider).release()
        self._get(spec.key).release()

    async def areset(self) -> None:
        with self._lock:
            self._breakers.clear()
            self._rests.clear()

    def shared_state(self) -> str:
        """'local': this registry lives in the process (no shared state to lose)."""
        return "local"

    async def acheck(self) -> str:
        return self.shared_state()

    async def aclose(self) -> None:
        """Nothing to close: the state lives in this process."""


default_breakers = BreakerRegistry()
"""The process-wide registry every run shares unless given another."""

if TYPE_CHECKING:  # the type checker proves the in-process registry fits the seam
    _breakers: Breakers = default_breakers
