"""Provider answers that look fine but are not, over the wire on every format: streams and
bodies that end cleanly without their end marker, refusals and blocked prompts on every
path, answers without usage; the adapter chosen by the wire format; custom endpoints that
must name their URL; and a ledger that says what happened.

Real SDK clients (through their LangChain integrations) talk HTTP to the provider emulator
on 127.0.0.1; every fault is what a real server or proxy sends."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any, TypedDict

import pytest
from langchain_core.messages import AIMessageChunk, HumanMessage

from frugalflow import (
    END,
    START,
    AllModelsFailedError,
    BreakerRegistry,
    Catalog,
    CatalogError,
    ContentFilterError,
    FallbackPolicy,
    Flow,
    IncompleteResponseError,
    ModelSpec,
    Needs,
    RoutedChatModel,
    RunContext,
)
from frugalflow.testing.emulator import (
    EMULATOR_KEY_ENV,
    PROVIDERS,
    ProviderEmulator,
    emulated_catalog,
    fault_supported,
)
from frugalflow.providers import adapter_for

FORMATS = list(PROVIDERS)  # openai, anthropic, gemini, ollama
ROUTE = {"openai": "openai", "groq": "openai", "deepseek": "openai", "anthropic": "anthropic",
         "google": "gemini", "ollama": "ollama"}
PROVIDER_OF = {"openai": "openai", "anthropic": "anthropic", "gemini": "google",
               "ollama": "ollama"}
INTEGRATION = {"openai": "langchain_openai:ChatOpenAI",
               "anthropic": "langchain_anthropic:ChatAnthropic",
               "gemini": "langchain_google_genai:ChatGoogleGenerativeAI",
               "ollama": "langchain_ollama:ChatOllama"}
CUTS = ["stream_truncated", "stream_eof"]
PROMPT = "Summarise the refund policy for order 88231, please."

# The emulator key and the clean-up of catalogs and cached SDK clients after each test, as
# in test_wire (the autouse fixture applies to this module once imported).
from test_wire import CATALOGS, _key  # noqa: E402,F401


@pytest.fixture
async def emu() -> AsyncIterator[ProviderEmulator]:
    async with ProviderEmulator(seed=5) as server:
        yield server


def tracked(catalog: Catalog) -> Catalog:
    CATALOGS.append(catalog)
    return catalog


def pair(emu: ProviderEmulator, route: str, catalog: Catalog | None = None
         ) -> tuple[Catalog, ModelSpec, ModelSpec]:
    """(catalog, the cheapest model on `route`, the dearest model on another route)."""
    cat = catalog or tracked(emulated_catalog(emu))
    price = lambda spec: spec.estimate_cost(100, 100)  # noqa: E731
    mine = min((s for s in cat if ROUTE.get(s.provider, s.provider) == route
                or s.provider.startswith("myproxy")), key=price)
    other = max((s for s in cat if ROUTE.get(s.provider) not in (route, None)), key=price)
    return cat, mine, other


def routed(cat: Catalog, mine: ModelSpec, other: ModelSpec, *,
           policy: FallbackPolicy | None = None,
           breakers: BreakerRegistry | None = None) -> tuple[RoutedChatModel, RunContext]:
    ctx = RunContext(catalog=cat, policy=policy or FallbackPolicy(timeout=3.0, max_retries=0),
                     breakers=breakers or BreakerRegistry())
    return RoutedChatModel(needs=Needs(models=(mine.key, other.key)), node="n",
                           context=ctx), ctx


class QA(TypedDict, total=False):
    q: str
    a: str


def qa_app(cat: Catalog, mine: ModelSpec, other: ModelSpec,
           policy: FallbackPolicy | None = None) -> Any:
    """A one-node flow whose node calls `await model.ainvoke(...)`."""
    flow: Flow[QA] = Flow("qa", QA)

    async def answer(state: QA, model: RoutedChatModel) -> dict[str, str]:
        reply = await model.ainvoke([HumanMessage(state["q"])])
        return {"a": str(reply.content)}

    flow.add_node("answer", answer, needs=Needs(models=(mine.key, other.key)))
    flow.add_edge(START, "answer")
    flow.add_edge("answer", END)
    return flow.compile(cat, policy=policy or FallbackPolicy(timeout=3.0, max_retries=0),
                        breakers=BreakerRegistry())


def tried(ctx: RunContext) -> list[tuple[str, str, str | None, str | None]]:
    return [(a.model, a.outcome, a.error_class, a.action) for a in ctx.usage.attempts]


# -- the emulator's clean cuts: no client raises anything ----------------------------------


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_clean_cut_raises_nothing_in_the_client_but_the_adapter_sees_it(
    emu: ProviderEmulator, fmt: str, cut: str
) -> None:
    model = emu.chat_model(fmt, timeout=3.0)
    spec = ModelSpec(provider=PROVIDER_OF[fmt], model="m")
    try:
        whole = [c async for c in model.astream(PROMPT)]
        emu.fault(fmt, cut, after_chunks=4)
        chunks = [c async for c in model.astream(PROMPT)]  # no exception: a clean end
        again = [c async for c in model.astream(PROMPT)]  # the client is still usable
    finally:
        await adapter_for(spec).aclose(model)

    def merged(parts: list[AIMessageChunk]) -> Any:
        total = parts[0]
        for p in parts[1:]:
            total = total + p
        return total

    assert len(chunks) < len(whole)
    cut_short, complete = merged(chunks), merged(whole)
    assert complete.text.startswith(cut_short.text) and cut_short.text != complete.text
    adapter_for(spec).check(complete, spec)  # a whole answer passes
    adapter_for(spec).check(merged(again), spec)
    with pytest.raises(IncompleteResponseError):
        adapter_for(spec).check(cut_short, spec)
    assert [(r.fault, r.status) for r in emu.requests] == [(None, 200), (cut, 200), (None, 200)]


# -- every API moves on (or, once chunks reached the caller, raises) ------------------------


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("fmt", FORMATS)
async def test_flow_in_messages_mode_moves_to_the_next_candidate(
    emu: ProviderEmulator, fmt: str, cut: str
) -> None:
    cat, mine, other = pair(emu, fmt)
    app = qa_app(cat, mine, other)
    emu.fault(fmt, cut, after_chunks=4, times=None)
    ctx = app.new_context()
    by_id: dict[str, str] = {}
    final: dict[str, Any] = {}
    async for mode, item in app.astream({"q": PROMPT}, stream_mode=["messages", "values"],
                                        context=ctx):
        if mode == "messages":
            msg, _ = item
            by_id[msg.id] = by_id.get(msg.id, "") + str(msg.content)
        else:
            final = item
    assert tried(ctx) == [(mine.key, "error", "incomplete", "next"),
                          (other.key, "ok", None, None)]
    broken, whole = list(by_id.values())
    assert final["a"] == whole and broken and broken not in final["a"]
    cut_attempt = ctx.usage.attempts[0]
    # Paid for, so priced: what arrived, estimated where the provider did not count it.
    assert cut_attempt.usage is not None and cut_attempt.usage.output_tokens > 0
    assert cut_attempt.usage_estimated
    assert cut_attempt.cost_usd == pytest.approx(mine.cost(cut_attempt.usage))
    assert (cut_attempt.cost_usd > 0) == (fmt != "ollama")  # Ollama is free


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("fmt", FORMATS)
async def test_routed_astream_raises_once_chunks_reached_the_caller(
    emu: ProviderEmulator, fmt: str, cut: str
) -> None:
    cat, mine, other = pair(emu, fmt)
    model, ctx = routed(cat, mine, other)
    emu.fault(fmt, cut, after_chunks=4, times=None)
    received: list[Any] = []
    with pytest.raises(IncompleteResponseError):
        async for chunk in model.astream([HumanMessage(PROMPT)]):
            received.append(chunk)
    assert received  # the README's rule for a broken stream: never glue a second answer on
    assert tried(ctx) == [(mine.key, "error", "incomplete", "raise")]


@pytest.mark.parametrize("fmt", FORMATS)
async def test_astream_events_moves_on_inside_a_flow_and_raises_on_the_model(
    emu: ProviderEmulator, fmt: str
) -> None:
    cat, mine, other = pair(emu, fmt)
    app = qa_app(cat, mine, other)
    emu.fault(fmt, "stream_truncated", after_chunks=4, times=None)
    ctx = app.new_context()
    streamed: dict[str, str] = {}
    output: Any = None
    async for event in app.graph.astream_events({"q": PROMPT}, context=ctx, version="v2"):
        if event["event"] == "on_chat_model_stream":
            chunk = event["data"]["chunk"]
            streamed[chunk.id] = streamed.get(chunk.id, "") + str(chunk.content)
        if event["event"] == "on_chain_end" and event["name"] == "qa":
            output = event["data"]["output"]
    assert tried(ctx) == [(mine.key, "error", "incomplete", "next"),
                          (other.key, "ok", None, None)]
    assert output["a"] == list(streamed.values())[-1]

    model, direct = routed(cat, mine, other)
    with pytest.raises(IncompleteResponseError):
        async for _ in model.astream_events([HumanMessage(PROMPT)], version="v2"):
            pass
    assert tried(direct)[-1][2] == "incomplete"


@pytest.mark.parametrize("fmt", FORMATS)
async def test_plain_answer_without_its_end_marker_moves_on(
    emu: ProviderEmulator, fmt: str
) -> None:
    cat, mine, other = pair(emu, fmt)
    model, ctx = routed(cat, mine, other)
    emu.fault(fmt, "stream_truncated", after_chunks=4)  # plain: finish_reason null, ...
    answer = await model.ainvoke([HumanMessage(PROMPT)])
    assert answer.text and model.last_model == other.key
    assert tried(ctx) == [(mine.key, "error", "incomplete", "next"),
                          (other.key, "ok", None, None)]


async def test_an_incomplete_answer_is_retried_like_a_broken_connection(
    emu: ProviderEmulator,
) -> None:
    cat, mine, other = pair(emu, "openai")
    model, ctx = routed(cat, mine, other, policy=FallbackPolicy(
        timeout=3.0, max_retries=1, backoff_base=0.001, backoff_max=0.002))
    emu.fault("openai", "stream_truncated")
    await model.ainvoke([HumanMessage(PROMPT)])
    assert tried(ctx) == [(mine.key, "error", "incomplete", "retry"),
                          (mine.key, "ok", None, None)]


# -- refusals and blocks on every path ----------------------------------------------------

REFUSALS = [
    pytest.param("openai", "filtered", None, id="openai-content_filter"),
    pytest.param("anthropic", "filtered", None, id="anthropic-refusal"),
    *[pytest.param("gemini", "filtered", r, id=f"gemini-{r}")
      for r in ("SAFETY", "PROHIBITED_CONTENT", "BLOCKLIST", "RECITATION")],
    pytest.param("gemini", "prompt_blocked", "SAFETY", id="gemini-blocked-prompt"),
    pytest.param("gemini", "prompt_blocked", "PROHIBITED_CONTENT", id="gemini-blocked-prompt2"),
]


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize(("fmt", "kind", "reason"), REFUSALS)
async def test_refusals_and_blocks_try_another_provider(
    emu: ProviderEmulator, fmt: str, kind: str, reason: str | None, streamed: bool
) -> None:
    cat, mine, other = pair(emu, fmt)
    emu.fault(fmt, kind, reason=reason, times=None)
    if streamed:
        app = qa_app(cat, mine, other)
        ctx = app.new_context()
        async for _ in app.astream({"q": PROMPT}, stream_mode="messages", context=ctx):
            pass
    else:
        model, ctx = routed(cat, mine, other)
        await model.ainvoke([HumanMessage(PROMPT)])
    assert tried(ctx) == [(mine.key, "error", "content_filter", "next"),
                          (other.key, "ok", None, None)]
    assert [r.stream for r in emu.requests_for(fmt)] == [streamed or fmt == "ollama"]


async def test_routed_astream_of_a_filtered_answer_raises_content_filter(
    emu: ProviderEmulator,
) -> None:
    cat, mine, other = pair(emu, "openai")
    model, ctx = routed(cat, mine, other)
    emu.fault("openai", "filtered")
    with pytest.raises(ContentFilterError):
        async for _ in model.astream([HumanMessage(PROMPT)]):
            pass


def test_unsupported_faults_say_why(emu: ProviderEmulator) -> None:
    for provider, kind in (("ollama", "filtered"), ("openai", "prompt_blocked"),
                           ("anthropic", "no_usage")):
        assert not fault_supported(provider, kind)
        with pytest.raises(ValueError, match=f"no fault {kind!r} for {provider}"):
            emu.fault(provider, kind)


# -- answers without usage are priced by estimate ------------------------------------------


@pytest.mark.parametrize("streamed", [False, True], ids=["plain", "streamed"])
@pytest.mark.parametrize("fmt", ["openai", "gemini", "ollama"])
async def test_an_answer_without_usage_is_estimated_priced_and_flagged(
    emu: ProviderEmulator, fmt: str, streamed: bool
) -> None:
    cat, mine, other = pair(emu, fmt)
    model, ctx = routed(cat, mine, other)
    await model.ainvoke([HumanMessage(PROMPT)])  # reported usage: not estimated
    emu.fault(fmt, "no_usage")
    if streamed:
        text = "".join([str(c.content) async for c in model.astream([HumanMessage(PROMPT)])])
    else:
        text = str((await model.ainvoke([HumanMessage(PROMPT)])).content)
    reported, estimated = ctx.usage.attempts
    assert (reported.outcome, estimated.outcome, estimated.model) == ("ok", "ok", mine.key)
    assert not reported.usage_estimated and estimated.usage_estimated
    assert estimated.usage is not None and reported.usage is not None
    assert estimated.usage.output_tokens == pytest.approx(len(text) / 4, abs=3)
    assert estimated.usage.input_tokens > 0
    assert estimated.cost_usd == pytest.approx(mine.cost(estimated.usage))
    assert (estimated.cost_usd > 0) == (fmt != "ollama")  # never $0 for a paid model
    assert estimated.cost_usd == pytest.approx(reported.cost_usd, rel=0.5)


async def test_the_ledger_records_estimated_usage(emu: ProviderEmulator, db_url: str) -> None:
    from frugalflow.runner import Runner

    cat, mine, other = pair(emu, "openai")
    app = qa_app(cat, mine, other)
    runner = Runner(db_url, flows=[app.flow], catalog=cat, breakers=BreakerRegistry())
    try:
        emu.fault("openai", "no_usage")
        first = await runner.start("qa", {"q": PROMPT})
        second = await runner.start("qa", {"q": PROMPT + " again"})
        rows = [(await runner.get(r.run_id)).attempts for r in (first, second)]
    finally:
        await runner.close()
    [[estimated], [reported]] = rows
    assert (estimated.usage_estimated, reported.usage_estimated) == (True, False)
    assert estimated.cost_usd > 0 and estimated.output_tokens > 0


async def test_a_version_2_database_gets_the_usage_estimated_column_in_place(
    db_url: str,
) -> None:
    from sqlalchemy import inspect, text

    from frugalflow.persistence.store import SCHEMA_VERSION, Store

    store = Store(db_url)
    await store.setup()
    # A database written by release 2: no ff_attempts.usage_estimated, schema version 2.
    async with store.write() as conn:
        await conn.execute(text("ALTER TABLE ff_attempts DROP COLUMN usage_estimated"))
        await conn.execute(text("DELETE FROM ff_schema WHERE v > 2"))
        await conn.execute(text(
            "INSERT INTO ff_attempts (call_id, node, model, provider, try_number, outcome, "
            "input_tokens, output_tokens, cache_read_tokens, cost_usd, latency_ms, started_at)"
            " VALUES ('c1', 'n', 'openai/x', 'openai', 1, 'ok', 1, 2, 0, 0.5, 1.0, "
            "CURRENT_TIMESTAMP)"))
    await store.close()
    again = Store(db_url)
    try:
        await again.setup()
        assert await again.version() == SCHEMA_VERSION >= 3
        async with again.read() as conn:
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("ff_attempts")})
            kept = (await conn.execute(text(
                "SELECT cost_usd, usage_estimated FROM ff_attempts"))).all()
        assert "usage_estimated" in columns
        assert [tuple(r) for r in kept] == [(0.5, None)]  # nothing lost; unknown stays NULL
    finally:
        await again.close()


# -- the adapter follows the wire format, not the provider's name ---------------------------


def proxied(emu: ProviderEmulator, fmt: str, name: str = "myproxy") -> ModelSpec:
    """The cheapest built-in model of `fmt`, served under a provider name of its own."""
    builtin = emulated_catalog(emu)
    spec = min((s for s in builtin if ROUTE[s.provider] == fmt),
               key=lambda s: s.estimate_cost(100, 100))
    return ModelSpec(provider=name, model=spec.model, integration=INTEGRATION[fmt],
                     base_url=emu.base_url(fmt), api_key_env=EMULATOR_KEY_ENV,
                     price_ref=f"{spec.provider}:{spec.model}",
                     input_price=max(spec.input_price_per_mtok, 0.01),
                     output_price=max(spec.output_price_per_mtok, 0.01),
                     context_window=spec.window, quality=dict(spec.quality))


@pytest.mark.parametrize(("kind", "expected"), [("overloaded", "overloaded"),
                                                ("connection", "connection"),
                                                ("stream_reset", "connection")])
@pytest.mark.parametrize("fmt", FORMATS)
async def test_a_compatible_endpoint_under_its_own_name_gets_its_wire_formats_adapter(
    emu: ProviderEmulator, fmt: str, kind: str, expected: str
) -> None:
    proxy = proxied(emu, fmt)
    base = emulated_catalog(emu)
    cat = tracked(Catalog([proxy, *(s for s in base if ROUTE[s.provider] != fmt)],
                          name="proxied"))
    _, mine, other = pair(emu, fmt, cat)
    assert mine.key == proxy.key and type(proxy.adapter).__name__.lower().startswith(
        {"openai": "openai", "anthropic": "anthropic", "gemini": "google",
         "ollama": "ollama"}[fmt])
    policy = FallbackPolicy(timeout=3.0, max_retries=1, backoff_base=0.001, backoff_max=0.002)
    model, ctx = routed(cat, mine, other, policy=policy)
    emu.fault(fmt, kind, times=None, after_chunks=3)
    if kind == "stream_reset":  # a reset mid-stream, in a flow's messages mode
        app = qa_app(cat, mine, other, policy)
        ctx = app.new_context()
        async for _ in app.astream({"q": PROMPT}, stream_mode="messages", context=ctx):
            pass
    else:
        await model.ainvoke([HumanMessage(PROMPT)])
    # A 529/503 is `overloaded` and retried; a reset is `connection` (never `timeout`).
    assert tried(ctx) == [(proxy.key, "error", expected, "retry"),
                          (proxy.key, "error", expected, "next"),
                          (other.key, "ok", None, None)]


# -- a custom endpoint must name its URL ---------------------------------------------------


@pytest.mark.parametrize("fmt", ["openai", "anthropic", "gemini"])
def test_a_custom_provider_without_base_url_fails_at_load_and_never_connects(
    fmt: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ACME_API_KEY", "sk-acme-secret-0123456789")
    connects: list[Any] = []
    real_connect, real_resolve = socket.socket.connect, socket.getaddrinfo

    def watch_connect(self: socket.socket, address: Any) -> Any:
        connects.append(address)
        return real_connect(self, address)

    def watch_resolve(host: Any, *args: Any, **kwargs: Any) -> Any:
        connects.append(host)
        return real_resolve(host, *args, **kwargs)

    monkeypatch.setattr(socket.socket, "connect", watch_connect)
    monkeypatch.setattr(socket, "getaddrinfo", watch_resolve)
    entry = {"provider": "acme", "model": "acme-large", "integration": INTEGRATION[fmt],
             "api_key_env": "ACME_API_KEY", "input_price": 1.0, "output_price": 2.0,
             "context_window": 100_000}
    with pytest.raises(CatalogError) as caught:
        Catalog.from_dict({"models": [entry]})
    message = str(caught.value)
    assert "\n" not in message and "acme/acme-large" in message and "base_url" in message
    assert "sk-acme" not in message
    with pytest.raises(CatalogError, match="base_url"):
        ModelSpec(**entry).build()  # a spec used outside a catalog is refused too
    assert connects == []  # no request ever left for the vendor's default URL
    # With its endpoint named, the entry loads.
    Catalog.from_dict({"models": [{**entry, "base_url": "http://127.0.0.1:9/v1"}]})


def test_the_vendors_own_entries_and_known_compatible_vendors_need_no_base_url() -> None:
    cat = Catalog.from_dict({"models": [
        {"provider": "openai", "model": "gpt-4o-mini"},
        {"provider": "deepseek", "model": "deepseek-chat"},  # its URL is known
        {"provider": "anthropic", "model": "claude-haiku-4-5"},
        {"provider": "google", "model": "gemini-2.5-flash"},
    ]})
    assert len(cat) == 4


# -- the ledger says what happened ---------------------------------------------------------


async def test_a_retry_the_open_circuit_prevents_is_recorded_as_next(
    emu: ProviderEmulator,
) -> None:
    cat, mine, other = pair(emu, "anthropic")
    model, ctx = routed(cat, mine, other, breakers=BreakerRegistry(threshold=2, cooldown=60),
                        policy=FallbackPolicy(timeout=3.0, max_retries=3, backoff_base=0.001,
                                              backoff_max=0.002))
    emu.fault("anthropic", "overloaded", times=None)
    await model.ainvoke([HumanMessage(PROMPT)])
    # The second failure opens the circuit: the call moves on, and the ledger says so.
    assert tried(ctx) == [(mine.key, "error", "overloaded", "retry"),
                          (mine.key, "error", "overloaded", "next"),
                          (other.key, "ok", None, None)]


async def test_context_length_with_no_larger_window_says_so(emu: ProviderEmulator) -> None:
    cat = tracked(emulated_catalog(emu))
    keys = [s.key for s in cat if ROUTE[s.provider] == "openai"][:3]
    widest = max(cat[k].window for k in keys)
    for key in keys:  # the same window for all three: none is larger
        cat = cat.override(key, context_window=widest)
    tracked(cat)
    ctx = RunContext(catalog=cat, policy=FallbackPolicy(timeout=3.0),
                     breakers=BreakerRegistry())
    model = RoutedChatModel(needs=Needs(models=tuple(keys)), node="n", context=ctx)
    emu.fault("openai", "context_length", times=None)
    with pytest.raises(AllModelsFailedError) as caught:
        await model.ainvoke([HumanMessage(PROMPT)])
    headline = str(caught.value).splitlines()[0]
    assert "the prompt is too long for" in headline
    assert "no capable model has a larger window" in headline
    assert len(ctx.usage.attempts) == 1
