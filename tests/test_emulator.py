"""The provider emulator, driven by the real LangChain integrations and their SDKs over HTTP.

Every client is built the way frugalflow builds it: SDK retries off, a short timeout. Each
fault must surface as the exception the SDK naturally raises for it, after exactly one
request (no hidden retries), and the next call must succeed on the same client.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import anthropic
import httpx
import httpx2
import ollama
import openai
import pytest
from tool_schemas import GetWeather, Person
from google.genai import errors as genai_errors
from langchain_anthropic import ChatAnthropic
from langchain_anthropic import _client_utils as lc_anthropic_clients
from langchain_core.exceptions import ContextOverflowError
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, ToolMessage
from langchain_google_genai import ChatGoogleGenerativeAI
from langchain_ollama import ChatOllama
from langchain_openai import ChatOpenAI
from langchain_openai.chat_models import _client_utils as lc_openai_clients
from pydantic import BaseModel, Field

from frugalflow import exceptions as ff
from frugalflow.catalog import ModelSpec
from frugalflow.testing.emulator import FAULT_KINDS, PROVIDERS, ProviderEmulator
from frugalflow.providers import adapter_for

MODELS = {"openai": "gpt-4o-mini", "anthropic": "claude-haiku-4-5",
          "gemini": "gemini-2.5-flash", "ollama": "llama3.2"}
HANG_TIMEOUT = 0.5



@pytest.fixture
async def emu() -> AsyncIterator[ProviderEmulator]:
    async with ProviderEmulator(seed=0) as server:
        yield server


_BUILT: list[BaseChatModel] = []
"""Models built by a test; their HTTP clients are closed after it (no unclosed sockets)."""


def _built(model: BaseChatModel) -> BaseChatModel:
    _BUILT.append(model)
    return model


async def _aclose(model: BaseChatModel) -> None:
    if isinstance(model, ChatOpenAI):
        await model.root_async_client.close()  # type: ignore[union-attr]
        model.root_client.close()  # type: ignore[union-attr]
    elif isinstance(model, ChatAnthropic):
        if "_async_client" in model.__dict__:
            await model._async_client.close()
        if "_client" in model.__dict__:
            model._client.close()
    elif isinstance(model, ChatGoogleGenerativeAI):
        await model.aclose()
    elif isinstance(model, ChatOllama):
        await model._async_client.close()
        model._client.close()


def _close_sync(model: BaseChatModel) -> None:
    if isinstance(model, ChatOpenAI):
        model.root_client.close()  # type: ignore[union-attr]
    elif isinstance(model, ChatAnthropic) and "_client" in model.__dict__:
        model._client.close()


@pytest.fixture(autouse=True)
async def _close_clients() -> AsyncIterator[None]:
    yield
    while _BUILT:
        await _aclose(_BUILT.pop())
    # langchain-openai and langchain-anthropic share cached httpx clients per base URL;
    # the emulator's port changes per test, so drop the (now closed) cached ones.
    lc_openai_clients._cached_async_httpx_client.cache_clear()
    lc_openai_clients._cached_sync_httpx_client.cache_clear()
    lc_anthropic_clients._get_default_async_httpx_client.cache_clear()
    lc_anthropic_clients._get_default_httpx_client.cache_clear()


def make(emu: ProviderEmulator, provider: str, *, timeout: float = 5.0,
         model: str | None = None, **kwargs: Any) -> BaseChatModel:
    """The provider's real LangChain model, pointed at the emulator, retries off."""
    return _built(_make(emu, provider, timeout=timeout, model=model, **kwargs))


def _make(emu: ProviderEmulator, provider: str, *, timeout: float, model: str | None,
          **kwargs: Any) -> BaseChatModel:
    name = model or MODELS[provider]
    if provider == "openai":
        return ChatOpenAI(model=name, base_url=emu.base_url("openai"), api_key="test-key",
                          max_retries=0, timeout=timeout, stream_usage=True, **kwargs)
    if provider == "anthropic":
        return ChatAnthropic(model=name, base_url=emu.base_url("anthropic"),  # type: ignore[call-arg]
                             api_key="test-key", max_retries=0,
                             default_request_timeout=timeout, **kwargs)
    if provider == "gemini":
        # google-genai 3.x maps attempts=0 to a single attempt (older ones retried 5 times).
        return ChatGoogleGenerativeAI(model=name, base_url=emu.base_url("gemini"),
                                      google_api_key="test-key", max_retries=0,
                                      timeout=timeout, **kwargs)
    # ChatOllama has no timeout or retry setting of its own: the httpx client takes it.
    return ChatOllama(model=name, base_url=emu.base_url("ollama"),
                      client_kwargs={"timeout": timeout}, **kwargs)


def merged(chunks: list[AIMessageChunk]) -> AIMessageChunk:
    total = chunks[0]
    for chunk in chunks[1:]:
        total = total + chunk
    return total


async def stream_all(model: Any, prompt: Any) -> list[AIMessageChunk]:
    return [chunk async for chunk in model.astream(prompt)]


# -- answers ------------------------------------------------------------------------------


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_invoke_answers_text_with_usage(emu: ProviderEmulator, provider: str) -> None:
    reply = await make(emu, provider).ainvoke("Summarise the refund policy, please.")

    assert isinstance(reply, AIMessage)
    assert isinstance(reply.content, str) and len(reply.content.split()) >= 6
    usage = reply.usage_metadata
    assert usage is not None
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert abs(usage["output_tokens"] - len(reply.content) / 4) <= 2
    [req] = emu.requests
    assert (req.provider, req.model, req.fault, req.status) == (
        provider, MODELS[provider], None, 200)
    assert req.stream is (provider == "ollama")  # ChatOllama always streams
    assert req.auth is (provider != "ollama")


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_astream_yields_several_chunks_and_usage(
    emu: ProviderEmulator, provider: str
) -> None:
    model = make(emu, provider)
    chunks = await stream_all(model, "Summarise the refund policy, please.")
    plain = await model.ainvoke("Summarise the refund policy, please.")

    assert len([c for c in chunks if c.content]) >= 3
    total = merged(chunks)
    assert total.text == plain.text  # the same deterministic answer, streamed
    assert total.usage_metadata is not None
    assert total.usage_metadata["output_tokens"] > 0
    assert total.usage_metadata["input_tokens"] > 0
    assert emu.requests[0].stream is True


async def test_answers_are_deterministic_for_a_seed(emu: ProviderEmulator) -> None:
    first = await make(emu, "openai").ainvoke("hello")
    again = await make(emu, "openai").ainvoke("hello")
    other_prompt = await make(emu, "openai").ainvoke("goodbye")
    async with ProviderEmulator(seed=1) as other_seed:
        reseeded = await make(other_seed, "openai").ainvoke("hello")

    assert first.content == again.content
    assert first.content != other_prompt.content
    assert first.content != reseeded.content


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_bound_tools_get_a_schema_valid_call(emu: ProviderEmulator, provider: str) -> None:
    model = make(emu, provider).bind_tools([GetWeather])

    reply = await model.ainvoke("What's the weather in Lyon?")
    streamed = merged(await stream_all(model, "What's the weather in Lyon?"))

    for message in (reply, streamed):
        [call] = message.tool_calls
        assert call["name"] == "GetWeather"
        GetWeather.model_validate(call["args"])
    assert streamed.tool_calls[0]["args"] == reply.tool_calls[0]["args"]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_forced_tool_and_text_after_a_tool_result(
    emu: ProviderEmulator, provider: str
) -> None:
    def lookup_order(order_id: str) -> str:
        """Look an order up."""
        return "shipped"

    model = make(emu, provider)
    forced = model.bind_tools([lookup_order, GetWeather], tool_choice="GetWeather")
    reply = await forced.ainvoke("Weather?")
    # The Ollama API has no tool_choice (ChatOllama drops it): the first tool is called.
    first = "lookup_order" if provider == "ollama" else "GetWeather"
    assert [c["name"] for c in reply.tool_calls] == [first]

    free = model.bind_tools([lookup_order, GetWeather])
    call = (await free.ainvoke("Where is order 42?")).tool_calls[0]
    assert call["name"] == "lookup_order"
    answer = await free.ainvoke([
        HumanMessage("Where is order 42?"),
        AIMessage(content="", tool_calls=[call]),
        ToolMessage("shipped", tool_call_id=call["id"]),
    ])
    assert answer.tool_calls == []
    assert answer.text


@pytest.mark.parametrize(
    ("provider", "method"),
    [
        ("openai", "json_schema"), ("openai", "function_calling"), ("openai", "json_mode"),
        ("anthropic", "function_calling"), ("anthropic", "json_schema"),
        ("gemini", "json_schema"), ("gemini", "function_calling"),
        ("ollama", "json_schema"), ("ollama", "function_calling"),
    ],
)
async def test_structured_output(emu: ProviderEmulator, provider: str, method: str) -> None:
    if method == "json_mode":
        schema: Any = {"title": "Answer", "type": "object",
                       "properties": {"answer": {"type": "string"}}}
        out = await make(emu, provider).with_structured_output(
            schema, method="json_mode").ainvoke("Answer in JSON.")
        assert isinstance(out, dict) and isinstance(out["answer"], str)
        return
    out = await make(emu, provider).with_structured_output(Person, method=method).ainvoke(
        "Alice is 31 and likes tea.")
    assert isinstance(out, Person)


async def test_responder_dictates_the_text(emu: ProviderEmulator) -> None:
    seen: list[tuple[str, str]] = []

    def responder(provider: str, model: str, body: dict[str, Any]) -> str | None:
        seen.append((provider, model))
        return f"{provider} says hi" if provider != "ollama" else None

    emu.responder = responder
    for provider in PROVIDERS:
        reply = await make(emu, provider).ainvoke("hi")
        assert (reply.text == f"{provider} says hi") is (provider != "ollama")
    assert seen == [(p, MODELS[p]) for p in PROVIDERS]


async def test_ollama_native_client_plain_and_streaming(emu: ProviderEmulator) -> None:
    client = ollama.AsyncClient(host=emu.base_url("ollama"), timeout=5)
    try:
        plain = await client.chat(model="llama3.2", stream=False,
                                  messages=[{"role": "user", "content": "hi"}])
        assert plain.message.content and plain.done
        assert plain.prompt_eval_count and plain.eval_count
        parts = [p async for p in await client.chat(
            model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True)]
        assert len(parts) >= 3 and parts[-1].done
        assert "".join(p.message.content or "" for p in parts) == plain.message.content
        assert [r.stream for r in emu.requests] == [False, True]
        assert (await client.list()).models
    finally:
        await client.close()


async def test_openai_models_listing(emu: ProviderEmulator) -> None:
    client = openai.AsyncOpenAI(base_url=emu.base_url("openai"), api_key="test-key",
                                max_retries=0)
    try:
        ids = [m.id async for m in client.models.list()]
    finally:
        await client.close()
    assert "gpt-4o-mini" in ids
    assert emu.requests == []  # listings are not generation requests


# -- faults -------------------------------------------------------------------------------

# What each fault raises from a plain call (ainvoke) and from a stream (astream). A type, or
# None for "the call succeeds with a recognisable answer" (checked separately).
_TRANSPORT2 = httpx2.TransportError  # google-genai (httpx2 backend) lets these through raw
_TRANSPORT = httpx.TransportError  # so does ollama (httpx)
EXPECTED: dict[str, dict[str, tuple[type[BaseException] | None, type[BaseException] | None]]] = {
    "openai": {
        "rate_limit": (openai.RateLimitError,) * 2,
        "overloaded": (openai.InternalServerError,) * 2,
        "server_error": (openai.InternalServerError,) * 2,
        "unavailable": (openai.InternalServerError,) * 2,
        "auth": (openai.AuthenticationError,) * 2,
        "context_length": (openai.BadRequestError,) * 2,
        "invalid_request": (openai.BadRequestError,) * 2,
        "content_filter": (openai.BadRequestError,) * 2,
        "connection": (openai.APIConnectionError,) * 2,
        "timeout": (openai.APITimeoutError,) * 2,
        "malformed": (json.JSONDecodeError,) * 2,
        "stream_cut": (openai.APIConnectionError,) * 2,
        "stream_stall": (openai.APITimeoutError,) * 2,
        "stream_error": (openai.InternalServerError, openai.APIError),
        "stream_reset": (openai.APIConnectionError,) * 2,
    },
    "anthropic": {
        "rate_limit": (anthropic.RateLimitError,) * 2,
        "overloaded": (anthropic.OverloadedError,) * 2,
        "server_error": (anthropic.InternalServerError,) * 2,
        "unavailable": (anthropic.InternalServerError,) * 2,
        "auth": (anthropic.AuthenticationError,) * 2,
        "context_length": (anthropic.BadRequestError,) * 2,
        "invalid_request": (anthropic.BadRequestError,) * 2,
        "content_filter": (None, None),
        "connection": (anthropic.APIConnectionError,) * 2,
        "timeout": (anthropic.APITimeoutError,) * 2,
        "malformed": (json.JSONDecodeError,) * 2,
        # anthropic does not wrap transport errors raised while a stream is iterated
        "stream_cut": (anthropic.APIConnectionError, httpx2.RemoteProtocolError),
        "stream_stall": (anthropic.APITimeoutError, httpx2.ReadTimeout),
        "stream_error": (anthropic.InternalServerError, anthropic.APIStatusError),
        "stream_reset": (anthropic.APIConnectionError, httpx2.ReadError),
    },
    "gemini": {
        "rate_limit": (genai_errors.ClientError,) * 2,
        "overloaded": (genai_errors.ServerError,) * 2,
        "server_error": (genai_errors.ServerError,) * 2,
        "unavailable": (genai_errors.ServerError,) * 2,
        "auth": (genai_errors.ClientError,) * 2,
        "context_length": (genai_errors.ClientError,) * 2,
        "invalid_request": (genai_errors.ClientError,) * 2,
        "content_filter": (None, None),
        "connection": (_TRANSPORT2,) * 2,
        "timeout": (httpx2.ReadTimeout,) * 2,
        "malformed": (json.JSONDecodeError, genai_errors.UnknownApiResponseError),
        "stream_cut": (httpx2.RemoteProtocolError,) * 2,
        "stream_stall": (httpx2.ReadTimeout,) * 2,
        "stream_error": (genai_errors.ServerError,) * 2,
        "stream_reset": (httpx2.ReadError,) * 2,
    },
    "ollama": {  # ChatOllama streams even for ainvoke
        "rate_limit": (ollama.ResponseError,) * 2,
        "overloaded": (ollama.ResponseError,) * 2,
        "server_error": (ollama.ResponseError,) * 2,
        "unavailable": (ollama.ResponseError,) * 2,
        "auth": (ollama.ResponseError,) * 2,
        "context_length": (ollama.ResponseError,) * 2,
        "invalid_request": (ollama.ResponseError,) * 2,
        "content_filter": (ollama.ResponseError,) * 2,
        "connection": (_TRANSPORT,) * 2,
        "timeout": (httpx.ReadTimeout,) * 2,
        "malformed": (json.JSONDecodeError,) * 2,
        "stream_cut": (httpx.RemoteProtocolError,) * 2,
        "stream_stall": (httpx.ReadTimeout,) * 2,
        "stream_error": (ollama.ResponseError,) * 2,
        "stream_reset": (httpx.ReadError,) * 2,
    },
}
STATUS = {"rate_limit": 429, "server_error": 500, "unavailable": 503, "auth": 401,
          "context_length": 400, "invalid_request": 400}
HANGS = {"timeout", "stream_stall"}
for _table in EXPECTED.values():  # auth_echo: the auth fault whose body repeats the key
    _table["auth_echo"] = _table["auth"]
STATUS["auth_echo"] = 401


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    """`exc` or the first exception in its cause chain that is a `kind`."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, kind):
            return seen
        seen = seen.__cause__
    return None


def _cases(stream: bool) -> list[Any]:
    out = []
    for provider in PROVIDERS:
        for kind in FAULT_KINDS:
            if kind == "slow" or kind not in EXPECTED[provider]:
                continue  # the answers that look fine but are not: tests/test_wire_faults.py
            if kind in HANGS and not stream and provider != "openai":
                continue  # the plain hang is covered once; hangs cost HANG_TIMEOUT each
            out.append(pytest.param(provider, kind, id=f"{provider}-{kind}"))
    return out


async def _check_fault(emu: ProviderEmulator, provider: str, kind: str, stream: bool) -> None:
    # Only hangs need the short client timeout: with it, a close delayed past 0.5 s by a
    # loaded machine read as a timeout instead of the connection error it is.
    model = make(emu, provider, timeout=HANG_TIMEOUT if kind in HANGS else 10.0)
    fault = emu.fault(provider, kind, retry_after=2, after_chunks=2, hang_seconds=5.0)
    expected = EXPECTED[provider][kind][1 if stream else 0]
    started = time.monotonic()

    async def call() -> AIMessage:
        if stream:
            return merged(await stream_all(model, "hello"))  # type: ignore[return-value]
        return await model.ainvoke("hello")

    if expected is None:
        reply = await call()
        meta = reply.response_metadata
        if provider == "anthropic":
            assert meta["stop_reason"] == "refusal"
        else:
            assert meta["finish_reason"] == "SAFETY"
        assert reply.text == ""
    else:
        with pytest.raises(Exception) as caught:
            await call()
        found = _cause(caught.value, expected)
        assert found is not None, f"{type(caught.value).__mro__} is not a {expected}"
        if kind == "connection" and provider in ("openai", "anthropic"):
            assert not isinstance(found, (openai.APITimeoutError, anthropic.APITimeoutError))
        _check_details(provider, kind, found, caught.value)
    elapsed = time.monotonic() - started
    assert elapsed < (HANG_TIMEOUT + 1.5 if kind in HANGS else 1.5)

    assert fault.hits == 1
    [record] = emu.requests  # exactly one request: no hidden SDK retries
    assert record.fault == kind
    if kind in STATUS:
        assert record.status == STATUS[kind]
    # The fault is spent, and the same client recovers (a fresh pooled connection if needed).
    again = await call()
    assert again.text
    assert [r.fault for r in emu.requests] == [kind, None]


def _check_details(provider: str, kind: str, found: BaseException, raised: BaseException) -> None:
    if kind == "rate_limit":
        if provider in ("openai", "anthropic"):
            assert found.response.headers["retry-after"] == "2"  # type: ignore[attr-defined]
        if provider == "gemini":
            assert found.details["error"]["details"][0]["retryDelay"] == "2s"  # type: ignore[attr-defined]
            assert found.response.headers["retry-after"] == "2"  # type: ignore[attr-defined]
    if kind == "overloaded" and provider == "anthropic":
        assert found.status_code == 529  # type: ignore[attr-defined]
        assert found.body["error"]["type"] == "overloaded_error"  # type: ignore[attr-defined]
    if kind == "context_length":
        if provider == "openai":
            assert found.code == "context_length_exceeded"  # type: ignore[attr-defined]
        if provider in ("anthropic", "gemini"):
            assert isinstance(raised, ContextOverflowError)
        if provider == "ollama":
            assert "context length" in str(found)
    if kind == "content_filter" and provider == "openai":
        assert found.code == "content_filter"  # type: ignore[attr-defined]
    if kind in STATUS:
        code = getattr(found, "status_code", None) or getattr(found, "code", None)
        assert code == STATUS[kind]


@pytest.mark.parametrize(("provider", "kind"), _cases(stream=False))
async def test_fault_on_a_plain_call(emu: ProviderEmulator, provider: str, kind: str) -> None:
    await _check_fault(emu, provider, kind, stream=False)


@pytest.mark.parametrize(("provider", "kind"), _cases(stream=True))
async def test_fault_on_a_stream(emu: ProviderEmulator, provider: str, kind: str) -> None:
    await _check_fault(emu, provider, kind, stream=True)


@pytest.mark.parametrize("provider", ["openai", "anthropic", "gemini"])
async def test_stream_cut_after_k_chunks_delivers_them_first(
    emu: ProviderEmulator, provider: str
) -> None:
    model = make(emu, provider)
    emu.fault(provider, "stream_cut", after_chunks=4)
    received: list[AIMessageChunk] = []
    with pytest.raises(Exception):  # noqa: B017 - the class is checked in test_fault_on_a_stream
        async for chunk in model.astream("Summarise the refund policy, please."):
            received.append(chunk)
    assert any(c.content for c in received)  # the cut came mid-answer, not before it


async def test_slow_answers_after_the_delay(emu: ProviderEmulator) -> None:
    emu.fault("openai", "slow", hang_seconds=0.05)
    started = time.monotonic()
    reply = await make(emu, "openai").ainvoke("hello")
    assert reply.text and time.monotonic() - started >= 0.05


async def test_fault_selection_by_call_number_model_and_stream(emu: ProviderEmulator) -> None:
    mini = make(emu, "openai")
    big = make(emu, "openai", model="gpt-4o")
    second = emu.fault("openai", "server_error", model="gpt-4o-mini", calls=[2, 3])
    streams = emu.fault("openai", "rate_limit", stream=True, times=None)

    await mini.ainvoke("1")
    await big.ainvoke("not counted: another model")
    for _ in range(2):
        with pytest.raises(openai.InternalServerError):
            await mini.ainvoke("2 and 3")
    await mini.ainvoke("4")
    for _ in range(3):
        with pytest.raises(openai.RateLimitError):
            await stream_all(mini, "streams fail until cleared")
    emu.clear_faults(streams)
    assert (await stream_all(mini, "cleared"))

    assert (second.hits, second.seen) == (2, 8)  # streams to gpt-4o-mini match it too
    assert streams.hits == 3
    assert [r.fault for r in emu.requests] == [
        None, None, "server_error", "server_error", None, "rate_limit", "rate_limit",
        "rate_limit", None]


async def test_faults_are_per_provider_and_clearable(emu: ProviderEmulator) -> None:
    emu.fault("anthropic", "overloaded", times=None)
    await make(emu, "openai").ainvoke("unaffected")
    with pytest.raises(anthropic.OverloadedError):
        await make(emu, "anthropic").ainvoke("hit")
    emu.clear_faults("anthropic")
    await make(emu, "anthropic").ainvoke("cleared")
    with pytest.raises(ValueError, match="unknown fault kind"):
        emu.fault("openai", "gremlins")
    with pytest.raises(ValueError, match="unknown provider"):
        emu.fault("mistral", "rate_limit")
    assert emu.fault("openai", "hang").kind == "timeout"  # aliases
    assert emu.fault("openai", "reset").kind == "connection"


async def test_requests_record_auth_but_never_the_key(emu: ProviderEmulator) -> None:
    secret = "sk-emulator-secret-123"
    await _built(ChatOpenAI(model="gpt-4o-mini", base_url=emu.base_url("openai"),
                            api_key=secret, max_retries=0)).ainvoke("hi")
    await _built(ChatAnthropic(model="claude-haiku-4-5",  # type: ignore[call-arg]
                               base_url=emu.base_url("anthropic"), api_key=secret,
                               max_retries=0)).ainvoke("hi")
    await _built(ChatGoogleGenerativeAI(model="gemini-2.5-flash",
                                        base_url=emu.base_url("gemini"),
                                        google_api_key=secret, max_retries=0)).ainvoke("hi")
    await make(emu, "ollama").ainvoke("hi")

    assert [(r.provider, r.auth) for r in emu.requests] == [
        ("openai", True), ("anthropic", True), ("gemini", True), ("ollama", False)]
    assert secret not in repr(emu.requests)
    assert all(secret not in json.dumps(r.body) for r in emu.requests)
    assert all("?" not in r.path for r in emu.requests)


async def test_require_key_answers_401_without_one() -> None:
    async with ProviderEmulator(require_key=True) as server:
        with pytest.raises(ollama.ResponseError) as caught:
            await make(server, "ollama").ainvoke("hi")
        assert caught.value.status_code == 401
        assert (await make(server, "openai").ainvoke("hi")).text
        assert [r.fault for r in server.requests] == ["auth", None]


async def test_stop_ends_a_hang_at_once() -> None:
    server = await ProviderEmulator().start()
    server.fault("openai", "timeout", hang_seconds=60)
    call = asyncio.create_task(make(server, "openai", timeout=60).ainvoke("hello"))
    await server.wait_for_requests(1)
    started = time.monotonic()
    await server.stop()
    with pytest.raises(openai.APIConnectionError):
        await call
    assert time.monotonic() - started < 2.0
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url


async def test_a_hang_ends_after_hang_seconds(emu: ProviderEmulator) -> None:
    emu.fault("anthropic", "timeout", hang_seconds=0.2)
    started = time.monotonic()
    with pytest.raises(anthropic.APIConnectionError) as caught:
        await make(emu, "anthropic", timeout=10).ainvoke("hello")
    assert not isinstance(caught.value, anthropic.APITimeoutError)  # closed, not timed out
    assert time.monotonic() - started < 2.0


async def test_chat_model_helper_builds_working_models(emu: ProviderEmulator) -> None:
    for provider in PROVIDERS:
        reply = await _built(emu.chat_model(provider)).ainvoke("hi")
        assert reply.text and reply.usage_metadata


def test_sync_use_from_a_thread() -> None:
    with ProviderEmulator(seed=3) as server:
        assert server.url.startswith("http://127.0.0.1:")
        model = ChatOpenAI(model="gpt-4o-mini", base_url=server.base_url("openai"),
                           api_key="test-key", max_retries=0, timeout=5)
        claude = _make(server, "anthropic", timeout=5, model=None)
        try:
            server.fault("openai", "rate_limit")
            with pytest.raises(openai.RateLimitError):
                model.invoke("hi")
            assert model.invoke("hi").text
            assert len(list(claude.stream("hi"))) >= 3
        finally:
            _close_sync(model)
            _close_sync(claude)
    assert len(server.requests) == 3


# -- frugalflow's adapters on real SDK errors ---------------------------------------------


_ADAPTER_CASES = [
    ("openai", "rate_limit", ff.RateLimitError),
    ("openai", "overloaded", ff.ProviderOverloadedError),
    ("openai", "context_length", ff.ContextLengthError),
    ("openai", "content_filter", ff.ContentFilterError),
    ("openai", "timeout", ff.ModelTimeoutError),
    ("openai", "connection", ff.ProviderConnectionError),
    ("anthropic", "overloaded", ff.ProviderOverloadedError),
    ("anthropic", "context_length", ff.ContextLengthError),
    ("anthropic", "auth", ff.AuthenticationError),
    ("gemini", "rate_limit", ff.RateLimitError),
    ("gemini", "context_length", ff.ContextLengthError),
    ("ollama", "overloaded", ff.ProviderOverloadedError),
    ("ollama", "timeout", ff.ModelTimeoutError),
    ("ollama", "connection", ff.ProviderConnectionError),
    pytest.param("gemini", "timeout", ff.ModelTimeoutError),  # raw httpx2 error
    pytest.param("anthropic", "stream_cut", ff.ProviderConnectionError),  # raw httpx2 in stream
    pytest.param("openai", "malformed", ff.MalformedResponseError),  # bare JSONDecodeError
]


@pytest.mark.parametrize(("provider", "kind", "expected"), _ADAPTER_CASES)
async def test_frugalflow_adapters_classify_emulated_faults(
    emu: ProviderEmulator, provider: str, kind: str, expected: type[ff.ModelAPIError]
) -> None:
    spec = ModelSpec(provider={"gemini": "google"}.get(provider, provider),
                     model=MODELS[provider])
    emu.fault(provider, kind, retry_after=2)
    model = make(emu, provider, timeout=HANG_TIMEOUT)
    with pytest.raises(Exception) as caught:
        if kind.startswith("stream"):
            await stream_all(model, "hello")
        else:
            await model.ainvoke("hello")
    error = adapter_for(spec).translate(caught.value, spec)
    assert isinstance(error, expected), repr(error)
    if kind == "rate_limit" and provider == "openai":
        assert error.retry_after == 2.0


def test_fault_kinds_are_documented() -> None:
    from frugalflow.testing import wire_faults

    assert wire_faults.__doc__ is not None
    for kind in FAULT_KINDS:
        assert f"\n    {kind} " in wire_faults.__doc__, kind


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_the_judge_mark_never_reaches_the_wire(emu: ProviderEmulator, provider: str) -> None:
    from frugalflow import Judge

    await make(emu, provider).ainvoke(Judge("Specific.").prompt("the input", "the answer"))
    sent = json.dumps(emu.requests[-1].body)
    assert "the input" in sent and Judge.MARK not in sent  # a real provider never sees it


def test_no_io_before_start() -> None:
    server = ProviderEmulator()
    with pytest.raises(RuntimeError, match="not running"):
        _ = server.url
    assert server.requests == [] and server.faults == []


async def test_bodies_sent_are_recorded_for_inspection(emu: ProviderEmulator) -> None:
    await make(emu, "anthropic").bind_tools([GetWeather]).ainvoke("weather?")
    body = emu.requests[0].body
    assert body["tools"][0]["name"] == "GetWeather"
    assert body["messages"][-1]["content"] == "weather?"


async def test_field_constraints_that_reach_the_wire_are_respected(
    emu: ProviderEmulator,
) -> None:
    class Booking(BaseModel):
        """Book a table."""

        guests: int = Field(ge=1, le=8)
        name: str = Field(min_length=12)
        when: Literal["lunch", "dinner"]

    for i in range(5):
        reply = await make(emu, "openai").bind_tools([Booking]).ainvoke(f"book {i}")
        Booking.model_validate(reply.tool_calls[0]["args"])


async def test_raw_http_edge_cases(emu: ProviderEmulator) -> None:
    async with httpx.AsyncClient(base_url=emu.url, timeout=5) as client:
        missing = await client.get("/nowhere")
        assert missing.status_code == 404
        not_json = await client.post("/openai/v1/chat/completions", content=b"{oops")
        assert not_json.status_code == 400
        bad_tools = await client.post("/anthropic/v1/messages", json={
            "model": "claude-haiku-4-5", "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"name": "x", "input_schema": None}], "tool_choice": "not a dict"})
        assert bad_tools.status_code == 400
        assert bad_tools.json()["error"]["type"] == "invalid_request_error"
        array = await client.post(
            "/gemini/v1beta/models/gemini-2.5-flash:streamGenerateContent",
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]},
            headers={"x-goog-api-key": "k"})
        chunks = array.json()
        assert isinstance(chunks, list) and chunks[-1]["candidates"][0]["finishReason"] == "STOP"
        keyed = await client.post(
            "/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=secret-in-query",
            json={"contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        assert keyed.status_code == 200
    assert len(emu.errors) == 1  # the tool_choice that was not an object
    assert emu.requests[-1].auth and "secret" not in emu.requests[-1].path


# -- frugalflow's fallback over the wire ---------------------------------------------------


async def test_routed_model_falls_back_across_real_clients(
    emu: ProviderEmulator, make_ctx: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from frugalflow import Catalog, FallbackPolicy, Needs, RoutedChatModel

    def entry(provider: str, model: str, price: float, base: str,
              window: int = 100_000) -> ModelSpec:
        monkeypatch.setenv(f"EMU_{provider.upper()}_KEY", "test-key")
        return ModelSpec(provider=provider, model=model, base_url=emu.base_url(base),
                         api_key_env=f"EMU_{provider.upper()}_KEY", input_price=price,
                         output_price=price, context_window=window,
                         # No reasoning mode: the expected output is the same for all (a
                         # reasoning model's thinking tokens would change the price order).
                         capabilities={"tool_calling": True, "structured_output": True,
                                       "reasoning": False},
                         quality={"writing": 0.8})

    cat = Catalog([
        entry("openai", "gpt-4o-mini", 0.1, "openai"),
        entry("anthropic", "claude-haiku-4-5", 0.2, "anthropic"),
        entry("google", "gemini-2.5-flash", 0.3, "gemini"),
        entry("ollama", "llama3.2", 0.4, "ollama", window=2_000_000),
    ], name="emulated")
    emu.fault("openai", "rate_limit", retry_after=30)  # beyond the cap: move on at once
    emu.fault("anthropic", "overloaded", times=None)  # retried once, then the next model
    emu.fault("gemini", "context_length")  # next, with a larger context window
    model = RoutedChatModel(needs=Needs(), node="n",
                            context=make_ctx(cat=cat, policy=FallbackPolicy(timeout=5.0)))
    try:
        answer = await model.ainvoke("hello over the wire")
    finally:
        for _, built in cat._built.values():
            await _aclose(built)

    assert answer.text and model.last_model == "ollama/llama3.2"
    tried = [(a.model, a.outcome, a.action) for a in model.context.usage.attempts]
    assert tried == [
        ("openai/gpt-4o-mini", "error", "next"),
        ("anthropic/claude-haiku-4-5", "error", "retry"),
        ("anthropic/claude-haiku-4-5", "error", "next"),
        ("google/gemini-2.5-flash", "error", "next"),
        ("ollama/llama3.2", "ok", None),
    ]
    assert [(r.provider, r.fault) for r in emu.requests] == [
        ("openai", "rate_limit"), ("anthropic", "overloaded"), ("anthropic", "overloaded"),
        ("gemini", "context_length"), ("ollama", None)]
