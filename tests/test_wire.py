"""Fallback over the wire: the real LangChain integrations talking HTTP to the provider
emulator on 127.0.0.1, one test per fault class, on the 4-node support-triage flow."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from frugalflow import (
    InvalidRequestError,
    Needs,
    RoutedChatModel,
    RunContext,
)
from frugalflow.cli import load_flow
from frugalflow.resilience import BreakerRegistry, BreakerState, FallbackPolicy
from conftest import FakeClock

from frugalflow.testing.emulator import EMULATOR_KEY_ENV, ProviderEmulator, emulated_catalog
from provider_clients import forget_provider_clients

ROUTE = {"openai": "openai", "groq": "openai", "deepseek": "openai", "anthropic": "anthropic",
         "google": "gemini", "ollama": "ollama"}
TICKET = {"ticket": "Hi, Dana here. I was charged twice for order 88231, please refund."}


@pytest.fixture(autouse=True)
async def _key(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    monkeypatch.setenv(EMULATOR_KEY_ENV, "emulator-test-key")
    yield
    while CATALOGS:
        await CATALOGS.pop().aclose()
    forget_provider_clients()


CATALOGS: list[Any] = []


def tracked(catalog: Any) -> Any:
    CATALOGS.append(catalog)
    return catalog


@contextlib.asynccontextmanager
async def triage(policy: FallbackPolicy | None = None) -> AsyncIterator[Any]:
    async with ProviderEmulator(seed=3) as emu:
        clock = FakeClock()
        catalog = tracked(emulated_catalog(emu))
        app = load_flow("flows/support_triage.py").compile(
            catalog, breakers=BreakerRegistry(threshold=3, cooldown=30, clock=clock),
            policy=policy or FallbackPolicy(timeout=1.0, backoff_base=0.01, backoff_max=0.02,
                                            retry_after_cap=5.0),
        )

        async def run() -> RunContext:
            ctx = app.new_context()
            ctx.sleep = clock.sleep
            await app.ainvoke(TICKET, context=ctx)
            return ctx

        yield emu, app, run, clock


def first_choice(app: Any, node: str) -> tuple[str, str, str]:
    """(catalog key, emulator route, model name) of the node's cheapest candidate."""
    # Priced at about the flow's prompt size: expected costs now differ per model in their
    # output (a reasoning model's thinking tokens), so the order can depend on the input.
    key = app.explain(100)[node][0]["model"]
    provider, model = key.split("/", 1)
    return key, ROUTE[provider], model


def tries(ctx: RunContext, node: str) -> list[tuple[str, str | None, str | None]]:
    return [(a.model, a.error_class, a.action) for a in ctx.usage.attempts if a.node == node]


async def test_clean_run_spans_providers() -> None:
    async with triage() as (emu, app, run, _):
        ctx = await run()
        assert [a.outcome for a in ctx.usage.attempts] == ["ok"] * 4
        assert len({a.provider for a in ctx.usage.attempts}) >= 3
        assert all(a.usage and a.usage.output_tokens > 0 for a in ctx.usage.attempts)
        assert len(emu.requests) == 4
        assert all(r.auth for r in emu.requests if r.provider != "ollama")


async def test_rate_limit_retry_after_is_honoured() -> None:
    async with triage() as (emu, app, run, clock):
        key, route, model = first_choice(app, "extract")
        emu.fault(route, "rate_limit", model=model, calls=[1], retry_after=2)
        ctx = await run()
        assert tries(ctx, "extract") == [(key, "rate_limit", "retry"), (key, None, None)]
        assert clock.sleeps == [2.0]


async def test_rate_limit_beyond_the_cap_moves_on_at_once() -> None:
    async with triage() as (emu, app, run, clock):
        key, route, model = first_choice(app, "extract")
        emu.fault(route, "rate_limit", model=model, times=None, retry_after=120)
        ctx = await run()
        (_, cls, action), ok = tries(ctx, "extract")
        assert (cls, action) == ("rate_limit", "next") and ok[0] != key
        assert clock.sleeps == []


@pytest.mark.parametrize("kind", ["server_error", "unavailable", "overloaded"])
async def test_5xx_retries_then_falls_back(kind: str) -> None:
    async with triage() as (emu, app, run, _):
        key, route, model = first_choice(app, "review")
        emu.fault(route, kind, model=model, times=None)
        ctx = await run()
        t = tries(ctx, "review")
        assert t[:2] == [(key, "overloaded", "retry"), (key, "overloaded", "next")]
        assert t[2][1] is None and t[2][0] != key


async def test_401_disables_the_provider_for_the_process() -> None:
    async with triage() as (emu, app, run, _):
        key, route, model = first_choice(app, "review")
        provider = key.split("/")[0]
        emu.fault(route, "auth", model=model, times=None)  # (other nodes may use the route)
        ctx = await run()
        assert tries(ctx, "review")[0][1] == "auth"
        assert await app.breakers.astate(provider) is BreakerState.DISABLED

        def to_provider() -> int:  # the route may serve other providers' models too
            return sum(f"{provider}/{r.model}" in app.catalog for r in emu.requests_for(route))

        before = to_provider()
        ctx = await run()  # the next run never calls that provider
        assert to_provider() == before
        assert all(a.provider != provider for a in ctx.usage.attempts)


async def test_context_length_moves_to_a_larger_window() -> None:
    async with triage() as (emu, app, run, _):
        key, route, model = first_choice(app, "extract")
        window = app.catalog[key].window
        emu.fault(route, "context_length", model=model)
        ctx = await run()
        (failed, cls, _), (winner, ok, _) = tries(ctx, "extract")
        assert (failed, cls, ok) == (key, "context_length", None)
        assert app.catalog[winner].window > window


async def test_invalid_request_raises_without_fallback() -> None:
    async with triage() as (emu, app, run, _):
        key, route, model = first_choice(app, "classify")
        emu.fault(route, "invalid_request", model=model)
        with pytest.raises(InvalidRequestError):
            await run()
        assert len(emu.requests) == 1  # nobody else was asked


@pytest.mark.parametrize("route_kind", [("openai", "content_filter"),
                                        ("anthropic", "content_filter"),
                                        ("gemini", "content_filter")])
async def test_content_filter_tries_another_provider(route_kind: tuple[str, str]) -> None:
    route, kind = route_kind
    policy = FallbackPolicy(timeout=1.0)
    async with ProviderEmulator(seed=1) as emu:
        cat = tracked(emulated_catalog(emu))
        price = lambda spec: spec.estimate_cost(100, 100)  # noqa: E731
        mine = min((x for x in cat if ROUTE[x.provider] == route), key=price)
        other = max((x for x in cat if ROUTE[x.provider] != route), key=price)
        ctx = RunContext(catalog=cat, policy=policy, breakers=BreakerRegistry())
        model = RoutedChatModel(needs=Needs(models=(mine.key, other.key)), node="n", context=ctx)
        emu.fault(route, kind, times=None)
        await model.ainvoke([HumanMessage("hello")])
        first, last = ctx.usage.attempts
        assert (first.model, first.error_class, first.action) == (mine.key, "content_filter", "next")
        assert (last.model, last.outcome) == (other.key, "ok")


@pytest.mark.parametrize("kind", ["connection", "timeout", "malformed"])
async def test_transport_faults_fall_back(kind: str) -> None:
    policy = FallbackPolicy(timeout=0.5, max_retries=0)
    async with triage(policy) as (emu, app, run, _):
        key, route, model = first_choice(app, "draft")
        emu.fault(route, kind, model=model, times=None, hang_seconds=3)
        ctx = await run()
        (failed, cls, action), (winner, ok, _) = tries(ctx, "draft")
        assert failed == key and action == "next" and ok is None and winner != key
        assert cls == {"connection": "connection", "timeout": "timeout",
                       "malformed": "malformed"}[kind]


async def test_stream_cut_restarts_coherently_in_langgraph_messages_mode() -> None:
    async with triage() as (emu, app, _, _):
        key, route, model = first_choice(app, "draft")
        emu.fault(route, "stream_cut", model=model, after_chunks=2, times=None)
        by_id: dict[str, str] = {}
        final: dict[str, Any] = {}
        async for mode, chunk in app.astream(TICKET, stream_mode=["messages", "values"]):
            if mode == "messages":
                msg, meta = chunk
                if meta["langgraph_node"] == "draft":
                    by_id[msg.id] = by_id.get(msg.id, "") + str(msg.content)
            else:
                final = chunk
        *broken, whole = by_id.values()
        assert broken and final["draft"] == whole  # one coherent answer in the state
        assert all(b not in final["draft"] for b in broken if b)


async def test_breaker_opens_skips_and_half_open_probe_closes() -> None:
    policy = FallbackPolicy(timeout=1.0, max_retries=0)
    async with triage(policy) as (emu, app, run, clock):
        key, route, model = first_choice(app, "classify")
        provider = key.split("/")[0]
        fault = emu.fault(route, "unavailable", times=None)
        for _ in range(3):
            await run()
        assert await app.breakers.astate(provider) is BreakerState.OPEN
        before = len(emu.requests_for(route))
        await run()
        assert len(emu.requests_for(route)) == before  # skipped while open
        emu.clear_faults(fault)  # the provider recovers
        clock.now += 31
        ctx = await run()
        assert ctx.usage.attempts[0].model == key and ctx.usage.attempts[0].outcome == "ok"
        assert await app.breakers.astate(provider) is BreakerState.CLOSED


# -- the seeds' providers, each shown working ----------------------------------------------


class Refund(BaseModel):
    order_id: str
    amount: float


@tool
def lookup_order(order_id: str) -> str:
    """Look up an order's status."""
    return f"order {order_id}: shipped"


@pytest.mark.parametrize("provider", ["openai", "anthropic", "google", "deepseek", "groq", "ollama"])
async def test_each_provider_tools_structured_streaming_usage_cost(provider: str) -> None:
    async with ProviderEmulator(seed=2) as emu:
        cat = tracked(emulated_catalog(emu))
        ctx = RunContext(catalog=cat, policy=FallbackPolicy(timeout=2.0), breakers=BreakerRegistry())
        model = RoutedChatModel(needs=Needs(providers=(provider,)), node="n", context=ctx)
        call = await model.bind_tools([lookup_order]).ainvoke([HumanMessage("status of order 7?")])
        assert call.tool_calls and call.tool_calls[0]["name"] == "lookup_order"
        refund = await model.with_structured_output(Refund).ainvoke([HumanMessage("refund 7")])
        assert isinstance(refund, Refund)
        chunks = [c async for c in model.astream([HumanMessage("hello")])]
        assert len(chunks) > 1 and "".join(str(c.content) for c in chunks)
        assert all(a.provider == provider and a.outcome == "ok" for a in ctx.usage.attempts)
        assert all(a.usage and a.usage.input_tokens > 0 and a.usage.output_tokens > 0
                   for a in ctx.usage.attempts)
        spec = cat[ctx.usage.attempts[0].model]
        for a in ctx.usage.attempts:
            assert a.cost_usd == pytest.approx(spec.cost(a.usage))
        assert (ctx.usage.spent_usd > 0) == (provider != "ollama")
