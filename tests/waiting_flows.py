"""The flow the waiting-run tests use, importable by the test process and by the poller
subprocess (tests/batch_poller_child.py): enrich (one task per document, may wait until its
deadline) -> summarize (now); with `ask`, a human's question beside the waiting tasks."""

from __future__ import annotations

import operator
from datetime import timedelta
from typing import Annotated, Any, TypedDict

from langchain_core.messages import HumanMessage
from langgraph.types import Send, interrupt

from frugalflow import END, START, Catalog, Flow, Needs, RoutedChatModel
from frugalflow.testing.emulator import EMULATOR_KEY_ENV

MODELS = ("openai/gpt-4o-mini", "anthropic/claude-haiku-4-5")
ROUTES = {"openai": "/openai/v1", "anthropic": "/anthropic", "google": "/gemini"}


class DocState(TypedDict, total=False):
    docs: list[str]
    notes: Annotated[list[str], operator.add]
    summary: str
    approved: Any


def nightly(deadline: timedelta | None = timedelta(hours=6), *, ask: bool = False,
            name: str = "nightly") -> Flow[DocState]:
    flow: Flow[DocState] = Flow(name, DocState)

    async def enrich(state: dict[str, str], model: RoutedChatModel) -> DocState:
        answer = await model.ainvoke([HumanMessage(f"Tag this document: {state['doc']}")])
        return {"notes": [f"{state['doc']}: {str(answer.content)[:40]}"]}

    async def summarize(state: DocState, model: RoutedChatModel) -> DocState:
        answer = await model.ainvoke([HumanMessage("Summarize: " + " | ".join(state["notes"]))])
        return {"summary": str(answer.content)[:80]}

    def approve(state: DocState) -> DocState:
        return {"approved": interrupt({"question": "send tonight's summary?"})}

    flow.add_node("enrich", enrich, needs=Needs(deadline=deadline))
    flow.add_node("summarize", summarize, needs=Needs())
    flow.add_conditional_edges(
        START, lambda s: [Send("enrich", {"doc": d}) for d in s["docs"]], ["enrich"])
    if ask:
        flow.add_node("approve", approve)
        flow.add_edge(START, "approve")
        flow.add_edge(["enrich", "approve"], "summarize")
    else:
        flow.add_edge("enrich", "summarize")
    flow.add_edge("summarize", END)
    return flow


def catalog_at(url: str, models: tuple[str, ...] = MODELS) -> Catalog:
    """The built-in entries of `models` served by the emulator at `url` (another process's)."""
    builtin = Catalog.builtin()
    return Catalog([builtin[m].model_copy(update={
        "base_url": url + ROUTES[builtin[m].provider], "api_key_env": EMULATOR_KEY_ENV})
        for m in models], name="emulated")
