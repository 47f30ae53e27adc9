"""Anthropic's Message Batches over the wire: frugalflow's batch client (the real `anthropic`
SDK and ChatAnthropic) against the emulator's batch desk, and the SDK's own calls."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anthropic
import httpx2
import pytest
from langchain_anthropic import ChatAnthropic
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.runnables import Runnable
from pydantic import BaseModel

from frugalflow import exceptions as ff
from frugalflow.batches import BatchRequest, ItemResult
from frugalflow.batches.anthropic import AnthropicBatchClient, client, item_id, wire_custom_id
from frugalflow.catalog import ModelSpec
from frugalflow.statuses import BatchStatus
from frugalflow.testing.emulator import EMULATOR_KEY_ENV, ProviderEmulator, emulated_catalog
from frugalflow.usage import Usage
from provider_clients import forget_provider_clients

KEY = "sk-ant-test-batch-secret-0123456789"
HAIKU = "anthropic/claude-haiku-4-5"


class Person(BaseModel):
    name: str
    age: int


def get_weather(city: str) -> str:
    """The weather in a city."""
    return f"sunny in {city}"


@pytest.fixture
async def emu(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ProviderEmulator]:
    monkeypatch.setenv(EMULATOR_KEY_ENV, KEY)
    async with ProviderEmulator(seed=0) as server:
        yield server
    forget_provider_clients()


@pytest.fixture
def spec(emu: ProviderEmulator) -> ModelSpec:
    return emulated_catalog(emu, [HAIKU])[HAIKU]


@pytest.fixture
async def batches(spec: ModelSpec) -> AsyncIterator[AnthropicBatchClient]:
    c = client(spec)
    yield c
    await c.aclose()


@pytest.fixture
async def chat(spec: ModelSpec) -> AsyncIterator[ChatAnthropic]:
    """The catalog entry's ChatAnthropic, as a synchronous call would use it."""
    model = spec.build()
    assert isinstance(model, ChatAnthropic)
    yield model
    await spec.adapter.aclose(model)


@pytest.fixture
async def sdk(emu: ProviderEmulator) -> AsyncIterator[anthropic.AsyncAnthropic]:
    c = anthropic.AsyncAnthropic(api_key=KEY, base_url=emu.base_url("anthropic"), max_retries=0)
    yield c
    await c.close()


def line(batches: AnthropicBatchClient, model: Runnable[Any, Any], prompt: str,
         custom_id: str) -> BatchRequest:
    messages: Sequence[BaseMessage] = [HumanMessage(prompt)]
    return BatchRequest(custom_id, batches.request_body(model, messages, None, {}))


def by_id(results: list[ItemResult]) -> dict[str, ItemResult]:
    return {r.custom_id: r for r in results}


def paid(emu: ProviderEmulator) -> dict[str, int]:
    """Items paid per frugalflow item id (the desk counts the wire's tagged ids)."""
    out: dict[str, int] = {}
    for cid, n in emu.batches.paid.items():
        out[item_id(cid)] = out.get(item_id(cid), 0) + n
    return out


def same_answer(batched: AIMessage, sync: AIMessage) -> None:
    """Equal as a synchronous call's answer, except the ids each call gets."""
    assert batched.content == sync.content
    assert batched.tool_calls == sync.tool_calls
    assert batched.usage_metadata == sync.usage_metadata
    meta = {k: v for k, v in batched.response_metadata.items() if k != "id"}
    assert meta == {k: v for k, v in sync.response_metadata.items() if k != "id"}


# -- the round trip ---------------------------------------------------------------------------


async def test_round_trip_equals_the_synchronous_call(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient, chat: ChatAnthropic,
) -> None:
    emu.batches.script("anthropic", delay=None)
    prompts = {"item-1": "Summarise the history of tea.", "item-2": "Name three rivers."}
    reqs = [line(batches, chat, p, cid) for cid, p in prompts.items()]
    assert all("stream" not in r.body for r in reqs)
    assert reqs[0].body["model"] == "claude-haiku-4-5"
    json.dumps([r.body for r in reqs])  # plain JSON

    pid = await batches.submit(spec, reqs, batch_id="b-round-trip")
    progress = await batches.progress(spec, pid)
    assert (progress.status, progress.total, progress.succeeded) == (BatchStatus.SUBMITTED, 2, 0)
    assert paid(emu) == {}

    emu.batches.release()
    progress = await batches.progress(spec, pid)
    assert (progress.status, progress.total, progress.succeeded, progress.failed) == \
        (BatchStatus.ENDED, 2, 2, 0)
    results = by_id(await batches.results(spec, pid))
    assert set(results) == set(prompts)
    for cid, prompt in prompts.items():
        sync = await chat.ainvoke(prompt)
        got = results[cid]
        assert got.error is None and got.message is not None
        same_answer(got.message, sync)
        assert got.usage == Usage.from_message(sync) and got.usage is not None
        assert got.usage.input_tokens > 0 and got.usage.requests == 1
    assert paid(emu) == {"item-1": 1, "item-2": 1}
    # the wire carried the tagged ids, in the SDK's own batch shape
    b = emu.batches.batches[pid]
    assert [cid for cid, _ in b.requests] == [wire_custom_id("b-round-trip", c) for c in prompts]


async def test_tools_and_structured_output_survive_the_batch_line(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient, chat: ChatAnthropic,
) -> None:
    tools = chat.bind_tools([get_weather])
    structured = chat.with_structured_output(Person, method="json_schema")
    forced = chat.with_structured_output(Person, method="function_calling")
    asks: list[tuple[str, Runnable[Any, Any], str]] = [
        ("tools", tools, "What is the weather in Paris?"),
        ("schema", structured, "Alice is 31."),
        ("forced", forced, "Bob is 40."),
    ]
    reqs = [line(batches, model, prompt, cid) for cid, model, prompt in asks]
    assert reqs[0].body["tools"][0]["name"] == "get_weather"
    assert reqs[1].body["output_config"]["format"]["type"] == "json_schema"
    assert reqs[2].body["tool_choice"] == {"type": "tool", "name": "Person"}
    assert all("ls_structured_output_format" not in r.body for r in reqs)

    pid = await batches.submit(spec, reqs, batch_id="b-tools")
    assert (await batches.progress(spec, pid)).status == BatchStatus.ENDED
    results = by_id(await batches.results(spec, pid))

    sync_tools = await tools.ainvoke("What is the weather in Paris?")
    got = results["tools"].message
    assert got is not None and got.tool_calls and got.tool_calls[0]["name"] == "get_weather"
    same_answer(got, sync_tools)

    schema_msg = results["schema"].message
    assert schema_msg is not None
    assert Person.model_validate_json(schema_msg.text) == await structured.ainvoke("Alice is 31.")

    forced_msg = results["forced"].message
    assert forced_msg is not None and forced_msg.tool_calls[0]["name"] == "Person"
    assert Person.model_validate(forced_msg.tool_calls[0]["args"]) == \
        await forced.ainvoke("Bob is 40.")


async def test_a_batch_may_mix_models(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient, chat: ChatAnthropic,
) -> None:
    sonnet = ChatAnthropic(model="claude-sonnet-4-6", base_url=emu.base_url("anthropic"),
                           api_key=KEY, max_retries=0)
    try:
        reqs = [line(batches, chat, "Hello there.", "haiku"),
                line(batches, sonnet, "Hello there.", "sonnet")]
        pid = await batches.submit(spec, reqs, batch_id="b-mixed")
        results = by_id(await batches.results(spec, pid))
        haiku_msg, sonnet_msg = results["haiku"].message, results["sonnet"].message
        assert haiku_msg is not None and sonnet_msg is not None
        assert haiku_msg.response_metadata["model"] == "claude-haiku-4-5"
        assert sonnet_msg.response_metadata["model"] == "claude-sonnet-4-6"
        same_answer(sonnet_msg, await sonnet.ainvoke("Hello there."))
    finally:
        if "_async_client" in sonnet.__dict__:
            await sonnet._async_client.close()


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "error"), [
    ("rate_limit", ff.RateLimitError),
    ("overloaded", ff.ProviderOverloadedError),
    ("server_error", ff.ProviderOverloadedError),
    ("context_length", ff.ContextLengthError),
    ("invalid_request", ff.InvalidRequestError),
])
async def test_per_item_errors_by_type(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient, chat: ChatAnthropic,
    kind: str, error: type[ff.ModelAPIError],
) -> None:
    emu.batches.script("anthropic", fail_items={2}, item_error=kind)
    reqs = [line(batches, chat, f"Question {i}.", f"q{i}") for i in (1, 2, 3)]
    pid = await batches.submit(spec, reqs, batch_id=f"b-{kind}")
    progress = await batches.progress(spec, pid)
    assert (progress.status, progress.succeeded, progress.failed) == (BatchStatus.ENDED, 2, 1)
    results = by_id(await batches.results(spec, pid))
    bad = results["q2"]
    assert type(bad.error) is error and bad.message is None and bad.usage is None
    assert (bad.error.provider, bad.error.model) == ("anthropic", "claude-haiku-4-5")
    assert "\n" not in str(bad.error) and KEY not in str(bad.error)
    assert results["q1"].message is not None and results["q3"].message is not None
    assert paid(emu) == {"q1": 1, "q3": 1}


async def test_expiry_answers_some_and_leaves_the_rest_unanswered(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient, chat: ChatAnthropic,
) -> None:
    emu.batches.script("anthropic", delay=None, expire=True, answered=1)
    reqs = [line(batches, chat, f"Question {i}.", f"q{i}") for i in (1, 2, 3)]
    pid = await batches.submit(spec, reqs, batch_id="b-expiry")
    assert (await batches.progress(spec, pid)).status == BatchStatus.SUBMITTED
    emu.batches.release()
    progress = await batches.progress(spec, pid)
    assert (progress.status, progress.total, progress.succeeded) == (BatchStatus.EXPIRED, 3, 1)
    results = by_id(await batches.results(spec, pid))
    assert results["q1"].message is not None and results["q1"].usage is not None
    for cid in ("q2", "q3"):
        assert isinstance(results[cid].error, ff.UnansweredError)
        assert results[cid].usage is None
    assert paid(emu) == {"q1": 1}


async def test_a_refused_batch_is_a_one_line_error_at_submit(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient, chat: ChatAnthropic,
    sdk: anthropic.AsyncAnthropic,
) -> None:
    emu.batches.script("anthropic", fail=True)
    with pytest.raises(ff.InvalidRequestError) as caught:
        await batches.submit(spec, [line(batches, chat, "Hi.", "q1")], batch_id="b-refused")
    text = str(caught.value)
    assert "\n" not in text and KEY not in text and "b-refused" in text
    assert caught.value.status_code == 400 and caught.value.provider == "anthropic"
    assert [b async for b in sdk.messages.batches.list()] == []  # nothing kept, nothing paid
    assert paid(emu) == {}
    assert await batches.find(spec, "b-refused") is None


async def test_cancel_before_the_end_pays_nothing(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient, chat: ChatAnthropic,
    sdk: anthropic.AsyncAnthropic,
) -> None:
    emu.batches.script("anthropic", delay=None)
    reqs = [line(batches, chat, f"Question {i}.", f"q{i}") for i in (1, 2)]
    pid = await batches.submit(spec, reqs, batch_id="b-cancel")
    cancelling = await sdk.messages.batches.cancel(pid)  # what the SDK sees at once
    assert cancelling.processing_status == "canceling" and cancelling.cancel_initiated_at
    await batches.cancel(spec, pid)  # again, through the client: no harm
    emu.batches.release()  # too late: nothing is answered
    progress = await batches.progress(spec, pid)
    assert (progress.status, progress.total, progress.succeeded) == (BatchStatus.CANCELLED, 2, 0)
    results = await batches.results(spec, pid)
    assert len(results) == 2
    assert all(isinstance(r.error, ff.UnansweredError) and r.usage is None for r in results)
    assert paid(emu) == {}


# -- finding a batch again --------------------------------------------------------------------


async def test_find_recognises_a_sent_batch(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient, chat: ChatAnthropic,
) -> None:
    emu.batches.script("anthropic", delay=None, times=2)
    other = await batches.submit(spec, [line(batches, chat, "Other.", "o1")], batch_id="b-other")
    pid = await batches.submit(spec, [line(batches, chat, "Mine.", "m1")], batch_id="b-mine")
    assert await batches.find(spec, "b-mine") == pid  # this process sent it

    fresh = client(spec)  # a restarted process: it remembers nothing
    try:
        # Still in progress: Anthropic shows no line of it, so find cannot say None.
        with pytest.raises(ff.ModelAPIError, match="cannot tell yet"):
            await fresh.find(spec, "b-mine")
        # ...unless no batch in progress has the row's item count
        assert await fresh.find(spec, "b-mine", items=7) is None
        # ...or none was created since the row was written
        later = datetime.now(UTC) + timedelta(hours=1)
        assert await fresh.find(spec, "b-mine", since=later) is None
        emu.batches.release()
        assert await fresh.find(spec, "b-mine") == pid  # its lines carry the tag
        assert await fresh.find(spec, "b-other") == other
        assert await fresh.find(spec, "b-unknown") is None
    finally:
        await fresh.aclose()


@pytest.mark.parametrize("kind", ["reset_after", "timeout_after"])
async def test_a_create_whose_answer_is_lost_makes_one_batch(
    emu: ProviderEmulator, spec: ModelSpec, chat: ChatAnthropic, kind: str,
) -> None:
    """The provider created the batch, the client saw a reset or timed out: not created
    again (an SDK retry would make a second batch, paid in full); `find` cannot tell while
    it runs, and names it once it ended."""
    emu.batches.script("anthropic", delay=None)
    emu.batches.fault("anthropic", kind)
    bc = AnthropicBatchClient(spec, timeout=0.5)
    try:
        with pytest.raises(ff.ModelAPIError):
            await bc.submit(spec, [line(bc, chat, "Once.", "q1")], batch_id="b-lost")
        [made] = emu.batches.listed("anthropic")
        with pytest.raises(ff.ModelAPIError, match="cannot tell yet"):
            await bc.find(spec, "b-lost", items=1)
        emu.batches.release()
        assert await bc.find(spec, "b-lost", items=1) == made.id
    finally:
        await bc.aclose()
    assert paid(emu) == {"q1": 1}


# -- the SDK against the emulator -------------------------------------------------------------


async def test_the_sdk_pages_through_batches(
    emu: ProviderEmulator, sdk: anthropic.AsyncAnthropic,
) -> None:
    params: Any = {"model": "claude-haiku-4-5", "max_tokens": 64,
                   "messages": [{"role": "user", "content": "Hi."}]}
    made = [await sdk.messages.batches.create(requests=[{"custom_id": f"r{i}", "params": params}])
            for i in range(5)]
    newest_first = [b.id for b in reversed(made)]
    assert [b.id async for b in sdk.messages.batches.list(limit=2)] == newest_first
    page = await sdk.messages.batches.list(limit=2)
    assert [b.id for b in page.data] == newest_first[:2] and page.has_next_page()
    older = await page.get_next_page()
    assert [b.id for b in older.data] == newest_first[2:4]
    newer = await sdk.messages.batches.list(limit=2, before_id=newest_first[3])
    assert [b.id for b in newer.data] == newest_first[1:3]
    one = await sdk.messages.batches.retrieve(made[0].id)
    assert (one.type, one.processing_status, one.request_counts.succeeded) == \
        ("message_batch", "ended", 1)
    assert one.ended_at is not None and one.expires_at > one.created_at
    assert one.results_url is not None and one.results_url.endswith(f"{one.id}/results")
    lines = [r async for r in await sdk.messages.batches.results(one.id)]
    assert [(r.custom_id, r.result.type) for r in lines] == [("r0", "succeeded")]
    deleted = await sdk.messages.batches.delete(one.id)
    assert deleted.id == one.id
    with pytest.raises(anthropic.NotFoundError):
        await sdk.messages.batches.retrieve(one.id)


@pytest.mark.parametrize(("requests", "says"), [
    ([{"custom_id": "a", "params": "P"}, {"custom_id": "a", "params": "P"}], "Duplicate custom_id"),
    ([{"custom_id": "not valid!", "params": "P"}], "should match pattern"),
    ([{"custom_id": "a"}], "params: Field required"),
    ([{"custom_id": "a", "params": {"model": "claude-haiku-4-5", "messages": []}}],
     "max_tokens: Field required"),
    ([], "at least 1 item"),
])
async def test_the_emulator_validates_like_anthropic(
    emu: ProviderEmulator, sdk: anthropic.AsyncAnthropic, requests: list[dict[str, Any]],
    says: str,
) -> None:
    params = {"model": "claude-haiku-4-5", "max_tokens": 64,
              "messages": [{"role": "user", "content": "Hi."}]}
    body = [{**r, "params": params} if r.get("params") == "P" else r for r in requests]
    with pytest.raises(anthropic.BadRequestError) as caught:
        await sdk.messages.batches.create(requests=body)  # type: ignore[arg-type]
    assert says in caught.value.message
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert emu.batches.batches == {}


async def test_results_of_a_batch_in_progress_are_refused(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient, chat: ChatAnthropic,
) -> None:
    emu.batches.script("anthropic", delay=None)
    pid = await batches.submit(spec, [line(batches, chat, "Hi.", "q1")], batch_id="b-early")
    with pytest.raises(ff.ModelAPIError) as caught:
        await batches.results(spec, pid)
    assert "\n" not in str(caught.value) and KEY not in str(caught.value)
    with pytest.raises(ff.ModelAPIError):
        await batches.progress(spec, "msgbatch_missing")


async def test_beta_lines_go_through_the_beta_endpoint(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient,
) -> None:
    beta = ChatAnthropic(model="claude-haiku-4-5", base_url=emu.base_url("anthropic"),
                         api_key=KEY, max_retries=0, betas=["token-efficient-tools-2025-02-19"])
    try:
        req = line(batches, beta, "Hello.", "q1")
        assert req.body["betas"] == ["token-efficient-tools-2025-02-19"]  # as the sync call
        pid = await batches.submit(spec, [req], batch_id="b-beta")
        sent = emu.batches.batches[pid].requests[0][1]
        assert "betas" not in sent  # a header of the batch, not a param of its line
        got = by_id(await batches.results(spec, pid))["q1"].message
        assert got is not None
        same_answer(got, await beta.ainvoke("Hello."))
    finally:
        if "_async_client" in beta.__dict__:
            await beta._async_client.close()


async def test_the_key_stays_out_of_sight(
    emu: ProviderEmulator, spec: ModelSpec, batches: AnthropicBatchClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert KEY not in repr(batches)
    monkeypatch.delenv(EMULATOR_KEY_ENV)
    with pytest.raises(ff.AuthenticationError, match=EMULATOR_KEY_ENV):
        client(spec)
    # an answer that echoes the key (as some 401s do) is scrubbed from errors
    scrubbed = batches._error(anthropic.AuthenticationError(
        f"invalid x-api-key {KEY}", response=httpx2.Response(
            401, request=httpx2.Request("POST", "http://127.0.0.1/")),
        body={"type": "error", "error": {"type": "authentication_error",
                                         "message": f"invalid x-api-key {KEY}"}}),
        spec, "batch b-x refused")
    assert isinstance(scrubbed, ff.AuthenticationError)
    assert KEY not in str(scrubbed) and KEY not in (scrubbed.body or "")
    assert "[redacted]" in str(scrubbed)


async def test_the_registry_gives_this_client(spec: ModelSpec) -> None:
    from frugalflow.batches import batch_client, close_batch_clients

    made = batch_client(spec)
    try:
        assert isinstance(made, AnthropicBatchClient) and made.provider == "anthropic"
        assert batch_client(spec) is made  # shared per base URL and key variable
    finally:
        await close_batch_clients()
