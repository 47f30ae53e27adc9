"""Document extraction with a validator that escalates.

extract (structured output, cheapest capable model) -> check -> END. The validator checks the
extracted invoice against its own arithmetic and the source text; an answer that fails is
paid for, recorded as a failed outcome, and the call escalates to a more capable model.

On the simulated catalog an oracle (frugalflow.testing.oracles) reads the invoice with a
regex, and each simulated model returns the right fields with a probability set by its
quality score (lower on messy invoices), so cheap models fail on hard documents the way real
ones do.
"""

from __future__ import annotations

from typing import Any, TypedDict

from langchain_core.messages import HumanMessage, SystemMessage
from pydantic import BaseModel, Field

from frugalflow import END, START, Flow, Needs, RoutedChatModel


class Invoice(BaseModel):
    """Fields of an invoice."""

    invoice_number: str = Field(description="as printed, e.g. INV-2041")
    vendor: str
    currency: str = Field(description="ISO code, e.g. EUR")
    subtotal: float
    tax: float
    total: float


class ExtractionState(TypedDict, total=False):
    document: str
    invoice: dict[str, Any]
    valid: bool


def check_invoice(invoice: Invoice, document: str | None = None) -> bool | str:
    """True, or the reason the extraction cannot be right."""
    if abs(invoice.subtotal + invoice.tax - invoice.total) > 0.011:
        return f"subtotal {invoice.subtotal} + tax {invoice.tax} != total {invoice.total}"
    if document is not None:
        if invoice.invoice_number not in document:
            return f"invoice number {invoice.invoice_number!r} is not in the document"
        if invoice.vendor.lower() not in document.lower():
            return f"vendor {invoice.vendor!r} is not in the document"
        if invoice.currency not in document:
            return f"currency {invoice.currency!r} is not in the document"
    return True


class ExtractionInput(TypedDict):
    """What a run starts from: the document's text."""

    document: str


flow: Flow[ExtractionState] = Flow(
    "document_extraction", ExtractionState,
    description="extract invoice fields; a validator escalates failed extractions",
    input_schema=ExtractionInput,
)


@flow.node(needs=Needs(quality={"extraction": 0.2}, expected_output_tokens=80, cascade=True))
async def extract(state: ExtractionState, model: RoutedChatModel) -> ExtractionState:
    document = state["document"]
    validated = model.with_validator(lambda inv: check_invoice(inv, document))
    invoice = await validated.with_structured_output(Invoice).ainvoke(
        [SystemMessage("Extract the invoice fields exactly as printed."), HumanMessage(document)]
    )
    return {"invoice": invoice.model_dump(), "valid": True}


flow.add_edge(START, "extract")
flow.add_edge("extract", END)


def sample_invoices(n: int = 20, seed: int = 0) -> list[str]:
    """Generated invoices, some tidy and some messy (notes, credits, references)."""
    import random

    rng = random.Random(seed)
    vendors = ["Acme Tools GmbH", "Northwind Traders", "Blue Harbor Ltd", "Kite & Co"]
    out = []
    for i in range(n):
        sub = round(rng.uniform(50, 5000), 2)
        tax = round(sub * rng.choice([0.07, 0.19, 0.2]), 2)
        lines = [f"Invoice INV-{2000 + i}", f"From: {rng.choice(vendors)}",
                 f"Date: 2026-0{1 + i % 9}-1{i % 9}", f"Currency: {rng.choice(['EUR', 'USD', 'GBP'])}"]
        if i % 3 == 0:  # a messy one
            lines += [f"Note: replaces previous invoice INV-{1000 + i}",
                      f"Ref: PO-{rng.randint(10000, 99999)}", "Credit applied: none",
                      "Discount terms: 2% within 10 days"]
        lines += [f"Subtotal: {sub:.2f}", f"VAT 19%: {tax:.2f}", f"Total due: {sub + tax:.2f}"]
        out.append("\n".join(lines))
    return out
