"""The database tables, as SQLModel models: checkpoints, the run ledger, leases, schema version.

Checkpoint tables follow LangGraph's own Postgres saver: a checkpoint row holds the
checkpoint without its channel values; each channel value is a blob stored once per
(channel, version), so a step writes only the channels it changed.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, Column, Index, LargeBinary
from sqlmodel import Field, SQLModel

from ..statuses import NodeStatus, RunStatus

__all__ = [
    "AttemptRow",
    "BatchItemRow",
    "BatchRow",
    "CheckpointBlobRow",
    "CheckpointRow",
    "CheckpointWriteRow",
    "EvalCellRow",
    "EvalRow",
    "EventRow",
    "LeaseHistoryRow",
    "RouterRow",
    "LeaseRow",
    "NodeRunRow",
    "PolicyRow",
    "RunRow",
    "SchemaVersionRow",
    "metadata",
]

metadata = SQLModel.metadata


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class SchemaVersionRow(SQLModel, table=True):
    """Applied migrations; the highest `v` is the schema version of the database."""

    __tablename__ = "ff_schema"

    v: int = Field(primary_key=True)
    applied_at: datetime = Field(default_factory=utcnow)


# -- checkpoints ---------------------------------------------------------------------------


class CheckpointRow(SQLModel, table=True):
    __tablename__ = "ff_checkpoints"

    thread_id: str = Field(primary_key=True)
    checkpoint_ns: str = Field(default="", primary_key=True)
    checkpoint_id: str = Field(primary_key=True)
    parent_checkpoint_id: str | None = None
    run_id: str | None = Field(default=None, index=True)
    type: str | None = None
    checkpoint: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    metadata_: dict[str, Any] = Field(
        default_factory=dict, sa_column=Column("metadata", JSON, nullable=False)
    )


class CheckpointBlobRow(SQLModel, table=True):
    __tablename__ = "ff_checkpoint_blobs"

    thread_id: str = Field(primary_key=True)
    checkpoint_ns: str = Field(default="", primary_key=True)
    channel: str = Field(primary_key=True)
    version: str = Field(primary_key=True)
    type: str
    blob: bytes | None = Field(default=None, sa_column=Column(LargeBinary, nullable=True))


class CheckpointWriteRow(SQLModel, table=True):
    __tablename__ = "ff_checkpoint_writes"
    __table_args__ = (Index("ff_checkpoint_writes_run", "run_id"),)

    thread_id: str = Field(primary_key=True)
    checkpoint_ns: str = Field(default="", primary_key=True)
    checkpoint_id: str = Field(primary_key=True)
    task_id: str = Field(primary_key=True)
    idx: int = Field(primary_key=True)
    channel: str
    type: str | None = None
    blob: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    task_path: str = ""
    run_id: str | None = None


# -- the run ledger ------------------------------------------------------------------------


class RunRow(SQLModel, table=True):
    """One run of a flow: what it was asked, what it has spent, where it stands."""

    __tablename__ = "ff_runs"

    id: str = Field(primary_key=True)
    flow: str = Field(index=True)
    status: str = Field(default=RunStatus.PENDING, index=True)
    input: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    budget_usd: float | None = None
    cost_usd: float = 0.0
    output: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """A JSON-safe, secret-scrubbed copy of the final (or interrupted) state."""
    interrupts: list[Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    cancel_requested: bool = False
    pending_resume: dict[str, Any] | None = Field(
        default=None, sa_column=Column(JSON, nullable=True))
    """{"value": v}: the answer a dispatched resume carries to the worker that executes it."""
    error: str | None = None
    error_type: str | None = None
    created_at: datetime = Field(default_factory=utcnow, index=True)
    updated_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    principal: str | None = Field(default=None, index=True)
    """Who started the run: the name of the service token it came with (None: not named)."""
    trace_context: dict[str, str] | None = Field(
        default=None, sa_column=Column(JSON, nullable=True))
    """The W3C trace context (`traceparent`, `tracestate`) of the run's trace, so every
    execution of the run (a resume on another worker) continues the same trace; None
    before schema v7 or without tracing."""
    deadline_at: datetime | None = None
    """The run's default deadline for its nodes' answers (`Runner.start(deadline=...)`); a
    node's `Needs.deadline` counts from `created_at` instead. None before schema v8."""


class NodeRunRow(SQLModel, table=True):
    """One execution of one node in a run (a LangGraph task)."""

    __tablename__ = "ff_node_runs"

    id: str = Field(primary_key=True)  # LangGraph task id
    run_id: str = Field(index=True)
    node: str
    status: str = NodeStatus.RUNNING
    holder: str | None = None
    """The executor (worker) that ran it."""
    cost_usd: float = 0.0
    started_at: datetime = Field(default_factory=utcnow)
    finished_at: datetime | None = None
    error: str | None = None


class AttemptRow(SQLModel, table=True):
    """One try of one model for one call: the finance and reliability record."""

    __tablename__ = "ff_attempts"
    __table_args__ = (Index("ff_attempts_run_node", "run_id", "node"),
                      Index("ff_attempts_task", "task_id"))

    id: int | None = Field(default=None, primary_key=True)
    run_id: str | None = Field(default=None)
    task_id: str | None = None
    call_id: str = Field(index=True)
    flow: str | None = None
    node: str
    model: str
    provider: str
    try_number: int
    outcome: str
    error_class: str | None = None
    error: str | None = None
    action: str | None = None
    fallback_from: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    started_at: datetime = Field(default_factory=utcnow, index=True)
    call_key: str | None = Field(default=None, index=True)
    route_reason: str | None = None
    prompt: str | None = None
    """The input text (scrubbed, truncated) that learned routers train on."""
    feedback: bool | None = None
    """Explicit feedback on this answer (True good, False bad), from `Ledger.feedback`."""
    category: str | None = None
    """The input's category (`RoutedChatModel.with_category`), a feature routers learn from."""
    response: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The answer of a successful call, so a node re-executed after a crash replays it."""
    usage_estimated: bool | None = None
    """True: the provider reported no (or only partial) usage, so the tokens and cost are
    frugalflow's estimate; None: written before schema v3."""
    reasoning_tokens: int | None = None
    """Hidden reasoning (thinking) tokens billed as output, when the provider reports them
    (part of output_tokens); None: not reported, or written before schema v6."""
    request: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The request of a successful call (messages, tools, response schema; scrubbed), so an
    evaluation can replay production traffic to another model (`frugalflow eval
    --from-ledger`); None before schema v6."""
    tier: str | None = None
    """The service tier the call was made (and priced) on (`frugalflow.tiers.Tier`: standard,
    flex, batch, off_peak); None before schema v8 (standard)."""
    batch_item_id: str | None = None
    """For a batch-tier answer: its `ff_batch_items` row (the request as it was parked)."""


class EventRow(SQLModel, table=True):
    """The persisted event log: every run event in the order it happened. `id` is the
    event's id (SSE `id:`), increasing across the database, so a subscriber that comes
    late (or reconnects with Last-Event-ID) replays what it missed."""

    __tablename__ = "ff_events"
    __table_args__ = (Index("ff_events_run", "run_id", "id"),)

    id: int | None = Field(default=None, primary_key=True)
    run_id: str
    kind: str
    """The event's kind: run_started, node_started, attempt, node_finished, run_finished."""
    at: datetime = Field(default_factory=utcnow)
    data: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """The event's fields (scrubbed of secrets), without run_id, kind and time."""


class BatchRow(SQLModel, table=True):
    """One provider batch: the parked requests of many runs for one model, sent together.

    Written before it is sent (`submitting`), so a process that dies between the provider's
    answer and this row's update finds the batch at the provider (by its id in the batch's
    metadata) instead of sending it twice."""

    __tablename__ = "ff_batches"

    id: str = Field(primary_key=True)
    """frugalflow's id, sent with the batch (metadata or display name)."""
    provider: str
    model: str = Field(index=True)
    """The catalog key (`provider/model`)."""
    status: str = Field(default="open", index=True)
    """`frugalflow.statuses.BatchStatus`."""
    provider_batch_id: str | None = None
    items: int = 0
    error: str | None = None
    holder: str | None = None
    """The process that last claimed it (to submit or poll); claims expire."""
    claimed_until: datetime | None = None
    created_at: datetime = Field(default_factory=utcnow)
    submitted_at: datetime | None = None
    polled_at: datetime | None = None
    ended_at: datetime | None = None


class BatchItemRow(SQLModel, table=True):
    """One parked request of a run: a batch item, or a timer for a cheaper hour.

    Its id is the item's `custom_id` at the provider. A node executed again finds its item
    by (run_id, call_key): a request is parked, sent and paid once."""

    __tablename__ = "ff_batch_items"
    __table_args__ = (Index("ff_batch_items_call", "run_id", "call_key"),
                      Index("ff_batch_items_status", "status", "model"))

    id: str = Field(primary_key=True)
    run_id: str
    flow: str | None = None
    node: str
    task_id: str | None = None
    call_key: str
    call_id: str = ""
    call_position: int | None = None
    """Its call's place among the calls of its node execution that may wait (1, 2, ...): an
    execution asking something else there has another key (`ParkedLedger.give_up_call`)."""
    model: str
    """The catalog key (`provider/model`) it was parked for."""
    provider: str
    tier: str
    """`batch` (a provider batch) or `off_peak` (a timer: the call is made at `wake_at`)."""
    status: str = Field(default="queued")
    """`frugalflow.statuses.BatchItemStatus`."""
    batch_id: str | None = Field(default=None, index=True)
    request: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The provider request body (what goes on the batch's line); no key is ever in it."""
    result: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    """The answer (a LangChain message dict), once the provider gave it."""
    error: str | None = None
    error_class: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    """What the provider charged for it (at the tier's price), once answered."""
    expected_cost_usd: float = 0.0
    created_at: datetime = Field(default_factory=utcnow)
    deadline_at: datetime | None = None
    fallback_at: datetime | None = None
    """When it is given up for a synchronous call if no answer came (deadline less margin)."""
    wake_at: datetime | None = None
    """A timer item's hour (the start of a cheaper window)."""
    ended_at: datetime | None = None


class RouterRow(SQLModel, table=True):
    """A trained router, versioned: the newest version of a name is the one in use."""

    __tablename__ = "ff_routers"

    name: str = Field(primary_key=True)
    version: int = Field(primary_key=True)
    blob: bytes = Field(sa_column=Column(LargeBinary, nullable=False))
    examples: int = 0
    metrics: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    created_at: datetime = Field(default_factory=utcnow)


class EvalRow(SQLModel, table=True):
    """One evaluation: what was measured (flow, node, data set, scorer, candidates) and how."""

    __tablename__ = "ff_evals"

    id: str = Field(primary_key=True)
    flow: str = Field(index=True)
    node: str | None = None
    """The node evaluated (None: the whole flow, end to end)."""
    spec: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    """Data set, scorer, candidates, repeats and budget, as given."""
    status: str = "running"
    cost_usd: float = 0.0
    created_at: datetime = Field(default_factory=utcnow, index=True)
    finished_at: datetime | None = None


class EvalCellRow(SQLModel, table=True):
    """One case answered by one model (one repeat): the unit an evaluation pays for once.

    Kept apart from `ff_attempts`: evaluation calls are not production traffic, so they
    never count in production costs or train routers by accident."""

    __tablename__ = "ff_eval_cells"

    eval_id: str = Field(primary_key=True)
    case_id: str = Field(primary_key=True)
    model: str = Field(primary_key=True)
    repeat: int = Field(default=0, primary_key=True)
    outcome: str
    """pass, fail (the scorer rejected the answer) or error (no answer, or no score)."""
    score: float | None = None
    reason: str | None = None
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    output: Any = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = Field(default_factory=utcnow)


class PolicyRow(SQLModel, table=True):
    """A flow's node policy, versioned: per node, the measured rates and the chosen models.
    The newest version of a name is the one runs use."""

    __tablename__ = "ff_policies"

    name: str = Field(primary_key=True)
    version: int = Field(primary_key=True)
    flow: str = Field(index=True)
    body: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    source: str | None = None
    """Where it came from (an evaluation id), for the audit trail."""
    created_at: datetime = Field(default_factory=utcnow)


class LeaseHistoryRow(SQLModel, table=True):
    """Every lease ever taken on a run: who executed it, from when (audit of one-executor)."""

    __tablename__ = "ff_lease_history"

    id: int | None = Field(default=None, primary_key=True)
    run_id: str = Field(index=True)
    holder: str
    epoch: int
    acquired_at: datetime = Field(default_factory=utcnow)
    released_at: datetime | None = None


class LeaseRow(SQLModel, table=True):
    """Who may execute a run, until when. `epoch` grows with every new holder (fencing)."""

    __tablename__ = "ff_leases"

    run_id: str = Field(primary_key=True)
    holder: str
    epoch: int = 1
    expires_at: datetime
    acquired_at: datetime = Field(default_factory=utcnow)
