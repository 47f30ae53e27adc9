"""The states a run, a node execution and a model call can be in, and how a failed call is
classified: the vocabulary stored in the ledger (as their string values).

They are `StrEnum`s: a member equals its string, so rows written before the enums existed
read back unchanged and JSON, SQL and logs see the plain value.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["FINAL_STATUSES", "BatchItemStatus", "BatchStatus", "ErrorClass", "NodeStatus", "Outcome",
           "RunStatus"]


class RunStatus(StrEnum):
    """Where a run stands (`ff_runs.status`)."""

    PENDING = "pending"  # created, not started
    QUEUED = "queued"  # waiting for a worker (dispatched) or for its resume
    RUNNING = "running"  # an executor holds its lease
    PAUSED = "paused"  # stopped without finishing (database away, shutdown, taken over)
    INTERRUPTED = "interrupted"  # waiting for a human's answer (`Runner.resume(value=...)`)
    WAITING = "waiting"  # parked on a batch or a cheaper hour: holds no worker; woken by the poller
    BUDGET_EXCEEDED = "budget_exceeded"  # stopped at its budget; resume with a larger one
    FAILED = "failed"  # an error ended it; resumable from its last checkpoint
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"


FINAL_STATUSES: frozenset[RunStatus] = frozenset({RunStatus.SUCCEEDED, RunStatus.CANCELLED})
"""A run in one of these never runs again."""


class NodeStatus(StrEnum):
    """One node execution (`ff_node_runs.status`)."""

    RUNNING = "running"
    DONE = "done"
    INTERRUPTED = "interrupted"
    WAITING = "waiting"  # parked on a batch item or a cheaper hour; runs again when woken
    ERROR = "error"
    ABANDONED = "abandoned"  # its executor died, or its checkpoint writes were lost


class Outcome(StrEnum):
    """One model call (`ff_attempts.outcome`, `Attempt.outcome`)."""

    PENDING = "pending"  # written before it was sent; filled in when it returns
    OK = "ok"
    ERROR = "error"
    REPLAYED = "replayed"  # answered from the ledger after a crash: not paid again
    ABANDONED = "abandoned"  # its executor died before the answer was written
    LATE = "late"  # a batch answer that came after its call had moved on: paid, not used


class ErrorClass(StrEnum):
    """How a failed model call is stored (`ff_attempts.error_class`) and counted. Code that
    reacts to a failure branches on the exception's type; this is its name on disk."""

    UNKNOWN = "unknown"
    RATE_LIMIT = "rate_limit"
    OVERLOADED = "overloaded"
    TIMEOUT = "timeout"
    CONNECTION = "connection"
    INCOMPLETE = "incomplete"
    AUTH = "auth"
    CONTEXT_LENGTH = "context_length"
    CONTENT_FILTER = "content_filter"
    MALFORMED = "malformed"
    VALIDATION = "validation"
    INVALID_REQUEST = "invalid_request"
    ABANDONED = "abandoned"  # the call's executor died before its answer was written
    UNANSWERED = "unanswered"  # its batch expired, failed or was cancelled before answering it


class BatchStatus(StrEnum):
    """One provider batch (`ff_batches.status`): frugalflow's side of its life."""

    OPEN = "open"  # gathering items; not sent yet
    SUBMITTING = "submitting"  # being sent: a restart looks the provider up before sending again
    SUBMITTED = "submitted"  # the provider has it (`provider_batch_id`)
    ENDED = "ended"  # the provider finished it; its items' results are collected
    FAILED = "failed"  # the provider refused or failed the whole batch
    EXPIRED = "expired"  # the provider's completion window passed
    CANCELLED = "cancelled"


class BatchItemStatus(StrEnum):
    """One parked request (`ff_batch_items.status`)."""

    QUEUED = "queued"  # waiting to be grouped into a batch (or for its hour: a timer)
    SUBMITTED = "submitted"  # in a provider batch
    SUCCEEDED = "succeeded"  # its answer is in `result`
    FAILED = "failed"  # the provider answered it with an error (`error`)
    EXPIRED = "expired"  # its batch expired or failed before answering it
    ABANDONED = "abandoned"  # given up (its deadline came too close, or its run was cancelled)
    DUE = "due"  # a timer item whose hour came: the node calls synchronously now
    USED = "used"  # its answer was taken by the node (the attempt row records the payment)
