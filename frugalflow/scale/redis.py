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
from enum import Enum
from typing import TYPE_CHECKING, ClassVar, Literal, TypeVar, cast

from ..exceptions import ModelAPIError
from ..limits import Counted, Limiter, RateLimiter, RateReservation
from ..resilience import Breakers, BreakerRegistry, BreakerState, Mark, rest_reason, verdict

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

    from ..catalog import ModelSpec

__all__ = [
    "RedisBreakerRegistry",
    "RedisRateLimiter",
    "SharedRedis",
    "acheck_shared_state",
    "shared_state",
]

log = logging.getLogger("frugalflow.shared")

_T = TypeVar("_T")


class _Down(Enum):
    DOWN = "down"


_DOWN: Literal[_Down.DOWN] = _Down.DOWN
"""What `SharedRedis.call` returns when Redis cannot answer."""


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
        self._client: Redis | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._sources: dict[str, str] = {}
        self._errors: tuple[type[BaseException], ...] = ()

    def script(self, name: str, source: str) -> None:
        self._sources[name] = source

    def client(self) -> Redis:
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

    async def run(self, name: str, keys: list[str], args: list[str | float]) -> int | str:
        """A registered Lua script (redis-py reloads it after a NOSCRIPT)."""
        self.client()
        # redis-py leaves a script's answer untyped; ours answer an integer or a state name.
        return cast("int | str", await self._scripts[name](keys=keys, args=args))

    def state(self) -> str:
        return "ok" if self.ok else "unavailable"

    async def call(self, fn: Callable[[Redis], Awaitable[_T]]) -> _T | Literal[_Down.DOWN]:
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


def shared_state(*parts: Breakers | Limiter | None) -> str:
    """One word for the health display: "unavailable" if any shared part lost Redis,
    "ok" if some part is shared and all answer, "local" if nothing is shared."""
    states = [p.shared_state() for p in parts if p is not None]
    if "unavailable" in states:
        return "unavailable"
    return "ok" if "ok" in states else "local"


async def acheck_shared_state(*parts: Breakers | Limiter | None) -> str:
    """`shared_state`, after asking each shared part's Redis (respecting its retry interval)."""
    for p in parts:
        if p is not None:
            await p.acheck()
    return shared_state(*parts)


async def _ping(r: Redis) -> bool:
    return bool(await r.ping())


def _text(value: bytes | str | None) -> str | None:
    """A Redis answer as text: the client decodes answers, but its types do not know it."""
    return value.decode() if isinstance(value, bytes) else value


# -- circuit breakers --------------------------------------------------------------------


_ACQUIRE = """
-- KEYS: breaker hashes (provider, then model). ARGV: now, cooldown.
-- Answers "1" (allowed) or "0", then the indexes of the keys it moved from open to half_open.
local now, cooldown = tonumber(ARGV[1]), tonumber(ARGV[2])
local taken = {}
local moved = ''
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
      if state == 'open' then moved = moved .. ' ' .. i end
      ok = 1
    end
  end
  if ok == 0 then
    for _, k in ipairs(taken) do redis.call('HSET', k, 'probe', '0') end
    return '0' .. moved
  end
end
return '1' .. moved
"""

_FAILURE = """
-- KEYS[1]: breaker hash. ARGV: now, threshold, reason. Answers "<before> <after>".
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'disabled' then return 'disabled disabled' end
local failures = redis.call('HINCRBY', KEYS[1], 'failures', 1)
redis.call('HSET', KEYS[1], 'reason', ARGV[3])
if state == 'half_open' or failures >= tonumber(ARGV[2]) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', ARGV[1], 'probe', '0')
  return state .. ' open'
end
return state .. ' ' .. state
"""

_SUCCESS = """
-- Answers "<before> <after>".
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'disabled' then return 'disabled disabled' end
if state ~= 'closed' or redis.call('HGET', KEYS[1], 'failures') ~= '0' then
  redis.call('HSET', KEYS[1], 'state', 'closed', 'failures', '0', 'probe', '0')
end
return state .. ' closed'
"""


class RedisBreakerRegistry:
    """Circuit breakers kept in Redis, so every worker of a fleet shares provider health:
    one worker's discovery of a dead provider protects all the others; a 429's
    Retry-After rests the model for the whole fleet (a key with a TTL).

    The transitions are Lua scripts (atomic in Redis) applying the same health rule as the
    in-process registry (`frugalflow.resilience.verdict`); times are wall-clock seconds, so
    the workers' clocks should agree to well under the cooldown. When Redis is unreachable
    the registry works on its in-process `local` one (one warning; `shared_state()` says
    "unavailable") and goes back to Redis when it answers again; a run never fails because
    Redis is down.
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
        self.url = url
        self.prefix = prefix
        self.threshold = threshold
        self.cooldown = cooldown
        self.clock = clock
        self.max_retry_after = max_retry_after
        # A provider disabled by a 401 stays disabled for the fleet this long (not forever:
        # Redis outlives the processes, and a fixed or rotated key must get a new chance).
        self.disabled_for = disabled_for
        self.shared = SharedRedis(url, timeout=timeout, retry_interval=retry_interval,
                                  name="circuit breakers")
        for name, src in (("acquire", _ACQUIRE), ("failure", _FAILURE), ("success", _SUCCESS)):
            self.shared.script(name, src)
        self.local = BreakerRegistry(threshold=threshold, cooldown=cooldown, clock=clock,
                                     max_retry_after=max_retry_after)
        """The breakers of this process alone, used while Redis cannot answer."""
        self.listeners = self.local.listeners
        """Told `(key, before, after)` of each state change this process makes, in Redis or
        in `local` (each change is made by one worker: summed over the fleet, none counts
        twice)."""

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
        async def go(r: Redis) -> bool:
            keys = [spec.provider, spec.key]
            answer = await self.shared.run(
                "acquire", [self._key(k) for k in keys], [self.clock(), self.cooldown])
            ok, *moved = str(answer).split()
            for i in moved:  # the keys this call moved from open to half-open
                self._changed(keys[int(i) - 1], "open half_open")
            return ok == "1"

        ok = await self.shared.call(go)
        return await self.local.aacquire(spec) if ok is _DOWN else ok

    async def arecord(self, spec: ModelSpec, error: ModelAPIError | None) -> None:
        now = self.clock()
        v = verdict(error, max_rest=self.max_retry_after)
        rest = v.rest
        if rest is not None:
            await self.local.arest(spec, rest)  # this process knows even if Redis does not

        async def go(r: Redis) -> None:
            if rest is not None:
                await r.set(self._cooldown_key(spec), repr(now + rest),
                            px=max(int(rest * 1000), 1))
            await self._mark(r, spec.provider, v.provider, v.reason, now)
            await self._mark(r, spec.key, v.model, v.reason, now)

        if await self.shared.call(go) is _DOWN:
            await self.local.arecord(spec, error)

    async def _mark(self, r: Redis, key: str, mark: Mark, reason: str, now: float) -> None:
        """Apply one side of a `Verdict` to the breaker of `key` in Redis."""
        if mark is Mark.UP:
            self._changed(key, await self.shared.run("success", [self._key(key)], []))
        elif mark is Mark.DOWN:
            self._changed(key, await self.shared.run(
                "failure", [self._key(key)], [now, self.threshold, reason]))
        elif mark is Mark.OFF:
            before = _text(await r.hget(self._key(key), "state")) or "closed"
            await r.hset(self._key(key),
                         mapping={"state": BreakerState.DISABLED.value, "reason": reason})
            await r.pexpire(self._key(key), max(int(self.disabled_for * 1000), 1))
            self._changed(key, f"{before} {BreakerState.DISABLED.value}")

    def _changed(self, key: str, answer: int | str) -> None:
        """Tell the listeners of a change a script reported ("<before> <after>")."""
        before, _, after = str(answer).partition(" ")
        if after and after != before and self.listeners:
            self.local._changed(key, before, after)

    async def arelease(self, spec: ModelSpec) -> None:
        async def go(r: Redis) -> None:
            for key in (spec.provider, spec.key):
                await r.hset(self._key(key), "probe", "0")

        await self.shared.call(go)
        await self.local.arelease(spec)  # the in-process breakers may have given the slot

    async def ablocked_reason(self, spec: ModelSpec) -> str | None:
        async def go(r: Redis) -> str | None:
            for key in (spec.provider, spec.key):
                state = _text(await r.hget(self._key(key), "state"))
                if state == "disabled":
                    reason = _text(await r.hget(self._key(key), "reason"))
                    return f"{key} disabled (shared): {reason}"
                if state in ("open", "half_open"):
                    return f"circuit {state} for {key} (shared)"
            return None

        why = await self.shared.call(go)
        return await self.local.ablocked_reason(spec) if why is _DOWN else why

    async def acooldown_reason(self, spec: ModelSpec) -> str | None:
        local = await self.local.acooldown_reason(spec)
        if local is not None:
            return local  # known here: no round trip

        async def go(r: Redis) -> str | None:
            return _text(await r.get(self._cooldown_key(spec)))

        until = await self.shared.call(go)
        if until is _DOWN or until is None:
            return None
        end = float(until)
        if self.clock() >= end:
            return None
        return rest_reason(end, self.clock) + " (shared)"

    async def astate(self, key: str) -> BreakerState:
        async def go(r: Redis) -> str | None:
            return _text(await r.hget(self._key(key), "state"))

        state = await self.shared.call(go)
        if state is _DOWN:
            return await self.local.astate(key)
        return BreakerState(state or "closed")

    async def areset(self) -> None:
        async def go(r: Redis) -> None:
            keys = [k async for k in r.scan_iter(match=self.prefix + "*")]
            if keys:
                await r.delete(*keys)

        await self.shared.call(go)
        await self.local.areset()

    async def aclose(self) -> None:
        await self.shared.aclose()


# -- rate limits ------------------------------------------------------------------------


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


class RedisRateLimiter:
    """Per-model request and token limits over any 60 s, shared by every worker through
    Redis (one atomic Lua check-and-count per call, a sliding-window log per model), so the
    fleet as a whole stays under a provider's limits. When Redis is unreachable it counts in
    this process (its `local` limiter; one warning; `shared_state()` says "unavailable")
    until Redis is back."""

    def __init__(self, url: str = "redis://127.0.0.1:6379/0", *,
                 prefix: str = "frugalflow:rate:", clock: Callable[[], float] = time.time,
                 timeout: float = 0.5, retry_interval: float = 5.0) -> None:
        self.url = url
        self.prefix = prefix
        self.clock = clock
        self.shared = SharedRedis(url, timeout=timeout, retry_interval=retry_interval,
                                  name="rate limits")
        self.shared.script("acquire", _RATE)
        self.shared.script("correct", _RATE_CORRECT)
        self.local = RateLimiter(clock)
        """The windows of this process alone, counted while Redis cannot answer."""

    def _keys(self, key: str) -> list[str]:
        base = f"{self.prefix}{{{key}}}"  # one hash tag: the three keys live on one node
        return [base + ":log", base + ":tokens", base + ":total"]

    def shared_state(self) -> str:
        return self.shared.state()

    async def acheck(self) -> str:
        await self.shared.call(_ping)
        return self.shared.state()

    async def aacquire(self, spec: ModelSpec, tokens: int) -> RateReservation | None:
        if spec.rpm is None and spec.tpm is None:
            return await self.local.aacquire(spec, tokens)  # nothing to count
        tokens = max(int(tokens), 0)
        now = self.clock()
        rid = uuid.uuid4().hex

        async def go(r: Redis) -> int:
            return int(await self.shared.run(
                "acquire", self._keys(spec.key),
                [now, self.local.window, spec.rpm or 0, spec.tpm or 0, tokens, rid]))

        ok = await self.shared.call(go)
        if ok is _DOWN:
            return await self.local.aacquire(spec, tokens)
        return RateReservation(spec.key, rid, tokens, now, Counted.FLEET) if ok else None

    async def acorrect(self, reservation: RateReservation, actual_tokens: int) -> None:
        if reservation.counted is not Counted.FLEET:
            await self.local.acorrect(reservation, actual_tokens)
            return
        keys = self._keys(reservation.key)
        actual = max(int(actual_tokens), 0)

        async def go(r: Redis) -> int | str:
            return await self.shared.run("correct", keys[1:], [reservation.id, actual])

        if await self.shared.call(go) is not _DOWN:
            reservation.tokens = actual

    async def aclose(self) -> None:
        await self.shared.aclose()


if TYPE_CHECKING:  # the type checker proves both fit the seams the routed model is typed with
    _breakers: Breakers = RedisBreakerRegistry()
    _limiter: Limiter = RedisRateLimiter()
