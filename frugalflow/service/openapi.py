"""What /openapi.json says beyond the response models: the error responses (one shape for
all, validation errors brought to it) and the event stream's media type."""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Sequence
from typing import Any, get_args

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from starlette.responses import Response

from .models import ErrorBody, RunEvent

__all__ = ["EventStream", "errors", "event_stream", "one_line_errors", "validation_message"]

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


def one_line_errors(base: type[APIRoute]) -> type[APIRoute]:
    """Routes of `base` whose request validation errors (a body field of the wrong type, an
    unknown field, malformed JSON) answer 422 in the service's one shape, one line naming
    the problem, instead of FastAPI's list of pydantic errors."""

    class _Route(base):  # type: ignore[valid-type,misc]
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    response: Response = await handler(request)
                    return response
                except RequestValidationError as e:
                    raise HTTPException(422, detail={"error": "InvalidInput",
                                                     "message": validation_message(e.errors())}
                                        ) from None

            return route

    return _Route


def validation_message(problems: Sequence[Any]) -> str:
    """The first of FastAPI's validation errors as one line: where, what, and how many more."""
    if not problems:
        return "the request is not valid"
    first = problems[0]
    loc = [str(k) for k in first.get("loc", ()) if k not in ("body", "query", "path")]
    where = ".".join(loc) or "the request's body"
    what = str(first.get("msg", "is not valid"))
    if first.get("type") == "json_invalid":
        error = (first.get("ctx") or {}).get("error", "")
        at = f" at character {loc[-1]}" if loc else ""
        return " ".join(f"the request's body is not valid JSON ({error}{at}): send a JSON "
                        "object".split())
    if first.get("type") == "extra_forbidden":
        what = "is not a field this request takes (remove it)"
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return " ".join(f"{where}: {what}{more}".split())  # one line, whatever the input was
