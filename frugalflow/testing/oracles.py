"""Oracles for the ready-made flows: the right answer to an input, and how hard it is to read.

A simulated model asked for a tool or schema its `Simulator` has an oracle for answers with
the oracle's right answer, with a probability set by its quality and the input's difficulty
(cheap models fail on hard documents the way real ones do); the provider emulator answers
with it outright, so the flows' validators accept its answers. The process-wide `simulator`
starts with `FLOW_ORACLES`, so the demo, `frugalflow run` on the simulated catalog, the
notebooks and the tests run the ready-made flows offline; importing a flow registers nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from langchain_core.messages import BaseMessage

__all__ = ["FLOW_ORACLES", "Oracle", "read_invoice", "read_ticket"]

Oracle = Callable[[list[BaseMessage]], tuple[dict[str, Any], float]]
"""Messages -> (the right answer's fields, the input's difficulty 0..1)."""

_NUM = r"([0-9]+(?:\.[0-9]{1,2})?)"


def read_invoice(messages: list[BaseMessage]) -> tuple[dict[str, Any], float]:
    """The right fields of a (generated) invoice (flows/document_extraction.py's `Invoice`),
    and how hard the document is (0..1)."""
    text = str(messages[-1].content)
    field = {
        "invoice_number": re.search(r"(INV-\d+)", text),
        "vendor": re.search(r"(?:From|Vendor|Seller):\s*(.+)", text),
        "currency": re.search(r"\b(EUR|USD|GBP|CHF)\b", text),
        "subtotal": re.search(r"Subtotal[^:\n]*:\s*" + _NUM, text),
        "tax": re.search(r"(?:Tax|VAT)[^:\n]*:\s*" + _NUM, text),
        "total": re.search(r"Total[^:\n]*:\s*" + _NUM, text),
    }
    answer: dict[str, Any] = {}
    for key, m in field.items():
        if m is None:
            return {}, 1.0
        value = m.group(1).strip()
        answer[key] = float(value) if key in ("subtotal", "tax", "total") else value
    noise = len(re.findall(r"(?i)note|ref|previous|credit|discount", text))
    return answer, min(1.0, 0.15 * noise + len(text) / 4000)


def read_ticket(messages: list[BaseMessage]) -> tuple[dict[str, Any], float]:
    """The right fields of a support ticket (agents/support.py's `TicketFields`), and how hard
    it is to read (0..1)."""
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


FLOW_ORACLES: Final[Mapping[str, Oracle]] = {"Invoice": read_invoice, "TicketFields": read_ticket}
"""Schema name -> oracle, for the ready-made flows' structured outputs."""

