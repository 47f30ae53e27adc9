"""LangChain callbacks show the fallback chain: each attempt of a routed call is a child run
(the provider's ls_provider and model id, tokens, cost, the error's class), under the routed
call's run (ls_provider "frugalflow"), under the node, under the graph.

Real LangGraph, the real LangChain integrations talking HTTP to the provider emulator, a
tracer recording the run tree, and LangSmith's own client exporting to a local HTTP server."""

from __future__ import annotations

import asyncio
import json
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, HumanMessage
from langchain_core.tracers.base import AsyncBaseTracer, BaseTracer
from langchain_core.tracers.schemas import Run

from frugalflow import (
    END,
    START,
    BreakerRegistry,
    Catalog,
    FallbackPolicy,
    Flow,
    ModelSpec,
    Needs,
    RoutedChatModel,
    RunContext,
)
from frugalflow.runner import Runner
from frugalflow.testing.emulator import EMULATOR_KEY_ENV, ProviderEmulator, emulated_catalog
from frugalflow.tracing.callbacks import ATTEMPT_TAG, attempt_runs

# The clean-up of catalogs and cached SDK clients after each test, as in test_wire.
from test_wire import CATALOGS, _key  # noqa: E402,F401

KEY = "sk-proj-" + "Zq8" * 16  # the emulator's key: key-shaped, echoed by `auth_echo`
PROMPT = "Summarise the refund policy for order 88231, please."


@pytest.fixture
async def emu(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ProviderEmulator]:
    monkeypatch.setenv(EMULATOR_KEY_ENV, KEY)
    async with ProviderEmulator(seed=5) as server:
        yield server


class Recorder(AsyncBaseTracer):
    """Keeps every finished root run (with its tree) and every token event's run id."""

    def __init__(self) -> None:
        super().__init__()
        self.roots: list[Run] = []
        self.tokens: list[tuple[uuid.UUID, str | None]] = []

    async def _persist_run(self, run: Run) -> None:
        self.roots.append(run)

    async def on_llm_new_token(self, token: Any, *, chunk: Any = None, run_id: uuid.UUID,
                               **kwargs: Any) -> None:
        self.tokens.append((run_id, chunk.message.id if chunk is not None else None))
        await super().on_llm_new_token(token, chunk=chunk, run_id=run_id, **kwargs)


def walk(run: Run) -> Iterator[Run]:
    yield run
    for child in run.child_runs:
        yield from walk(child)


def meta(run: Run) -> dict[str, Any]:
    return dict(run.extra.get("metadata") or {})


def routed_runs(root: Run) -> list[Run]:
    return [r for r in walk(root) if meta(r).get("ls_provider") == "frugalflow"
            and ATTEMPT_TAG not in (r.tags or [])]


def pair(emu: ProviderEmulator) -> tuple[Catalog, ModelSpec, ModelSpec]:
    """(catalog, OpenAI's cheapest model, Anthropic's dearest): first and fallback."""
    cat = emulated_catalog(emu)
    CATALOGS.append(cat)
    price = lambda spec: spec.estimate_cost(100, 100)  # noqa: E731
    first = min((s for s in cat if s.provider == "openai"), key=price)
    second = max((s for s in cat if s.provider == "anthropic"), key=price)
    return cat, first, second


class QA(TypedDict, total=False):
    q: str
    a: str


def qa_flow(first: ModelSpec, second: ModelSpec, *, stream: bool = False) -> Flow[QA]:
    flow: Flow[QA] = Flow("qa", QA)

    async def answer(state: QA, model: RoutedChatModel) -> dict[str, str]:
        if stream:
            text = ""
            async for chunk in model.astream([HumanMessage(state["q"])]):
                text += str(chunk.content)
            return {"a": text}
        reply = await model.ainvoke([HumanMessage(state["q"])])
        return {"a": str(reply.content)}

    flow.add_node("answer", answer, needs=Needs(models=(first.key, second.key)))
    flow.add_edge(START, "answer")
    flow.add_edge("answer", END)
    return flow


POLICY = FallbackPolicy(timeout=3.0, max_retries=0)


def check_chain(root: Run, ctx: RunContext, first: ModelSpec, second: ModelSpec,
                error: str) -> tuple[Run, Run, Run]:
    """The routed run and its two attempts, checked against the run's ledger."""
    (routed,) = routed_runs(root)
    assert meta(routed)["ls_model_name"] == "routed:answer"
    assert meta(routed)["ls_model_type"] == "chat"
    assert meta(routed)["frugalflow_node"] == "answer"
    # graph -> node -> ... -> routed call: its ancestors are the node's run and the graph's
    by_id = {r.id: r for r in walk(root)}
    ancestors, at = [], routed
    while at.parent_run_id is not None:
        at = by_id[at.parent_run_id]
        ancestors.append(at.name)
    assert ancestors[0] == "answer" and ancestors[-1] == root.name == "qa"
    failed, ok = routed.child_runs
    for attempt in (failed, ok):
        assert attempt.parent_run_id == routed.id and attempt.trace_id == root.id
        assert attempt.run_type == "llm" and ATTEMPT_TAG in (attempt.tags or [])
        assert attempt.dotted_order.startswith(routed.dotted_order + ".")
    assert failed.start_time <= failed.end_time <= ok.start_time <= ok.end_time
    assert failed.error is not None and failed.error.startswith(error + "(")
    assert (meta(failed)["ls_provider"], meta(failed)["ls_model_name"]) == ("openai", first.model)
    assert meta(failed)["frugalflow_model"] == first.key and meta(failed)["frugalflow_try"] == 1
    assert ok.error is None
    assert (meta(ok)["ls_provider"], meta(ok)["ls_model_name"]) == ("anthropic", second.model)
    assert meta(ok)["frugalflow_try"] == 2 and meta(ok)["frugalflow_fallback_from"] == first.key
    assert ok.extra["invocation_params"]["model"] == second.model
    # tokens and cost: what the ledger recorded for the answering attempt
    recorded = ctx.usage.attempts[-1]
    assert recorded.usage is not None and recorded.cost_usd > 0
    (generation,) = ok.outputs["generations"][0]
    usage = generation["message"]["kwargs"]["usage_metadata"]
    assert usage["input_tokens"] == recorded.usage.input_tokens
    assert usage["output_tokens"] == recorded.usage.output_tokens
    assert usage["total_cost"] == pytest.approx(recorded.cost_usd)
    summary = ok.outputs["llm_output"]["frugalflow"]
    assert summary["cost_usd"] == pytest.approx(recorded.cost_usd) and summary["outcome"] == "ok"
    assert ok.outputs["llm_output"]["token_usage"]["total_tokens"] == recorded.usage.total_tokens
    return routed, failed, ok


def answered_by(routed: Run) -> str:
    """The model the routed run's output names (an `ainvoke`'s answer carries it)."""
    (answer,) = routed.outputs["generations"][0]
    return str(answer["message"]["kwargs"]["response_metadata"]["frugalflow"]["model"])


def assert_no_secret(recorder: Recorder) -> None:
    dumped = json.dumps([r.model_dump(mode="json") for r in recorder.roots], default=str)
    assert KEY not in dumped and KEY[8:30] not in dumped


async def test_a_flow_run_with_a_fallback_shows_the_chain(emu: ProviderEmulator) -> None:
    cat, first, second = pair(emu)
    app = qa_flow(first, second).compile(cat, policy=POLICY, breakers=BreakerRegistry())
    emu.fault("openai", "auth_echo", times=None)  # a 401 whose body repeats the key
    ctx = app.new_context()
    recorder = Recorder()
    out = await app.ainvoke({"q": PROMPT}, {"callbacks": [recorder]}, context=ctx)
    assert out["a"]
    assert [(a.model, a.error_class) for a in ctx.usage.attempts] == [
        (first.key, "auth"), (second.key, None)]
    (root,) = recorder.roots
    routed, failed, _ = check_chain(root, ctx, first, second, "AuthenticationError")
    assert answered_by(routed) == second.key
    assert "[redacted]" in (failed.error or "")  # the echoed key, scrubbed
    assert_no_secret(recorder)


@pytest.mark.parametrize("kind", ["overloaded", "rate_limit"])
async def test_streamed_calls_put_tokens_on_the_routed_run(
    emu: ProviderEmulator, kind: str
) -> None:
    cat, first, second = pair(emu)
    app = qa_flow(first, second, stream=True).compile(cat, policy=POLICY,
                                                      breakers=BreakerRegistry())
    emu.fault("openai", kind, times=None, retry_after=60.0)
    ctx = app.new_context()
    recorder = Recorder()
    out = await app.ainvoke({"q": PROMPT}, {"callbacks": [recorder]}, context=ctx)
    (root,) = recorder.roots
    error = {"overloaded": "ProviderOverloadedError", "rate_limit": "RateLimitError"}[kind]
    routed, failed, ok = check_chain(root, ctx, first, second, error)
    # every token went to the routed call's run, none to an attempt's
    assert recorder.tokens and {run_id for run_id, _ in recorder.tokens} == {routed.id}
    assert out["a"] == str(routed.outputs["generations"][0][0]["message"]["kwargs"]["content"])
    assert_no_secret(recorder)


async def test_a_broken_stream_keeps_its_tokens_apart_in_messages_mode(
    emu: ProviderEmulator,
) -> None:
    """LangGraph's `messages` mode sees each attempt's tokens under their own id, and no
    attempt's answer a second time (attempt runs are `nostream`)."""
    cat, first, second = pair(emu)
    app = qa_flow(first, second).compile(cat, policy=POLICY, breakers=BreakerRegistry())
    emu.fault("openai", "stream_truncated", after_chunks=4, times=None)
    ctx = app.new_context()
    recorder = Recorder()
    texts: dict[str | None, str] = {}
    async for message, _ in app.astream({"q": PROMPT}, {"callbacks": [recorder]},
                                         stream_mode="messages", context=ctx):
        texts[message.id] = texts.get(message.id, "") + str(message.content)
    assert [(a.model, a.error_class) for a in ctx.usage.attempts] == [
        (first.key, "incomplete"), (second.key, None)]
    assert len(texts) == 2  # the broken attempt's tokens, then the answer's: apart
    (root,) = recorder.roots
    routed, failed, ok = check_chain(root, ctx, first, second, "IncompleteResponseError")
    assert {run_id for run_id, _ in recorder.tokens} == {routed.id}
    assert len({mid for _, mid in recorder.tokens}) == 2


async def test_runner_callbacks_see_every_run(emu: ProviderEmulator, tmp_path: Any) -> None:
    cat, first, second = pair(emu)
    recorder = Recorder()
    runner = Runner(f"sqlite:///{tmp_path / 'runs.db'}", flows=[qa_flow(first, second)],
                    catalog=cat, fallback=POLICY, breakers=BreakerRegistry(),
                    callbacks=[recorder])
    try:
        emu.fault("openai", "unavailable", times=None)
        result = await runner.start("qa", {"q": PROMPT})
        assert result.ok, result.error
        (root,) = recorder.roots
        assert root.id == uuid.UUID(result.run_id)  # the trace is the run
        (routed,) = routed_runs(root)
        failed, ok = routed.child_runs
        assert failed.error is not None and failed.error.startswith("ProviderOverloadedError(")
        record = await runner.get(result.run_id)
        assert [a.model for a in record.attempts] == [first.key, second.key]
        assert ok.outputs["llm_output"]["frugalflow"]["cost_usd"] == pytest.approx(
            record.attempts[-1].cost_usd)
    finally:
        await runner.close()


# -- unit level: the simulator -----------------------------------------------------------


def _sim_catalog() -> Catalog:
    def spec(provider: str, model: str, price: float) -> ModelSpec:
        return ModelSpec(provider=provider, model=model, simulated=True, input_price=price,
                         output_price=price, context_window=100_000,
                         capabilities={"tool_calling": True, "structured_output": True},
                         quality={"writing": 0.8})

    return Catalog([spec("sim-a", "small", 0.1), spec("sim-b", "medium", 1.0)], name="t")


def test_sync_invoke_reports_attempts_too(sim: Any) -> None:
    class SyncRecorder(BaseTracer):
        def __init__(self) -> None:
            super().__init__()
            self.roots: list[Run] = []

        def _persist_run(self, run: Run) -> None:
            self.roots.append(run)

    sim.fail("sim-a/small", "content_filter")
    model = RoutedChatModel(context=RunContext(catalog=_sim_catalog(), policy=POLICY), node="n")
    recorder = SyncRecorder()
    model.invoke([HumanMessage("hi")], config={"callbacks": [recorder]})
    (root,) = recorder.roots
    failed, ok = root.child_runs
    assert failed.error is not None and failed.error.startswith("ContentFilterError(")
    assert (meta(ok)["ls_provider"], meta(ok)["ls_model_name"]) == ("sim-b", "medium")


async def test_a_replayed_answer_is_shown_and_not_counted(sim: Any) -> None:
    async def replay(node: str | None, key: str) -> AIMessage:
        return AIMessage("from before", usage_metadata={
            "input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
            response_metadata={"frugalflow": {"model": "sim-b/medium"}})

    ctx = RunContext(catalog=_sim_catalog(), policy=POLICY, replay=replay)
    model = RoutedChatModel(context=ctx, node="n")
    recorder = Recorder()
    answer = await model.ainvoke([HumanMessage("hi")], config={"callbacks": [recorder]})
    assert answer.content == "from before" and sim.calls["sim-a/small"] == 0
    (root,) = recorder.roots
    (shown,) = root.child_runs
    assert shown.name == "replay" and meta(shown)["frugalflow_replayed"] is True
    assert meta(shown)["ls_model_name"] == "sim-b/medium"
    message = shown.outputs["generations"][0][0]["message"]["kwargs"]
    assert message["content"] == "from before" and message.get("usage_metadata") is None


async def test_a_cancelled_attempt_ends_its_run(sim: Any) -> None:
    sim.fail("sim-a/small", "timeout")  # it hangs
    model = RoutedChatModel(context=RunContext(
        catalog=_sim_catalog(), policy=FallbackPolicy(timeout=None)), node="n")
    recorder = Recorder()
    task = asyncio.create_task(model.ainvoke([HumanMessage("hi")],
                                             config={"callbacks": [recorder]}))
    while sim.calls["sim-a/small"] == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # (LangChain leaves the cancelled routed run itself open: gather() is what is cancelled)
    (root,) = recorder.run_map.values()
    (attempt,) = root.child_runs
    assert attempt.end_time is not None and (attempt.error or "").startswith("CancelledError(")


async def test_no_handler_no_child_manager(sim: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from frugalflow.tracing import callbacks

    built: list[object] = []
    real = callbacks.AttemptRuns.__init__

    def counting(self: Any, parent: Any) -> None:
        built.append(parent)
        real(self, parent)

    monkeypatch.setattr(callbacks.AttemptRuns, "__init__", counting)
    model = RoutedChatModel(context=RunContext(catalog=_sim_catalog(), policy=POLICY), node="n")
    await model.ainvoke([HumanMessage("hi")])
    _ = [c async for c in model.astream([HumanMessage("hi")])]
    assert built == [] and attempt_runs(None) is None
    await model.ainvoke([HumanMessage("hi")], config={"callbacks": [Recorder()]})
    assert len(built) == 1


# -- LangSmith's own client, exporting to a local server ------------------------------------


class _LangSmithServer:
    """A LangSmith API stand-in on 127.0.0.1: /info says "use /runs/batch", and every posted
    or patched run is kept (by id, patches merged in)."""

    def __init__(self) -> None:
        self.runs: dict[str, dict[str, Any]] = {}
        self.bodies: list[bytes] = []
        self.received = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _json(self, payload: Any) -> None:
                body = json.dumps(payload).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:  # noqa: N802
                self._json({"version": "0.10.0", "batch_ingest_config": {
                    "use_multipart_endpoint": False, "scale_up_qsize_trigger": 1000,
                    "scale_up_nthreads_limit": 1, "scale_down_nempty_trigger": 4,
                    "size_limit": 100, "size_limit_bytes": 20_971_520}})

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                server.take(self.path, body)
                self._json({})

            do_PATCH = do_POST  # noqa: N815

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def take(self, path: str, body: bytes) -> None:
        data = json.loads(body) if body else {}
        with self.received:
            self.bodies.append(body)
            if path.endswith("/runs/batch"):
                for run in [*data.get("post", []), *data.get("patch", [])]:
                    self.runs.setdefault(str(run["id"]), {}).update(run)
            elif path.rstrip("/").endswith("/runs"):
                self.runs.setdefault(str(data["id"]), {}).update(data)
            elif "/runs/" in path:
                self.runs.setdefault(path.rsplit("/", 1)[1], {}).update(data)
            self.received.notify_all()


@pytest.fixture
def langsmith_server() -> Iterator[_LangSmithServer]:
    server = _LangSmithServer()
    server.thread.start()
    yield server
    server.http.shutdown()
    server.http.server_close()


@pytest.mark.slow
async def test_langsmith_tracer_exports_the_chain(
    emu: ProviderEmulator, langsmith_server: _LangSmithServer,
) -> None:
    from langchain_core.tracers.langchain import LangChainTracer
    from langsmith import Client

    client = Client(api_url=langsmith_server.url, api_key="dummy-langsmith-key")
    tracer = LangChainTracer(client=client, project_name="frugalflow-test")
    cat, first, second = pair(emu)
    app = qa_flow(first, second).compile(cat, policy=POLICY, breakers=BreakerRegistry())
    emu.fault("openai", "auth_echo", times=None)
    ctx = app.new_context()
    await app.ainvoke({"q": PROMPT}, {"callbacks": [tracer]}, context=ctx)
    await asyncio.to_thread(client.flush)

    def attempts_done() -> bool:
        done = [r for r in langsmith_server.runs.values()
                if ATTEMPT_TAG in (r.get("tags") or []) and r.get("end_time")]
        return len(done) == 2

    with langsmith_server.received:
        assert langsmith_server.received.wait_for(attempts_done, timeout=30)
    runs = langsmith_server.runs
    attempts = sorted((r for r in runs.values() if ATTEMPT_TAG in (r.get("tags") or [])),
                      key=lambda r: r["dotted_order"])
    parent = runs[str(attempts[0]["parent_run_id"])]
    assert parent["extra"]["metadata"]["ls_provider"] == "frugalflow"
    assert {str(a["parent_run_id"]) for a in attempts} == {str(parent["id"])}
    assert all(str(a["trace_id"]) == str(parent["trace_id"]) for a in attempts)
    failed, ok = attempts
    assert failed["error"].startswith("AuthenticationError(")
    assert ok["extra"]["metadata"]["ls_provider"] == "anthropic"
    assert ok["extra"]["metadata"]["ls_model_name"] == second.model
    usage = ok["extra"]["metadata"]["usage_metadata"]  # LangSmith's tokens and cost
    assert usage["total_cost"] == pytest.approx(ctx.usage.attempts[-1].cost_usd)
    assert usage["output_tokens"] > 0
    sent = b"".join(langsmith_server.bodies)
    assert KEY.encode() not in sent and KEY[8:30].encode() not in sent


@pytest.fixture
def langsmith_env(langsmith_server: _LangSmithServer,
                  monkeypatch: pytest.MonkeyPatch) -> Iterator[_LangSmithServer]:
    """LANGSMITH_TRACING=true towards the local server (LangSmith's cached settings and
    client are reset around the test)."""
    from langsmith import run_trees, utils

    for name, value in (("LANGSMITH_TRACING", "true"), ("LANGSMITH_API_KEY", "dummy-key"),
                        ("LANGSMITH_ENDPOINT", langsmith_server.url),
                        ("LANGSMITH_PROJECT", "frugalflow-env")):
        monkeypatch.setenv(name, value)

    def reset() -> None:
        utils.get_env_var.cache_clear()
        utils.get_tracer_project.cache_clear()
        run_trees._CLIENT = None

    reset()
    yield langsmith_server
    from langchain_core.tracers.langchain import wait_for_all_tracers

    wait_for_all_tracers()
    monkeypatch.undo()
    reset()


@pytest.mark.slow
async def test_langsmith_tracing_from_the_environment(
    emu: ProviderEmulator, langsmith_env: _LangSmithServer,
) -> None:
    """No handler given: LangChain's own LANGSMITH_TRACING tracer sees the attempts, in a
    flow and on a routed model streamed at top level."""
    from langchain_core.tracers.langchain import wait_for_all_tracers

    cat, first, second = pair(emu)
    app = qa_flow(first, second).compile(cat, policy=POLICY, breakers=BreakerRegistry())
    emu.fault("openai", "overloaded", times=None)
    await app.ainvoke({"q": PROMPT})
    model = RoutedChatModel(needs=Needs(models=(first.key, second.key)), node="direct",
                            context=RunContext(catalog=cat, policy=POLICY,
                                               breakers=BreakerRegistry()))
    _ = [c async for c in model.astream([HumanMessage(PROMPT)])]
    await asyncio.to_thread(wait_for_all_tracers)

    def tagged() -> list[dict[str, Any]]:
        return [r for r in langsmith_env.runs.values()
                if ATTEMPT_TAG in (r.get("tags") or []) and r.get("end_time")]

    with langsmith_env.received:
        assert langsmith_env.received.wait_for(lambda: len(tagged()) == 4, timeout=30)
    runs = langsmith_env.runs
    by_parent: dict[str, list[dict[str, Any]]] = {}
    for attempt in tagged():
        by_parent.setdefault(str(attempt["parent_run_id"]), []).append(attempt)
    names = sorted(runs[p]["extra"]["metadata"]["ls_model_name"] for p in by_parent)
    assert names == ["routed:answer", "routed:direct"]
    for parent_id, attempts in by_parent.items():
        parent = runs[parent_id]
        assert parent["extra"]["metadata"]["ls_provider"] == "frugalflow"
        failed, ok = sorted(attempts, key=lambda r: r["dotted_order"])
        assert failed["error"].startswith("ProviderOverloadedError(")
        assert ok["extra"]["metadata"]["ls_provider"] == "anthropic"
        assert {str(a["trace_id"]) for a in attempts} == {str(parent["trace_id"])}
