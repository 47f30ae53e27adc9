"""Gemini batch mode over the wire: frugalflow's GeminiBatchClient (the real google-genai
SDK, lines made and answers read by the real ChatGoogleGenerativeAI) against the
emulator's batch desk. Batches end when the test releases them (delay=None), never after
a sleep."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from tool_schemas import GetWeather, Person
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.runnables import Runnable
from langchain_google_genai import ChatGoogleGenerativeAI

from frugalflow import exceptions as ff
from frugalflow.attempts import generate_once
from frugalflow.batches import BatchRequest, ItemResult
from frugalflow.batches.gemini import GeminiBatchClient
from frugalflow.catalog import ModelSpec
from frugalflow.statuses import BatchStatus
from frugalflow.testing.emulator import ProviderEmulator
from frugalflow.usage import Usage

MODEL = "gemini-2.5-flash"
KEY_ENV = "FRUGALFLOW_TEST_GEMINI_BATCH_KEY"
SECRET = "sk-gemini-batch-secret-0123456789"



@pytest.fixture
async def emu() -> AsyncIterator[ProviderEmulator]:
    async with ProviderEmulator(seed=0) as server:
        yield server


@pytest.fixture
def spec(emu: ProviderEmulator, monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    monkeypatch.setenv(KEY_ENV, SECRET)
    return ModelSpec(provider="google", model=MODEL, base_url=emu.base_url("gemini"),
                     api_key_env=KEY_ENV)


@pytest.fixture
async def batches(spec: ModelSpec) -> AsyncIterator[GeminiBatchClient]:
    client = GeminiBatchClient(spec)
    yield client
    await client.aclose()


@pytest.fixture
async def chat(emu: ProviderEmulator) -> AsyncIterator[ChatGoogleGenerativeAI]:
    model = ChatGoogleGenerativeAI(model=MODEL, base_url=emu.base_url("gemini"),
                                   google_api_key="test-key", max_retries=0, timeout=5.0)
    yield model
    await model.aclose()


def ask(i: int) -> list[BaseMessage]:
    return [SystemMessage("Answer briefly."), HumanMessage(f"Question number {i}: why?")]


async def sync_answer(model: Runnable[Any, Any], messages: list[BaseMessage]) -> AIMessage:
    """What frugalflow's synchronous call returns for the same request."""
    message, _ = await generate_once(model, messages, None, {})
    return message


async def submit(batches: GeminiBatchClient, spec: ModelSpec, model: Runnable[Any, Any],
                 n: int, batch_id: str = "ffb_1") -> str:
    lines = [BatchRequest(f"item-{i}", batches.request_body(model, ask(i), None, {}))
             for i in range(1, n + 1)]
    return await batches.submit(spec, lines, batch_id=batch_id)


def by_id(results: list[ItemResult]) -> dict[str, ItemResult]:
    out = {r.custom_id: r for r in results}
    assert len(out) == len(results), "an item reported twice"
    return out


def same_answer(batched: AIMessage, sync: AIMessage) -> None:
    assert batched.content == sync.content
    # Gemini sends no tool call ids: the integration makes a fresh uuid per call.
    assert [{**c, "id": None} for c in batched.tool_calls] == [
        {**c, "id": None} for c in sync.tool_calls]
    assert all(c["id"] for c in batched.tool_calls)
    assert batched.usage_metadata == sync.usage_metadata
    # Everything but the per-response id agrees.
    assert batched.response_metadata == sync.response_metadata


async def test_request_body_is_what_the_synchronous_call_sends(
        emu: ProviderEmulator, batches: GeminiBatchClient,
        chat: ChatGoogleGenerativeAI) -> None:
    model = chat.bind_tools([GetWeather])
    body = batches.request_body(model, ask(1), ["STOP HERE"], {"temperature": 0.2})
    await model.ainvoke(ask(1), stop=["STOP HERE"], temperature=0.2)
    assert body == emu.requests[-1].body
    assert body["tools"][0]["functionDeclarations"][0]["name"] == "GetWeather"
    assert body["generationConfig"]["stopSequences"] == ["STOP HERE"]
    json.dumps(body)  # storable as JSON


async def test_lines_reach_the_provider_unchanged(
        emu: ProviderEmulator, spec: ModelSpec, batches: GeminiBatchClient) -> None:
    """The SDK's inlined requests are rebuilt from the REST bodies: every field of a rich
    request (a tool round, thinking, sampling, safety, a forced tool) arrives as made."""
    from langchain_google_genai import HarmBlockThreshold, HarmCategory

    rich = ChatGoogleGenerativeAI(
        model=MODEL, base_url=emu.base_url("gemini"), google_api_key="test-key",
        max_retries=0, temperature=0.1, top_p=0.9, top_k=20, max_output_tokens=300,
        thinking_budget=128, include_thoughts=True, seed=7,
        safety_settings={HarmCategory.HARM_CATEGORY_DANGEROUS_CONTENT:
                         HarmBlockThreshold.BLOCK_ONLY_HIGH})
    try:
        model = rich.bind_tools([GetWeather], tool_choice="any")
        messages: list[BaseMessage] = [
            SystemMessage("Answer briefly."), HumanMessage("Weather in Oslo?"),
            AIMessage("", tool_calls=[{"name": "GetWeather", "id": "call_1", "args": {
                "city": "Oslo", "days": 2, "unit": "celsius"}}]),
            ToolMessage('{"forecast": "snow"}', tool_call_id="call_1", name="GetWeather"),
            HumanMessage("And in Rome?")]
        body = batches.request_body(model, messages, ["END"], {})
        gen = body["generationConfig"]
        # (The SDK sends thinkingConfig's fields in snake case, the sync call too.)
        assert sorted(gen["thinkingConfig"].values()) == [True, 128]
        assert (gen["temperature"], gen["topK"], gen["seed"]) == (0.1, 20, 7)
        assert body["toolConfig"]["functionCallingConfig"]["mode"] == "ANY"
        assert body["safetySettings"] and len(body["contents"]) == 4
        await model.ainvoke(messages, stop=["END"])
        assert body == emu.requests[-1].body
        await batches.submit(spec, [BatchRequest("rich", body)], batch_id="ffb_rich")
        (sent,) = emu.batches.listed("gemini")
        assert sent.requests == [("rich", body)]
    finally:
        await rich.aclose()


async def test_round_trip_matches_the_synchronous_answers(
        emu: ProviderEmulator, spec: ModelSpec, batches: GeminiBatchClient,
        chat: ChatGoogleGenerativeAI) -> None:
    emu.batches.script("gemini", delay=None)
    name = await submit(batches, spec, chat, 3)
    assert name.startswith("batches/")
    assert (await batches.progress(spec, name)).status is BatchStatus.SUBMITTED
    # The SDK sent every line as the REST request the synchronous call sends.
    (sent,) = emu.batches.listed("gemini")
    assert [cid for cid, _ in sent.requests] == ["item-1", "item-2", "item-3"]
    assert sent.requests[0][1] == batches.request_body(chat, ask(1), None, {})
    assert sent.metadata["displayName"] == "ffb_1"
    assert not emu.batches.paid
    assert await batches.results(spec, name) == []  # asked too early: nothing yet

    emu.batches.release()
    progress = await batches.progress(spec, name)
    assert (progress.status, progress.total, progress.succeeded, progress.failed) == (
        BatchStatus.ENDED, 3, 3, 0)
    results = by_id(await batches.results(spec, name))
    assert sorted(results) == ["item-1", "item-2", "item-3"]
    for i in (1, 2, 3):
        r = results[f"item-{i}"]
        assert r.error is None and r.message is not None
        same_answer(r.message, await sync_answer(chat, ask(i)))
        assert r.usage == Usage.from_message(r.message)
        assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert dict(emu.batches.paid) == {"item-1": 1, "item-2": 1, "item-3": 1}


async def test_tools_survive(emu: ProviderEmulator, spec: ModelSpec,
                             batches: GeminiBatchClient,
                             chat: ChatGoogleGenerativeAI) -> None:
    model = chat.bind_tools([GetWeather], tool_choice="GetWeather")
    name = await submit(batches, spec, model, 2)
    (r1, r2) = sorted(await batches.results(spec, name), key=lambda r: r.custom_id)
    assert r1.message is not None and r2.message is not None
    call = r1.message.tool_calls[0]
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])
    same_answer(r1.message, await sync_answer(model, ask(1)))
    same_answer(r2.message, await sync_answer(model, ask(2)))


async def test_structured_output_survives(emu: ProviderEmulator, spec: ModelSpec,
                                          batches: GeminiBatchClient,
                                          chat: ChatGoogleGenerativeAI) -> None:
    # Gemini's native JSON schema output, as with_structured_output(method="json_schema")
    # binds it (its tracing-only key included: the batch line drops it, as ainvoke does).
    structured = chat.with_structured_output(Person, method="json_schema")
    model = structured.first  # type: ignore[attr-defined]  # the bound chat model
    body = batches.request_body(model, ask(1), None, {})
    assert body["generationConfig"]["responseMimeType"] == "application/json"
    assert body["generationConfig"]["responseJsonSchema"]["title"] == "Person"
    name = await submit(batches, spec, model, 1)
    (r,) = await batches.results(spec, name)
    assert r.message is not None
    assert Person.model_validate_json(str(r.message.content)) == await structured.ainvoke(ask(1))
    sync = await model.ainvoke(ask(1))
    assert (r.message.content, r.message.usage_metadata) == (sync.content, sync.usage_metadata)

    # frugalflow's own structured output: the schema as a forced tool.
    forced = chat.bind_tools([Person], tool_choice="Person")
    name = await submit(batches, spec, forced, 1, batch_id="ffb_2")
    (r,) = await batches.results(spec, name)
    assert r.message is not None
    Person.model_validate(r.message.tool_calls[0]["args"])
    same_answer(r.message, await sync_answer(forced, ask(1)))


@pytest.mark.parametrize(("kind", "error"), [
    ("rate_limit", ff.RateLimitError),
    ("overloaded", ff.ProviderOverloadedError),
    ("server_error", ff.ProviderOverloadedError),
    ("invalid_request", ff.InvalidRequestError),
    ("context_length", ff.ContextLengthError),
])
async def test_item_errors(emu: ProviderEmulator, spec: ModelSpec, batches: GeminiBatchClient,
                           chat: ChatGoogleGenerativeAI, kind: str,
                           error: type[ff.ModelAPIError]) -> None:
    emu.batches.script("gemini", fail_items={2}, item_error=kind)
    name = await submit(batches, spec, chat, 3)
    progress = await batches.progress(spec, name)
    assert (progress.status, progress.succeeded, progress.failed) == (BatchStatus.ENDED, 2, 1)
    results = by_id(await batches.results(spec, name))
    bad = results["item-2"]
    assert bad.message is None and bad.usage is None
    assert type(bad.error) is error
    assert (bad.error.provider, bad.error.model) == ("google", MODEL)
    assert "\n" not in str(bad.error) and SECRET not in str(bad.error)
    assert results["item-1"].message is not None and results["item-3"].message is not None
    assert dict(emu.batches.paid) == {"item-1": 1, "item-3": 1}


async def test_expiry_answers_some_the_rest_unanswered(
        emu: ProviderEmulator, spec: ModelSpec, batches: GeminiBatchClient,
        chat: ChatGoogleGenerativeAI) -> None:
    emu.batches.script("gemini", delay=None, expire=True, answered=2)
    name = await submit(batches, spec, chat, 5)
    emu.batches.release()
    progress = await batches.progress(spec, name)
    assert (progress.status, progress.total, progress.succeeded) == (BatchStatus.EXPIRED, 5, 2)
    results = by_id(await batches.results(spec, name))
    assert sorted(results) == [f"item-{i}" for i in range(1, 6)]
    for i in (1, 2):
        assert results[f"item-{i}"].message is not None
    for i in (3, 4, 5):
        r = results[f"item-{i}"]
        assert isinstance(r.error, ff.UnansweredError) and r.usage is None
        assert "expired" in str(r.error)
    assert dict(emu.batches.paid) == {"item-1": 1, "item-2": 1}

    # Another process (a restart) reads the answered items; the rest are simply absent.
    again = GeminiBatchClient(spec)
    try:
        assert sorted(r.custom_id for r in await again.results(spec, name)) == [
            "item-1", "item-2"]
    finally:
        await again.aclose()


async def test_failed_batch(emu: ProviderEmulator, spec: ModelSpec, batches: GeminiBatchClient,
                            chat: ChatGoogleGenerativeAI) -> None:
    emu.batches.script("gemini", fail=True)
    name = await submit(batches, spec, chat, 2)
    progress = await batches.progress(spec, name)
    assert progress.status is BatchStatus.FAILED
    assert progress.error and "\n" not in progress.error and name in progress.error
    results = by_id(await batches.results(spec, name))
    assert all(isinstance(r.error, ff.UnansweredError) for r in results.values())
    assert not emu.batches.paid


async def test_cancel_before_the_end(emu: ProviderEmulator, spec: ModelSpec,
                                     batches: GeminiBatchClient,
                                     chat: ChatGoogleGenerativeAI) -> None:
    emu.batches.script("gemini", delay=None)
    name = await submit(batches, spec, chat, 3)
    await batches.cancel(spec, name)
    emu.batches.release()  # too late: it stays cancelled
    assert (await batches.progress(spec, name)).status is BatchStatus.CANCELLED
    results = await batches.results(spec, name)
    assert len(results) == 3
    assert all(isinstance(r.error, ff.UnansweredError) and r.usage is None for r in results)
    assert not emu.batches.paid


async def test_find(emu: ProviderEmulator, spec: ModelSpec, batches: GeminiBatchClient,
                    chat: ChatGoogleGenerativeAI) -> None:
    emu.batches.script("gemini", delay=None, times=None)
    names = [await submit(batches, spec, chat, 1, batch_id=f"ffb_{i}") for i in range(3)]
    assert await batches.find(spec, "ffb_1") == names[1]
    assert await batches.find(spec, "ffb_unknown") is None
    # A fresh client (after a restart) finds it by the display name alone.
    again = GeminiBatchClient(spec)
    try:
        assert await again.find(spec, "ffb_0") == names[0]
    finally:
        await again.aclose()


async def test_a_create_whose_answer_is_lost_makes_one_batch(
        emu: ProviderEmulator, spec: ModelSpec, batches: GeminiBatchClient,
        chat: ChatGoogleGenerativeAI) -> None:
    """The provider created the batch, the client saw a reset: one attempt, no second
    batch; `find` names it by its display name."""
    emu.batches.fault("gemini", "reset_after")
    with pytest.raises(ff.ModelAPIError):
        await submit(batches, spec, chat, 2, batch_id="ffb_lost")
    [made] = emu.batches.listed("gemini")
    assert await batches.find(spec, "ffb_lost") is not None
    assert sorted(emu.batches.paid.values()) == [1, 1] and made.done


async def test_list_pages(emu: ProviderEmulator, spec: ModelSpec, batches: GeminiBatchClient,
                          chat: ChatGoogleGenerativeAI) -> None:
    from google import genai
    from google.genai import types

    names = [await submit(batches, spec, chat, 1, batch_id=f"ffb_{i}") for i in range(5)]
    sdk = genai.Client(api_key="test-key",
                       http_options=types.HttpOptions(base_url=emu.base_url("gemini")))
    try:
        pager = await sdk.aio.batches.list(config={"page_size": 2})
        assert len(pager.page) == 2
        listed = [job.name async for job in pager]
        assert listed == names[::-1]
        job = await sdk.aio.batches.get(name=names[0])
        assert job.display_name == "ffb_0" and job.state == types.JobState.JOB_STATE_SUCCEEDED
        assert job.model == f"models/{MODEL}"
    finally:
        await sdk.aio.aclose()
        sdk.close()


async def test_errors_name_no_secret(emu: ProviderEmulator, spec: ModelSpec,
                                     batches: GeminiBatchClient) -> None:
    with pytest.raises(ff.ModelAPIError) as info:
        await batches.progress(spec, "batches/nope")
    assert info.value.status_code == 404
    assert SECRET not in str(info.value) and SECRET not in (info.value.body or "")
    emu.require_key = True  # a request without a key is refused; ours has one
    assert await batches.find(spec, "ffb_none") is None


async def test_missing_key(monkeypatch: pytest.MonkeyPatch, spec: ModelSpec) -> None:
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(ff.AuthenticationError, match=KEY_ENV):
        GeminiBatchClient(spec)


async def test_the_registry_gives_this_client(spec: ModelSpec) -> None:
    from frugalflow.batches import batch_client, batch_wire_format, close_batch_clients

    assert batch_wire_format(spec) == "gemini"
    made = batch_client(spec)
    try:
        assert isinstance(made, GeminiBatchClient) and batch_client(spec) is made
        assert made.provider == "google"
    finally:
        await close_batch_clients()
