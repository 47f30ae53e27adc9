"""Failures classified and translated, the retry policy, the one health rule, and the
circuit breakers in process and in Redis."""

from __future__ import annotations

import pickle

import pytest

from frugalflow import (
    AllModelsFailedError,
    Attempt,
    AuthenticationError,
    Catalog,
    ContentFilterError,
    ContextLengthError,
    InvalidRequestError,
    IncompleteResponseError,
    MalformedResponseError,
    ModelAPIError,
    ModelTimeoutError,
    ProviderConnectionError,
    ProviderOverloadedError,
    RateLimitError,
)
from frugalflow.exceptions import ValidationFailedError
from frugalflow.providers.base import error_from_status
from frugalflow.resilience import (
    Action,
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    FallbackPolicy,
    Mark,
    parse_retry_after,
    verdict,
)


@pytest.mark.parametrize(
    ("status", "body", "cls"),
    [
        (429, "", RateLimitError),
        (401, "", AuthenticationError),
        (403, "", AuthenticationError),
        (408, "", ModelTimeoutError),
        (400, '{"error": {"code": "context_length_exceeded"}}', ContextLengthError),
        (400, "prompt is too long: 250000 tokens", ContextLengthError),
        (413, "", ContextLengthError),
        (400, '{"error": {"code": "content_filter"}}', ContentFilterError),
        (400, "bad parameter temperature", InvalidRequestError),
        (422, "", InvalidRequestError),
        (500, "", ProviderOverloadedError),
        (503, "", ProviderOverloadedError),
        (529, "overloaded_error", ProviderOverloadedError),
        (404, "model not found", ModelAPIError),
    ],
)
def test_status_classification(status: int, body: str, cls: type) -> None:
    err = error_from_status(status, f"HTTP {status}", body=body, provider="p", model="m")
    assert type(err) is cls
    assert err.status_code == status


def test_one_translator_reads_sdk_errors_through_wrappers() -> None:
    import httpx
    import openai

    from frugalflow.providers import adapter_for
    from frugalflow.providers.base import translate_error

    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"].model_copy(
        update={"provider": "openai", "simulated": False})
    adapter = adapter_for(spec)
    request = httpx.Request("POST", "http://127.0.0.1/v1/chat/completions")
    answer = httpx.Response(429, headers={"retry-after": "2"}, request=request)
    sdk_error = openai.RateLimitError("slow down", response=answer, body=None)
    try:
        try:
            raise sdk_error
        except openai.RateLimitError as inner:
            raise RuntimeError("an integration's own wrapper") from inner
    except RuntimeError as wrapper:
        err = adapter.translate(wrapper, spec)
    assert type(err) is RateLimitError and err.retry_after == 2.0 and err.status_code == 429
    assert err.provider == "openai" and err.message.startswith("openai/gpt-4o-mini: HTTP 429")
    # What every SDK shares: transport errors, httpx status errors, already-translated ones.
    assert type(translate_error(TimeoutError(), spec)) is ModelTimeoutError
    assert type(translate_error(ConnectionResetError(), spec)) is ProviderConnectionError
    status = httpx.HTTPStatusError("503", request=request,
                                   response=httpx.Response(503, request=request))
    assert type(translate_error(status, spec)) is ProviderOverloadedError
    mine = ContextLengthError("too long")
    assert translate_error(mine, spec) is mine
    unknown = translate_error(ValueError("odd"), spec)
    assert type(unknown) is ModelAPIError and "ValueError: odd" in str(unknown)


def test_retry_after_parsing() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(None) is None
    assert parse_retry_after("garbage") is None
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0  # in the past
    err = error_from_status(429, "slow down", retry_after="2")
    assert err.retry_after == 2.0


def test_policy_decisions() -> None:
    p = FallbackPolicy(max_retries=1, retry_after_cap=5)
    assert p.decide(InvalidRequestError("x"), 0)[0] is Action.RAISE
    assert p.decide(RateLimitError("x", retry_after=2.0), 0) == (Action.RETRY, 2.0)
    assert p.decide(RateLimitError("x", retry_after=60.0), 0)[0] is Action.NEXT
    assert p.decide(RateLimitError("x"), 0)[0] is Action.NEXT
    action, delay = p.decide(ProviderOverloadedError("x"), 0)
    assert action is Action.RETRY and 0.125 <= delay <= 0.25  # jittered 50-100% of base
    assert p.decide(ProviderOverloadedError("x"), 1)[0] is Action.NEXT
    for err in (AuthenticationError("x"), ContextLengthError("x"), ContentFilterError("x")):
        assert p.decide(err, 0)[0] is Action.NEXT


def test_breaker_state_machine(clock) -> None:  # type: ignore[no-untyped-def]
    b = CircuitBreaker("p", threshold=3, cooldown=10, clock=clock)
    assert b.allow()
    b.record_failure("overloaded")
    b.record_failure("overloaded")
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record_failure("overloaded")
    assert b.state is BreakerState.OPEN
    assert not b.allow()
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.2
    assert b.allow()  # the one half-open probe
    assert b.state is BreakerState.HALF_OPEN
    assert not b.allow()  # no second probe while the first is in flight
    b.record_failure("timeout")
    assert b.state is BreakerState.OPEN  # probe failed: open again, new cooldown
    assert not b.allow()
    clock.now += 10.1
    assert b.allow()
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.failures == 0 and b.allow()


def test_breaker_success_resets_the_count(clock) -> None:  # type: ignore[no-untyped-def]
    b = CircuitBreaker("p", threshold=2, cooldown=10, clock=clock)
    b.record_failure()
    b.record_success()
    b.record_failure()
    assert b.state is BreakerState.CLOSED


def test_cancelled_probe_frees_the_slot(clock) -> None:  # type: ignore[no-untyped-def]
    b = CircuitBreaker("p", threshold=1, cooldown=1, clock=clock)
    b.record_failure()
    clock.now += 2
    assert b.allow()
    b.release()
    assert b.allow()


async def test_registry_disables_a_provider_on_auth_failure(clock) -> None:  # type: ignore[no-untyped-def]
    reg = BreakerRegistry(threshold=2, cooldown=5, clock=clock)
    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"]
    other = Catalog.simulated()["sim-openai/gpt-4.1"]
    await reg.arecord(spec, AuthenticationError("bad key", status_code=401))
    assert await reg.astate("sim-openai") is BreakerState.DISABLED
    assert not await reg.aacquire(other)
    assert "disabled" in (await reg.ablocked_reason(other) or "")
    clock.now += 10_000
    assert not await reg.aacquire(other)  # disabled for the process, not a cooldown


async def test_registry_counts_only_health_errors(clock) -> None:  # type: ignore[no-untyped-def]
    reg = BreakerRegistry(threshold=1, cooldown=5, clock=clock)
    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"]
    await reg.arecord(spec, ContextLengthError("too long"))
    await reg.arecord(spec, InvalidRequestError("bad"))
    assert await reg.aacquire(spec)
    await reg.arecord(spec, ProviderOverloadedError("503"))
    assert await reg.astate("sim-openai") is BreakerState.OPEN
    assert await reg.astate("sim-openai/gpt-4o-mini") is BreakerState.OPEN


# Every outcome, and what the one health rule makes of it: (provider, model) breaker.
_VERDICTS = [
    (None, Mark.UP, Mark.UP),
    (ContextLengthError("too long"), Mark.UP, Mark.UP),
    (ContentFilterError("flagged"), Mark.UP, Mark.UP),
    (InvalidRequestError("bad"), Mark.UP, Mark.UP),
    (ValidationFailedError("rejected"), Mark.UP, Mark.UP),
    (MalformedResponseError("not JSON"), Mark.UP, Mark.DOWN),
    (AuthenticationError("bad key", status_code=401), Mark.OFF, Mark.NONE),
    (RateLimitError("slow down"), Mark.DOWN, Mark.DOWN),
    (ProviderOverloadedError("503"), Mark.DOWN, Mark.DOWN),
    (ModelTimeoutError("slow"), Mark.DOWN, Mark.DOWN),
    (ProviderConnectionError("reset"), Mark.DOWN, Mark.DOWN),
    (IncompleteResponseError("cut"), Mark.DOWN, Mark.DOWN),
    (ModelAPIError("who knows"), Mark.DOWN, Mark.DOWN),
]


@pytest.mark.parametrize(("error", "provider", "model"), _VERDICTS,
                         ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None)
def test_one_health_rule(error: ModelAPIError | None, provider: Mark, model: Mark) -> None:
    v = verdict(error, max_rest=600)
    assert (v.provider, v.model) == (provider, model)


def test_a_retry_after_rests_the_model_capped() -> None:
    assert verdict(RateLimitError("x", retry_after=30.0), max_rest=600).rest == 30.0
    assert verdict(RateLimitError("x", retry_after=10**6), max_rest=600).rest == 600
    assert verdict(RateLimitError("x"), max_rest=600).rest is None
    assert verdict(ProviderOverloadedError("x", retry_after=30.0), max_rest=600).rest is None


@pytest.mark.parametrize(("error", "provider", "model"), _VERDICTS,
                         ids=lambda v: type(v).__name__ if isinstance(v, Exception) else None)
async def test_the_registries_apply_the_same_rule(
        redis_url: str, error: ModelAPIError | None, provider: Mark, model: Mark) -> None:
    """In process and in Redis, one outcome leaves the same breaker states."""
    import uuid

    from frugalflow.scale.redis import RedisBreakerRegistry

    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"]
    local = BreakerRegistry(threshold=1)
    fleet = RedisBreakerRegistry(redis_url, threshold=1,
                                 prefix=f"frugalflow:test:{uuid.uuid4().hex}:")
    try:
        states = []
        for reg in (local, fleet):
            await reg.arecord(spec, error)
            states.append((await reg.astate(spec.provider), await reg.astate(spec.key)))
        assert states[0] == states[1]
        assert fleet.shared_state() == "ok"  # it was Redis that answered
    finally:
        await fleet.areset()
        await fleet.aclose()


def test_a_redis_registry_has_no_silent_local_reads() -> None:
    """Every public method of either registry is async (or says which state it reads)."""
    import inspect

    from frugalflow.resilience import Breakers
    from frugalflow.scale.redis import RedisBreakerRegistry

    assert not issubclass(RedisBreakerRegistry, BreakerRegistry)
    for cls in (BreakerRegistry, RedisBreakerRegistry):
        public = {n for n, f in inspect.getmembers(cls, inspect.isfunction)
                  if not n.startswith("_")}
        sync = {n for n in public if not inspect.iscoroutinefunction(getattr(cls, n))}
        assert sync == {"shared_state"}, (cls, sync)
        assert {n for n in dir(Breakers) if n.startswith("a") or n == "shared_state"} <= public


def test_exceptions_pickle() -> None:
    err = RateLimitError("slow", provider="p", model="m", status_code=429, retry_after=1.5)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is RateLimitError and back.retry_after == 1.5 and str(back) == "slow"
    group = AllModelsFailedError(
        "all failed", [err, ProviderOverloadedError("down")], node="n",
        attempts=[Attempt(node="n", model="p/m", provider="p", outcome="error",
                          error_class="rate_limit", error="slow")],
    )
    back_group = pickle.loads(pickle.dumps(group))
    assert isinstance(back_group, ExceptionGroup)
    assert back_group.node == "n" and len(back_group.exceptions) == 2
    assert back_group.attempts[0].model == "p/m"
    assert "p/m (p): rate_limit: slow" in str(back_group)


async def test_redis_breakers_are_shared_between_workers(clock, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    import uuid

    from frugalflow import ProviderOverloadedError as Overloaded
    from frugalflow.scale.redis import RedisBreakerRegistry

    prefix = f"frugalflow:test:{uuid.uuid4().hex}:"
    # A generous Redis timeout: under a loaded test machine the default 0.5 s can pass, and
    # then a registry rightly falls back to its local state, which is not what this tests.
    a = RedisBreakerRegistry(redis_url, threshold=2, cooldown=10, prefix=prefix, clock=clock,
                             timeout=5.0)
    b = RedisBreakerRegistry(redis_url, threshold=2, cooldown=10, prefix=prefix, clock=clock,
                             timeout=5.0)
    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"]
    try:
        assert await b.aacquire(spec)
        await a.arecord(spec, Overloaded("503"))
        await a.arecord(spec, Overloaded("503"))  # worker a opens the breaker...
        assert await b.astate("sim-openai") is BreakerState.OPEN
        assert not await b.aacquire(spec)  # ...and worker b no longer calls the provider
        assert "open" in (await b.ablocked_reason(spec) or "")
        clock.now += 11
        assert await b.aacquire(spec)  # one half-open probe for the whole fleet
        assert not await a.aacquire(spec)
        await b.arecord(spec, None)  # the probe succeeded
        assert await a.astate("sim-openai") is BreakerState.CLOSED
        assert await a.aacquire(spec)
        await a.arecord(spec, AuthenticationError("401", status_code=401))
        assert await b.astate("sim-openai") is BreakerState.DISABLED
    finally:
        await a.areset()
        await a.aclose()
        await b.aclose()


async def test_rate_limits_are_shared_by_the_fleet(clock, redis_url: str) -> None:  # type: ignore[no-untyped-def]
    import uuid

    from frugalflow.scale.redis import RedisRateLimiter

    prefix = f"frugalflow:test-rate:{uuid.uuid4().hex}:"
    wall = lambda: 600.0 + clock.now  # noqa: E731 - a minute window we control
    a = RedisRateLimiter(redis_url, prefix=prefix, clock=wall)
    b = RedisRateLimiter(redis_url, prefix=prefix, clock=wall)
    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"].model_copy(update={"rpm": 3, "tpm": 1000})
    try:
        assert await a.aacquire(spec, 100) and await a.aacquire(spec, 100)
        assert await b.aacquire(spec, 100)
        assert not await b.aacquire(spec, 100)  # 3 requests this minute, fleet-wide
        assert not await a.aacquire(spec, 100)
        clock.now += 60  # the next minute
        assert not await a.aacquire(spec, 1001)  # over the token budget
        assert await a.aacquire(spec, 900)
    finally:
        await a.aclose()
        await b.aclose()
