"""Nightly enrichment: tag every document (each may wait for a batch price), then summarize.

enrich (one task per document, `Send`) -> summarize -> END. The enrich calls say they may
wait until a deadline (`Needs(deadline=...)`, 6 hours here), so they go to a provider's
batch, flex tier or a cheaper hour when one meets the deadline, and the run parks as
`waiting` until the answers land; the summary may not wait, even under a run's default
deadline (`Needs(deadline=timedelta(0))`). `nightly(deadline=None)` is the
same flow all-standard; `approval=True` adds a human's go-ahead beside the waiting tasks.
"""

from __future__ import annotations

import operator
from datetime import timedelta
from typing import Annotated, Any

from typing_extensions import TypedDict  # pydantic (LangGraph Studio's forms) reads it on 3.11

from langchain_core.messages import HumanMessage
from langgraph.types import Send, interrupt

from frugalflow import END, START, Flow, Needs, RoutedChatModel

DEADLINE = timedelta(hours=6)


class NightlyState(TypedDict, total=False):
    docs: list[str]
    notes: Annotated[list[str], operator.add]
    summary: str
    approved: Any


class NightlyInput(TypedDict):
    """What a run starts from: `frugalflow run nightly_enrichment -i '{"docs": ["..."]}'`."""

    docs: list[str]


def nightly(deadline: timedelta | None = DEADLINE, *, name: str = "nightly_enrichment",
            approval: bool = False) -> Flow[NightlyState]:
    """The flow with its enrich calls allowed to wait `deadline` (None: not at all)."""
    flow: Flow[NightlyState] = Flow(
        name, NightlyState, input_schema=NightlyInput,
        description="enrich each document (may wait for a batch price) -> summarize")

    async def enrich(state: dict[str, str], model: RoutedChatModel) -> NightlyState:
        answer = await model.ainvoke([HumanMessage(f"Tag this document: {state['doc']}")])
        return {"notes": [f"{state['doc']}: {str(answer.content)[:40]}"]}

    async def summarize(state: NightlyState, model: RoutedChatModel) -> NightlyState:
        answer = await model.ainvoke([HumanMessage("Summarize: " + " | ".join(state["notes"]))])
        return {"summary": str(answer.content)[:80]}

    def approve(state: NightlyState) -> NightlyState:
        return {"approved": interrupt({"question": "send tonight's summary?"})}

    flow.add_node("enrich", enrich, needs=Needs(deadline=deadline))
    # Answers now, also when the run is started with a default deadline for its nodes.
    flow.add_node("summarize", summarize, needs=Needs(deadline=timedelta(0)))
    flow.add_conditional_edges(
        START, lambda s: [Send("enrich", {"doc": d}) for d in s["docs"]], ["enrich"])
    if approval:
        flow.add_node("approve", approve)
        flow.add_edge(START, "approve")
        flow.add_edge(["enrich", "approve"], "summarize")
    else:
        flow.add_edge("enrich", "summarize")
    flow.add_edge("summarize", END)
    return flow


flow = nightly()
