"""Shared (Redis) breakers and rate limits when Redis goes away, the sliding rate window,
and Retry-After cool-downs. Real Redis at 127.0.0.1:6379, cut through tests/tcp_proxy.py."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from conftest import FakeClock
from langchain_core.messages import HumanMessage
from tcp_proxy import TcpProxy

from frugalflow import Catalog, ProviderOverloadedError, RateLimitError
from frugalflow.cli import load_flow
from frugalflow.limits import RateLimiter
from frugalflow.resilience import BreakerRegistry, FallbackPolicy
from frugalflow.scale.redis import (
    RedisBreakerRegistry,
    RedisRateLimiter,
    acheck_shared_state,
    shared_state,
)

REDIS = ("127.0.0.1", 6379)  # the session's Redis (set from the redis_url fixture below)
REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(autouse=True)
def _session_redis(redis_url: str) -> None:
    """Point this module at the session's Redis (real on CI, else a throwaway one)."""
    from sqlalchemy.engine import make_url

    global REDIS, REDIS_URL
    u = make_url(redis_url)
    REDIS, REDIS_URL = (u.host or "127.0.0.1", u.port or 6379), redis_url
TICKET = {"ticket": "Hi, Dana here. I was charged twice for order 88231, please refund."}


def limited_catalog(rpm: int = 10_000, tpm: int = 10_000_000) -> Catalog:
    """The simulated catalog with rate limits on every model (so the limiter is consulted)."""
    return Catalog([s.model_copy(update={"rpm": rpm, "tpm": tpm}) for s in Catalog.simulated()],
                   name="limited")


def closed_port() -> int:
    """A loopback port nobody listens on (connects are refused)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def shared_pair(url: str, clock: Any = time.time, threshold: int = 5,
                **kw: Any) -> tuple[RedisBreakerRegistry, RedisRateLimiter]:
    prefix = f"frugalflow:test-shared:{uuid.uuid4().hex}:"
    return (RedisBreakerRegistry(url, prefix=prefix + "b:", clock=clock, threshold=threshold,
                                 **kw),
            RedisRateLimiter(url, prefix=prefix + "r:", clock=clock, **kw))


async def run_flow(app: Any, limiter: Any, listener: Any = None) -> Any:
    ctx = app.new_context()
    ctx.limiter = limiter
    if listener is not None:
        ctx.usage.listeners.append(listener)
    return await app.ainvoke(TICKET, context=ctx), ctx


def shared_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == "frugalflow.shared" and r.levelno == logging.WARNING]


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    async with TcpProxy(*REDIS) as p:
        yield p


# -- the proxy helper itself -------------------------------------------------------------


async def test_tcp_proxy_cuts_refuses_and_restores(proxy: TcpProxy) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    writer.write(b"PING\r\n")
    assert await reader.readline() == b"+PONG\r\n"
    await proxy.refuse()
    try:
        ended = await reader.read()
    except ConnectionResetError:
        ended = b""
    assert ended == b""  # the open connection was reset
    writer.close()
    with pytest.raises(ConnectionRefusedError):  # and the port refuses new ones
        await asyncio.open_connection("127.0.0.1", proxy.port)
    await proxy.reopen()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)  # same port
    proxy.blackhole()
    writer.write(b"PING\r\n")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readline(), 0.2)  # nothing comes back
    proxy.restore()
    assert await reader.readline() == b"+PONG\r\n"  # the held bytes go through
    writer.close()


# -- Redis unreachable, lost, slow: runs never fail ----------------------------------------


async def test_unreachable_redis_from_the_start_never_fails_a_run(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "frugalflow.shared")
    breakers, limiter = shared_pair(f"redis://127.0.0.1:{closed_port()}/0", threshold=3)
    app = load_flow("flows/support_triage.py").compile(limited_catalog(), breakers=breakers)
    try:
        assert await acheck_shared_state(breakers, limiter) == "unavailable"
        for _ in range(5):
            result, ctx = await run_flow(app, limiter)
            assert result["review"] and all(a.outcome == "ok" for a in ctx.usage.attempts)
        assert breakers.shared_state() == limiter.shared_state() == "unavailable"
        assert shared_state(breakers, limiter) == "unavailable"
        # One warning for the whole outage, not one per call or per shared part.
        assert len(shared_warnings(caplog)) == 1
        assert sum(limiter.local.used(s)[0] for s in ctx.catalog) > 0  # counted locally
        # While down, breakers still work in-process.
        spec = ctx.catalog["sim-openai/gpt-4o-mini"]
        for _ in range(3):
            await breakers.arecord(spec, ProviderOverloadedError("503"))
        assert not await breakers.aacquire(spec)
        assert "circuit open" in (await breakers.ablocked_reason(spec) or "")
    finally:
        await breakers.aclose()
        await limiter.aclose()


async def test_redis_lost_mid_run_and_back(proxy: TcpProxy,
                                           caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "frugalflow.shared")
    url = f"redis://127.0.0.1:{proxy.port}/0"
    breakers, limiter = shared_pair(url)
    health = FakeClock()  # when the links may try Redis again
    breakers.shared.clock = limiter.shared.clock = health
    catalog = limited_catalog()
    app = load_flow("flows/support_triage.py").compile(catalog, breakers=breakers)
    direct = RedisRateLimiter(f"redis://{REDIS[0]}:{REDIS[1]}/0", prefix=limiter.prefix)
    try:
        _, ctx = await run_flow(app, limiter)
        models = {a.model for a in ctx.usage.attempts}
        assert shared_state(breakers, limiter) == "ok"

        async def fleet_count() -> int:  # requests the fleet's windows hold, read past the proxy
            r = direct.shared.client()
            return sum([await r.zcard(direct._keys(m)[0]) for m in models])

        assert await fleet_count() == 4

        async def cut_after_first(attempt: Any) -> None:
            if not proxy.is_cut:
                await proxy.refuse()

        result, ctx = await run_flow(app, limiter, cut_after_first)  # Redis lost mid-run
        assert result["review"] and [a.outcome for a in ctx.usage.attempts] == ["ok"] * 4
        assert shared_state(breakers, limiter) == "unavailable"
        assert await fleet_count() == 5  # only the first call reached Redis
        for _ in range(2):
            await run_flow(app, limiter)
        warned = shared_warnings(caplog)
        assert len(warned) == 1 and "unavailable" in warned[0]

        await proxy.reopen()
        await run_flow(app, limiter)
        # Not retried on every call: the retry interval has not passed.
        assert shared_state(breakers, limiter) == "unavailable"
        assert await fleet_count() == 5
        health.now += 5.0
        await run_flow(app, limiter)
        assert shared_state(breakers, limiter) == "ok"  # back on Redis
        assert await fleet_count() == 9
        assert any("answers again" in r.getMessage() for r in caplog.records)
    finally:
        await breakers.aclose()
        await limiter.aclose()
        await direct.aclose()


async def test_hung_redis_does_not_stall_calls(proxy: TcpProxy) -> None:
    breakers, limiter = shared_pair(f"redis://127.0.0.1:{proxy.port}/0", timeout=0.2)
    app = load_flow("flows/support_triage.py").compile(limited_catalog(), breakers=breakers)
    try:
        await run_flow(app, limiter)
        t0 = time.monotonic()
        for _ in range(3):
            await run_flow(app, limiter)
        baseline = time.monotonic() - t0  # three runs with Redis answering
        proxy.blackhole()  # Redis accepts bytes and never answers
        t0 = time.monotonic()
        for _ in range(3):
            _, ctx = await run_flow(app, limiter)
            assert [a.outcome for a in ctx.usage.attempts] == ["ok"] * 4
        elapsed = time.monotonic() - t0
        # Each link waits out one 0.2 s timeout, then stays local; waiting on every Redis
        # round trip (3 runs x 4 calls x 5+ round trips) would take 12 s and more.
        assert elapsed < 2 * baseline + 1.5, (elapsed, baseline)
        assert shared_state(breakers, limiter) == "unavailable"
    finally:
        proxy.restore()
        await breakers.aclose()
        await limiter.aclose()


def _error_classes() -> list[Any]:
    from redis import exceptions as rx

    return [
        rx.ConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused."),
        rx.TimeoutError("Timeout reading from socket"),
        rx.BusyLoadingError("Redis is loading the dataset in memory"),
        rx.NoScriptError("No matching script. Please use EVAL."),
        rx.ResponseError("NOSCRIPT No matching script"),
        rx.ReadOnlyError("You can't write against a read only replica."),
        ConnectionResetError(104, "Connection reset by peer"),
    ]


@pytest.mark.parametrize("error", _error_classes(), ids=lambda e: type(e).__name__)
async def test_every_redis_error_degrades_to_local_state(error: Exception) -> None:
    breakers, limiter = shared_pair(f"redis://{REDIS[0]}:{REDIS[1]}/0")
    spec = limited_catalog(rpm=1)["sim-openai/gpt-4o-mini"]

    async def failing(*args: Any, **kwargs: Any) -> Any:
        raise error

    try:
        for part in (breakers, limiter):
            part.shared.client().execute_command = failing  # every command the server answers
        assert await breakers.aacquire(spec)  # the in-process breaker says yes
        await breakers.arecord(spec, None)
        assert await breakers.ablocked_reason(spec) is None
        assert await limiter.aacquire(spec, 10)  # counted in process: rpm 1 ...
        assert not await limiter.aacquire(spec, 10)  # ... holds there too
        assert shared_state(breakers, limiter) == "unavailable"
    finally:
        await breakers.aclose()
        await limiter.aclose()


async def test_a_routed_model_keeps_answering_without_redis(
        make_ctx: Any, caplog: pytest.LogCaptureFixture) -> None:
    from frugalflow import Needs, RoutedChatModel

    caplog.set_level(logging.WARNING, "frugalflow.shared")
    breakers, limiter = shared_pair(f"redis://127.0.0.1:{closed_port()}/0")
    ctx = make_ctx(cat=limited_catalog(), breakers=breakers)
    ctx.limiter = limiter
    model = RoutedChatModel(needs=Needs(), node="n", context=ctx)
    try:
        for i in range(20):
            answer = await model.ainvoke([HumanMessage(f"question {i}")])
            assert answer.content
        assert len(shared_warnings(caplog)) == 1
    finally:
        await breakers.aclose()
        await limiter.aclose()


# -- sliding-window rate limits ------------------------------------------------------------


def max_in_any_window(times: list[float], window: float = 60.0) -> int:
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - window:
            j += 1
        best = max(best, i - j + 1)
    return best


async def test_fixed_window_boundary_no_longer_doubles_the_limit(clock: FakeClock) -> None:
    limiter = RateLimiter(clock=clock)
    spec = limited_catalog(rpm=10)["sim-openai/gpt-4o-mini"]
    clock.now = 6000 + 59.0  # one second before a minute boundary
    assert all([await limiter.aacquire(spec, 1) for _ in range(10)])
    clock.now = 6000 + 60.5  # just after it: a fixed window would allow 10 more
    assert not await limiter.aacquire(spec, 1)
    clock.now = 6000 + 118.9
    assert not await limiter.aacquire(spec, 1)
    clock.now = 6000 + 119.0  # the first ten are 60 s old
    assert await limiter.aacquire(spec, 1)


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "redis"])
async def test_no_60s_span_exceeds_the_limits(clock: FakeClock, shared: bool) -> None:
    rng = random.Random(7)
    spec = limited_catalog(rpm=20, tpm=2000)["sim-openai/gpt-4o-mini"]
    prefix = f"frugalflow:test-rate:{uuid.uuid4().hex}:"
    # Two workers of one fleet (Redis), or one process.
    workers = ([RedisRateLimiter(REDIS_URL, prefix=prefix, clock=clock) for _ in range(2)] if shared
               else [RateLimiter(clock=clock)])
    granted: list[tuple[float, int]] = []
    try:
        for _ in range(600):
            clock.now += rng.expovariate(1 / 0.8)  # bursts and gaps across many minutes
            tokens = rng.randint(10, 200)
            if await rng.choice(workers).aacquire(spec, tokens):
                granted.append((clock.now, tokens))
        times = [t for t, _ in granted]
        assert max_in_any_window(times) == 20  # reached, never exceeded
        for t, _ in granted:
            assert sum(k for u, k in granted if t - 60 < u <= t) <= 2000
        assert len(granted) > 120  # about rpm x minutes got through (8 min: at most 160)
    finally:
        for w in workers:
            if shared:
                await w.aclose()


@pytest.mark.parametrize("shared", [False, True], ids=["memory", "redis"])
async def test_actual_usage_corrects_the_estimate(clock: FakeClock, shared: bool) -> None:
    spec = limited_catalog(rpm=100, tpm=1000)["sim-openai/gpt-4o-mini"]
    prefix = f"frugalflow:test-rate:{uuid.uuid4().hex}:"
    a, b = ((RedisRateLimiter(REDIS_URL, prefix=prefix, clock=clock), RedisRateLimiter(REDIS_URL, prefix=prefix,
            clock=clock)) if shared else (RateLimiter(clock=clock),) * 2)
    try:
        res = await a.aacquire(spec, 800)  # estimated
        assert res and not await b.aacquire(spec, 300)
        await a.acorrect(res, 200)  # the call used 200: 600 refunded
        assert await b.aacquire(spec, 300)
        await a.acorrect(res, 900)  # it used 900 after all: 700 added
        assert not await b.aacquire(spec, 1)  # 900 + 300 > 1000 already
        clock.now += 60
        assert await b.aacquire(spec, 1000)  # all out of the window
    finally:
        if shared:
            await a.aclose()
            await b.aclose()


async def test_routed_calls_count_their_actual_usage(make_ctx: Any) -> None:
    from frugalflow import Needs, RoutedChatModel

    ctx = make_ctx(cat=limited_catalog())
    ctx.limiter = RateLimiter()
    model = RoutedChatModel(needs=Needs(expected_output_tokens=5000), node="n", context=ctx)
    await model.ainvoke([HumanMessage("hello")])
    (attempt,) = ctx.usage.attempts
    spec = ctx.catalog[attempt.model]
    # The window holds what the call used, not the 5,000-token estimate.
    assert ctx.limiter.used(spec) == (1, attempt.usage.total_tokens)
    assert attempt.usage.total_tokens < 5000


# -- Retry-After cool-downs ------------------------------------------------------------


async def test_retry_after_rests_the_model_in_process(clock: FakeClock) -> None:
    reg = BreakerRegistry(clock=clock)
    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"]
    other = Catalog.simulated()["sim-openai/gpt-4.1"]
    await reg.arecord(spec, RateLimitError("slow down", status_code=429, retry_after=30.0))
    assert "rate limited until" in (await reg.acooldown_reason(spec) or "")
    assert await reg.acooldown_reason(other) is None  # per model
    clock.now += 29.9
    assert await reg.acooldown_reason(spec) is not None
    clock.now += 0.1
    assert await reg.acooldown_reason(spec) is None
    await reg.arecord(spec, RateLimitError("slow down", retry_after=10**6))  # capped
    clock.now += reg.max_retry_after
    assert await reg.acooldown_reason(spec) is None


async def test_retry_after_rests_the_model_for_the_fleet(clock: FakeClock) -> None:
    wall = FakeClock()
    wall.now = time.time()  # a TTL key in Redis: the clock must be wall time
    prefix = f"frugalflow:test-ra:{uuid.uuid4().hex}:"
    a = RedisBreakerRegistry(REDIS_URL, prefix=prefix, clock=wall)
    b = RedisBreakerRegistry(REDIS_URL, prefix=prefix, clock=wall)
    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"]
    try:
        await a.arecord(spec, RateLimitError("slow down", status_code=429, retry_after=30.0))
        why = await b.acooldown_reason(spec)  # another worker knows
        assert why is not None and "rate limited until" in why and "(shared)" in why
        ttl = await b.shared.client().pttl(b._cooldown_key(spec))
        assert 0 < ttl <= 30_000  # the key goes away by itself
        wall.now += 30.0
        assert await b.acooldown_reason(spec) is None
    finally:
        await a.areset()
        await a.aclose()
        await b.aclose()


@pytest.fixture
def _emulator_key(monkeypatch: pytest.MonkeyPatch) -> Any:
    from langchain_anthropic import _client_utils as anthropic_clients
    from langchain_openai.chat_models import _client_utils as openai_clients

    from frugalflow.testing.emulator import EMULATOR_KEY_ENV

    monkeypatch.setenv(EMULATOR_KEY_ENV, "emulator-test-key")
    yield
    # The integrations cache one httpx client per base URL; this emulator's port is gone.
    openai_clients._cached_async_httpx_client.cache_clear()
    openai_clients._cached_sync_httpx_client.cache_clear()
    anthropic_clients._get_default_async_httpx_client.cache_clear()
    anthropic_clients._get_default_httpx_client.cache_clear()


@pytest.mark.parametrize("shared", [False, True], ids=["process", "redis"])
async def test_retry_after_over_the_wire_is_remembered(_emulator_key: None, shared: bool) -> None:
    from test_wire import ROUTE, first_choice, tries

    from frugalflow.testing.emulator import ProviderEmulator, emulated_catalog

    clock = FakeClock()
    clock.now = time.time()
    prefix = f"frugalflow:test-ra:{uuid.uuid4().hex}:"
    policy = FallbackPolicy(timeout=2.0, backoff_base=0.01, backoff_max=0.02, retry_after_cap=5.0)
    async with ProviderEmulator(seed=3) as emu:
        catalog = emulated_catalog(emu)
        flow = load_flow("flows/support_triage.py")
        # Two workers (apps) sharing Redis, or one process's registry shared by its runs.
        regs = ([RedisBreakerRegistry(REDIS_URL, prefix=prefix, clock=clock) for _ in range(2)] if shared
                else [BreakerRegistry(clock=clock)] * 2)
        apps = [flow.compile(catalog, breakers=r, policy=policy) for r in regs]

        async def run(app: Any) -> Any:
            ctx = app.new_context()
            ctx.sleep = clock.sleep
            await app.ainvoke(TICKET, context=ctx)
            return ctx

        try:
            key, route, model = first_choice(apps[0], "extract")
            emu.fault(route, "rate_limit", model=model, calls=[1], retry_after=30)
            ctx = await run(apps[0])
            assert tries(ctx, "extract")[0] == (key, "rate_limit", "next")
            called = len(emu.requests_for(route, model))
            ctx = await run(apps[1])  # the next run (on the other worker) skips the model
            assert len(emu.requests_for(route, model)) == called
            assert all(a.model != key for a in ctx.usage.attempts)
            assert all(a.outcome == "ok" for a in ctx.usage.attempts)
            clock.now += 30.0  # Retry-After has passed
            ctx = await run(apps[1])
            assert tries(ctx, "extract")[0] == (key, None, None)
            assert ROUTE[key.split("/")[0]] == route
        finally:
            if shared:
                await regs[0].areset()
            for r in regs:
                if shared:
                    await r.aclose()
            await catalog.aclose()


# -- the health display ------------------------------------------------------------------


async def test_health_shows_shared_state(tmp_path: Any) -> None:
    import httpx

    from frugalflow.runner import Runner
    from frugalflow.service import create_app

    down = f"redis://127.0.0.1:{closed_port()}/0"
    up = f"redis://{REDIS[0]}:{REDIS[1]}/0"
    for url, expected in ((down, "unavailable"), (up, "ok")):
        breakers, limiter = shared_pair(url)
        runner = Runner(f"sqlite:///{tmp_path / 'h.db'}", catalog=Catalog.simulated(),
                        breakers=breakers, limiter=limiter)
        try:
            transport = httpx.ASGITransport(app=create_app(runner))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                body = (await client.get("/health")).json()
            assert body["shared_state"] == expected
        finally:
            await runner.close()
            await breakers.aclose()
            await limiter.aclose()


def test_catalog_command_shows_shared_state() -> None:
    from typer.testing import CliRunner

    from frugalflow.cli import app

    out = CliRunner().invoke(app, ["catalog", "--redis", f"redis://127.0.0.1:{closed_port()}/0"])
    assert out.exit_code == 0, out.output
    assert "shared state: unavailable" in out.output
    out = CliRunner().invoke(app, ["catalog", "--redis", f"redis://{REDIS[0]}:{REDIS[1]}/0",
                                   "--json"])
    assert out.exit_code == 0, out.output
    assert {row["shared_state"] for row in json.loads(out.output)} == {"ok"}
    out = CliRunner().invoke(app, ["catalog"], env={"FRUGALFLOW_REDIS_URL": ""})
    assert "shared state: local" in out.output
    out = CliRunner().invoke(app, ["catalog", "--redis", "127.0.0.1:6379"])
    assert out.exit_code == 1 and "is not a Redis URL; use redis://" in out.output


def test_a_bad_redis_url_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="not a Redis URL"):
        RedisBreakerRegistry("localhost:6379")
    with pytest.raises(ValueError, match="not a Redis URL") as raised:
        RedisRateLimiter("http://user:secret@cache:6379")
    assert "secret" not in str(raised.value)  # the password never reaches an error or log


async def test_a_provider_disabled_for_the_fleet_gets_a_new_chance() -> None:
    """A 401 disables its provider for every worker, but Redis outlives the processes: the
    disabled state expires (`disabled_for`), so a fixed or rotated key is tried again."""
    import redis.asyncio as aioredis

    from frugalflow import Catalog
    from frugalflow.exceptions import AuthenticationError

    prefix = f"frugalflow:test-shared:{uuid.uuid4().hex}:"
    a = RedisBreakerRegistry(REDIS_URL, prefix=prefix, disabled_for=30)
    b = RedisBreakerRegistry(REDIS_URL, prefix=prefix, disabled_for=30)
    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"]
    other = Catalog.simulated()["sim-openai/gpt-4.1"]
    direct = aioredis.from_url(REDIS_URL)
    try:
        await a.arecord(spec, AuthenticationError("bad key", status_code=401))
        assert not await b.aacquire(other)  # the whole fleet stops calling it
        assert "disabled (shared)" in (await b.ablocked_reason(other) or "")
        ttl = await direct.pttl(prefix + spec.provider)
        assert 0 < ttl <= 30_000  # ...for a while, not forever
    finally:
        await direct.aclose()
        await a.aclose()
        await b.aclose()
