"""What the service answers: JSON rendered safely (stored values that cannot be shown become
placeholders) and errors translated to HTTP statuses without leaking the database."""

from __future__ import annotations

import json
import logging
import math
from typing import Any

from fastapi import HTTPException
from pydantic import BaseModel
from starlette.responses import Response

from ..exceptions import (
    FrugalflowError,
    LeaseError,
    RunNotFoundError,
    RunStateError,
    StoreError,
    StoreUnavailableError,
    UserError,
)
from ..persistence.tables import RunRow
from ..runner import RunResult

log = logging.getLogger("frugalflow.service")

_SHOW_DEPTH = 200  # stored values nested deeper than this are shown as a placeholder


def dumps(content: Any) -> bytes:
    # ASCII with \u escapes: a lone surrogate that reached the state cannot break encoding.
    return json.dumps(content, ensure_ascii=True, allow_nan=False, default=str,
                      separators=(",", ":")).encode()


def _finite(value: Any) -> Any:
    """`value` with NaN and infinities (JSON has neither) as null. Depth is bounded here:
    stored values deeper than _SHOW_DEPTH were replaced by `_shown`."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def render(content: Any, status_code: int = 200) -> Response:
    try:
        body = dumps(content)
    except ValueError:  # a NaN or infinite number stored before budgets were checked
        body = dumps(_finite(content))
    return Response(body, status_code=status_code, media_type="application/json")


def depth_over(value: Any, limit: int) -> bool:
    """Whether `value` nests deeper than `limit` levels (iterative: no recursion on input)."""
    stack = [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, (dict, list)):
            if depth > limit:
                return True
            stack.extend((item, depth + 1) for item in (v.values() if isinstance(v, dict) else v))
    return False


def _shown(name: str, value: Any) -> Any:
    """A stored JSON value as it can be shown, or a placeholder saying why it cannot."""
    if value is None:
        return None
    if depth_over(value, _SHOW_DEPTH):
        return {"not_shown": f"the stored {name} is nested deeper than {_SHOW_DEPTH} levels"}
    try:
        dumps(_finite(value))
    except (ValueError, TypeError, RecursionError) as e:
        return {"not_shown": f"the stored {name} cannot be shown as JSON ({type(e).__name__})"}
    return value


def row_json(row: BaseModel, json_fields: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = row.model_dump(mode="json", exclude=set(json_fields))
    for name in json_fields:
        out[name] = _shown(name, getattr(row, name))
    return out


_RUN_JSON = ("input", "output", "interrupts", "pending_resume")


def run_json(row: RunRow) -> dict[str, Any]:
    return row_json(row, _RUN_JSON)


def result_json(result: RunResult) -> dict[str, Any]:
    return {"run_id": result.run_id, "status": result.status, "cost_usd": result.cost_usd,
            "error": result.error, "interrupts": _shown("interrupts", result.interrupts),
            "state": _shown("state", result.state)}


def http_error(status: int, error: BaseException) -> HTTPException:
    return HTTPException(status, detail={"error": type(error).__name__, "message": str(error)})


def not_found(run_id: str) -> HTTPException:
    # Says nothing of the database (its URL or path) nor whether another principal owns it.
    shown = run_id if len(run_id) <= 80 else run_id[:80] + "..."
    return HTTPException(404, detail={"error": "RunNotFoundError",
                                      "message": f"no run {shown!r}"})


def translate(e: FrugalflowError, run_id: str | None = None) -> HTTPException:
    if isinstance(e, RunNotFoundError):
        return not_found(run_id or getattr(e, "run_id", "") or "")
    if isinstance(e, (RunStateError, LeaseError)):
        return http_error(409, e)
    if isinstance(e, StoreError):  # their messages may name the database: keep it in the log
        log.error("frugalflow service: %s: %s", type(e).__name__, e)
        if isinstance(e, StoreUnavailableError):
            return HTTPException(503, detail={"error": "StoreUnavailableError",
                                              "message": "the database is unavailable; try "
                                                         "again later"})
        return HTTPException(500, detail={"error": type(e).__name__,
                                          "message": "a database error; the server's log "
                                                     "has the details"})
    if isinstance(e, UserError):
        return http_error(400, e)
    return http_error(500, e)

