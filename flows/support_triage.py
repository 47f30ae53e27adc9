"""Support triage: classify a ticket, extract its fields, draft a reply, review the draft.

Each step asks for what it needs and no more: classification is easy and goes to a small
model; the review needs strong reasoning and goes to a frontier model only for that step.
The extraction is checked against the ticket (`check_fields`): a failed answer escalates to
a more capable model and is an outcome a learned router trains on (`cascade=True`: with a
router in the run, e.g. `frugalflow run support_triage --router NAME`, each ticket starts
on the model with the lowest expected cost per validated answer).
"""

from __future__ import annotations

import re
from typing import TypedDict

from langchain_core.messages import HumanMessage, SystemMessage

from frugalflow import END, START, Flow, Needs, RoutedChatModel

# Installed from the wheel the folder is frugalflow_agents (see pyproject.toml).
if __package__ == "frugalflow_flows":
    from frugalflow_agents.support import TicketFields
else:
    from agents.support import TicketFields

CATEGORIES = ("billing", "shipping", "account", "technical", "other")


class TriageState(TypedDict, total=False):
    ticket: str
    category: str
    fields: dict[str, object]
    draft: str
    review: str
    approved: bool


class TriageInput(TypedDict):
    """What a run starts from: `frugalflow run support_triage -i '{"ticket": "..."}'`."""

    ticket: str


flow: Flow[TriageState] = Flow(
    "support_triage", TriageState,
    description="classify -> extract fields (structured) -> draft reply -> review",
    input_schema=TriageInput,
)


@flow.node(needs=Needs(quality={"classification": 0.34}, expected_output_tokens=5))
async def classify(state: TriageState, model: RoutedChatModel) -> TriageState:
    answer = await model.ainvoke(
        [
            SystemMessage(f"Classify the ticket into one of: {', '.join(CATEGORIES)}. "
                          "Answer with the category only."),
            HumanMessage(state["ticket"]),
        ]
    )
    text = str(answer.content).lower()
    category = next((c for c in CATEGORIES if c in text), "other")
    return {"category": category}


def check_fields(fields: TicketFields, ticket: str) -> bool | str:
    """True, or why the extracted fields cannot be right for this ticket."""
    name = fields.customer_name.strip()
    if name.lower() != "unknown" and name.lower() not in ticket.lower():
        return f"customer name {name!r} is not in the ticket"
    if fields.order_id and fields.order_id not in ticket:
        return f"order id {fields.order_id!r} is not in the ticket"
    if fields.order_id is None and re.search(r"(?i)\border\s*#?\d", ticket):
        return "the ticket names an order but order_id is empty"
    return True


@flow.node(needs=Needs(structured_output=True, quality={"extraction": 0.2},
                       expected_output_tokens=120, cascade=True))
async def extract(state: TriageState, model: RoutedChatModel) -> TriageState:
    ticket = state["ticket"]
    # The category from `classify` is a routing feature: billing tickets may need another
    # model than shipping ones, and a learned router can tell from the outcomes.
    checked = model.with_category(state.get("category")).with_validator(
        lambda f: check_fields(f, ticket))
    fields = await checked.with_structured_output(TicketFields).ainvoke(
        [SystemMessage("Extract the ticket's fields."), HumanMessage(ticket)]
    )
    return {"fields": fields.model_dump()}


@flow.node(needs=Needs(quality={"writing": 0.28}, expected_output_tokens=350))
async def draft(state: TriageState, model: RoutedChatModel) -> TriageState:
    answer = await model.ainvoke(
        [
            SystemMessage("Write a short, friendly reply to this support ticket. "
                          f"Category: {state['category']}. Known fields: {state['fields']}."),
            HumanMessage(state["ticket"]),
        ]
    )
    return {"draft": str(answer.content)}


@flow.node(needs=Needs(quality={"reasoning": 0.72}, expected_output_tokens=150))
async def review(state: TriageState, model: RoutedChatModel) -> TriageState:
    answer = await model.ainvoke(
        [
            SystemMessage("Review this reply for accuracy, tone and policy. Start with "
                          "APPROVE or REJECT, then one sentence of reasons."),
            HumanMessage(f"Ticket:\n{state['ticket']}\n\nReply:\n{state['draft']}"),
        ]
    )
    text = str(answer.content)
    return {"review": text, "approved": not text.upper().startswith("REJECT")}


flow.add_edge(START, "classify")
flow.add_edge("classify", "extract")
flow.add_edge("extract", "draft")
flow.add_edge("draft", "review")
flow.add_edge("review", END)
