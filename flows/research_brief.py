"""Research brief: plan sub-questions -> research them in parallel (Send) -> synthesise ->
critique, revising at most MAX_REVISIONS times.

Research searches local documents (examples/data/kb by default, shipped in the wheel as
frugalflow_flows/kb; FRUGALFLOW_KB to change).
"""

from __future__ import annotations

import operator
import os
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

from langgraph.types import Send

from frugalflow import END, START, Flow
from frugalflow.flow import Agent

# Installed from the wheel these folders are frugalflow_flows/_agents/_tools (see pyproject.toml).
if __package__ == "frugalflow_flows":
    from frugalflow_agents import critic, planner, researcher, synthesizer
    from frugalflow_tools import make_document_search
else:
    from agents import critic, planner, researcher, synthesizer
    from tools import make_document_search

MAX_REVISIONS = 2
_HERE = Path(__file__).resolve().parent
# The wheel ships the documents as frugalflow_flows/kb; a checkout has them in examples/data/kb.
KB = Path(os.environ.get("FRUGALFLOW_KB") or (
    _HERE / "kb" if (_HERE / "kb").is_dir() else _HERE.parent / "examples/data/kb"))


class BriefState(TypedDict, total=False):
    topic: str
    questions: list[str]
    findings: Annotated[list[str], operator.add]
    brief: str
    acceptable: bool
    issues: list[str]
    revisions: int


class BriefInput(TypedDict):
    """What a run starts from: the topic to brief on."""

    topic: str


flow: Flow[BriefState] = Flow(
    "research_brief", BriefState,
    description="plan -> parallel research (Send) -> synthesis -> critique loop (bounded)",
    input_schema=BriefInput,
)

_research = Agent(**{**researcher.__dict__, "tools": [make_document_search(KB)]})


async def plan(state: BriefState, model: Any) -> BriefState:
    out = await planner.run(state, model)
    return {"questions": out["plan"]["questions"][:4], "revisions": 0}


async def research(state: dict[str, Any], model: Any) -> BriefState:
    out = await _research.run(state, model)
    return {"findings": [f"Q: {state['question']}\nA: {out['research']}"]}


async def synthesize(state: BriefState, model: Any) -> BriefState:
    out = await synthesizer.run(state, model)
    return {"brief": out["synthesize"]}


async def critique(state: BriefState, model: Any) -> BriefState:
    out = (await critic.run(state, model))["critique"]
    return {"acceptable": out["acceptable"], "issues": out["issues"],
            "revisions": state.get("revisions", 0) + (0 if out["acceptable"] else 1)}


def fan_out(state: BriefState) -> list[Send]:
    return [Send("research", {"question": q}) for q in state["questions"]]


def after_critique(state: BriefState) -> Literal["synthesize", "__end__"]:
    if state.get("acceptable") or state.get("revisions", 0) > MAX_REVISIONS:
        return END
    return "synthesize"


flow.add_node("plan", plan, needs=planner.needs)
flow.add_node("research", research, needs=_research.needs)
flow.add_node("synthesize", synthesize, needs=synthesizer.needs)
flow.add_node("critique", critique, needs=critic.needs)
flow.add_edge(START, "plan")
flow.add_conditional_edges("plan", fan_out, ["research"])
flow.add_edge("research", "synthesize")
flow.add_edge("synthesize", "critique")
flow.add_conditional_edges("critique", after_critique)
