"""`frugalflow flows` and `GET /flows`: each flow, its nodes and the input it takes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypedDict

from rich.table import Table
from rich.text import Text

from .flow import Flow
from .inputs import describe_fields, input_fields

__all__ = ["FlowInfo", "flow_json", "flows_json", "flows_table"]


class FlowInfo(TypedDict):
    """One flow as `frugalflow flows --json` and `GET /flows` show it."""

    name: str
    description: str
    nodes: list[dict[str, str | None]]
    input: list[dict[str, Any]] | None
    """Each input field's name, type and whether it is required (None: not readable)."""


def flow_json(flow: Flow[Any]) -> FlowInfo:
    fields = input_fields(flow)
    return {"name": flow.name, "description": flow.description,
            "nodes": [{"name": n.name, "needs": n.needs.describe() if n.needs else None}
                      for n in flow.nodes.values()],
            "input": None if fields is None else [f.as_json() for f in fields]}


def flows_json(flows: Sequence[Flow[Any]]) -> list[FlowInfo]:
    return [flow_json(f) for f in flows]


def flows_table(flows: Sequence[Flow[Any]]) -> Table:
    table = Table(title="flows")
    for col in ("flow", "input (required unless optional)", "nodes", "description"):
        table.add_column(col, overflow="fold")
    for f in flows:
        fields = input_fields(f)
        table.add_row(f.name, "any object" if fields is None else describe_fields(fields),
                      ", ".join(f.nodes), Text(f.description))
    return table
