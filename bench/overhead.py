"""Per-node overhead of frugalflow over plain LangGraph.

The same N-node chain runs twice in one process with the same checkpointer kind
(LangGraph's InMemorySaver) and a zero-latency model: once as plain LangGraph whose nodes
call a SimulatedChatModel directly, once as a frugalflow flow whose nodes call their routed
model (which ranks the simulated catalog, picks, calls the same kind of model, prices the
call and records the attempt). Runs alternate; the medians are compared.

Then what OpenTelemetry costs per node (issue 15): the same chain as durable runs of a
Runner on SQLite, four ways, alternated round by round (the order rotates): tracing off (no
provider: the runner's hooks are None); OTel configured without an exporter (SDK tracer and
meter providers with no span processor and no metric reader); with an in-memory span
exporter behind a SimpleSpanProcessor (and an in-memory metric reader); and with a
BatchSpanProcessor in front of that exporter. Each is compared with the off runs of the same
rounds: the median ratio and its spread (min - max of the per-round ratios) are printed.
Last, the tracing hooks alone (a node's start and end, one attempt: two spans, five metric
records), timed without the runner, the database or the model around them.

    python bench/overhead.py [--nodes 50] [--runs 30] [--tracing-nodes 20] [--tracing-runs 15]

Target (issue 12): ratio <= 1.05 at N = 50. It prints figures; it is not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any, TypedDict

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

import frugalflow
from frugalflow import BreakerRegistry, Catalog, Flow, Needs, RoutedChatModel
from frugalflow.runner import Runner
from frugalflow.testing import SimulatedChatModel


class State(TypedDict, total=False):
    text: str
    last: str


def plain_graph(n: int):  # type: ignore[no-untyped-def]
    model = SimulatedChatModel(model_name="llama-3.1-8b-instant", provider="sim-groq")
    g = StateGraph(State)

    def make(i: int):  # type: ignore[no-untyped-def]
        async def node(state: State) -> State:
            msg = await model.ainvoke([HumanMessage(state["text"])])
            return {"last": str(msg.content)[:20]}

        return node

    for i in range(n):
        g.add_node(f"n{i}", make(i))
        g.add_edge(START if i == 0 else f"n{i - 1}", f"n{i}")
    g.add_edge(f"n{n - 1}", END)
    return g.compile(checkpointer=InMemorySaver())


def frugal_flow(n: int):  # type: ignore[no-untyped-def]
    return bench_flow(n).compile(Catalog.simulated(), checkpointer=InMemorySaver(),
                                 breakers=BreakerRegistry())


def bench_flow(n: int) -> Flow[State]:
    flow: Flow[State] = Flow("bench", State)

    async def node(state: State, model: RoutedChatModel) -> State:
        msg = await model.ainvoke([HumanMessage(state["text"])])
        return {"last": str(msg.content)[:20]}

    for i in range(n):
        flow.add_node(f"n{i}", node, needs=Needs(quality={"classification": 0.45}))
        flow.add_edge(START if i == 0 else f"n{i - 1}", f"n{i}")
    flow.add_edge(f"n{n - 1}", END)
    return flow


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--tracing-nodes", type=int, default=20)
    ap.add_argument("--tracing-runs", type=int, default=15, help="0: skip the tracing part")
    args = ap.parse_args()
    await langgraph_overhead(args.nodes, args.runs)
    if args.tracing_runs > 0:
        await tracing_overhead(args.tracing_nodes, args.tracing_runs)


async def langgraph_overhead(n: int, runs: int) -> None:
    """frugalflow's routed calls against plain LangGraph (issue 12)."""
    plain, ff = plain_graph(n), frugal_flow(n)
    inp = {"text": "Classify this support ticket: my invoice is wrong."}

    async def run_plain() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        await plain.ainvoke(inp, {"configurable": {"thread_id": uuid.uuid4().hex}})
        return time.perf_counter() - t0, time.process_time() - c0

    async def run_ff() -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        await ff.ainvoke(inp)
        return time.perf_counter() - t0, time.process_time() - c0

    for _ in range(3):  # warm up both paths (imports, caches, profile resolution)
        await run_plain()
        await run_ff()
    p_times, f_times = [], []
    for i in range(runs):  # alternating, and which goes first too (caches, allocator)
        if i % 2:
            f_times.append(await run_ff())
            p_times.append(await run_plain())
        else:
            p_times.append(await run_plain())
            f_times.append(await run_ff())
    print(f"nodes per run: {n}, runs: {runs} each (alternating), checkpointer: InMemorySaver")
    print(f"catalog: simulated ({len(Catalog.simulated())} models), model latency: 0")
    print(f"frugalflow from: {frugalflow.__file__}")
    for clock, i in (("wall-clock", 0), ("CPU time", 1)):
        p = statistics.median(t[i] for t in p_times)
        f = statistics.median(t[i] for t in f_times)
        print(f"-- {clock} (medians)")
        print(f"plain LangGraph + SimulatedChatModel : {p * 1e3:8.2f} ms/run  "
              f"{p / n * 1e6:8.1f} us/node")
        print(f"frugalflow flow + RoutedChatModel    : {f * 1e3:8.2f} ms/run  "
              f"{f / n * 1e6:8.1f} us/node")
        print(f"frugalflow overhead per node         : {(f - p) / n * 1e6:8.1f} us")
        print(f"ratio frugalflow / plain             : {f / p:8.3f}   (target <= 1.05)")


# -- what tracing costs ---------------------------------------------------------------------


def _variants() -> dict[str, Callable[[], dict[str, Any]]]:
    """Runner keyword arguments of each tracing set-up (built fresh for each runner)."""
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import InMemoryMetricReader
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    def bare() -> dict[str, Any]:
        return {"tracer_provider": TracerProvider(), "meter_provider": MeterProvider()}

    def exporting(processor: Callable[[InMemorySpanExporter], Any]) -> dict[str, Any]:
        tp = TracerProvider()
        tp.add_span_processor(processor(InMemorySpanExporter()))
        return {"tracer_provider": tp,
                "meter_provider": MeterProvider(metric_readers=[InMemoryMetricReader()])}

    return {
        "off (no provider)": dict,
        "OTel, no exporter": bare,
        "in-memory exporter, Simple": lambda: exporting(SimpleSpanProcessor),
        "in-memory exporter, Batch": lambda: exporting(BatchSpanProcessor),
    }


async def tracing_overhead(n: int, runs: int) -> None:
    """Durable runs of an n-node chain with tracing off, and on three ways (issue 15)."""
    for name in [k for k in os.environ if k.startswith("OTEL_")]:
        del os.environ[name]  # "off" must mean off
    variants = _variants()
    inp = {"text": "Classify this support ticket: my invoice is wrong."}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {label: Runner(f"sqlite:///{tmp}/{i}.db", flows=[bench_flow(n)],
                                 catalog=Catalog.simulated(), breakers=BreakerRegistry(),
                                 **make())
                   for i, (label, make) in enumerate(variants.items())}
        assert runners["off (no provider)"]._otel is None
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in runners}

        async def once(label: str) -> tuple[float, float]:
            t0, c0 = time.perf_counter(), time.process_time()
            result = await runners[label].start("bench", inp)
            assert result.ok, result.error
            return time.perf_counter() - t0, time.process_time() - c0

        try:
            for label in runners:  # warm up (imports, caches, the database files)
                await once(label)
                await once(label)
            labels = list(runners)
            for r in range(runs):  # alternating; the order rotates round by round
                for label in labels[r % 4:] + labels[:r % 4]:
                    times[label].append(await once(label))
        finally:
            for runner in runners.values():
                await runner.close()
    print()
    await hooks_alone()
    print(f"-- tracing: durable runs (Runner, SQLite), nodes per run: {n}, rounds: {runs}, "
          "each round runs every set-up once (rotating order)")
    off = times["off (no provider)"]
    for clock, i in (("wall-clock", 0), ("CPU time", 1)):
        base = statistics.median(t[i] for t in off)
        print(f"-- {clock}: median ms/run, us/node; overhead per node and ratio against "
              "off in the same rounds (median, min - max)")
        for label, ts in times.items():
            med = statistics.median(t[i] for t in ts)
            ratios = [t[i] / o[i] for t, o in zip(ts, off)]
            print(f"{label:28s}: {med * 1e3:8.2f} ms/run {med / n * 1e6:8.1f} us/node  "
                  f"+{(med - base) / n * 1e6:7.1f} us/node  ratio "
                  f"{statistics.median(ratios):6.3f} ({min(ratios):.3f} - {max(ratios):.3f})")


async def hooks_alone(nodes: int = 2000, rounds: int = 5) -> None:
    """What the runner's tracing hooks cost per node by themselves (CPU, median of rounds)."""
    from frugalflow.persistence.tables import RunRow
    from frugalflow.statuses import Outcome
    from frugalflow.tracing.otel_setup import run_tracing
    from frugalflow.usage import Attempt, RunUsage, Usage

    stored = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
    row = RunRow(id="bench", flow="bench", trace_context=stored)  # stored: nothing to write
    attempt = Attempt(node="n0", model="sim-groq/llama-3.1-8b-instant", provider="sim-groq",
                      outcome=Outcome.OK, call_id="c", task_id="t", usage=Usage(40, 12, requests=1),
                      cost_usd=3e-6, latency_ms=1.0)
    print("-- tracing hooks alone (a node started and ended, one attempt), CPU us/node, "
          f"median of {rounds} rounds of {nodes}")
    for label, make in list(_variants().items())[1:]:
        hooks = run_tracing(**make())
        assert hooks is not None
        per_round = []
        for _ in range(rounds):
            usage = RunUsage(budget_usd=1.0)
            with hooks.execution("bench"):
                await hooks.begin(row, usage, None)  # type: ignore[arg-type]  # not written
                on_attempt = usage.listeners[-1]
                c0 = time.process_time()
                for _ in range(nodes):
                    hooks.task("bench", {"id": "t", "name": "n0", "input": {}})
                    on_attempt(attempt)
                    hooks.task("bench", {"id": "t", "name": "n0", "result": {}})
                per_round.append((time.process_time() - c0) / nodes * 1e6)
        await hooks.aclose()
        print(f"{label:28s}: {statistics.median(per_round):7.1f} us/node "
              f"({min(per_round):.1f} - {max(per_round):.1f})")


if __name__ == "__main__":
    asyncio.run(main())
