"""OpenTelemetry spans of runs: run -> node -> attempt, after the GenAI semantic conventions.

One execution of a run (a start, or a resume by any runner or worker) is an
`invoke_workflow {flow}` span (INTERNAL). Each LangGraph task (node execution) is an
`invoke_agent {node}` span (INTERNAL: the node is the workflow's agent step, run in process).
Each model attempt is a `chat {model}` span (CLIENT), made from its `Attempt` record with its
own start and end times, under the node span of its task: a fallback shows as a failed
attempt (status ERROR, `error.type` = its error class) followed by the one that answered.

The run's trace context (W3C `traceparent`/`tracestate` of its first execution span) is
stored with the run (`ff_runs.trace_context`). A later execution of the same run, in this
process or another, starts its span as a child of that context: the whole life of a run is
one trace. The caller's own span at a resume (an HTTP request, a queue job), when there is
one, is attached as a *link*: it caused this execution but is not the run's parent.

`error.type` of an attempt is its `ErrorClass` (rate_limit, overloaded, timeout, connection,
incomplete, auth, context_length, content_filter, malformed, validation, invalid_request,
unknown); of a node or a run, the exception's class name (or the run's status). No prompts,
answers, inputs, outputs or error messages go into spans: names, models, counts, costs,
statuses and error classes only.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from ..statuses import NodeStatus, Outcome, RunStatus
from .metrics import CallMetrics, provider_name, request_model, response_model

if TYPE_CHECKING:
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import Span, TracerProvider
    from opentelemetry.util.types import AttributeValue

    from ..persistence.ledger import Ledger
    from ..persistence.tables import RunRow
    from ..resilience import BreakerListener, Breakers
    from ..runner import RunResult
    from ..usage import Attempt, RunUsage

__all__ = ["RunTracing"]

log = logging.getLogger("frugalflow")

_W3C = TraceContextTextMapPropagator()
"""The stored context is W3C trace context whatever the app's global propagator is."""

_ERROR_STATUSES = frozenset({RunStatus.FAILED, RunStatus.BUDGET_EXCEEDED})


@dataclass
class _Execution:
    """One execution of one run in this process: its span, its open node spans."""

    run_id: str
    span: Span | None = None
    token: object | None = None  # the context attached while the run executes
    flow: str = ""
    nodes: dict[str, Span] = field(default_factory=dict)
    costs: dict[str, float] = field(default_factory=dict)  # task id -> its attempts' cost
    fallbacks: dict[str, str] = field(default_factory=dict)  # call id -> last error class


class RunTracing:
    """The runner's OpenTelemetry hooks (None in the runner when tracing is off)."""

    def __init__(self, tracer_provider: TracerProvider | None,
                 meter_provider: MeterProvider | None, breakers: Breakers | None = None) -> None:
        self.tracer_provider = tracer_provider
        self.meter_provider = meter_provider
        version = _version()
        self.tracer = (tracer_provider.get_tracer("frugalflow", version)
                       if tracer_provider is not None else trace.NoOpTracer())
        self.metrics = (CallMetrics(meter_provider, version)
                        if meter_provider is not None else None)
        self._runs: dict[str, _Execution] = {}
        # Registries that report their state changes (the in-process one) are counted.
        self._breakers: list[BreakerListener] | None = getattr(breakers, "listeners", None)
        if self._breakers is not None and self.metrics is not None:
            self._breakers.append(self.breaker_changed)

    # -- a run's execution -------------------------------------------------------------------

    @contextlib.contextmanager
    def execution(self, run_id: str) -> Iterator[_Ended]:
        """Around one execution of `run_id`: its span starts in `begin` (once the run's row
        is read) and ends here, with the execution's result."""
        ex = self._runs[run_id] = _Execution(run_id)
        ended = _Ended()
        try:
            yield ended
        except BaseException as e:  # cancelled, or a bug: the span says so, then it goes on
            ended.error = type(e).__name__
            raise
        finally:
            self._runs.pop(run_id, None)
            self._close(ex, ended)

    async def begin(self, row: RunRow, usage: RunUsage, ledger: Ledger) -> None:
        """The execution's span (a child of the run's stored trace context, if it has one),
        attached as the current context while the run executes; the attempt listener."""
        ex = self._runs.get(row.id)
        if ex is None:  # not inside `execution` (cannot happen through the runner)
            return
        ex.flow = row.flow
        stored = row.trace_context
        links: list[Link] = []
        if stored:
            parent = _W3C.extract(stored)
            caller = trace.get_current_span().get_span_context()
            if caller.is_valid:
                links.append(Link(caller, {"frugalflow.link": "resumed_by"}))
        else:
            parent = None  # the caller's context (its span, if any) is the parent
        span = self.tracer.start_span(
            f"invoke_workflow {row.flow}", context=parent, kind=SpanKind.INTERNAL, links=links,
            attributes={"gen_ai.operation.name": "invoke_workflow",
                        "gen_ai.workflow.name": row.flow, "frugalflow.run_id": row.id,
                        "frugalflow.flow": row.flow,
                        "frugalflow.resumed": bool(stored)})
        if row.budget_usd is not None:
            span.set_attribute("frugalflow.budget_usd", row.budget_usd)
        ex.span = span
        ex.token = otel_context.attach(trace.set_span_in_context(span))
        usage.listeners.append(self._listener(ex, usage))
        if not stored and span.get_span_context().is_valid:
            carrier: dict[str, str] = {}
            _W3C.inject(carrier, trace.set_span_in_context(span))
            await ledger.set_trace_context(row.id, carrier)

    def _close(self, ex: _Execution, ended: _Ended) -> None:
        span = ex.span
        if ex.token is not None:
            with contextlib.suppress(ValueError):  # attached in another context: leave it
                otel_context.detach(ex.token)  # type: ignore[arg-type]
        status = ended.status or ("cancelled" if ended.error == "CancelledError" else "failed")
        for node_span in ex.nodes.values():  # cut short: the execution ended under them
            node_span.set_attribute("frugalflow.status", "abandoned")
            node_span.end()
        if span is None:
            return
        span.set_attribute("frugalflow.status", status)
        if ended.cost_usd is not None:
            span.set_attribute("frugalflow.cost_usd", ended.cost_usd)
        # A failed or over-budget end is an error; a pause, an interrupt or a cancel is not.
        if status in _ERROR_STATUSES or (ended.status is None and status == "failed"):
            span.set_attribute("error.type", ended.error_type or ended.error or status)
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    # -- nodes ---------------------------------------------------------------------------

    def task(self, run_id: str, chunk: dict[str, Any]) -> None:
        """A LangGraph "tasks" stream event: a node execution started or ended."""
        ex = self._runs.get(run_id)
        if ex is None:
            return
        task_id, node = str(chunk["id"]), str(chunk["name"])
        if "input" in chunk:
            parent = trace.set_span_in_context(ex.span) if ex.span is not None else None
            ex.nodes[task_id] = self.tracer.start_span(
                f"invoke_agent {node}", context=parent, kind=SpanKind.INTERNAL,
                attributes={"gen_ai.operation.name": "invoke_agent", "gen_ai.agent.name": node,
                            "frugalflow.run_id": run_id, "frugalflow.flow": ex.flow,
                            "frugalflow.node": node, "frugalflow.task_id": task_id})
            return
        span = ex.nodes.pop(task_id, None)
        if span is None:
            return
        span.set_attribute("frugalflow.cost_usd", ex.costs.pop(task_id, 0.0))
        err = chunk.get("error")
        status = (NodeStatus.ERROR if err else NodeStatus.INTERRUPTED
                  if chunk.get("interrupts") else NodeStatus.DONE)
        span.set_attribute("frugalflow.status", str(status))
        if err is not None:
            span.set_attribute("error.type", type(err).__name__ if isinstance(
                err, BaseException) else "_OTHER")
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    # -- attempts ------------------------------------------------------------------------

    def _listener(self, ex: _Execution, usage: RunUsage) -> Callable[[Attempt], None]:
        def on_attempt(attempt: Attempt) -> None:
            self.attempt(ex, attempt, usage)
            if self.metrics is not None:
                self.metrics.attempt(attempt, ex.flow)

        return on_attempt

    def attempt(self, ex: _Execution, attempt: Attempt, usage: RunUsage) -> None:
        """The attempt's span, from its record (start time and latency), under its node."""
        node = ex.nodes.get(attempt.task_id or "")
        parent_span = node if node is not None else ex.span
        parent = trace.set_span_in_context(parent_span) if parent_span is not None else None
        start = int(attempt.started_at * 1e9)
        attrs: dict[str, AttributeValue] = {
            "frugalflow.run_id": ex.run_id, "frugalflow.flow": ex.flow,
            "frugalflow.node": attempt.node, "frugalflow.outcome": str(attempt.outcome),
            "frugalflow.try": attempt.try_number, "frugalflow.cost_usd": attempt.cost_usd,
            "frugalflow.call_id": attempt.call_id,
        }
        if attempt.outcome == Outcome.REPLAYED:  # answered from the ledger: no model call
            span = self.tracer.start_span(f"replay {attempt.model}", context=parent,
                                          kind=SpanKind.INTERNAL, attributes=attrs,
                                          start_time=start)
            span.end(end_time=start)
            return
        model = request_model(attempt)
        attrs.update({"gen_ai.operation.name": "chat",
                      "gen_ai.provider.name": provider_name(attempt.provider),
                      "gen_ai.request.model": model, "frugalflow.provider": attempt.provider,
                      "frugalflow.model": attempt.model})
        _optional(attrs, attempt, usage)
        previous = ex.fallbacks.get(attempt.call_id)
        if attempt.fallback_from:
            attrs["frugalflow.fallback_from"] = attempt.fallback_from
        if previous:  # why this try happened: the previous try of the call failed so
            attrs["frugalflow.fallback_reason" if attempt.fallback_from
                  else "frugalflow.retry_reason"] = previous
        span = self.tracer.start_span(f"chat {model}", context=parent, kind=SpanKind.CLIENT,
                                      attributes=attrs, start_time=start)
        if attempt.error_class is not None:
            ex.fallbacks[attempt.call_id] = str(attempt.error_class)
            span.set_attribute("error.type", str(attempt.error_class))
            span.set_status(Status(StatusCode.ERROR))
        else:
            ex.fallbacks.pop(attempt.call_id, None)
        span.end(end_time=start + int(attempt.latency_ms * 1e6))
        if node is not None and attempt.task_id is not None:
            ex.costs[attempt.task_id] = ex.costs.get(attempt.task_id, 0.0) + attempt.cost_usd
            if attempt.outcome == Outcome.OK:  # the agent step's provider: who served it
                node.set_attribute("gen_ai.provider.name", str(attrs["gen_ai.provider.name"]))
                node.set_attribute("gen_ai.request.model", model)

    async def aclose(self) -> None:
        """Stop counting breaker changes; export what is buffered (off the event loop)."""
        if self._breakers is not None and self.breaker_changed in self._breakers:
            self._breakers.remove(self.breaker_changed)
        await asyncio.to_thread(self.flush)

    def flush(self, timeout_ms: int = 5000) -> None:
        """Export what is buffered (blocking: call it off the event loop)."""
        for provider in (self.tracer_provider, self.meter_provider):
            flush = getattr(provider, "force_flush", None)
            if flush is not None:
                with contextlib.suppress(Exception):
                    flush(timeout_ms)

    def breaker_changed(self, key: str, before: str, after: str) -> None:
        if self.metrics is not None:
            self.metrics.breaker_changed(key, before, after)


@dataclass
class _Ended:
    """How the execution ended, as the runner says it (`ended(result)`)."""

    status: str | None = None
    error: str | None = None
    error_type: str | None = None
    cost_usd: float | None = None

    def __call__(self, result: RunResult) -> RunResult:
        self.status = str(result.status)
        self.cost_usd = result.cost_usd
        if result.error is not None:
            self.error_type = _error_type(result.error)
        return result


def _version() -> str:
    """frugalflow's version, the instrumentation scope's (as `frugalflow.__version__`)."""
    try:
        return importlib.metadata.version("frugalflow")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def _error_type(error: str) -> str | None:
    """A low-cardinality error class from the run's error text ("KeyError: ..." -> KeyError),
    or None; never the message itself (it may quote inputs)."""
    head = error.split(":", 1)[0].strip()
    return head if head.isidentifier() else None


def _optional(attrs: dict[str, AttributeValue], attempt: Attempt, usage: RunUsage) -> None:
    """Attributes present only when known: usage, response model, route, budget left."""
    u = attempt.usage
    if u is not None:
        attrs["gen_ai.usage.input_tokens"] = u.input_tokens
        attrs["gen_ai.usage.output_tokens"] = u.output_tokens
        if u.cache_read_tokens:
            attrs["gen_ai.usage.cache_read.input_tokens"] = u.cache_read_tokens
        if u.cache_write_tokens:
            attrs["gen_ai.usage.cache_creation.input_tokens"] = u.cache_write_tokens
        if u.reasoning_tokens:
            attrs["gen_ai.usage.reasoning.output_tokens"] = u.reasoning_tokens
        if attempt.usage_estimated:
            attrs["frugalflow.usage_estimated"] = True
    if attempt.outcome == Outcome.OK:
        attrs["gen_ai.response.model"] = response_model(attempt) or str(
            attrs["gen_ai.request.model"])
    if attempt.route_reason:
        attrs["frugalflow.route_reason"] = attempt.route_reason
    if attempt.action:
        attrs["frugalflow.action"] = attempt.action
    left = usage.remaining_usd
    if left is not None:
        attrs["frugalflow.budget_left_usd"] = left
