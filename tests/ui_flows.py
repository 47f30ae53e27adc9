"""A flow for the run viewer's tests that waits where the test says: `first` (a model call),
then `hold` (waits on the test's gate), then `second` (a model call). A page opened while the
run holds sees it running; releasing the gate lets the test watch the rest arrive live."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TypedDict

from langchain_core.messages import HumanMessage

from frugalflow import END, START, Flow, Needs, RoutedChatModel


class GatedState(TypedDict, total=False):
    topic: str
    first: str
    second: str


@dataclass
class Gate:
    """`reached` is set when a run holds; `release()` lets every holding run go on."""

    reached: asyncio.Event = field(default_factory=asyncio.Event)
    opened: asyncio.Event = field(default_factory=asyncio.Event)

    def release(self) -> None:
        self.opened.set()


def gated_flow(gate: Gate) -> Flow[GatedState]:
    flow: Flow[GatedState] = Flow("gated", GatedState)

    async def first(state: GatedState, model: RoutedChatModel) -> GatedState:
        answer = await model.ainvoke([HumanMessage(f"first: {state['topic']}")])
        return {"first": str(answer.content)[:80]}

    async def hold(state: GatedState) -> GatedState:
        gate.reached.set()
        await gate.opened.wait()
        return {}

    async def second(state: GatedState, model: RoutedChatModel) -> GatedState:
        answer = await model.ainvoke([HumanMessage(f"second: {state['first']}")])
        return {"second": str(answer.content)[:80]}

    needs = Needs(quality={"classification": 0.45})
    flow.add_node("first", first, needs=needs)
    flow.add_node("hold", hold, model=False)
    flow.add_node("second", second, needs=needs)
    flow.add_edge(START, "first")
    flow.add_edge("first", "hold")
    flow.add_edge("hold", "second")
    flow.add_edge("second", END)
    return flow
