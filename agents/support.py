"""Agents for customer support: triage, field extraction, drafting and review."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from frugalflow import Agent, Needs

Category = Literal["billing", "shipping", "account", "technical", "other"]


class Triage(BaseModel):
    category: Category
    urgent: bool = Field(description="true when the customer is blocked or losing money")


class TicketFields(BaseModel):
    """Structured fields extracted from a support ticket."""

    customer_name: str = Field(description="the customer's name, or 'unknown'")
    order_id: str | None = Field(default=None, description="an order number if mentioned")
    product: str | None = Field(default=None, description="the product concerned")
    urgency: Literal["low", "normal", "high"] = "normal"
    summary: str = Field(description="one sentence describing the problem")


def _ticket(state: Any) -> str:
    return str(state["ticket"])


triager = Agent(
    name="triage",
    instructions="Classify the support ticket and say whether it is urgent.",
    needs=Needs(quality={"classification": 0.34}, expected_output_tokens=20),
    output=Triage,
    prompt=_ticket,
)

extractor = Agent(
    name="extract",
    instructions="Extract the ticket's fields. Use 'unknown' or null when absent.",
    needs=Needs(quality={"extraction": 0.2}, expected_output_tokens=120),
    output=TicketFields,
    prompt=_ticket,
)

drafter = Agent(
    name="draft",
    instructions="Write a short, friendly, accurate reply to the customer.",
    needs=Needs(quality={"writing": 0.28}, expected_output_tokens=350),
    prompt=lambda s: f"Ticket: {s['ticket']}\nKnown fields: {s.get('fields')}",
)

reviewer = Agent(
    name="review",
    instructions=("Review the reply for accuracy, tone and policy. Start with APPROVE or "
                  "REJECT, then one sentence of reasons."),
    needs=Needs(quality={"reasoning": 0.72}, expected_output_tokens=150),
    prompt=lambda s: f"Ticket:\n{s['ticket']}\n\nReply:\n{s['draft']}",
)
