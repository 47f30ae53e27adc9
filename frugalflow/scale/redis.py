"""Provider health and rate limits shared by a fleet through Redis (the `scale` extra).

- `SharedRedis` is the Redis link of the shared variants: when Redis is unreachable,
  slow or failing they fall back to in-process state and come back when it answers again.
- `RedisBreakerRegistry` / `RedisRateLimiter`: circuit breakers and rate limits for the fleet.
- `shared_state` / `acheck_shared_state`: one word for the health display.

redis-py is imported only when a link first talks to Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, cast

from ..exceptions import ModelAPIError
from ..limits import RateLimiter, RateReservation
from ..resilience import HEALTH_ERRORS, BreakerRegistry, BreakerState

if TYPE_CHECKING:
    from ..catalog import ModelSpec

__all__ = [
    "RedisBreakerRegistry",
    "RedisRateLimiter",
    "SharedRedis",
    "acheck_shared_state",
    "shared_state",
]

log = logging.getLogger("frugalflow.shared")


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
