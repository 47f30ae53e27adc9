"""What /openapi.json says beyond the response models: the error responses (one shape for
all) and the event stream's media type."""

from __future__ import annotations

from typing import Any, get_args

from fastapi.responses import StreamingResponse

from .models import ErrorBody, RunEvent

__all__ = ["EventStream", "errors", "event_stream"]

_WHEN = {
    401: "No valid bearer token (`Authorization: Bearer <token>`).",
    404: "No such run (or flow), or a run of another principal: the two are not told apart.",
    409: "The run is not in a state that allows it (already finished, running elsewhere).",
    413: "The request body is over the size limit.",
    422: "Bad input (a body or parameter that is malformed, too deep, not finite, unknown "
         "fields): one line naming the problem and the fix.",
    500: "A database error (the server's log has the details).",
    503: "The database is unavailable; try again later.",
}


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The `responses=` of a route that may answer these error statuses, each
    `{"detail": {"error": ..., "message": ...}}` (a route that reads the database, 503, may
    also answer 500 for its other errors)."""
    codes = {*statuses, 500} if 503 in statuses else set(statuses)
    return {s: {"model": ErrorBody, "description": _WHEN[s]} for s in sorted(codes)}


def event_stream() -> dict[int | str, dict[str, Any]]:
    """The `responses=` of the event stream: 200 is `text/event-stream`, each frame's `data:`
    one `RunEvent` (as `schema`, and as OpenAPI 3.2's `itemSchema` of a frame); its errors
    are JSON (not the route's media type)."""
    events = {"oneOf": [{"$ref": f"#/components/schemas/{e.__name__}"}
                        for e in get_args(get_args(RunEvent)[0])]}
    frame = {"type": "object", "required": ["data"], "properties": {
        "id": {"type": "integer", "description": "The event's id (absent: not logged)."},
        "event": {"type": "string", "description": "The event's kind (its `event` field)."},
        "data": {"type": "string", "contentMediaType": "application/json",
                 "contentSchema": events}}}
    json_error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
    return {200: {"model": RunEvent, "description": EventStream.__doc__,
                  # Each event is an object: replaces the {"type": "string"} FastAPI gives
                  # any non-JSON response before it merges the model's schema.
                  "content": {EventStream.media_type: {"schema": {"type": "object"},
                                                       "itemSchema": frame}}},
            **{s: {"description": _WHEN[s], "content": json_error}
               for s in (401, 404, 422, 500, 503)}}


class EventStream(StreamingResponse):
    """Server-sent events: per event a frame `id: <event id>` (when logged), `event: <kind>`
    and `data: <the event as JSON>` (one of the models below, told apart by `event`).
    The stream opens with a `status` event, sends `: keep-alive` comments while idle, and ends
    with the run's final `status`. Reconnect with `Last-Event-ID` (or `?after=<id>`) to
    replay what was missed."""

    media_type = "text/event-stream"
