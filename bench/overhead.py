"""Per-node overhead of frugalflow over plain LangGraph.

The same N-node chain runs twice in one process with the same checkpointer kind
(LangGraph's InMemorySaver) and a zero-latency model: once as plain LangGraph whose nodes
call a SimulatedChatModel directly, once as a frugalflow flow whose nodes call their routed
model (which ranks the simulated catalog, picks, calls the same kind of model, prices the
call and records the attempt). Runs alternate; the medians are compared.

    python bench/overhead.py [--nodes 50] [--runs 30]

Target (issue 12): ratio <= 1.05 at N = 50. It prints figures; it is not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import TypedDict

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import END, START, StateGraph

import frugalflow
from frugalflow import BreakerRegistry, Catalog, Flow, Needs, RoutedChatModel
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
    flow: Flow[State] = Flow("bench", State)

    async def node(state: State, model: RoutedChatModel) -> State:
        msg = await model.ainvoke([HumanMessage(state["text"])])
        return {"last": str(msg.content)[:20]}

    for i in range(n):
        flow.add_node(f"n{i}", node, needs=Needs(quality={"classification": 0.45}))
        flow.add_edge(START if i == 0 else f"n{i - 1}", f"n{i}")
    flow.add_edge(f"n{n - 1}", END)
    return flow.compile(Catalog.simulated(), checkpointer=InMemorySaver(),
                        breakers=BreakerRegistry())


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--nodes", type=int, default=50)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    n = args.nodes
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
    for i in range(args.runs):  # alternating, and which goes first too (caches, allocator)
        if i % 2:
            f_times.append(await run_ff())
            p_times.append(await run_plain())
        else:
            p_times.append(await run_plain())
            f_times.append(await run_ff())
    print(f"nodes per run: {n}, runs: {args.runs} each (alternating), checkpointer: InMemorySaver")
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


if __name__ == "__main__":
    asyncio.run(main())
