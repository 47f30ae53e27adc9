"""frugalflow inside an async service: a FastAPI router to mount, and a stand-alone app.

    from frugalflow.service import create_router
    app.include_router(create_router(runner, token=os.environ["FRUGALFLOW_TOKEN"]),
                       prefix="/frugalflow")

Endpoints: start a run, get a run, its live events (server-sent events), resume, cancel,
feedback, list runs, list flows, the catalog with provider health, health. Runs execute in
the app's event loop (bounded by the runner's `max_concurrency`); on shutdown they stop and
stay resumable.

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
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import re
import tomllib
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from os import PathLike
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .exceptions import (
    FrugalflowError,
    LeaseError,
    RunNotFoundError,
    RunStateError,
    StoreError,
    StoreUnavailableError,
    UserError,
)
from .flow_listing import flows_json
from .inputs import InputError
from .persistence.tables import RunRow
from .runner import RunResult, Runner
from .statuses import FINAL_STATUSES

__all__ = [
    "MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "SINGLE_TOKEN",
    "BodyLimitMiddleware",
    "Principal",
    "UnauthenticatedServiceWarning",
    "create_app",
    "create_router",
    "is_loopback",
    "load_tokens",
    "parse_request_json",
]

log = logging.getLogger("frugalflow.service")

MAX_BODY_BYTES = 1_000_000
"""Request bodies larger than this are refused (413)."""
MAX_JSON_DEPTH = 64
"""Request JSON nested deeper than this (objects and arrays, the body itself is level 1) is
refused (422): deep values cost recursion everywhere they are later read or shown."""
_INLINE_JSON_BYTES = 64_000  # bigger request bodies are parsed and checked in a thread
_SHOW_DEPTH = 200  # stored values nested deeper than this are shown as a placeholder
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN_SHAPE = re.compile(r"[\x21-\x7e]+")  # what an Authorization header carries intact

Role = Literal["admin", "user"]
Docs = Literal["token", "public", "off"]


class UnauthenticatedServiceWarning(UserWarning):
    """`create_router` was mounted without a token: anyone who reaches the app may use it."""


# -- principals ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Principal:
    """Who a bearer token stands for: an `admin` sees every run, a `user` only its own."""

    name: str
    role: Role = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


SINGLE_TOKEN = Principal("admin", "admin")
"""The principal of the one `token=` (FRUGALFLOW_TOKEN): an admin named "admin"."""


def _check_token(token: Any, what: str) -> str:
    if not isinstance(token, str) or not token:
        raise UserError(f"{what} is empty: use a secret, e.g. from "
                        "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if not _TOKEN_SHAPE.fullmatch(token):
        raise UserError(
            f"{what} has spaces or non-ASCII characters, which an Authorization header does "
            "not carry intact: use printable ASCII (e.g. secrets.token_urlsafe(32))")
    return token


def load_tokens(path: str | PathLike[str]) -> dict[str, Principal]:
    """Named principals from a TOML file, one table per person:

        [alice]
        token = "..."     # her bearer token (printable ASCII, unique)
        role = "admin"    # "admin" (every run) or "user" (own runs only; the default)
    """
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"tokens file {file} does not exist: name an existing TOML file "
                        "(--tokens / FRUGALFLOW_TOKENS)") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"tokens file {file} is not valid TOML: {e}") from None
    out: dict[str, Principal] = {}
    for name, entry in data.items():
        usage = (f'tokens file {file}: [{name}] must be a table with token = "..." and '
                 'role = "admin" or "user"')
        if not isinstance(entry, dict) or set(entry) - {"token", "role"}:
            raise UserError(usage)
        token = _check_token(entry.get("token"), f"tokens file {file}: the token of [{name}]")
        role = entry.get("role", "user")
        if role not in ("admin", "user"):
            raise UserError(usage)
        if token in out:
            raise UserError(f"tokens file {file}: [{out[token].name}] and [{name}] have the "
                            "same token; give each principal its own")
        out[token] = Principal(name, role)
    if not out:
        raise UserError(f"tokens file {file} names no principal: add a [name] table with "
                        'token = "..." and role = "admin" or "user"')
    return out


class _Auth:
    """Bearer tokens -> principals. Open (everyone, principal None) when it has no token."""

    def __init__(self, token: str | None,
                 tokens: Mapping[str, Principal] | str | PathLike[str] | None) -> None:
        if isinstance(tokens, (str, PathLike)):
            tokens = load_tokens(tokens)
        entries: dict[str, Principal] = {}
        if token is not None:
            entries[_check_token(token, "the token (--token, FRUGALFLOW_TOKEN)")] = SINGLE_TOKEN
        for t, who in (tokens or {}).items():
            if not isinstance(who, Principal) or who.role not in ("admin", "user"):
                raise UserError(f"tokens: {who!r} is not a Principal(name, 'admin' or 'user')")
            _check_token(t, f"the token of principal {who.name!r}")
            if t in entries:
                raise UserError(f"principal {who.name!r} has the same token as "
                                f"{entries[t].name!r}; give each its own")
            entries[t] = who
        roles: dict[str, str] = {}
        for who in entries.values():
            # Runs belong to a name: one name with two roles would let a user into the
            # runs of the admin of that name (e.g. a [admin] user and --token's "admin").
            if roles.setdefault(who.name, who.role) != who.role:
                raise UserError(f"principal name {who.name!r} is given both roles admin and "
                                "user (--token's principal is named 'admin'): rename one")
        # Digests, compared in constant time: neither the time nor the length of a
        # comparison says how much of a guess was right.
        self._entries = [(hashlib.sha256(t.encode()).digest(), who) for t, who in entries.items()]

    @property
    def open(self) -> bool:
        return not self._entries

    def identify(self, request: Request) -> Principal | None:
        """The principal of the request's bearer token; None when it has none or a wrong one."""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer":
            given = ""  # matches no token: tokens are never empty
        digest = hashlib.sha256(given.strip().encode("latin-1", "replace")).digest()
        found = None
        for expected, who in self._entries:  # no early exit: every token costs the same
            if hmac.compare_digest(digest, expected):
                found = who
        return found

    async def require(self, request: Request) -> Principal | None:
        """FastAPI dependency: the caller's principal (None when the API is open), or 401."""
        if self.open:
            return None
        who = self.identify(request)
        if who is None:
            raise HTTPException(401, detail={"error": "Unauthorized",
                                             "message": "send Authorization: Bearer <token>"},
                                headers={"WWW-Authenticate": "Bearer"})
        return who


# -- request bodies ------------------------------------------------------------------------


class StartRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flow: str = Field(min_length=1, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)
    budget: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """USD the run may spend: finite and above 0 (None: no limit)."""
    wait: bool = False
    """Answer when the run stops (succeeded, interrupted, failed...) instead of at once."""


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


def _invalid(message: str) -> HTTPException:
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
        raise _invalid(f"the request's JSON is nested deeper than {max_depth} levels: "
                       "flatten it") from None
    except ValueError as e:  # not UTF-8, an integer of thousands of digits...
        raise _invalid(f"the request's body cannot be read as JSON: {e}") from None
    problem = _json_problem(value, max_depth, numbers=odd_number,
                            strings=_SURROGATE_ESCAPE.search(body) is not None)
    if problem:
        raise _invalid(problem)
    return value


def _route_class(max_body_bytes: int, max_json_depth: int) -> type[APIRoute]:
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


# -- responses -----------------------------------------------------------------------------


def _dumps(content: Any) -> bytes:
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


def _render(content: Any, status_code: int = 200) -> Response:
    try:
        body = _dumps(content)
    except ValueError:  # a NaN or infinite number stored before budgets were checked
        body = _dumps(_finite(content))
    return Response(body, status_code=status_code, media_type="application/json")


def _depth_over(value: Any, limit: int) -> bool:
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
    if _depth_over(value, _SHOW_DEPTH):
        return {"not_shown": f"the stored {name} is nested deeper than {_SHOW_DEPTH} levels"}
    try:
        _dumps(_finite(value))
    except (ValueError, TypeError, RecursionError) as e:
        return {"not_shown": f"the stored {name} cannot be shown as JSON ({type(e).__name__})"}
    return value


def _row(row: BaseModel, json_fields: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = row.model_dump(mode="json", exclude=set(json_fields))
    for name in json_fields:
        out[name] = _shown(name, getattr(row, name))
    return out


_RUN_JSON = ("input", "output", "interrupts", "pending_resume")


def _run_json(row: RunRow) -> dict[str, Any]:
    return _row(row, _RUN_JSON)


def _result(result: RunResult) -> dict[str, Any]:
    return {"run_id": result.run_id, "status": result.status, "cost_usd": result.cost_usd,
            "error": result.error, "interrupts": _shown("interrupts", result.interrupts),
            "state": _shown("state", result.state)}


def _error(status: int, error: BaseException) -> HTTPException:
    return HTTPException(status, detail={"error": type(error).__name__, "message": str(error)})


def _not_found(run_id: str) -> HTTPException:
    # Says nothing of the database (its URL or path) nor whether another principal owns it.
    shown = run_id if len(run_id) <= 80 else run_id[:80] + "..."
    return HTTPException(404, detail={"error": "RunNotFoundError",
                                      "message": f"no run {shown!r}"})


def _translate(e: FrugalflowError, run_id: str | None = None) -> HTTPException:
    if isinstance(e, RunNotFoundError):
        return _not_found(run_id or getattr(e, "run_id", "") or "")
    if isinstance(e, (RunStateError, LeaseError)):
        return _error(409, e)
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
        return _error(400, e)
    return _error(500, e)


# -- the router ----------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """True for hosts only this machine reaches. An empty host binds every interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def create_router(
    runner: Runner,
    *,
    token: str | None = None,
    tokens: Mapping[str, Principal] | str | PathLike[str] | None = None,
    allow_unauthenticated: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_json_depth: int = MAX_JSON_DEPTH,
) -> APIRouter:
    """The API as a router. `token` (an admin) and/or `tokens` (token -> Principal, or a TOML
    file for `load_tokens`) are required as `Authorization: Bearer <token>`. Without either,
    the API is open to whoever reaches the app: that warns (`UnauthenticatedServiceWarning`)
    unless `allow_unauthenticated=True` says it is meant (an app bound to loopback)."""
    auth = _Auth(token, tokens)
    if auth.open and not allow_unauthenticated:
        message = ("frugalflow: create_router() without token= or tokens=: anyone who reaches "
                   "this app can start runs (spending money) and read, resume and cancel "
                   "every run. Pass token=... (e.g. FRUGALFLOW_TOKEN), or "
                   "allow_unauthenticated=True if the app is bound to loopback only")
        log.warning(message)
        warnings.warn(message, UnauthenticatedServiceWarning, stacklevel=2)
    route_class = _route_class(max_body_bytes, max_json_depth)
    router = APIRouter(route_class=route_class)
    api = APIRouter(route_class=route_class, dependencies=[Depends(auth.require)])
    _add_run_routes(api, runner, auth.require)
    _add_run_action_routes(api, runner, auth.require)
    _add_status_routes(api, router, runner, auth)
    router.include_router(api)
    return router


_Require = Callable[[Request], Awaitable["Principal | None"]]


async def _own_run(runner: Runner, run_id: str, who: Principal | None) -> RunRow:
    """The run, if `who` may see it; else 404, the same as for a missing run."""
    try:
        row = await runner.ledger.get_run(run_id)
    except FrugalflowError as e:
        raise _translate(e, run_id) from None
    if who is not None and not who.is_admin and row.principal != who.name:
        raise _not_found(run_id)
    return row


def _add_run_routes(api: APIRouter, runner: Runner, require: _Require) -> None:
    """The flows, and runs: start one, list them, read one."""

    @api.get("/flows")
    async def list_flows() -> list[dict[str, Any]]:
        """Each flow: description, nodes (and their needs), input fields (name, type,
        required)."""
        return [dict(f) for f in flows_json(list(runner.flows.values()))]

    @api.post("/runs", status_code=202, response_model=dict[str, Any])
    async def start_run(body: StartRun,
                        who: Principal | None = Depends(require)) -> Response:
        if body.flow not in runner.flows:
            raise HTTPException(404, detail={
                "error": "UnknownFlow",
                "message": f"no flow {body.flow!r}; flows: {', '.join(sorted(runner.flows))}"})
        try:
            result = await runner.start(body.flow, body.input, budget=body.budget,
                                        wait=body.wait, principal=who.name if who else None)
        except InputError as e:  # missing, unknown or mistyped fields: nothing was written
            raise _error(422, e) from None
        except FrugalflowError as e:
            raise _translate(e) from None
        except ValueError as e:  # a budget the model's constraints let through
            raise _invalid(str(e)) from None
        return _render(_result(result), status_code=200 if body.wait else 202)

    @api.get("/runs", response_model=list[dict[str, Any]])
    async def list_runs(flow: str | None = None, status: str | None = None, limit: int = 50,
                        who: Principal | None = Depends(require)) -> Response:
        limit = max(1, min(limit, 500))
        mine = who.name if who is not None and not who.is_admin else None
        try:
            rows = await runner.ledger.list_runs(flow=flow, status=status, limit=limit,
                                                 principal=mine)
        except FrugalflowError as e:
            raise _translate(e) from None
        # Up to 500 stored inputs, each up to the body limit: render off the event loop.
        return await asyncio.to_thread(lambda: _render([_run_json(r) for r in rows]))

    @api.get("/runs/{run_id}", response_model=dict[str, Any])
    async def get_run(run_id: str, who: Principal | None = Depends(require)) -> Response:
        await _own_run(runner, run_id, who)
        try:
            record = await runner.get(run_id)
        except FrugalflowError as e:
            raise _translate(e, run_id) from None
        return await asyncio.to_thread(lambda: _render({
            **_run_json(record.run),
            "cost_by_node": record.cost_by("node"),
            "cost_by_model": record.cost_by("model"),
            "nodes": [n.model_dump(mode="json") for n in record.nodes],
            "calls": [_row(a, ("response", "request")) for a in record.attempts],
        }))


def _add_run_action_routes(api: APIRouter, runner: Runner, require: _Require) -> None:
    """What a principal does to one of its runs: resume, cancel, feedback, follow."""

    @api.post("/runs/{run_id}/resume", status_code=202, response_model=dict[str, Any])
    async def resume_run(run_id: str, body: ResumeRun,
                         who: Principal | None = Depends(require)) -> Response:
        await _own_run(runner, run_id, who)
        try:
            result = await runner.resume(run_id, body.value, budget=body.budget, wait=body.wait)
        except FrugalflowError as e:
            raise _translate(e, run_id) from None
        except ValueError as e:
            raise _invalid(str(e)) from None
        return _render(_result(result), status_code=200 if body.wait else 202)

    @api.post("/runs/{run_id}/cancel", response_model=dict[str, Any])
    async def cancel_run(run_id: str, who: Principal | None = Depends(require)) -> Response:
        await _own_run(runner, run_id, who)
        try:
            return _render(_result(await runner.cancel(run_id)))
        except FrugalflowError as e:
            raise _translate(e, run_id) from None

    @api.post("/runs/{run_id}/feedback")
    async def run_feedback(run_id: str, body: Feedback,
                           who: Principal | None = Depends(require)) -> dict[str, Any]:
        """Was an answer good? Learned routers trained afterwards learn from it."""
        await _own_run(runner, run_id, who)
        try:
            n = await runner.ledger.run_feedback(run_id, body.good, node=body.node,
                                                 call_id=body.call_id)
        except FrugalflowError as e:
            raise _translate(e, run_id) from None
        return {"run_id": run_id, "answers": n, "good": body.good}

    @api.get("/runs/{run_id}/events")
    async def run_events(run_id: str, request: Request,
                         who: Principal | None = Depends(require)) -> StreamingResponse:
        row = await _own_run(runner, run_id, who)
        return StreamingResponse(_sse(runner, run_id, row.status, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


def _add_status_routes(api: APIRouter, router: APIRouter, runner: Runner, auth: _Auth) -> None:
    """The catalog with provider health (authenticated), and /health (liveness for all)."""

    @api.get("/catalog")
    async def catalog() -> list[dict[str, Any]]:
        cat = runner.catalog
        health = await _provider_health(runner)
        return [
            {"model": s.key, "provider": s.provider, "simulated": s.simulated,
             "input_per_mtok": s.input_price_per_mtok, "output_per_mtok": s.output_price_per_mtok,
             "context_window": s.window,
             "capabilities": [c for c, v in s.caps.model_dump().items() if v],
             "quality": s.quality, "available": cat.is_available(s),
             "unavailable_reason": cat.unavailable_reason(s),
             "provider_health": health[s.provider]}
            for s in cat
        ]

    @router.get("/health")
    async def health(request: Request) -> dict[str, Any]:
        """Liveness for anyone; with a valid token (or on an open API) also the details."""
        if not auth.open and auth.identify(request) is None:
            return {"ok": True}
        return {"ok": True, **await _health_details(runner)}


async def _provider_health(runner: Runner) -> dict[str, str]:
    """Each catalog provider's breaker state (shared by the fleet with Redis breakers)."""
    providers = sorted({s.provider for s in runner.catalog})
    return {p: (await runner.breakers.astate(p)).value for p in providers}


async def _health_details(runner: Runner) -> dict[str, Any]:
    from . import __version__
    from .scale.redis import acheck_shared_state

    database: dict[str, Any] = {"dialect": runner.store.dialect}
    try:
        database["schema_version"] = await asyncio.wait_for(runner.store.version(), 5.0)
        database["reachable"] = True
    except (StoreError, asyncio.TimeoutError):
        database["reachable"] = False
    return {"version": __version__, "database": database,
            "executing": len(runner.executing), "flows": sorted(runner.flows),
            "providers": await _provider_health(runner),
            # "unavailable": Redis (shared breakers / rate limits) is down and this process
            # uses in-process state until it is back; "local": nothing is shared.
            "shared_state": await acheck_shared_state(runner.breakers, runner.limiter)}


async def _sse(runner: Runner, run_id: str, status: str, request: Request) -> AsyncIterator[bytes]:
    def frame(event: dict[str, Any]) -> bytes:
        return f"event: {event['event']}\ndata: {json.dumps(event, default=str)}\n\n".encode()

    async with runner.events.subscribe(run_id) as events:
        yield frame({"run_id": run_id, "event": "status", "status": status})
        if status in FINAL_STATUSES:
            return
        it = events.__aiter__()
        while True:
            try:
                event = await asyncio.wait_for(it.__anext__(), timeout=15.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                yield b": keep-alive\n\n"
                continue
            yield frame(event)
            if event["event"] == "run_finished":
                return


# -- the app -------------------------------------------------------------------------------


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
        body = _dumps({"detail": {"error": "PayloadTooLarge",
                                  "message": f"request body over {self.max_bytes} bytes"}})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def create_app(
    runner: Runner,
    *,
    token: str | None = None,
    tokens: Mapping[str, Principal] | str | PathLike[str] | None = None,
    host: str = "127.0.0.1",
    max_body_bytes: int = MAX_BODY_BYTES,
    max_json_depth: int = MAX_JSON_DEPTH,
    docs: Docs = "token",
) -> FastAPI:
    """A stand-alone app around `runner`. Refuses to serve off loopback (any other address,
    a wildcard such as 0.0.0.0 or ::, or an empty host) without a token. `docs`: "token"
    (the OpenAPI schema and /docs need a token, when the API has one), "public" or "off"."""
    auth = _Auth(token, tokens)  # refuses empty and malformed tokens
    if auth.open and not is_loopback(host):
        where = host or "every interface (an empty host)"
        raise UserError(f"refusing to serve on {where} without a bearer token: set "
                        "FRUGALFLOW_TOKEN or --tokens, or bind to 127.0.0.1")
    if docs not in ("token", "public", "off"):
        raise UserError(f"docs={docs!r}: use 'token', 'public' or 'off'")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await runner.setup()
        yield
        await runner.close()  # running runs stop as `paused`, resumable later

    public = docs == "public"
    app = FastAPI(title="frugalflow", version="1", lifespan=lifespan,
                  openapi_url="/openapi.json" if public else None,
                  docs_url="/docs" if public else None, redoc_url=None)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.include_router(create_router(runner, token=token, tokens=tokens,
                                     allow_unauthenticated=True, max_body_bytes=max_body_bytes,
                                     max_json_depth=max_json_depth))
    if docs == "token":
        guarded = [Depends(auth.require)]

        @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
        async def openapi() -> dict[str, Any]:
            return app.openapi()

        @app.get("/docs", include_in_schema=False, dependencies=guarded)
        async def swagger() -> Response:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="frugalflow")
    return app
