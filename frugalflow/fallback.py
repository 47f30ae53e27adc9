"""What to do when a model call fails: classify, retry, move on, or stop.

- `error_from_status` turns an HTTP status (and body) into frugalflow's error classes.
- `FallbackPolicy` says how often to retry the same model and how long to wait.
- `CircuitBreaker` / `BreakerRegistry` stop calls to a provider (or model) that keeps
  failing, shared by every run in the process; a half-open probe tests it after a cooldown.
- `Attempt` is the event every model call emits, success or failure.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .exceptions import (
    AuthenticationError,
    ContentFilterError,
    ContextLengthError,
    InvalidRequestError,
    ModelAPIError,
    ModelTimeoutError,
    ProviderOverloadedError,
    RateLimitError,
)

if TYPE_CHECKING:
    from .catalog import ModelSpec
    from .usage import Usage

__all__ = [
    "Attempt",
    "RateLimiter",
    "RedisRateLimiter",
    "RedisBreakerRegistry",
    "BreakerRegistry",
    "BreakerState",
    "CircuitBreaker",
    "FallbackPolicy",
    "default_breakers",
    "error_from_status",
]

_CONTEXT_MARKERS = (
    "context_length",
    "context length",
    "context window",
    "maximum context",
    "prompt is too long",
    "too many tokens",
    "input is too long",
    "exceeds the maximum number of tokens",
)
_FILTER_MARKERS = ("content_filter", "content filter", "content management policy", "safety")


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


def error_from_status(
    status: int,
    message: str,
    *,
    body: str | None = None,
    retry_after: str | float | None = None,
    provider: str = "",
    model: str = "",
) -> ModelAPIError:
    """The frugalflow error for an HTTP error answer from a provider."""
    text = (body or "").lower() + " " + message.lower()
    kw: dict[str, Any] = {"provider": provider, "model": model, "status_code": status, "body": body}
    if status == 429:
        return RateLimitError(message, retry_after=parse_retry_after(retry_after), **kw)
    if status in (401, 403):
        return AuthenticationError(message, **kw)
    if status == 408:
        return ModelTimeoutError(message, **kw)
    if status == 413 or (400 <= status < 500 and any(m in text for m in _CONTEXT_MARKERS)):
        return ContextLengthError(message, **kw)
    if 400 <= status < 500 and any(m in text for m in _FILTER_MARKERS):
        return ContentFilterError(message, **kw)
    if status in (400, 422):
        return InvalidRequestError(message, **kw)
    if status >= 500:  # includes Anthropic's 529 overloaded
        return ProviderOverloadedError(message, **kw)
    # 404 (model gone at this provider) and other codes: this model failed, others may not.
    return ModelAPIError(message, **kw)


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
            wait = error.retry_after  # type: ignore[attr-defined]
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
            if self.state is BreakerState.CLOSED:
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
    ) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self._breakers: dict[str, CircuitBreaker] = {}
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

    def record(self, spec: ModelSpec, error: ModelAPIError | None) -> None:
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

    # The routed model uses these: a shared (networked) registry overrides them.
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


_ACQUIRE = """
-- KEYS: breaker hashes (provider, then model). ARGV: now, cooldown.
local now, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2])
local taken = {}
for i, key in ipairs(KEYS) do
  local state = redis.call('HGET', key, 'state') or 'closed'
  local ok = 0
  if state == 'closed' then
    ok = 1
  elseif state == 'open' or state == 'half_open' then
    local opened = tonumber(redis.call('HGET', key, 'opened_at') or '0')
    local probe_at = tonumber(redis.call('HGET', key, 'probe_at') or '0')
    local probing = redis.call('HGET', key, 'probe') == '1' and now - probe_at < cooldown
    if now - opened >= cooldown and not probing then
      redis.call('HSET', key, 'state', 'half_open', 'probe', '1', 'probe_at', ARGV[1])
      taken[#taken + 1] = key
      ok = 1
    end
  end
  if ok == 0 then
    for _, k in ipairs(taken) do redis.call('HSET', k, 'probe', '0') end
    return 0
  end
end
return 1
"""

_FAILURE = """
-- KEYS[1]: breaker hash. ARGV: now, threshold, reason.
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'disabled' then return state end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HSET', KEYS[1], 'reason', ARGV[3])
if state == 'half_open' or failures >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1], 'probe', '0')
  return 'open'
end
return state
"""

_SUCCESS = """
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'disabled' then return state end
if state ~= 'closed' or redis.call('HGET', KEYS[1], 'failures') ~= '0' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', '0', 'probe', '0')
end
return 'closed'
"""


class RedisBreakerRegistry(BreakerRegistry):
    """Circuit breakers kept in Redis, so every worker of a fleet shares provider health:
    one worker's discovery of a dead provider protects all the others.

    The transitions are Lua scripts (atomic in Redis); times are wall-clock seconds, so the
    workers' clocks should agree to well under the cooldown.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        threshold: int = 5,
        cooldown: float = 30.0,
        prefix: str = "frugalflow:breaker:",
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(threshold=threshold, cooldown=cooldown, clock=clock)
        self.url = url
        self.prefix = prefix
        self._redis: Any = None
        self._scripts: dict[str, Any] = {}
        self._known: dict[str, BreakerState] = {}

    def _client(self) -> Any:
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(self.url, decode_responses=True)
            self._scripts = {
                name: self._redis.register_script(src)
                for name, src in (("acquire", _ACQUIRE), ("failure", _FAILURE),
                                  ("success", _SUCCESS))
            }
        return self._redis

    def _key(self, key: str) -> str:
        return self.prefix + key

    async def aacquire(self, spec: ModelSpec) -> bool:
        self._client()
        ok = await self._scripts["acquire"](
            keys=[self._key(spec.provider), self._key(spec.key)],
            args=[self.clock(), self.cooldown],
        )
        return bool(ok)

    async def arecord(self, spec: ModelSpec, error: ModelAPIError | None) -> None:
        r = self._client()
        now = self.clock()
        if error is None or error.error_class not in HEALTH_ERRORS | {"auth", "malformed"}:
            for key in (spec.provider, spec.key):
                self._known[key] = BreakerState(
                    await self._scripts["success"](keys=[self._key(key)], args=[]))
        elif error.error_class == "auth":
            reason = f"authentication failed ({error.status_code or 'no status'})"
            await r.hset(self._key(spec.provider), mapping={"state": "disabled", "reason": reason})
            self._known[spec.provider] = BreakerState.DISABLED
        else:
            keys = [spec.key] if error.error_class == "malformed" else [spec.provider, spec.key]
            for key in keys:
                self._known[key] = BreakerState(await self._scripts["failure"](
                    keys=[self._key(key)], args=[now, self.threshold, error.error_class]))

    async def arelease(self, spec: ModelSpec) -> None:
        r = self._client()
        for key in (spec.provider, spec.key):
            await r.hset(self._key(key), "probe", "0")

    async def ablocked_reason(self, spec: ModelSpec) -> str | None:
        r = self._client()
        for key in (spec.provider, spec.key):
            state = await r.hget(self._key(key), "state")
            if state == "disabled":
                return f"{key} disabled (shared): {await r.hget(self._key(key), 'reason')}"
            if state in ("open", "half_open"):
                return f"circuit {state} for {key} (shared)"
        return None

    async def astate(self, key: str) -> BreakerState:
        state = await self._client().hget(self._key(key), "state")
        self._known[key] = BreakerState(state or "closed")
        return self._known[key]

    def state(self, key: str) -> BreakerState:
        """The last state this process saw (use `astate` for the fleet's current one)."""
        return self._known.get(key, BreakerState.CLOSED)

    async def areset(self) -> None:
        r = self._client()
        keys = [k async for k in r.scan_iter(match=self.prefix + "*")]
        if keys:
            await r.delete(*keys)
        self._known.clear()

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None


default_breakers = BreakerRegistry()
"""The process-wide registry every run shares unless given another."""


@dataclass
class Attempt:
    """One try of one model for one call: the event the ledger and the demo consume."""

    node: str
    model: str
    provider: str
    outcome: str  # "ok" | "error"
    call_id: str = ""
    run_id: str | None = None
    task_id: str | None = None  # the LangGraph task (node execution) that made the call
    try_number: int = 1
    usage: Usage | None = None
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    error_class: str | None = None
    error: str | None = None
    fallback_from: str | None = None
    action: str | None = None  # what followed a failure: retry, next, raise
    started_at: float = field(default_factory=time.time)
    call_key: str | None = None  # identifies the call for replay after a crash
    route_reason: str | None = None  # why the router put this model where it did
    prompt: str | None = None  # the input text routers learn from (persisted runs only)
    category: str | None = None  # the input's category, another feature routers learn from
    usage_estimated: bool = False  # the provider reported no (or partial) usage: tokens estimated
    response: Any = field(default=None, repr=False)  # the answer (an AIMessage), if ok

    def describe(self) -> str:
        if self.outcome == "ok":
            return f"{self.model}: ok in {self.latency_ms:.0f} ms, ${self.cost_usd:.6f}"
        if self.outcome == "replayed":
            return f"{self.model}: replayed from the ledger (not paid again)"
        return f"{self.model} ({self.provider}): {self.error_class}: {self.error}"


Sleep = Callable[[float], Awaitable[Any]]
_default_sleep: Sleep = asyncio.sleep


class RateLimiter:
    """Keeps calls under each model's `rpm`/`tpm` (catalog fields), per fixed minute window.

    A call that would exceed a limit is not sent: the routed model moves to the next
    candidate at once (no 429 round trip). This one counts in this process;
    `RedisRateLimiter` counts for the whole fleet.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._counts: dict[tuple[str, int], list[int]] = {}
        self._lock = threading.Lock()

    async def aacquire(self, spec: ModelSpec, tokens: int) -> bool:
        if spec.rpm is None and spec.tpm is None:
            return True
        window = int(self.clock() // 60)
        with self._lock:
            used = self._counts.setdefault((spec.key, window), [0, 0])
            if (spec.rpm is not None and used[0] + 1 > spec.rpm) or (
                spec.tpm is not None and used[1] + tokens > spec.tpm
            ):
                return False
            used[0] += 1
            used[1] += tokens
            for key in [k for k in self._counts if k[1] < window]:
                del self._counts[key]  # old windows
        return True


_RATE = """
-- KEYS: requests key, tokens key. ARGV: rpm (0 = none), tpm (0 = none), tokens, ttl.
local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local reqs = tonumber(redis.call('GET', KEYS[1]) or '0')
local toks = tonumber(redis.call('GET', KEYS[2]) or '0')
if (rpm > 0 and reqs + 1 > rpm) or (tpm > 0 and toks + tokens > tpm) then return 0 end
redis.call('INCR', KEYS[1]); redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('INCRBY', KEYS[2], tokens); redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""


class RedisRateLimiter(RateLimiter):
    """Per-model request and token budgets per minute, shared by every worker through Redis
    (one atomic Lua check-and-count per call), so the fleet as a whole stays under a
    provider's limits."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *,
                 prefix: str = "frugalflow:rate:", clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self.url = url
        self.prefix = prefix
        self._redis: Any = None
        self._script: Any = None

    async def aacquire(self, spec: ModelSpec, tokens: int) -> bool:
        if spec.rpm is None and spec.tpm is None:
            return True
        if self._redis is None:
            import redis.asyncio as aioredis

            self._redis = aioredis.from_url(self.url, decode_responses=True)
            self._script = self._redis.register_script(_RATE)
        window = int(self.clock() // 60)
        base = f"{self.prefix}{spec.key}:{window}"
        ok = await self._script(keys=[base + ":r", base + ":t"],
                                args=[spec.rpm or 0, spec.tpm or 0, tokens, 120])
        return bool(ok)

    async def aclose(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None
