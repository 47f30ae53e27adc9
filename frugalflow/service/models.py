"""What every endpoint of the service answers, as pydantic models: the schema of `/openapi.json`,
and what a client validates a response against (`TypeAdapter(RunDetail).validate_python(...)`).

The endpoints render their answers themselves (`responses.render`, robust to stored values
that cannot be shown); these models describe them, and tests/test_service_types.py holds
real responses to them. Stored JSON values (a run's input, output, interrupts; a result's
state) stay JSON values: a stored value that cannot be shown (nested deeper than 200 levels,
or not representable as JSON) is replaced by a `NotShown` placeholder, and one the ledger
cannot decode by an `Unreadable` one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, JsonValue

from ..costs import CostBucket, CostSummary, CostTotals
from ..resilience import Action, BreakerState
from ..statuses import BatchItemStatus, BatchStatus, ErrorClass, NodeStatus, Outcome, RunStatus
from ..tiers import Tier

__all__ = [
    "AttemptEvent", "CallRecord", "CatalogEntry", "CostBucket", "CostSummary", "CostTotals",
    "DatabaseHealth", "ErrorBody", "ErrorDetail", "FeedbackResult", "FlowDescription",
    "FlowNode", "HealthDetails", "HealthPublic", "InputFieldInfo", "NodeExecution",
    "NodeFinishedEvent", "NodeStartedEvent", "NotShown", "ParkedRequest", "RunActionResult",
    "RunDetail",
    "RunEvent", "RunFinishedEvent", "RunStartedEvent", "RunSummary", "StatusEvent",
    "StoredObject", "Unreadable",
]


# -- placeholders and stored values ------------------------------------------------------


class NotShown(BaseModel):
    """In place of a stored value that cannot be shown: nested deeper than 200 levels, or
    not representable as JSON. The rest of the response is intact."""

    model_config = ConfigDict(extra="forbid")  # a stored object with more keys is not one

    not_shown: str = Field(description="Why the stored value is not shown.")


class Unreadable(BaseModel):
    """In place of a stored value the ledger could not decode."""

    model_config = ConfigDict(extra="forbid")

    unreadable: str = Field(description="Why the stored value could not be read.")


# Placeholders first (left to right): a client reads `{"not_shown": "..."}` as NotShown.
StoredObject: TypeAlias = Annotated[NotShown | Unreadable | dict[str, JsonValue],
                                    Field(union_mode="left_to_right")]
"""A stored JSON object (a run's input or output, a result's state), or a placeholder."""
StoredList: TypeAlias = Annotated[NotShown | Unreadable | list[JsonValue],
                                  Field(union_mode="left_to_right")]
"""A stored JSON array (a run's interrupts), or a placeholder (the ledger's unreadable
interrupts come as a list holding one `Unreadable`)."""


# -- errors ------------------------------------------------------------------------------


class ErrorDetail(BaseModel):
    error: str = Field(description="The error's name, e.g. RunNotFoundError, InvalidInput.")
    message: str = Field(description="One line: what is wrong and how to fix it.")


class ErrorBody(BaseModel):
    """Every error the service answers itself (401, 404, 409, 413, 422, 503...)."""

    detail: ErrorDetail


# -- flows -------------------------------------------------------------------------------


class FlowNode(BaseModel):
    name: str
    needs: str | None = Field(description="The node's non-default needs (e.g. `tools, "
                                          "quality.writing>=0.8`); None: none declared.")


class InputFieldInfo(BaseModel):
    name: str
    type: str = Field(description="The field's type as written (e.g. `str`, `int | None`).")
    required: bool


class FlowDescription(BaseModel):
    """A flow as `GET /flows` lists it."""

    name: str
    description: str
    nodes: list[FlowNode]
    input: list[InputFieldInfo] | None = Field(
        description="The input's fields (None: its schema is not one frugalflow can read; "
                    "any object is taken).")


# -- runs --------------------------------------------------------------------------------


class RunSummary(BaseModel):
    """A run as `GET /runs` lists it: what it was asked, what it spent, where it stands."""

    id: str
    flow: str
    status: RunStatus
    input: StoredObject
    budget_usd: float | None = Field(description="USD the run may spend (None: no limit).")
    cost_usd: float | None = Field(description="What it spent, in USD (None only for a "
                                               "stored number that is not finite).")
    output: StoredObject | None = Field(description="The final (or interrupted) state, "
                                                    "scrubbed of secrets.")
    interrupts: StoredList | None = Field(description="What the run waits for an answer to "
                                                      "(status `interrupted`).")
    cancel_requested: bool
    pending_resume: StoredObject | None = Field(
        description='{"value": v}: an answer on its way to the worker that resumes the run.')
    error: str | None
    error_type: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    principal: str | None = Field(description="The name of the token that started the run.")
    trace_context: dict[str, str] | None = Field(
        None, description="The W3C trace context (traceparent, tracestate) of the run's trace.")
    deadline_at: datetime | None = Field(
        None, description="The run's default deadline for its nodes' answers (None: none; "
                          "a node's own `Needs.deadline` may still set one).")


class NodeExecution(BaseModel):
    """One execution of one node (a LangGraph task)."""

    id: str = Field(description="The LangGraph task id.")
    run_id: str
    node: str
    status: NodeStatus
    holder: str | None = Field(description="The executor (worker) that ran it.")
    cost_usd: float
    started_at: datetime
    finished_at: datetime | None
    error: str | None


class CallRecord(BaseModel):
    """One try of one model for one call (a row of the ledger's ff_attempts)."""

    id: int
    run_id: str | None
    task_id: str | None
    call_id: str
    flow: str | None
    node: str
    model: str
    provider: str
    try_number: int
    outcome: Outcome
    error_class: ErrorClass | None
    error: str | None
    action: Action | None = Field(description="What followed a failure: retry (the same "
                                              "model), next (a fallback), raise.")
    fallback_from: str | None = Field(description="The model that failed before this one "
                                                  "(this try is a fallback).")
    input_tokens: int
    output_tokens: int
    cache_read_tokens: int
    cost_usd: float
    latency_ms: float
    started_at: datetime
    call_key: str | None
    route_reason: str | None = Field(description="Why the router put this model where it did.")
    prompt: str | None
    feedback: bool | None
    category: str | None
    response: StoredObject | None = Field(description="The answer of a successful call "
                                                      "(a LangChain message as JSON).")
    usage_estimated: bool | None
    reasoning_tokens: int | None
    request: StoredObject | None = Field(description="The request of a successful call "
                                                     "(messages, tools, response schema).")
    tier: Tier | None = Field(None, description="The service tier the call was made and "
                                                "priced on (None: standard).")
    batch_item_id: str | None = Field(None, description="A batch answer's parked request "
                                                        "(`GET /runs/{id}/parked`).")


class RunDetail(RunSummary):
    """A run with its node executions, its model calls (every attempt) and its cost."""

    cost_by_node: dict[str, float]
    cost_by_model: dict[str, float]
    nodes: list[NodeExecution]
    calls: list[CallRecord] = Field(description="Every attempt: each try of each model call.")


class ParkedRequest(BaseModel):
    """One parked request of a run (`GET /runs/{run_id}/parked`): a call waiting in a
    provider batch (tier `batch`) or for a cheaper hour (tier `off_peak`, a timer). Its
    request and answer bodies hold user data and are not shown; the answer, once taken, is
    the node's attempt (`calls` of `GET /runs/{run_id}`, with this `batch_item_id`)."""

    id: str = Field(description="The item's id (its `custom_id` at the provider).")
    run_id: str
    node: str
    task_id: str | None = Field(description="The node execution (LangGraph task) that parked it.")
    call_id: str
    model: str = Field(description="The catalog key (`provider/model`) it was parked for.")
    provider: str
    tier: Tier
    status: BatchItemStatus
    batch_id: str | None = Field(description="frugalflow's id of the provider batch it was "
                                             "sent in (None: not sent yet, or a timer).")
    batch_status: BatchStatus | None = Field(description="That batch's status.")
    created_at: datetime
    deadline_at: datetime | None = Field(description="When its answer is due at the latest.")
    fallback_at: datetime | None = Field(description="When it is given up for a synchronous "
                                                     "call if no answer came.")
    wake_at: datetime | None = Field(description="A timer's hour (a cheaper window opens).")
    ended_at: datetime | None
    cost_usd: float = Field(description="What the provider charged for it (at the tier's "
                                        "price), once answered.")
    expected_cost_usd: float = Field(description="Its expected cost when it was parked.")
    input_tokens: int
    output_tokens: int
    error: str | None
    error_class: ErrorClass | None


class RunActionResult(BaseModel):
    """Where a run stands after a start, resume or cancel (202: `running`, it goes on)."""

    run_id: str
    status: RunStatus
    cost_usd: float | None = Field(description="What it spent, in USD (None only for a "
                                               "stored number that is not finite).")
    error: str | None
    interrupts: StoredList = Field(description="What the run waits for an answer to.")
    state: StoredObject | None = Field(description="Its state when it stopped (with "
                                                   "`wait`), else None.")


class FeedbackResult(BaseModel):
    run_id: str
    answers: int = Field(description="How many recorded answers the feedback applies to.")
    good: bool


# -- catalog and health ------------------------------------------------------------------


class CatalogEntry(BaseModel):
    """A model of the catalog: its prices and profile, whether it can be called here, and
    its provider's breaker state."""

    model: str
    provider: str
    simulated: bool
    input_per_mtok: float = Field(description="USD per million input tokens.")
    output_per_mtok: float = Field(description="USD per million output tokens.")
    context_window: int
    capabilities: list[str]
    quality: dict[str, float] = Field(description="Skill -> score in 0..1.")
    available: bool
    unavailable_reason: str | None
    provider_health: BreakerState


class HealthPublic(BaseModel):
    """`/health` without a valid token (liveness only)."""

    ok: Literal[True]


class DatabaseHealth(BaseModel):
    dialect: Literal["sqlite", "postgresql"]
    reachable: bool
    schema_version: int | None = Field(None, description="Absent when not reachable.")


class HealthDetails(HealthPublic):
    """`/health` with a valid token (or on an open API)."""

    version: str
    database: DatabaseHealth
    executing: int = Field(description="Runs executing in this process.")
    flows: list[str]
    providers: dict[str, BreakerState]
    shared_state: Literal["ok", "unavailable", "local"] = Field(
        description="ok: breakers / rate limits shared through Redis; unavailable: Redis is "
                    "down and this process uses its own state until it is back; local: "
                    "nothing is shared.")


# -- events (GET /runs/{run_id}/events) --------------------------------------------------


class _Event(BaseModel):
    id: int | None = Field(None, description="The event's id in the event log (the SSE "
                                             "`id:`); None: not logged (yet).")
    run_id: str
    at: datetime | None = Field(None, description="When it happened (None: a status event).")


class RunStartedEvent(_Event):
    event: Literal["run_started"]
    flow: str


class NodeStartedEvent(_Event):
    event: Literal["node_started"]
    node: str
    task_id: str


class AttemptEvent(_Event):
    """One model call, as it ended (ok, or failed and retried, fallen back or raised)."""

    event: Literal["attempt"]
    node: str
    model: str
    provider: str
    outcome: Outcome
    error_class: ErrorClass | None
    error: str | None = Field(description="Scrubbed of secrets.")
    action: Action | None
    fallback_from: str | None
    cost_usd: float
    latency_ms: float
    call_id: str
    task_id: str | None
    try_number: int
    route_reason: str | None
    started_at: datetime
    input_tokens: int
    output_tokens: int
    usage_estimated: bool
    tier: Tier | None = Field(None, description="The service tier it was made and priced on "
                                                "(None: standard).")
    batch_item_id: str | None = Field(None, description="A batch answer's parked request.")


class NodeFinishedEvent(_Event):
    event: Literal["node_finished"]
    node: str
    task_id: str
    status: NodeStatus


class RunFinishedEvent(_Event):
    event: Literal["run_finished"]
    status: RunStatus
    error: str | None = Field(description="Scrubbed of secrets.")


class StatusEvent(_Event):
    """The run's status: first when the stream opens, last when it ends."""

    event: Literal["status"]
    status: RunStatus


RunEvent: TypeAlias = Annotated[
    RunStartedEvent | NodeStartedEvent | AttemptEvent | NodeFinishedEvent | RunFinishedEvent
    | StatusEvent,
    Field(discriminator="event")]
"""Any event of a run's stream (the `data:` of an SSE frame), told apart by `event`."""
