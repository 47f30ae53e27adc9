"""OpenTelemetry: run -> node -> attempt spans (GenAI conventions) and metrics from real runs
against the provider emulator, the trace kept across executions of a run on SQLite and
PostgreSQL, configuration by OTEL_* variables, and an export over OTLP/HTTP to a receiver."""

from __future__ import annotations

import asyncio
import http.server
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, TypedDict

import pytest
from durable_flows import review_flow
from langchain_core.messages import HumanMessage
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from frugalflow import (
    END,
    START,
    AuthenticationError,
    Catalog,
    Flow,
    Needs,
    ProviderOverloadedError,
    RoutedChatModel,
    UserError,
)
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.testing.emulator import EMULATOR_KEY_ENV, ProviderEmulator, emulated_catalog
from frugalflow.tracing import otel_setup
from provider_clients import forget_provider_clients

SECRET = f"sk-live-{uuid.uuid4().hex}{uuid.uuid4().hex[:8]}"
MARKER = f"prompt-marker-{uuid.uuid4().hex[:8]}"


class Tracing:
    """SDK providers with in-memory exporters, as a test reads them."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def finished(self) -> list[ReadableSpan]:
        return list(self.spans.get_finished_spans())

    def points(self, name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return [p for rm in data.resource_metrics for sm in rm.scope_metrics
                for m in sm.metrics if m.name == name for p in m.data.data_points]


@pytest.fixture
def otel() -> Iterator[Tracing]:
    t = Tracing()
    yield t
    t.tracer_provider.shutdown()
    t.meter_provider.shutdown()


@pytest.fixture
async def _clients() -> AsyncIterator[None]:
    yield
    forget_provider_clients()


class OneState(TypedDict, total=False):
    topic: str
    answer: str


def one_node_flow() -> Flow[OneState]:
    flow: Flow[OneState] = Flow("ask", OneState)

    @flow.node(needs=Needs())
    async def ask(state: OneState, model: RoutedChatModel) -> OneState:
        answer = await model.ainvoke([HumanMessage(f"{state['topic']}: answer briefly")])
        return {"answer": str(answer.content)[:60]}

    flow.add_edge(START, "ask")
    flow.add_edge("ask", END)
    return flow


def _by_name(spans: list[ReadableSpan]) -> dict[str, list[ReadableSpan]]:
    out: dict[str, list[ReadableSpan]] = {}
    for s in spans:
        out.setdefault(s.name, []).append(s)
    return out


def _parent_id(span: ReadableSpan) -> int | None:
    return span.parent.span_id if span.parent is not None else None


def _everything(spans: list[ReadableSpan]) -> str:
    """Every name, attribute, event and link of `spans`, as text to scan."""
    return json.dumps([{"name": s.name, "attrs": dict(s.attributes or {}),
                        "events": [(e.name, dict(e.attributes or {})) for e in s.events],
                        "links": [dict(lk.attributes or {}) for lk in s.links],
                        "resource": dict(s.resource.attributes)} for s in spans], default=str)


@pytest.mark.usefixtures("_clients")
async def test_a_fallback_is_run_node_and_two_attempt_spans_like_the_ledger(
    tmp_path: Path, otel: Tracing, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(EMULATOR_KEY_ENV, SECRET)
    async with ProviderEmulator(seed=3) as emu:
        catalog = emulated_catalog(emu, ("openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"))
        emu.fault("openai", "rate_limit", retry_after=None)  # 429, no Retry-After: next model
        runner = Runner(f"sqlite:///{tmp_path / 'runs.db'}", flows=[one_node_flow()],
                        catalog=catalog, breakers=BreakerRegistry(threshold=1),
                        tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider)
        try:
            result = await runner.start("ask", {"topic": f"{MARKER} {SECRET}"}, budget=1.0)
            assert result.ok, result.error
            record = await runner.get(result.run_id)
        finally:
            await runner.close()
            await catalog.aclose()  # its httpx clients, before the emulator stops
    assert [a.outcome for a in record.attempts] == ["error", "ok"]
    _assert_spans(otel, result.run_id, record)
    run = _by_name(otel.finished())["invoke_workflow ask"][0]
    # the trace context is kept with the run
    row = await _row(tmp_path / "runs.db", result.run_id)
    assert row.trace_context is not None
    assert f"{run.context.trace_id:032x}" in row.trace_context["traceparent"]

    _assert_metrics(otel, record)
    # no secrets, no prompts: not in spans, not in metric attributes
    text = _everything(otel.finished()) + json.dumps(
        [dict(p.attributes) for name in ("gen_ai.client.token.usage", "frugalflow.attempts",
                                         "frugalflow.cost") for p in otel.points(name)])
    assert SECRET not in text and SECRET[8:24] not in text
    assert MARKER not in text


def _assert_spans(otel: Tracing, run_id: str, record: Any) -> None:
    """run -> node -> two attempts, with the conventions' attributes and the ledger's facts."""
    failed, served = record.attempts
    spans = _by_name(otel.finished())
    (run,) = spans["invoke_workflow ask"]
    (node,) = spans["invoke_agent ask"]
    attempts = sorted((s for s in otel.finished() if s.name.startswith("chat ")),
                      key=lambda s: s.start_time or 0)
    assert [s.name for s in attempts] == ["chat gpt-4o-mini", "chat claude-haiku-4-5"]
    # run -> node -> attempts, one trace
    assert run.parent is None and run.kind is SpanKind.INTERNAL
    assert _parent_id(node) == run.context.span_id
    assert all(_parent_id(a) == node.context.span_id for a in attempts)
    assert {s.context.trace_id for s in otel.finished()} == {run.context.trace_id}
    assert run.attributes is not None and node.attributes is not None
    assert run.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert run.attributes["gen_ai.workflow.name"] == "ask"
    assert run.attributes["frugalflow.run_id"] == run_id
    assert run.attributes["frugalflow.status"] == "succeeded"
    assert run.status.status_code is StatusCode.UNSET
    assert node.attributes["gen_ai.operation.name"] == "invoke_agent"
    assert node.attributes["gen_ai.agent.name"] == "ask"
    assert node.attributes["frugalflow.status"] == "done"
    assert node.attributes["gen_ai.provider.name"] == "anthropic"  # who served the step
    assert node.attributes["frugalflow.cost_usd"] == pytest.approx(record.nodes[0].cost_usd)
    # the failed attempt: CLIENT, status ERROR, error.type = its class
    first, second = attempts
    a1, a2 = dict(first.attributes or {}), dict(second.attributes or {})
    assert first.kind is SpanKind.CLIENT and second.kind is SpanKind.CLIENT
    assert first.status.status_code is StatusCode.ERROR and a1["error.type"] == "rate_limit"
    assert second.status.status_code is StatusCode.UNSET and "error.type" not in a2
    assert a1["gen_ai.operation.name"] == a2["gen_ai.operation.name"] == "chat"
    assert (a1["gen_ai.provider.name"], a2["gen_ai.provider.name"]) == ("openai", "anthropic")
    assert (a1["gen_ai.request.model"], a2["gen_ai.request.model"]) == (
        "gpt-4o-mini", "claude-haiku-4-5")
    assert a2["gen_ai.response.model"] and "gen_ai.response.model" not in a1
    assert a2["frugalflow.fallback_from"] == "openai/gpt-4o-mini"
    assert a2["frugalflow.fallback_reason"] == "rate_limit"
    assert (a1["frugalflow.try"], a2["frugalflow.try"]) == (1, 2)
    assert a2.get("frugalflow.route_reason") == served.route_reason  # set by routers
    assert 0 < float(a2["frugalflow.budget_left_usd"]) < 1.0
    # the same attempts as the ledger: count, models, costs, tokens, times
    assert [f"{a['frugalflow.model']}" for a in (a1, a2)] == [a.model for a in record.attempts]
    assert a1["frugalflow.cost_usd"] == failed.cost_usd
    assert a2["frugalflow.cost_usd"] == pytest.approx(served.cost_usd) and served.cost_usd > 0
    assert a2["gen_ai.usage.input_tokens"] == served.input_tokens > 0
    assert a2["gen_ai.usage.output_tokens"] == served.output_tokens > 0
    assert first.end_time is not None and second.start_time is not None
    assert first.end_time <= second.start_time  # the fallback came after the failure
    assert run.attributes["frugalflow.cost_usd"] == pytest.approx(record.run.cost_usd)



def _assert_metrics(otel: Tracing, record: Any) -> None:
    """The ledger's tokens, durations, cost, attempts by outcome; the breaker changes."""
    served = record.attempts[1]
    tokens = {(p.attributes["gen_ai.token.type"], p.attributes["gen_ai.provider.name"]): p
              for p in otel.points("gen_ai.client.token.usage")}
    assert set(tokens) == {("input", "anthropic"), ("output", "anthropic")}
    assert tokens["input", "anthropic"].sum == served.input_tokens
    assert tokens["output", "anthropic"].sum == served.output_tokens
    assert tokens["input", "anthropic"].attributes["gen_ai.operation.name"] == "chat"
    durations = {p.attributes.get("error.type"): p
                 for p in otel.points("gen_ai.client.operation.duration")}
    assert set(durations) == {"rate_limit", None}
    assert all(p.count == 1 for p in durations.values())
    assert durations[None].sum == pytest.approx(served.latency_ms / 1000)
    outcomes = {p.attributes["frugalflow.outcome"]: p.value
                for p in otel.points("frugalflow.attempts")}
    assert outcomes == {"error": 1, "ok": 1}
    cost = sum(p.value for p in otel.points("frugalflow.cost"))
    assert cost == pytest.approx(record.run.cost_usd)
    changes = {(p.attributes["frugalflow.breaker.key"], p.attributes["frugalflow.breaker.from"],
                p.attributes["frugalflow.breaker.to"]): p.value
               for p in otel.points("frugalflow.breaker.transitions")}
    assert changes == {("openai", "closed", "open"): 1,
                       ("openai/gpt-4o-mini", "closed", "open"): 1}


async def _row(db: Path, run_id: str) -> Any:
    from frugalflow.persistence import Store
    from frugalflow.persistence.ledger import Ledger

    store = Store(f"sqlite:///{db}")
    try:
        return await Ledger(store).get_run(run_id)
    finally:
        await store.close()


async def test_a_run_resumed_by_another_runner_continues_its_trace(db_url: str) -> None:
    first, second = Tracing(), Tracing()  # two processes' providers
    a = Runner(db_url, flows=[review_flow()], catalog=Catalog.simulated(),
               breakers=BreakerRegistry(), tracer_provider=first.tracer_provider)
    try:
        started = await a.start("review", {"text": "refund please"})
        assert started.status == "interrupted"
    finally:
        await a.close()
    b = Runner(db_url, flows=[review_flow()], catalog=Catalog.simulated(),
               breakers=BreakerRegistry(), tracer_provider=second.tracer_provider)
    caller = second.tracer_provider.get_tracer("test").start_span("POST /runs/resume")
    try:
        with trace.use_span(caller, end_on_exit=True):
            resumed = await b.resume(started.run_id, "approved")
        assert resumed.ok
        row = await b.ledger.get_run(started.run_id)
    finally:
        await b.close()
    (run1,) = _by_name(first.finished())["invoke_workflow review"]
    (run2,) = _by_name(second.finished())["invoke_workflow review"]
    assert run1.attributes is not None and run2.attributes is not None
    assert run1.attributes["frugalflow.status"] == "interrupted"
    assert run1.status.status_code is StatusCode.UNSET
    assert run2.attributes["frugalflow.status"] == "succeeded"
    assert run2.attributes["frugalflow.resumed"] is True
    # same trace; the second execution is a child of the stored (first execution's) context
    assert run2.context.trace_id == run1.context.trace_id
    assert _parent_id(run2) == run1.context.span_id and run2.parent is not None
    assert run2.parent.is_remote
    assert row.trace_context["traceparent"].startswith(  # then the sampled (and random) flags
        f"00-{run1.context.trace_id:032x}-{run1.context.span_id:016x}-")
    # the caller that resumed it is linked, not the parent
    (link,) = run2.links
    assert link.context.span_id == caller.get_span_context().span_id
    assert caller.get_span_context().trace_id != run1.context.trace_id
    # nodes: the draft in the first execution, the approval (again) in the second
    nodes1 = {s.name: s for s in first.finished() if s.name.startswith("invoke_agent")}
    nodes2 = {s.name: s for s in second.finished() if s.name.startswith("invoke_agent")}
    assert nodes1["invoke_agent approve"].attributes["frugalflow.status"] == "interrupted"
    assert nodes2["invoke_agent approve"].attributes["frugalflow.status"] == "done"
    assert all(_parent_id(s) == run2.context.span_id for s in nodes2.values())
    assert [s.name for s in first.finished() if s.name.startswith("chat ")] != []
    assert not [s for s in second.finished() if s.name.startswith("chat ")]  # paid once
    for t in (first, second):
        t.tracer_provider.shutdown()
        t.meter_provider.shutdown()


async def test_a_failed_run_and_its_node_are_errors(tmp_path: Path, otel: Tracing,
                                                    sim: Any) -> None:
    catalog = Catalog.simulated()
    for provider in catalog.providers:
        sim.down(provider, kind="auth")  # every provider refuses: the node fails, then the run
    runner = Runner(f"sqlite:///{tmp_path / 'runs.db'}", flows=[one_node_flow()],
                    catalog=catalog, breakers=BreakerRegistry(), meter_provider=otel.meter_provider,
                    tracer_provider=otel.tracer_provider)
    try:
        result = await runner.start("ask", {"topic": "x"})
        record = await runner.get(result.run_id)
    finally:
        await runner.close()
    assert result.status == "failed"
    spans = _by_name(otel.finished())
    (run,), (node,) = spans["invoke_workflow ask"], spans["invoke_agent ask"]
    assert run.status.status_code is StatusCode.ERROR
    assert node.status.status_code is StatusCode.ERROR
    assert run.attributes is not None and node.attributes is not None
    assert run.attributes["frugalflow.status"] == "failed" and run.attributes["error.type"]
    assert node.attributes["error.type"] == "AllModelsFailedError"
    chats = [s for s in otel.finished() if s.name.startswith("chat ")]
    assert len(chats) == len(record.attempts) > 1
    assert all(s.status.status_code is StatusCode.ERROR for s in chats)
    errors = sum(p.value for p in otel.points("frugalflow.attempts")
                 if p.attributes["frugalflow.outcome"] == "error")
    assert errors == len(record.attempts)


async def test_breaker_changes_are_counted_in_process_and_in_redis(
    redis_url: str, clock: Any,
) -> None:
    """The same outcomes move both registries through the same transitions, each told to
    the listeners (and counted by the metrics) once."""
    from frugalflow.scale.redis import RedisBreakerRegistry
    from frugalflow.tracing.otel import RunTracing

    spec = Catalog.simulated()["sim-openai/gpt-4o-mini"]
    local = BreakerRegistry(threshold=1, cooldown=5, clock=clock)
    fleet = RedisBreakerRegistry(redis_url, threshold=1, cooldown=5, clock=clock,
                                 prefix=f"frugalflow:test:{uuid.uuid4().hex}:")
    seen: dict[str, list[tuple[str, str, str]]] = {"local": [], "fleet": []}
    tracing = Tracing()
    hooks = RunTracing(None, tracing.meter_provider, fleet)
    try:
        for name, reg in (("local", local), ("fleet", fleet)):
            reg.listeners.append(lambda *change, n=name: seen[n].append(change))
            start = clock.now
            await reg.arecord(spec, ProviderOverloadedError("503"))  # closed -> open
            clock.now = start + 10  # after the cooldown: one probe, half-open
            assert await reg.aacquire(spec)
            await reg.arecord(spec, None)  # the probe answered: closed
            await reg.arecord(spec, AuthenticationError("bad key", status_code=401))
        assert seen["fleet"] == seen["local"] == [
            ("sim-openai", "closed", "open"), ("sim-openai/gpt-4o-mini", "closed", "open"),
            ("sim-openai", "open", "half_open"), ("sim-openai/gpt-4o-mini", "open", "half_open"),
            ("sim-openai", "half_open", "closed"),
            ("sim-openai/gpt-4o-mini", "half_open", "closed"),
            ("sim-openai", "closed", "disabled")]
        counted = {(p.attributes["frugalflow.breaker.key"], p.attributes["frugalflow.breaker.from"],
                    p.attributes["frugalflow.breaker.to"]): p.value
                   for p in tracing.points("frugalflow.breaker.transitions")}
        assert counted == {change: 1 for change in seen["fleet"]}
        assert fleet.shared_state() == "ok"  # Redis made them
        await hooks.aclose()
        assert hooks.breaker_changed not in fleet.listeners
    finally:
        await fleet.areset()
        await fleet.aclose()
        tracing.meter_provider.shutdown()
        tracing.tracer_provider.shutdown()


# -- configuration ---------------------------------------------------------------------------

_OTEL_VARS = ("OTEL_TRACES_EXPORTER", "OTEL_METRICS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT",
              "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
              "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES", "OTEL_SDK_DISABLED",
              "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL",
              "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No OTEL_* variable set; the providers built from them are shut down afterwards."""
    for name in _OTEL_VARS:
        monkeypatch.delenv(name, raising=False)
    built: dict[Any, Any] = {}
    monkeypatch.setattr(otel_setup, "_built", built)
    yield monkeypatch
    for tp, mp in built.values():
        for p in (tp, mp):
            if p is not None:
                p.shutdown()


def test_not_configured_means_no_hooks_and_nothing_of_ours_imported(tmp_path: Path) -> None:
    # (langsmith, which langchain-core imports, already imports the OpenTelemetry API and SDK
    # modules when they are installed: what frugalflow must not add is its own hooks, an
    # exporter, or a provider.)
    code = (
        "import sys\n"
        "from frugalflow import Catalog\n"
        "from frugalflow.runner import Runner\n"
        f"r = Runner('sqlite:///{tmp_path / 'r.db'}', catalog=Catalog.simulated())\n"
        "ours = [m for m in sys.modules if m in ('frugalflow.tracing.otel',\n"
        "        'frugalflow.tracing.metrics') or m.startswith('opentelemetry.exporter')]\n"
        "from opentelemetry import trace\n"
        "print(r._otel is None, ours, type(trace.get_tracer_provider()).__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True [] ProxyTracerProvider"


def test_otel_variables_build_the_providers(env: pytest.MonkeyPatch) -> None:
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    assert otel_setup.run_tracing() is None  # nothing set: nothing built
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    env.setenv("OTEL_SERVICE_NAME", "support-bot")
    env.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")
    hooks = otel_setup.run_tracing()
    assert hooks is not None and hooks.metrics is not None
    tp, mp = hooks.tracer_provider, hooks.meter_provider
    assert isinstance(tp, TracerProvider) and isinstance(mp, MeterProvider)
    assert tp.resource.attributes["service.name"] == "support-bot"
    assert tp.resource.attributes["deployment.environment"] == "test"
    (processor,) = tp._active_span_processor._span_processors
    assert isinstance(processor, BatchSpanProcessor)
    exporter = processor._batch_processor._exporter
    assert isinstance(exporter, OTLPSpanExporter)
    assert exporter._endpoint == "http://127.0.0.1:4318/v1/traces"
    (reader,) = mp._metric_readers
    assert isinstance(reader._exporter, OTLPMetricExporter)
    assert reader._exporter._endpoint == "http://127.0.0.1:4318/v1/metrics"
    assert otel_setup.run_tracing().tracer_provider is tp  # type: ignore[union-attr]  # once

    env.delenv("OTEL_EXPORTER_OTLP_ENDPOINT")
    env.delenv("OTEL_SERVICE_NAME")
    env.setenv("OTEL_TRACES_EXPORTER", "console")
    env.setenv("OTEL_METRICS_EXPORTER", "none")
    hooks = otel_setup.run_tracing()
    assert hooks is not None and hooks.meter_provider is None and hooks.metrics is None
    assert isinstance(hooks.tracer_provider, TracerProvider)
    assert hooks.tracer_provider.resource.attributes["service.name"] == "frugalflow"
    (processor,) = hooks.tracer_provider._active_span_processor._span_processors
    assert isinstance(processor._batch_processor._exporter, ConsoleSpanExporter)

    env.setenv("OTEL_SDK_DISABLED", "true")
    assert otel_setup.run_tracing() is None
    explicit = TracerProvider()
    hooks = otel_setup.run_tracing(explicit)  # explicit providers are the app's own choice
    assert hooks is not None and hooks.tracer_provider is explicit
    env.delenv("OTEL_SDK_DISABLED")

    env.setenv("OTEL_TRACES_EXPORTER", "zipkin")
    with pytest.raises(UserError, match="OTEL_TRACES_EXPORTER=zipkin"):
        otel_setup.run_tracing()
    env.setenv("OTEL_TRACES_EXPORTER", "otlp")
    env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(UserError, match="http/protobuf"):
        otel_setup.run_tracing()


def test_an_apps_global_provider_is_used(env: pytest.MonkeyPatch, otel: Tracing) -> None:
    assert otel_setup.run_tracing() is None  # the API's proxy is not a configuration
    # As `trace.set_tracer_provider` would (it may be called once per process).
    env.setattr(trace, "_TRACER_PROVIDER", otel.tracer_provider)
    hooks = otel_setup.run_tracing()
    assert hooks is not None and hooks.tracer_provider is otel.tracer_provider
    assert hooks.metrics is None
    from opentelemetry.metrics import _internal as metrics_api

    env.setattr(metrics_api, "_METER_PROVIDER", otel.meter_provider)
    hooks = otel_setup.run_tracing()
    assert hooks is not None and hooks.meter_provider is otel.meter_provider
    assert hooks.metrics is not None
    env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")  # the app's win
    again = otel_setup.run_tracing()
    assert again is not None and again.tracer_provider is otel.tracer_provider
    assert not otel_setup._built


# -- OTLP over HTTP ----------------------------------------------------------------------------


class _Receiver(http.server.ThreadingHTTPServer):
    """An OTLP/HTTP receiver: decodes each ExportTrace/MetricsServiceRequest it is sent."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.traces: list[Any] = []
        self.metrics: list[Any] = []
        self.got_traces = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:  # noqa: N802 - the http.server protocol
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
            ExportMetricsServiceRequest,
            ExportMetricsServiceResponse,
        )
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
            ExportTraceServiceResponse,
        )

        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.headers["Content-Type"] == "application/x-protobuf"
        if self.path == "/v1/traces":
            request: Any = ExportTraceServiceRequest.FromString(body)
            self.server.traces.append(request)
            self.server.got_traces.set()
            answer = ExportTraceServiceResponse().SerializeToString()
        elif self.path == "/v1/metrics":
            self.server.metrics.append(ExportMetricsServiceRequest.FromString(body))
            answer = ExportMetricsServiceResponse().SerializeToString()
        else:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.mark.usefixtures("_clients")
async def test_spans_and_metrics_exported_over_otlp_http(
    tmp_path: Path, env: pytest.MonkeyPatch,
) -> None:
    receiver = _Receiver()
    serving = threading.Thread(target=receiver.serve_forever, daemon=True)
    serving.start()
    try:
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
        env.setenv("OTEL_SERVICE_NAME", "otlp-test")
        env.setenv(EMULATOR_KEY_ENV, SECRET)
        async with ProviderEmulator(seed=4) as emu:
            catalog = emulated_catalog(emu, ("openai/gpt-4o-mini", "anthropic/claude-haiku-4-5"))
            emu.fault("openai", "rate_limit", retry_after=None)
            runner = Runner(f"sqlite:///{tmp_path / 'runs.db'}", flows=[one_node_flow()],
                            catalog=catalog, breakers=BreakerRegistry())
            assert runner._otel is not None  # built from the environment
            try:
                result = await runner.start("ask", {"topic": MARKER})
                assert result.ok, result.error
            finally:
                await runner.close()  # flushes the batch processor and the metric reader
                await catalog.aclose()  # its httpx clients, before the emulator stops
        assert await asyncio.to_thread(receiver.got_traces.wait, 30)
    finally:
        for built in list(otel_setup._built.values()):  # while the receiver still answers
            for provider in built:
                await asyncio.to_thread(provider.shutdown)
        otel_setup._built.clear()
        receiver.shutdown()
        receiver.server_close()
    spans = [(rs.resource, s) for req in receiver.traces for rs in req.resource_spans
             for ss in rs.scope_spans for s in ss.spans]
    by_name = {s.name: s for _, s in spans}
    assert set(by_name) == {"invoke_workflow ask", "invoke_agent ask", "chat gpt-4o-mini",
                            "chat claude-haiku-4-5"}
    run, node = by_name["invoke_workflow ask"], by_name["invoke_agent ask"]
    failed, served = by_name["chat gpt-4o-mini"], by_name["chat claude-haiku-4-5"]
    assert node.parent_span_id == run.span_id and run.parent_span_id == b""
    assert failed.parent_span_id == served.parent_span_id == node.span_id
    assert len({s.trace_id for _, s in spans}) == 1
    attrs = {kv.key: kv.value for kv in failed.attributes}
    assert attrs["error.type"].string_value == "rate_limit"
    assert failed.status.code == 2  # STATUS_CODE_ERROR
    assert failed.kind == 3  # SPAN_KIND_CLIENT
    served_attrs = {kv.key: kv.value for kv in served.attributes}
    assert served_attrs["gen_ai.provider.name"].string_value == "anthropic"
    assert served_attrs["gen_ai.usage.output_tokens"].int_value > 0
    resource = {kv.key: kv.value.string_value for kv in spans[0][0].attributes}
    assert resource["service.name"] == "otlp-test"
    names = {m.name for req in receiver.metrics for rm in req.resource_metrics
             for sm in rm.scope_metrics for m in sm.metrics}
    assert {"gen_ai.client.token.usage", "gen_ai.client.operation.duration",
            "frugalflow.cost", "frugalflow.attempts"} <= names
    wire = b"".join(r.SerializeToString() for r in receiver.traces + receiver.metrics)
    assert SECRET.encode() not in wire and MARKER.encode() not in wire
