"""OpenAI's Batch API over the wire: frugalflow's batch client (the real `openai` SDK, lines
made and answers read by the real ChatOpenAI) against the emulator's Files + Batches API.

Batches are scripted on the emulator's desk (`delay=None` + `release()`): no sleeps.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from tool_schemas import GetWeather, Person
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers.openai_tools import PydanticToolsParser
from langchain_core.runnables import RunnableBinding
from langchain_openai import ChatOpenAI
from langchain_openai.chat_models import _client_utils as lc_openai_clients

from frugalflow import exceptions as ff
from frugalflow.batches import BatchRequest, batch_client, close_batch_clients
from frugalflow.batches.openai import METADATA_KEY, OpenAIBatchClient, client
from frugalflow.catalog import ModelSpec
from frugalflow.statuses import BatchStatus
from frugalflow.testing.emulator import EMULATOR_KEY_ENV, ProviderEmulator, emulated_catalog
from frugalflow.usage import Usage

MODEL = "gpt-4o-mini"
KEY = "sk-emulator-secret-0123456789"



_MODELS: list[ChatOpenAI] = []


@pytest.fixture
async def emu() -> AsyncIterator[ProviderEmulator]:
    async with ProviderEmulator(seed=0) as server:
        try:
            yield server
        finally:  # the test's clients close before the server does
            while _MODELS:
                m = _MODELS.pop()
                await m.root_async_client.close()
                m.root_client.close()
            # ChatOpenAI caches its httpx clients per base URL; the next test's port differs.
            # (Only langchain-openai's: importing langchain-anthropic costs seconds.)
            lc_openai_clients._cached_async_httpx_client.cache_clear()
            lc_openai_clients._cached_sync_httpx_client.cache_clear()


@pytest.fixture
def spec(emu: ProviderEmulator, monkeypatch: pytest.MonkeyPatch) -> ModelSpec:
    monkeypatch.setenv(EMULATOR_KEY_ENV, KEY)
    return emulated_catalog(emu, [f"openai/{MODEL}"])[f"openai/{MODEL}"]


@pytest.fixture
async def batches(spec: ModelSpec) -> AsyncIterator[OpenAIBatchClient]:
    bc = client(spec)
    yield bc
    await bc.aclose()


def chat(emu: ProviderEmulator, **kwargs: Any) -> ChatOpenAI:
    """The real ChatOpenAI pointed at the emulator (closed after the test)."""
    m = ChatOpenAI(model=MODEL, base_url=emu.base_url("openai"), api_key="test-key",
                   max_retries=0, timeout=5.0, stream_usage=True, **kwargs)
    _MODELS.append(m)
    return m


def asks(n: int) -> list[list[BaseMessage]]:
    return [[SystemMessage("Answer briefly."), HumanMessage(f"Question number {i}: why?")]
            for i in range(n)]


def requests_for(bc: OpenAIBatchClient, model: Any, conversations: list[list[BaseMessage]],
                 **kwargs: Any) -> list[BatchRequest]:
    return [BatchRequest(f"item-{i}", bc.request_body(model, msgs, None, dict(kwargs)))
            for i, msgs in enumerate(conversations)]


def assert_same_answer(got: AIMessage, want: AIMessage) -> None:
    """A batch answer is the answer the synchronous call gets (but its id and time)."""
    assert got.content == want.content
    assert got.tool_calls == want.tool_calls
    assert got.usage_metadata == want.usage_metadata
    assert got.additional_kwargs == want.additional_kwargs
    for key in ("finish_reason", "model_name", "model_provider", "token_usage",
                "service_tier", "system_fingerprint"):
        assert got.response_metadata.get(key) == want.response_metadata.get(key), key


# -- the round trip ---------------------------------------------------------------------------


async def test_round_trip_answers_equal_the_synchronous_calls(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient) -> None:
    model = chat(emu)
    conversations = asks(3)
    reqs = requests_for(batches, model, conversations)
    assert all("stream" not in r.body and r.body["model"] == MODEL for r in reqs)
    json.dumps([r.body for r in reqs])  # JSON-safe
    emu.batches.script("openai", delay=None)

    pid = await batches.submit(spec, reqs, batch_id="ffb-round")
    waiting = await batches.progress(spec, pid)
    assert (waiting.status, waiting.total, waiting.succeeded) == (BatchStatus.SUBMITTED, 3, 0)
    assert not emu.batches.paid

    emu.batches.release()
    done = await batches.progress(spec, pid)
    assert (done.status, done.total, done.succeeded, done.failed) == (BatchStatus.ENDED, 3, 3, 0)
    results = await batches.results(spec, pid)
    assert [r.custom_id for r in results] == ["item-0", "item-1", "item-2"]
    for r, msgs in zip(results, conversations, strict=True):
        assert r.error is None and r.message is not None
        want = await model.ainvoke(msgs)
        assert_same_answer(r.message, want)
        assert r.usage == Usage.from_message(want) and r.usage is not None
        assert r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    assert emu.batches.paid == {"item-0": 1, "item-1": 1, "item-2": 1}
    # What went over the wire: one JSONL line per request, metadata naming frugalflow's batch.
    b = emu.batches.batches[pid]
    assert b.metadata == {METADATA_KEY: "ffb-round"}
    assert [cid for cid, _ in b.requests] == ["item-0", "item-1", "item-2"]


async def test_tools_and_structured_output_survive_the_batch_line(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient) -> None:
    model = chat(emu)
    weather = model.bind_tools([GetWeather])
    forced_chain = model.with_structured_output(Person, method="function_calling")
    forced = forced_chain.first  # type: ignore[attr-defined]
    schema_chain = model.with_structured_output(Person, method="json_schema")
    schema = schema_chain.first  # type: ignore[attr-defined]
    assert isinstance(forced, RunnableBinding) and isinstance(schema, RunnableBinding)
    msgs = [HumanMessage("What's the weather in Lyon for 3 days? Also: Ada, 36, tags x.")]
    reqs = [BatchRequest("tools", batches.request_body(weather, msgs, None, {})),
            BatchRequest("forced", batches.request_body(forced, msgs, None, {})),
            BatchRequest("schema", batches.request_body(schema, msgs, None, {}))]
    assert reqs[0].body["tools"][0]["function"]["name"] == "GetWeather"
    assert reqs[1].body["tool_choice"]["function"]["name"] == "Person"
    assert reqs[2].body["response_format"]["type"] == "json_schema"
    assert "ls_structured_output_format" not in json.dumps([r.body for r in reqs])

    pid = await batches.submit(spec, reqs, batch_id="ffb-tools")
    assert (await batches.progress(spec, pid)).status == BatchStatus.ENDED
    got = {r.custom_id: r.message for r in await batches.results(spec, pid)}
    for cid, bound in (("tools", weather), ("forced", forced), ("schema", schema)):
        message = got[cid]
        assert message is not None
        want = await bound.ainvoke(msgs)
        if cid == "schema":
            # The sync call parses into the class it was given; a JSON line carries only
            # the schema: the batch answer's `parsed` is the same object as JSON.
            assert want.additional_kwargs["parsed"].model_dump() == \
                message.additional_kwargs["parsed"]
            message.additional_kwargs["parsed"] = want.additional_kwargs["parsed"]
        assert_same_answer(message, want)
    assert got["tools"] is not None and got["tools"].tool_calls[0]["name"] == "GetWeather"
    GetWeather.model_validate(got["tools"].tool_calls[0]["args"])
    assert got["forced"] is not None
    person = PydanticToolsParser(tools=[Person], first_tool_only=True).invoke(got["forced"])
    assert isinstance(person, Person)
    assert got["schema"] is not None and isinstance(got["schema"].content, str)
    Person.model_validate_json(got["schema"].content)
    # ChatOpenAI's own structured-output parser reads the batch answer.
    parser = schema_chain.steps[-1]  # type: ignore[attr-defined]
    assert parser.invoke(got["schema"]) == Person.model_validate_json(got["schema"].content)


async def test_request_body_refuses_what_a_batch_line_cannot_carry(
        emu: ProviderEmulator, batches: OpenAIBatchClient) -> None:
    msgs = [HumanMessage("hi")]
    with pytest.raises(ff.InvalidRequestError, match="Responses API"):
        batches.request_body(chat(emu, use_responses_api=True), msgs, None, {})
    with pytest.raises(ff.InvalidRequestError, match="ChatOpenAI"):
        batches.request_body(FakeListChatModel(responses=["x"]).bind(stop=["y"]), msgs, None, {})
    # stop words and call arguments go into the body as the synchronous call sends them
    body = batches.request_body(chat(emu, temperature=0.2), msgs, ["END"], {"max_tokens": 7})
    assert (body["stop"], body["max_completion_tokens"], body["temperature"]) == (["END"], 7, 0.2)
    # bindings of bindings: every bound argument is in the body, the outer one wins
    nested = chat(emu).bind_tools([GetWeather]).bind(max_tokens=5).bind(max_tokens=9)
    body = batches.request_body(nested, msgs, None, {})
    assert body["tools"][0]["function"]["name"] == "GetWeather"
    assert body["max_completion_tokens"] == 9


# -- failures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "error"), [
    ("rate_limit", ff.RateLimitError),
    ("server_error", ff.ProviderOverloadedError),
    ("overloaded", ff.ProviderOverloadedError),
    ("invalid_request", ff.InvalidRequestError),
    ("context_length", ff.ContextLengthError),
])
async def test_per_item_errors_are_translated(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient, kind: str,
        error: type[ff.ModelAPIError]) -> None:
    emu.batches.script("openai", fail_items={2}, item_error=kind)
    pid = await batches.submit(spec, requests_for(batches, chat(emu), asks(3)),
                               batch_id=f"ffb-{kind}")
    progress = await batches.progress(spec, pid)
    assert (progress.status, progress.succeeded, progress.failed) == (BatchStatus.ENDED, 2, 1)
    results = await batches.results(spec, pid)
    assert [r.message is not None for r in results] == [True, False, True]
    failed = results[1].error
    assert type(failed) is error
    assert (failed.provider, failed.model, failed.status_code) == ("openai", MODEL,
                                                                   failed.status_code)
    assert failed.status_code is not None and failed.status_code >= 400
    assert KEY not in str(failed) and KEY not in (failed.body or "")
    assert results[1].usage is None
    assert emu.batches.paid == {"item-0": 1, "item-2": 1}


async def test_expiry_keeps_the_answered_items_and_reports_the_rest_unanswered(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient) -> None:
    emu.batches.script("openai", delay=None, expire=True, answered=2)
    pid = await batches.submit(spec, requests_for(batches, chat(emu), asks(4)),
                               batch_id="ffb-expire")
    assert (await batches.progress(spec, pid)).status == BatchStatus.SUBMITTED
    emu.batches.release()
    progress = await batches.progress(spec, pid)
    assert (progress.status, progress.succeeded) == (BatchStatus.EXPIRED, 2)
    results = await batches.results(spec, pid)
    assert [r.message is not None for r in results] == [True, True, False, False]
    for r in results[2:]:
        assert isinstance(r.error, ff.UnansweredError) and r.usage is None
        assert "batch_expired" in str(r.error)
        assert (r.error.provider, r.error.model) == ("openai", MODEL)
    assert emu.batches.paid == {"item-0": 1, "item-1": 1}


async def test_a_scripted_batch_failure_is_failed_with_its_reason_and_nothing_paid(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient) -> None:
    emu.batches.script("openai", fail=True)
    pid = await batches.submit(spec, requests_for(batches, chat(emu), asks(2)),
                               batch_id="ffb-fail")
    progress = await batches.progress(spec, pid)
    assert progress.status == BatchStatus.FAILED
    assert progress.error is not None and "token_limit_exceeded" in progress.error
    results = await batches.results(spec, pid)
    assert [type(r.error) for r in results] == [ff.UnansweredError] * 2
    assert not emu.batches.paid


@pytest.mark.parametrize(("line", "code"), [
    ("{not json", "invalid_json_line"),
    (json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]}}),
     "mismatched_model"),
    (json.dumps({"custom_id": "b", "method": "POST", "url": "/v1/embeddings",
                 "body": {"model": MODEL, "input": "x"}}), "invalid_url"),
    (json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                 "body": {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}}),
     "duplicate_custom_id"),
])
async def test_a_bad_input_file_fails_the_batch_with_a_one_line_error(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient, line: str,
        code: str) -> None:
    good = json.dumps({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
                       "body": {"model": MODEL,
                                "messages": [{"role": "user", "content": "hello"}]}})
    sdk = openai.AsyncOpenAI(api_key=KEY, base_url=emu.base_url("openai"), max_retries=0)
    try:
        f = await sdk.files.create(file=("in.jsonl", f"{good}\n{line}\n".encode()),
                                   purpose="batch")
        created = await sdk.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                           completion_window="24h")
        assert created.status == "validating"
        b = await sdk.batches.retrieve(created.id)
    finally:
        await sdk.close()
    assert b.status == "failed" and b.failed_at is not None and b.errors is not None
    assert [(e.code, e.line) for e in b.errors.data or []] == [(code, 2)]
    progress = await batches.progress(spec, created.id)
    assert progress.status == BatchStatus.FAILED
    assert progress.error is not None and "\n" not in progress.error
    assert progress.error.startswith(f"line 2: {code}: ")
    assert not emu.batches.paid


async def test_cancel_before_the_end_pays_nothing(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient) -> None:
    emu.batches.script("openai", delay=None)
    pid = await batches.submit(spec, requests_for(batches, chat(emu), asks(3)),
                               batch_id="ffb-cancel")
    await batches.cancel(spec, pid)
    assert (await batches.progress(spec, pid)).status == BatchStatus.CANCELLED
    emu.batches.release()  # too late: a cancelled batch answers nothing
    results = await batches.results(spec, pid)
    assert all(isinstance(r.error, ff.UnansweredError) and "batch_cancelled" in str(r.error)
               for r in results) and len(results) == 3
    assert not emu.batches.paid
    await batches.cancel(spec, pid)  # cancelling again (or an ended batch) is no error


async def test_cancel_of_an_ended_batch_is_quiet(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient) -> None:
    pid = await batches.submit(spec, requests_for(batches, chat(emu), asks(1)),
                               batch_id="ffb-ended")
    await batches.cancel(spec, pid)
    assert (await batches.progress(spec, pid)).status == BatchStatus.ENDED
    assert emu.batches.paid == {"item-0": 1}


# -- finding a batch, the SDK's own calls --------------------------------------------------------


async def test_find_returns_the_submitted_batch_and_none_for_an_unknown_id(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient) -> None:
    model = chat(emu)
    ids = [await batches.submit(spec, requests_for(batches, model, asks(1)),
                                batch_id=f"ffb-find-{i}") for i in range(3)]
    assert await batches.find(spec, "ffb-find-0") == ids[0]
    assert await batches.find(spec, "ffb-find-2") == ids[2]
    assert await batches.find(spec, "ffb-never-sent") is None
    batches.page_size = 1  # the oldest batch is on the last page
    assert await batches.find(spec, "ffb-find-0") == ids[0]


@pytest.mark.parametrize("kind", ["reset_after", "timeout_after"])
async def test_a_create_whose_answer_is_lost_makes_one_batch_found_later(
        emu: ProviderEmulator, spec: ModelSpec, kind: str) -> None:
    """The provider created the batch, the client saw a reset or timed out: not created
    again (an SDK retry would make a second batch, paid in full); `find` names it."""
    bc = OpenAIBatchClient(spec, timeout=0.5)
    try:
        emu.batches.fault("openai", kind, op="create")
        with pytest.raises(ff.ModelAPIError):
            await bc.submit(spec, requests_for(bc, chat(emu), asks(2)), batch_id="ffb-lost")
        [made] = emu.batches.listed("openai")
        assert await bc.find(spec, "ffb-lost") == made.id
    finally:
        await bc.aclose()
    assert sum(emu.batches.paid.values()) == 2


async def test_an_upload_whose_answer_is_lost_is_not_uploaded_again(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient) -> None:
    emu.batches.fault("openai", "reset_after", op="upload")
    with pytest.raises(ff.ModelAPIError):
        await batches.submit(spec, requests_for(batches, chat(emu), asks(1)), batch_id="ffb-up")
    assert len(emu.batches.files) == 1 and emu.batches.listed("openai") == []
    assert await batches.find(spec, "ffb-up") is None  # so the next tick sends it


async def test_results_of_a_running_batch_are_refused_and_errors_carry_no_key(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient) -> None:
    emu.batches.script("openai", delay=None)
    pid = await batches.submit(spec, requests_for(batches, chat(emu), asks(1)),
                               batch_id="ffb-running")
    with pytest.raises(RuntimeError, match="has not stopped"):
        await batches.results(spec, pid)
    with pytest.raises(ff.ModelAPIError) as caught:
        await batches.progress(spec, "batch_never_made")
    assert caught.value.status_code == 404
    assert (caught.value.provider, caught.value.model) == ("openai", MODEL)
    assert KEY not in str(caught.value) and KEY not in (caught.value.body or "")
    assert not emu.batches.paid


async def test_the_sdk_pages_batches_and_reads_result_files(
        emu: ProviderEmulator, spec: ModelSpec, batches: OpenAIBatchClient) -> None:
    model = chat(emu)
    emu.batches.script("openai", fail_items={1}, item_error="server_error")
    ids = [await batches.submit(spec, requests_for(batches, model, asks(2)),
                                batch_id=f"ffb-page-{i}") for i in range(5)]
    sdk = openai.AsyncOpenAI(api_key=KEY, base_url=emu.base_url("openai"), max_retries=0)
    try:
        first = await sdk.batches.list(limit=2)
        assert [b.id for b in first.data] == ids[::-1][:2] and first.has_more
        seen = [b.id async for b in sdk.batches.list(limit=2)]
        assert seen == ids[::-1]

        b = await sdk.batches.retrieve(ids[0])
        assert b.status == "completed" and b.request_counts is not None
        assert (b.request_counts.total, b.request_counts.completed,
                b.request_counts.failed) == (2, 1, 1)
        assert b.usage is not None and b.usage.input_tokens > 0
        assert b.output_file_id and b.error_file_id and b.completed_at is not None
        out = [json.loads(x) for x in (await sdk.files.content(b.output_file_id)).text.splitlines()]
        err = [json.loads(x) for x in (await sdk.files.content(b.error_file_id)).text.splitlines()]
        assert [(x["custom_id"], x["response"]["status_code"], x["error"]) for x in out] == [
            ("item-1", 200, None)]
        assert out[0]["response"]["body"]["object"] == "chat.completion"
        assert out[0]["id"].startswith("batch_req_") and out[0]["response"]["request_id"]
        assert [(x["custom_id"], x["response"]["status_code"]) for x in err] == [("item-0", 500)]
        assert err[0]["response"]["body"]["error"]["type"] == "server_error"
        info = await sdk.files.retrieve(b.input_file_id)
        assert (info.purpose, info.filename) == ("batch", "frugalflow-ffb-page-0.jsonl")
        lines = (await sdk.files.content(b.input_file_id)).text.splitlines()
        assert [json.loads(x)["url"] for x in lines] == ["/v1/chat/completions"] * 2
    finally:
        await sdk.close()


async def test_batch_client_registry_builds_the_openai_client(
        emu: ProviderEmulator, spec: ModelSpec) -> None:
    made = batch_client(spec)
    try:
        assert isinstance(made, OpenAIBatchClient) and made.base_url == emu.base_url("openai")
        assert batch_client(spec) is made
    finally:
        await close_batch_clients()


def test_a_missing_key_is_an_authentication_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FF_TEST_NO_SUCH_KEY", raising=False)
    spec = ModelSpec(provider="openai", model=MODEL, base_url="http://127.0.0.1:9/v1",
                     api_key_env="FF_TEST_NO_SUCH_KEY")
    with pytest.raises(ff.AuthenticationError, match="FF_TEST_NO_SUCH_KEY"):
        client(spec)


# -- flex ----------------------------------------------------------------------------------------


async def test_flex_service_tier_is_served_and_reported(emu: ProviderEmulator) -> None:
    msgs = [HumanMessage("Summarise the night's reports.")]
    flex = await chat(emu, service_tier="flex").ainvoke(msgs)
    standard = await chat(emu).ainvoke(msgs)
    auto = await chat(emu, service_tier="auto").ainvoke(msgs)
    assert flex.response_metadata["service_tier"] == "flex"
    assert standard.response_metadata["service_tier"] == "default"
    assert auto.response_metadata["service_tier"] == "default"
    assert flex.usage_metadata is not None
    assert flex.usage_metadata["input_token_details"].get("flex") == \
        flex.usage_metadata["input_tokens"]
    sent = [r.body.get("service_tier") for r in emu.requests_for("openai")]
    assert sent == ["flex", None, "auto"]
