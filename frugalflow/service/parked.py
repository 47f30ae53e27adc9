"""A run's parked requests as the service shows them: the ledger's batch items without their
request and answer bodies (user data), each with the status of the batch it was sent in."""

from __future__ import annotations

from typing import Any

from ..persistence.parked import ParkedLedger
from ..persistence.tables import BatchItemRow

__all__ = ["SHOWN", "parked_items", "parked_json", "parked_requests"]

SHOWN = ("id", "run_id", "node", "task_id", "call_id", "model", "provider", "tier", "status",
         "batch_id", "created_at", "deadline_at", "fallback_at", "wake_at", "ended_at",
         "cost_usd", "expected_cost_usd", "input_tokens", "output_tokens", "error",
         "error_class")
"""The fields of `ParkedRequest` read from an item (not `request` nor `result`)."""


async def parked_items(parked: ParkedLedger, run_id: str
                       ) -> tuple[list[BatchItemRow], dict[str, str]]:
    """The run's items, oldest first, and the status of each batch they were sent in."""
    items = await parked.all_items(run_id)
    batches: dict[str, str] = {}
    for batch_id in dict.fromkeys(i.batch_id for i in items if i.batch_id):
        batch = await parked.get_batch(batch_id)
        if batch is not None:
            batches[batch_id] = batch.status
    return items, batches


def parked_json(item: BatchItemRow, batch_status: str | None) -> dict[str, Any]:
    out: dict[str, Any] = item.model_dump(mode="json", include=set(SHOWN))
    out["batch_status"] = batch_status
    return out


async def parked_requests(parked: ParkedLedger, run_id: str) -> list[dict[str, Any]]:
    """`GET /runs/{run_id}/parked`: the run's items as `ParkedRequest` JSON."""
    items, batches = await parked_items(parked, run_id)
    return [parked_json(i, batches.get(i.batch_id or "")) for i in items]
