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
from typing import Any, Literal, TypedDict

from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import BaseModel, Field

from frugalflow import END, START, Flow, Needs, RoutedChatModel
from frugalflow.testing.simulator import simulator

CATEGORIES = ("billing", "shipping", "account", "technical", "other")


class TicketFields(BaseModel):
    """Structured fields extracted from a support ticket."""

    customer_name: str = Field(description="the customer's name, or 'unknown'")
    order_id: str | None = Field(default=None, description="an order number if mentioned")
    product: str | None = Field(default=None, description="the product concerned")
    urgency: Literal["low", "normal", "high"] = "normal"
    summary: str = Field(description="one sentence describing the problem")


class TriageState(TypedDict, total=False):
    ticket: str
    category: str
    fields: dict[str, object]
    draft: str
    review: str
    approved: bool


flow: Flow[TriageState] = Flow(
    "support_triage", TriageState,
    description="classify -> extract fields (structured) -> draft reply -> review",
)


@flow.node(needs=Needs(quality={"classification": 0.6}, expected_output_tokens=5))
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


@flow.node(needs=Needs(structured_output=True, quality={"extraction": 0.7},
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


@flow.node(needs=Needs(quality={"writing": 0.8}, expected_output_tokens=350))
async def draft(state: TriageState, model: RoutedChatModel) -> TriageState:
    answer = await model.ainvoke(
        [
            SystemMessage("Write a short, friendly reply to this support ticket. "
                          f"Category: {state['category']}. Known fields: {state['fields']}."),
            HumanMessage(state["ticket"]),
        ]
    )
    return {"draft": str(answer.content)}


@flow.node(needs=Needs(quality={"reasoning": 0.8}, expected_output_tokens=150))
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


# -- simulation support: the oracle that simulated models consult -------------------------


def read_ticket(messages: list[Any]) -> tuple[dict[str, Any], float]:
    """The right fields of a ticket, and how hard it is to read (0..1)."""
    text = str(messages[-1].content)
    name = (re.search(r"(?:I'm|I am|This is|[Nn]ame is)\s+([A-Z][a-z]+(?: [A-Z][a-z]+)?)", text)
            or re.search(r"(?:^|\s)[-\u2014]\s*([A-Z][a-z]+)\s*$", text)
            or re.search(r"(?:Regards|Thanks|Cheers),?\s+([A-Z][a-z]+(?: [A-Z][a-z]+)?)", text))
    order = re.search(r"(?i)\border\s*#?\s*(\d+)", text)
    product = re.search(r"\(the ([^)]+)\)", text)
    urgent = re.search(r"(?i)urgent|asap|immediately|blocked", text)
    summary = re.split(r"(?<=[.?!])\s", text.strip(), maxsplit=1)[0][:120]
    answer = {
        "customer_name": name.group(1) if name else "unknown",
        "order_id": order.group(1) if order else None,
        "product": product.group(1) if product else None,
        "urgency": "high" if urgent else "normal",
        "summary": summary,
    }
    # Several orders or a forwarded thread make a ticket hard; a short one is easy.
    orders = len(re.findall(r"(?i)\border\s*#?\s*\d+", text))
    tangled = len(re.findall(r"(?i)forwarded|previous|also|another|wrong order", text))
    return answer, min(1.0, 0.3 * max(0, orders - 1) + 0.2 * tangled + len(text) / 3000)


simulator.oracles["TicketFields"] = read_ticket
