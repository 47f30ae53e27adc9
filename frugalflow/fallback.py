"""What to do when a model call fails: classify, retry, move on, or stop.

- `error_from_status` turns an HTTP status (and body) into frugalflow's error classes.
- `FallbackPolicy` says how often to retry the same model and how long to wait.
- `CircuitBreaker` / `BreakerRegistry` stop calls to a provider (or model) that keeps
  failing, shared by every run in the process; a half-open probe tests it after a cooldown.
- `RateLimiter` / `RedisRateLimiter` keep calls under a model's rpm/tpm (sliding window).
- `SharedRedis` is the Redis link of the shared (fleet) variants: when Redis is unreachable,
  slow or failing they fall back to in-process state and come back when it answers again.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import random
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, cast

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
    "RateLimiter",
    "RedisRateLimiter",
    "RedisBreakerRegistry",
    "BreakerRegistry",
    "RateReservation",
    "SharedRedis",
    "BreakerState",
    "CircuitBreaker",
    "FallbackPolicy",
    "default_breakers",
    "error_from_status",
    "acheck_shared_state",
    "shared_state",
]

log = logging.getLogger("frugalflow.shared")

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


_DOWN: Any = object()  # what `SharedRedis.call` returns when Redis cannot answer


def _redis_errors() -> tuple[type[BaseException], ...]:
    from redis.exceptions import RedisError

    # RedisError covers ConnectionError (BusyLoadingError included), TimeoutError,
    # ResponseError (NOSCRIPT after a restart, ReadOnlyError on a demoted replica, ...);
    # OSError covers socket errors redis-py lets through and the builtin TimeoutError.
    return (RedisError, OSError)


class SharedRedis:
    """The Redis link of a shared registry or limiter, and its health.

    `call(fn)` runs `fn(client)`; if Redis errs in any way (refused, reset, timed out,
    loading, read-only, script missing) it returns `_DOWN` and the caller uses its
    in-process state instead. The first failure logs one warning; while Redis is down it
    is not touched again until `retry_interval` seconds have passed (one caller probes,
    the others stay local), so a dead Redis costs nothing per call. Short socket timeouts
    keep a black-holed Redis from stalling calls.
    """

    def __init__(self, url: str, *, timeout: float = 0.5, retry_interval: float = 5.0,
                 name: str = "shared state") -> None:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            # A typo must not pass as an outage: say so at start-up.
            raise ValueError(f"{name}: {_safe_url(url)!r} is not a Redis URL; use "
                             "redis://host:6379/0 (or rediss://, unix://)")
        self.url = url
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.name = name
        self.clock: Callable[[], float] = time.monotonic
        self.ok = True
        """False from a failure until Redis answers again."""
        self.last_error: str | None = None
        self._retry_at = 0.0
        self._client: Any = None
        self._scripts: dict[str, Any] = {}
        self._sources: dict[str, str] = {}
        self._errors: tuple[type[BaseException], ...] = ()

    def script(self, name: str, source: str) -> None:
        self._sources[name] = source

    def client(self) -> Any:
        if self._client is None:
            import redis.asyncio as aioredis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import ConnectionError as RedisConnectionError

            self._errors = _redis_errors()
            self._client = aioredis.from_url(
                self.url, decode_responses=True, socket_timeout=self.timeout,
                socket_connect_timeout=self.timeout,
                # One immediate reconnect for a pooled connection a Redis restart closed;
                # no retry on timeouts (a hung Redis would stall every call twice as long).
                retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            )
            self._scripts = {n: self._client.register_script(src)
                             for n, src in self._sources.items()}
        return self._client

    async def run(self, name: str, keys: list[str], args: list[Any]) -> Any:
        """A registered Lua script (redis-py reloads it after a NOSCRIPT)."""
        self.client()
        return await self._scripts[name](keys=keys, args=args)

    def state(self) -> str:
        return "ok" if self.ok else "unavailable"

    async def call(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        """`await fn(client)`, or `_DOWN` when Redis is (or just went) unavailable."""
        if not self.ok:
            now = self.clock()
            if now < self._retry_at:
                return _DOWN
            self._retry_at = now + self.retry_interval  # this caller probes, others stay local
        client = self.client()
        try:
            # The socket timeouts bound each read; this bounds the whole exchange.
            async with asyncio.timeout(self.timeout * 4):
                result = await fn(client)
        except self._errors as e:
            self._down(e)
            return _DOWN
        if not self.ok:
            self.ok = True
            self.last_error = None
            SharedRedis._down_links[self.url] -= 1
            log.info("%s: Redis at %s answers again; shared state restored", self.name,
                     _safe_url(self.url))
        return result

    # Links (breakers, limiter) to one Redis that are down: an outage warns once, not once
    # per link.
    _down_links: ClassVar[dict[str, int]] = {}

    def _down(self, error: BaseException) -> None:
        self._retry_at = self.clock() + self.retry_interval
        self.last_error = f"{type(error).__name__}: {error}"
        if self.ok:
            self.ok = False
            others = SharedRedis._down_links.get(self.url, 0)
            SharedRedis._down_links[self.url] = others + 1
            log.log(logging.INFO if others else logging.WARNING,
                    "%s: Redis at %s unavailable (%s); shared state degrades to in-process "
                    "state, retried every %.0f s", self.name, _safe_url(self.url),
                    self.last_error, self.retry_interval)

    async def aclose(self) -> None:
        if not self.ok:  # a closed link no longer counts as one that is down
            self.ok = True
            SharedRedis._down_links[self.url] -= 1
        if self._client is not None:
            client, self._client = self._client, None
            try:
                await client.aclose()
            except self._errors:
                pass  # closing a dead link: nothing to tell


def _safe_url(url: str) -> str:
    """The URL without its password (it goes to logs)."""
    if "@" in url:
        scheme, _, rest = url.partition("://")
        return f"{scheme}://***@{rest.rpartition('@')[2]}"
    return url


def shared_state(*parts: Any) -> str:
    """One word for the health display: "unavailable" if any shared part lost Redis,
    "ok" if some part is shared and all answer, "local" if nothing is shared."""
    states = [p.shared_state() for p in parts if p is not None and hasattr(p, "shared_state")]
    if "unavailable" in states:
        return "unavailable"
    return "ok" if "ok" in states else "local"


async def acheck_shared_state(*parts: Any) -> str:
    """`shared_state`, after asking each shared part's Redis (respecting its retry interval)."""
    for p in parts:
        if p is not None and hasattr(p, "acheck"):
            await p.acheck()
    return shared_state(*parts)


async def _ping(r: Any) -> Any:
    return await r.ping()


class RedisBreakerRegistry(BreakerRegistry):
    """Circuit breakers kept in Redis, so every worker of a fleet shares provider health:
    one worker's discovery of a dead provider protects all the others; a 429's
    Retry-After rests the model for the whole fleet (a key with a TTL).

    The transitions are Lua scripts (atomic in Redis); times are wall-clock seconds, so the
    workers' clocks should agree to well under the cooldown. When Redis is unreachable the
    registry works in-process (one warning; `shared_state()` says "unavailable") and goes
    back to Redis when it answers again; a run never fails because Redis is down.
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",
        *,
        threshold: int = 5,
        cooldown: float = 30.0,
        prefix: str = "frugalflow:breaker:",
        clock: Callable[[], float] = time.time,
        timeout: float = 0.5,
        retry_interval: float = 5.0,
        max_retry_after: float = 600.0,
        disabled_for: float = 600.0,
    ) -> None:
        super().__init__(threshold=threshold, cooldown=cooldown, clock=clock,
                         max_retry_after=max_retry_after)
        self.url = url
        self.prefix = prefix
        # A provider disabled by a 401 stays disabled for the fleet this long (not forever:
        # Redis outlives the processes, and a fixed or rotated key must get a new chance).
        self.disabled_for = disabled_for
        self.shared = SharedRedis(url, timeout=timeout, retry_interval=retry_interval,
                                  name="circuit breakers")
        for name, src in (("acquire", _ACQUIRE), ("failure", _FAILURE), ("success", _SUCCESS)):
            self.shared.script(name, src)
        self._known: dict[str, BreakerState] = {}

    def _key(self, key: str) -> str:
        return self.prefix + key

    def _cooldown_key(self, spec: ModelSpec) -> str:
        return self.prefix + "retry-after:" + spec.key

    def shared_state(self) -> str:
        return self.shared.state()

    async def acheck(self) -> str:
        await self.shared.call(_ping)
        return self.shared.state()

    async def aacquire(self, spec: ModelSpec) -> bool:
        async def go(r: Any) -> bool:
            return bool(await self.shared.run(
                "acquire", [self._key(spec.provider), self._key(spec.key)],
                [self.clock(), self.cooldown]))

        ok = await self.shared.call(go)
        return self.acquire(spec) if ok is _DOWN else bool(ok)

    async def arecord(self, spec: ModelSpec, error: ModelAPIError | None) -> None:
        now = self.clock()
        wait = self._retry_after(error)
        if wait is not None:
            self.note_retry_after(spec, wait)  # this process knows even if Redis does not

        async def go(r: Any) -> None:
            if wait is not None:
                await r.set(self._cooldown_key(spec), repr(now + wait),
                            px=max(int(wait * 1000), 1))
            if error is None or error.error_class not in HEALTH_ERRORS | {"auth", "malformed"}:
                for key in (spec.provider, spec.key):
                    self._known[key] = BreakerState(
                        await self.shared.run("success", [self._key(key)], []))
            elif error.error_class == "auth":
                reason = f"authentication failed ({error.status_code or 'no status'})"
                await r.hset(self._key(spec.provider),
                             mapping={"state": "disabled", "reason": reason})
                await r.pexpire(self._key(spec.provider), max(int(self.disabled_for * 1000), 1))
                self._known[spec.provider] = BreakerState.DISABLED
            else:
                keys = [spec.key] if error.error_class == "malformed" else [spec.provider,
                                                                             spec.key]
                for key in keys:
                    self._known[key] = BreakerState(await self.shared.run(
                        "failure", [self._key(key)], [now, self.threshold, error.error_class]))

        if await self.shared.call(go) is _DOWN:
            BreakerRegistry.record(self, spec, error)

    async def arelease(self, spec: ModelSpec) -> None:
        async def go(r: Any) -> None:
            for key in (spec.provider, spec.key):
                await r.hset(self._key(key), "probe", "0")

        await self.shared.call(go)
        self.release(spec)  # the in-process breakers may have given the slot while down

    async def ablocked_reason(self, spec: ModelSpec) -> str | None:
        async def go(r: Any) -> str | None:
            for key in (spec.provider, spec.key):
                state = await r.hget(self._key(key), "state")
                if state == "disabled":
                    return f"{key} disabled (shared): {await r.hget(self._key(key), 'reason')}"
                if state in ("open", "half_open"):
                    return f"circuit {state} for {key} (shared)"
            return None

        why = await self.shared.call(go)
        return self.blocked_reason(spec) if why is _DOWN else why

    async def acooldown_reason(self, spec: ModelSpec) -> str | None:
        local = self.cooldown_reason(spec)
        if local is not None:
            return local  # known here: no round trip

        async def go(r: Any) -> str | None:
            return cast("str | None", await r.get(self._cooldown_key(spec)))

        until = await self.shared.call(go)
        if until is _DOWN or until is None:
            return None
        until = float(until)
        if self.clock() >= until:
            return None
        return self._cooldown_text(until) + " (shared)"

    async def astate(self, key: str) -> BreakerState:
        async def go(r: Any) -> str | None:
            return cast("str | None", await r.hget(self._key(key), "state"))

        state = await self.shared.call(go)
        if state is _DOWN:
            return BreakerRegistry.state(self, key)
        self._known[key] = BreakerState(state or "closed")
        return self._known[key]

    def state(self, key: str) -> BreakerState:
        """The last state this process saw (use `astate` for the fleet's current one)."""
        if not self.shared.ok:
            return BreakerRegistry.state(self, key)
        return self._known.get(key, BreakerState.CLOSED)

    async def areset(self) -> None:
        async def go(r: Any) -> None:
            keys = [k async for k in r.scan_iter(match=self.prefix + "*")]
            if keys:
                await r.delete(*keys)

        await self.shared.call(go)
        self._known.clear()
        self.reset()

    async def aclose(self) -> None:
        await self.shared.aclose()


default_breakers = BreakerRegistry()
"""The process-wide registry every run shares unless given another."""


Sleep = Callable[[float], Awaitable[Any]]
_default_sleep: Sleep = asyncio.sleep


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


_RATE = """
-- A sliding-window log. KEYS: zset (request id by time), hash (id -> tokens), total tokens.
-- ARGV: now, window, rpm (0 = none), tpm (0 = none), tokens, id.
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local rpm, tpm, tokens = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local edge = now - window
while true do
  local old = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', edge, 'LIMIT', 0, 500)
  if #old == 0 then break end
  local sum = 0
  for _, t in ipairs(redis.call('HMGET', KEYS[2], unpack(old))) do
    sum = sum + (tonumber(t) or 0)
  end
  redis.call('DECRBY', KEYS[3], sum)
  redis.call('HDEL', KEYS[2], unpack(old))
  redis.call('ZREM', KEYS[1], unpack(old))
end
local n = redis.call('ZCARD', KEYS[1])
local used = tonumber(redis.call('GET', KEYS[3]) or '0')
if used < 0 then used = 0; redis.call('SET', KEYS[3], 0) end
if (rpm > 0 and n + 1 > rpm) or (tpm > 0 and used + tokens > tpm) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[6])
redis.call('HSET', KEYS[2], ARGV[6], tokens)
redis.call('INCRBY', KEYS[3], tokens)
local ttl = math.ceil(window * 1000) + 1000
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ttl) end
return 1
"""

_RATE_CORRECT = """
-- KEYS: hash (id -> tokens), total tokens. ARGV: id, actual tokens.
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then return 0 end
local diff = tonumber(ARGV[2]) - tonumber(old)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('INCRBY', KEYS[2], diff)
return diff
"""


class RedisRateLimiter(RateLimiter):
    """Per-model request and token limits over any 60 s, shared by every worker through
    Redis (one atomic Lua check-and-count per call, a sliding-window log per model), so the
    fleet as a whole stays under a provider's limits. When Redis is unreachable it counts in
    this process (one warning; `shared_state()` says "unavailable") until Redis is back."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *,
                 prefix: str = "frugalflow:rate:", clock: Callable[[], float] = time.time,
                 timeout: float = 0.5, retry_interval: float = 5.0) -> None:
        super().__init__(clock)
        self.url = url
        self.prefix = prefix
        self.shared = SharedRedis(url, timeout=timeout, retry_interval=retry_interval,
                                  name="rate limits")
        self.shared.script("acquire", _RATE)
        self.shared.script("correct", _RATE_CORRECT)

    def _keys(self, key: str) -> list[str]:
        base = f"{self.prefix}{{{key}}}"  # one hash tag: the three keys live on one node
        return [base + ":log", base + ":tokens", base + ":total"]

    def shared_state(self) -> str:
        return self.shared.state()

    async def acheck(self) -> str:
        await self.shared.call(_ping)
        return self.shared.state()

    async def aacquire(self, spec: ModelSpec, tokens: int) -> RateReservation | bool | None:
        if spec.rpm is None and spec.tpm is None:
            return True
        tokens = max(int(tokens), 0)
        now = self.clock()
        rid = uuid.uuid4().hex

        async def go(r: Any) -> int:
            return int(await self.shared.run(
                "acquire", self._keys(spec.key),
                [now, self.window, spec.rpm or 0, spec.tpm or 0, tokens, rid]))

        ok = await self.shared.call(go)
        if ok is _DOWN:
            return self.acquire(spec, tokens)
        return RateReservation(spec.key, rid, tokens, now, shared=True) if ok else None

    async def acorrect(self, reservation: Any, actual_tokens: int) -> None:
        if not isinstance(reservation, RateReservation):
            return
        if not reservation.shared:
            self.correct(reservation, actual_tokens)
            return
        keys = self._keys(reservation.key)

        async def go(r: Any) -> Any:
            return await self.shared.run("correct", keys[1:],
                                         [reservation.id, max(int(actual_tokens), 0)])

        if await self.shared.call(go) is not _DOWN:
            reservation.tokens = max(int(actual_tokens), 0)

    async def aclose(self) -> None:
        await self.shared.aclose()
