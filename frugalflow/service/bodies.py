"""Request bodies the service accepts: their models, and hostile input refused (bodies over
the size limit while they stream, JSON too deep, lone surrogates, non-finite numbers)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .responses import dumps

MAX_BODY_BYTES = 1_000_000
"""Request bodies larger than this are refused (413)."""
MAX_JSON_DEPTH = 64
"""Request JSON nested deeper than this (objects and arrays, the body itself is level 1) is
refused (422): deep values cost recursion everywhere they are later read or shown."""
_INLINE_JSON_BYTES = 64_000  # bigger request bodies are parsed and checked in a thread
_SURROGATE = re.compile("[\ud800-\udfff]")


MAX_DEADLINE = timedelta(days=365)
Duration = Annotated[timedelta, WithJsonSchema({
    "anyOf": [{"type": "number", "exclusiveMinimum": 0}, {"type": "string", "format": "duration"}],
    "description": "Seconds, or an ISO-8601 duration (e.g. PT6H), above 0 and at most a year."})]


class StartRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flow: str = Field(min_length=1, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)
    budget: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """USD the run may spend: finite and above 0 (None: no limit)."""
    wait: bool = False
    """Answer when the run stops (succeeded, interrupted, failed...) instead of at once."""
    deadline: Duration | None = Field(default=None, gt=timedelta(0), le=MAX_DEADLINE)
    """The run's default deadline (`Runner.start(deadline=...)`): seconds, or an ISO-8601
    duration ("PT6H"); nodes without their own `Needs.deadline` may wait this long."""

    @field_validator("deadline", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # JSON true would be 1 second
            raise ValueError("deadline is seconds (a number) or an ISO-8601 duration (PT6H)")
        return value


class ResumeRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: Any = None
    budget: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    wait: bool = False


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    good: bool
    node: str | None = Field(default=None, max_length=200)
    """Every answer of this node in the run..."""
    call_id: str | None = Field(default=None, max_length=200)
    """...or this one call (one of the two)."""


def invalid(message: str) -> HTTPException:
    return HTTPException(422, detail={"error": "InvalidInput", "message": message})


def _too_large(max_bytes: int) -> HTTPException:
    return HTTPException(413, detail={"error": "PayloadTooLarge",
                                      "message": f"request body over {max_bytes} bytes"})


def _where(path: tuple[Any, ...] | None) -> str:
    """A JSON path (linked (parent, key) pairs) as text: input.items[3].name."""
    keys: list[Any] = []
    while path is not None:
        path, key = path
        keys.append(key)
    text = ""
    for key in reversed(keys):
        text += f"[{key}]" if isinstance(key, int) else (f".{key}" if text else str(key))
    text = _SURROGATE.sub("?", text)
    return (text[:120] + "...") if len(text) > 120 else (text or "the top level")


def _json_problem(value: Any, max_depth: int, *, strings: bool = True,
                  numbers: bool = True) -> str | None:
    """What is wrong with a request's decoded JSON (None: nothing): too deep, a lone
    surrogate in a string (`strings`), a non-finite number (`numbers`). Iterative: no
    recursion on input the client chose. A first pass keeps no paths (cheap); only when it
    finds a problem does a second one say where."""
    if _walk(value, max_depth, strings, numbers, track=False) is None:
        return None
    return _walk(value, max_depth, strings, numbers, track=True)


def _walk(value: Any, max_depth: int, strings: bool, numbers: bool, *,
          track: bool) -> str | None:
    def scalar(v: Any, path: tuple[Any, ...] | None) -> str | None:
        if strings and isinstance(v, str) and (bad := _SURROGATE.search(v)):
            return _surrogate(bad, path)
        if numbers and isinstance(v, float) and not math.isfinite(v):
            return (f"the number at {_where(path)} is not finite (NaN, Infinity, or too large "
                    "for a double, like 1e400): send a finite number")
        return None

    if not isinstance(value, (dict, list)):
        return scalar(value, None)
    check = strings or numbers
    stack: list[tuple[Any, int, tuple[Any, ...] | None]] = [(value, 1, None)]
    while stack:
        v, depth, path = stack.pop()
        if depth > max_depth:
            return (f"the request's JSON is nested deeper than {max_depth} levels "
                    f"(at {_where(path)}): flatten it")
        if isinstance(v, dict):
            if strings:
                for k in v:
                    if isinstance(k, str) and (bad := _SURROGATE.search(k)):
                        return _surrogate(bad, (path, k) if track else None)
            items: Any = v.items() if track else zip(v.values(), v.values())
        else:
            items = enumerate(v) if track else zip(v, v)
        for k, item in items:
            if isinstance(item, (dict, list)):
                if item:
                    stack.append((item, depth + 1, (path, k) if track else None))
                elif depth + 1 > max_depth:
                    stack.append((item, depth + 1, (path, k) if track else None))
            elif check and (problem := scalar(item, (path, k) if track else None)):
                return problem
    return None


def _surrogate(found: re.Match[str], path: tuple[Any, ...] | None) -> str:
    return (f"the request's JSON has a lone surrogate (\\u{ord(found.group()):04x}) at "
            f"{_where(path)}: send valid Unicode text (a \\ud800-\\udfff escape must be "
            "half of a pair)")


# A lone surrogate can only come from a \uD800-\uDFFF escape (UTF-8 cannot encode one):
# a body without such an escape needs no look at its strings.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")


def parse_request_json(body: bytes, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """A request body as JSON, or HTTPException 422 naming what is wrong."""
    odd_number = False

    def number(text: str) -> float:  # NaN, Infinity, 1e400: note them, refuse them below
        nonlocal odd_number
        value = float(text)
        odd_number = odd_number or not math.isfinite(value)
        return value

    try:
        value = json.loads(body, parse_float=number, parse_constant=number)
    except json.JSONDecodeError:
        raise  # FastAPI answers 422 with the position
    except RecursionError:
        raise invalid(f"the request's JSON is nested deeper than {max_depth} levels: "
                       "flatten it") from None
    except ValueError as e:  # not UTF-8, an integer of thousands of digits...
        raise invalid(f"the request's body cannot be read as JSON: {e}") from None
    problem = _json_problem(value, max_depth, numbers=odd_number,
                            strings=_SURROGATE_ESCAPE.search(body) is not None)
    if problem:
        raise invalid(problem)
    return value


def route_class(max_body_bytes: int, max_json_depth: int) -> type[APIRoute]:
    """Routes whose requests read their body within `max_body_bytes` (counted as it
    streams) and parse JSON with `parse_request_json`: the router protects itself, also
    when mounted in an app without `BodyLimitMiddleware`."""

    class _Request(Request):
        async def body(self) -> bytes:
            if not hasattr(self, "_body"):
                chunks: list[bytes] = []
                size = 0
                async for chunk in self.stream():
                    size += len(chunk)
                    if size > max_body_bytes:
                        raise _too_large(max_body_bytes)
                    chunks.append(chunk)
                self._body = b"".join(chunks)
            return self._body

        async def json(self) -> Any:
            if not hasattr(self, "_json"):
                body = await self.body()
                if len(body) > _INLINE_JSON_BYTES:  # ~10-100 ms of CPU: off the event loop
                    self._json = await asyncio.to_thread(parse_request_json, body,
                                                         max_json_depth)
                else:
                    self._json = parse_request_json(body, max_json_depth)
            return self._json

    class _Route(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                return await handler(_Request(request.scope, request.receive))

            return route

    return _Route



class _BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Refuse request bodies over `max_bytes` with 413: at once when Content-Length says so,
    else as soon as the streamed body (chunked, or longer than it claimed) passes the limit."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        received = 0
        over = False
        started = False

        async def limited_receive() -> Message:
            nonlocal received, over
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    over = True
                    raise _BodyTooLarge()
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if over and not started:
                return  # the app's answer to its aborted read is replaced by the 413 below
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _BodyTooLarge:
            pass
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        body = dumps({"detail": {"error": "PayloadTooLarge",
                                  "message": f"request body over {self.max_bytes} bytes"}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})
