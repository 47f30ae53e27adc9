"""Flows used by the durability tests, importable by the test process and by subprocesses.

Run as a script it executes one run step for the kill-and-resume test:

    python tests/durable_flows.py start|resume DATABASE_URL RUN_ID

It prints `calling <node>` (flushed) right before each node's model call, so the parent
can SIGKILL it while that call is in flight (each call takes LATENCY seconds, KILL_WINDOW
seconds in the run that is killed).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TypedDict

from langchain_core.messages import HumanMessage
from langgraph.types import interrupt

from frugalflow import END, START, Catalog, Flow, Needs, RoutedChatModel
from frugalflow.resilience import BreakerRegistry

LATENCY = 0.4  # seconds per simulated model call in the chain flow
# In the run the parent kills: its kill must land while n4's call is in flight, after the
# parent has seen that call written down (another process's write, polled): on a loaded
# machine that took over 0.8 s, so the window is wide.
KILL_WINDOW = 2.5


class ChainState(TypedDict, total=False):
    topic: str
    n1: str
    n2: str
    n3: str
    n4: str
    n5: str


def chain_flow(n: int = 5, *, announce: bool = False) -> Flow[ChainState]:
    """n model nodes in a row; node i writes key f"n{i}" from the previous node's output."""
    flow: Flow[ChainState] = Flow("chain", ChainState)

    def make(i: int) -> Any:
        async def node(state: ChainState, model: RoutedChatModel) -> dict[str, str]:
            previous = state.get(f"n{i - 1}", state["topic"])  # type: ignore[misc]
            if announce:
                print(f"calling n{i}", flush=True)
            answer = await model.ainvoke([HumanMessage(f"step {i}: {previous}")])
            return {f"n{i}": str(answer.content)[:60]}

        return node

    for i in range(1, n + 1):
        flow.add_node(f"n{i}", make(i), needs=Needs(quality={"classification": 0.45}))
        flow.add_edge(START if i == 1 else f"n{i - 1}", f"n{i}")
    flow.add_edge(f"n{n}", END)
    return flow


class ReviewState(TypedDict, total=False):
    text: str
    draft: str
    verdict: str


def review_flow() -> Flow[ReviewState]:
    """draft (model) -> approve (human interrupt) -> END."""
    flow: Flow[ReviewState] = Flow("review", ReviewState)

    @flow.node(needs=Needs())
    async def draft(state: ReviewState, model: RoutedChatModel) -> ReviewState:
        answer = await model.ainvoke([HumanMessage(state["text"])])
        return {"draft": str(answer.content)}

    @flow.node()
    def approve(state: ReviewState) -> ReviewState:
        return {"verdict": interrupt({"question": "approve this draft?", "draft": state["draft"]})}

    flow.add_edge(START, "draft")
    flow.add_edge("draft", "approve")
    flow.add_edge("approve", END)
    return flow


async def _main(command: str, url: str, run_id: str) -> None:
    from frugalflow.testing.simulator import simulator
    from frugalflow.runner import Runner

    simulator.reset(seed=0)
    latency = KILL_WINDOW if command == "start" else LATENCY
    runner = Runner(url, flows=[chain_flow(announce=True)], catalog=_latency_catalog(latency),
                    breakers=BreakerRegistry(), lease_ttl=1.0)
    try:
        if command == "start":
            result = await runner.start("chain", {"topic": "durability"}, run_id=run_id)
        else:
            result = await runner.resume(run_id, wait_for_lease=10.0)
        print(f"finished {result.status}", flush=True)
    finally:
        await runner.close()


def _latency_catalog(latency: float = LATENCY) -> Catalog:
    cat = Catalog.simulated()
    return Catalog(
        [s.model_copy(update={"model_kwargs": {"latency": latency}}) for s in cat], name="slow"
    )


if __name__ == "__main__":
    asyncio.run(_main(*sys.argv[1:4]))
