"""frugalflow inside an async service: a FastAPI router to mount, and a stand-alone app.

    from frugalflow.service import create_router
    app.include_router(create_router(runner, token=os.environ["FRUGALFLOW_TOKEN"]),
                       prefix="/frugalflow")

Endpoints: start a run, get a run, its live events (server-sent events), resume, cancel,
feedback, its parked requests (a `waiting` run's batch items and timers), list runs, list
flows, the catalog with provider health, costs (by day, model, node, flow and tier), health.
Runs execute in the app's event loop (bounded by the runner's `max_concurrency`); on
shutdown they stop and stay resumable.

Who may call it: a bearer token (`token=`, acting as an admin), or named principals
(`tokens=`, a TOML file or a mapping token -> `Principal(name, role)`). An `admin` sees and
acts on every run; a `user` lists, reads, resumes, cancels, follows and gives feedback only
on the runs it started (another's run answers 404, exactly like a missing one). `create_app`
refuses to serve off loopback without a token; `create_router` without one warns
(`UnauthenticatedServiceWarning`) unless told `allow_unauthenticated=True`.

Hostile input: request bodies over `max_body_bytes` are refused with 413 while they stream
(whatever Content-Length says); JSON nested deeper than `max_json_depth` levels, lone UTF-16
surrogates, NaN/Infinity and out-of-range numbers are refused with 422; budgets must be
finite and above 0. Stored runs are shown field by field, so none can break a listing.

Typed: every endpoint declares its response model (`/openapi.json` describes what each
returns, errors included: `{"detail": {"error", "message"}}`); the models are exported here
(`RunDetail`, `RunSummary`, `RunActionResult`, `CostSummary`, `RunEvent`...), so a client
can check an answer with `pydantic.TypeAdapter(RunDetail).validate_python(response.json())`.
"""
from __future__ import annotations

from .app import Docs, create_app, is_loopback
from .auth import SINGLE_TOKEN, Principal, UnauthenticatedServiceWarning, load_tokens
from .bodies import MAX_BODY_BYTES, MAX_JSON_DEPTH, BodyLimitMiddleware, parse_request_json
from .models import (
    AttemptEvent,
    CallRecord,
    CatalogEntry,
    CostBucket,
    CostSummary,
    CostTotals,
    DatabaseHealth,
    ErrorBody,
    ErrorDetail,
    FeedbackResult,
    FlowDescription,
    FlowNode,
    HealthDetails,
    HealthPublic,
    InputFieldInfo,
    NodeExecution,
    NodeFinishedEvent,
    NodeStartedEvent,
    NotShown,
    ParkedRequest,
    RunActionResult,
    RunDetail,
    RunEvent,
    RunFinishedEvent,
    RunStartedEvent,
    RunSummary,
    StatusEvent,
    StoredObject,
    Unreadable,
)
from .routes import create_router

__all__ = [
    "MAX_BODY_BYTES",
    "AttemptEvent",
    "CallRecord",
    "CatalogEntry",
    "CostBucket",
    "CostSummary",
    "CostTotals",
    "DatabaseHealth",
    "ErrorBody",
    "ErrorDetail",
    "FeedbackResult",
    "FlowDescription",
    "FlowNode",
    "HealthDetails",
    "HealthPublic",
    "InputFieldInfo",
    "NodeExecution",
    "NodeFinishedEvent",
    "NodeStartedEvent",
    "NotShown",
    "ParkedRequest",
    "RunActionResult",
    "RunDetail",
    "RunEvent",
    "RunFinishedEvent",
    "RunStartedEvent",
    "RunSummary",
    "StatusEvent",
    "StoredObject",
    "Unreadable",
    "MAX_JSON_DEPTH",
    "SINGLE_TOKEN",
    "BodyLimitMiddleware",
    "Docs",
    "Principal",
    "UnauthenticatedServiceWarning",
    "create_app",
    "create_router",
    "is_loopback",
    "load_tokens",
    "parse_request_json",
]
