"""frugalflow inside an async service: a FastAPI router to mount, and a stand-alone app.

    from frugalflow.service import create_router
    app.include_router(create_router(runner), prefix="/frugalflow")

Endpoints: start a run, get a run, its live events (server-sent events), resume, cancel,
list runs, list flows, the catalog with provider health. Runs execute in the app's event
loop (bounded by the runner's `max_concurrency`); on shutdown they stop and stay resumable.
A bearer token is required unless the server is bound to loopback.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import Response

from .exceptions import (
    FrugalflowError,
    LeaseError,
    RunNotFoundError,
    RunStateError,
    StoreUnavailableError,
    UserError,
)
from .runner import FINAL_STATUSES, Runner

__all__ = ["BodyLimitMiddleware", "create_app", "create_router", "is_loopback"]


class StartRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    flow: str = Field(min_length=1, max_length=200)
    input: dict[str, Any] = Field(default_factory=dict)
    budget: float | None = Field(default=None, ge=0)
    wait: bool = False
    """Answer when the run stops (succeeded, interrupted, failed...) instead of at once."""


class ResumeRun(BaseModel):
    model_config = ConfigDict(extra="forbid")

    value: Any = None
    budget: float | None = Field(default=None, ge=0)
    wait: bool = False


class Feedback(BaseModel):
    model_config = ConfigDict(extra="forbid")

    good: bool
    node: str | None = Field(default=None, max_length=200)
    """Every answer of this node in the run..."""
    call_id: str | None = Field(default=None, max_length=200)
    """...or this one call (one of the two)."""


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _error(status: int, error: BaseException) -> HTTPException:
    return HTTPException(status, detail={"error": type(error).__name__, "message": str(error)})


def _translate(e: FrugalflowError) -> HTTPException:
    if isinstance(e, RunNotFoundError):
        return _error(404, e)
    if isinstance(e, (RunStateError, LeaseError)):
        return _error(409, e)
    if isinstance(e, StoreUnavailableError):
        return _error(503, e)
    if isinstance(e, UserError):
        return _error(400, e)
    return _error(500, e)


def create_router(runner: Runner, *, token: str | None = None) -> APIRouter:
    """The API as a router; `token` (if set) is required as `Authorization: Bearer <token>`."""

    async def auth(request: Request) -> None:
        if token is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), token.encode()):
            raise HTTPException(401, detail={"error": "Unauthorized",
                                             "message": "send Authorization: Bearer <token>"},
                                headers={"WWW-Authenticate": "Bearer"})

    router = APIRouter(dependencies=[Depends(auth)])

    @router.get("/flows")
    async def list_flows() -> list[dict[str, Any]]:
        return [
            {"name": f.name, "description": f.description,
             "nodes": [{"name": n.name, "needs": n.needs.describe() if n.needs else None}
                       for n in f.nodes.values()]}
            for f in runner.flows.values()
        ]

    @router.post("/runs", status_code=202)
    async def start_run(body: StartRun) -> JSONResponse:
        if body.flow not in runner.flows:
            raise HTTPException(404, detail={
                "error": "UnknownFlow",
                "message": f"no flow {body.flow!r}; flows: {', '.join(sorted(runner.flows))}"})
        try:
            result = await runner.start(body.flow, body.input, budget=body.budget, wait=body.wait)
        except FrugalflowError as e:
            raise _translate(e) from None
        return JSONResponse(_result(result), status_code=200 if body.wait else 202)

    @router.get("/runs")
    async def list_runs(flow: str | None = None, status: str | None = None,
                        limit: int = 50) -> list[dict[str, Any]]:
        limit = max(1, min(limit, 500))
        try:
            rows = await runner.ledger.list_runs(flow=flow, status=status, limit=limit)
        except FrugalflowError as e:
            raise _translate(e) from None
        return [r.model_dump(mode="json") for r in rows]

    @router.get("/runs/{run_id}")
    async def get_run(run_id: str) -> dict[str, Any]:
        try:
            record = await runner.get(run_id)
        except FrugalflowError as e:
            raise _translate(e) from None
        return {
            **record.run.model_dump(mode="json"),
            "cost_by_node": record.cost_by("node"),
            "cost_by_model": record.cost_by("model"),
            "nodes": [n.model_dump(mode="json") for n in record.nodes],
            "calls": [a.model_dump(mode="json") for a in record.attempts],
        }

    @router.post("/runs/{run_id}/resume", status_code=202)
    async def resume_run(run_id: str, body: ResumeRun) -> JSONResponse:
        try:
            result = await runner.resume(run_id, body.value, budget=body.budget, wait=body.wait)
        except FrugalflowError as e:
            raise _translate(e) from None
        return JSONResponse(_result(result), status_code=200 if body.wait else 202)

    @router.post("/runs/{run_id}/cancel")
    async def cancel_run(run_id: str) -> dict[str, Any]:
        try:
            return _result(await runner.cancel(run_id))
        except FrugalflowError as e:
            raise _translate(e) from None

    @router.post("/runs/{run_id}/feedback")
    async def run_feedback(run_id: str, body: Feedback) -> dict[str, Any]:
        """Was an answer good? Learned routers trained afterwards learn from it."""
        try:
            n = await runner.ledger.run_feedback(run_id, body.good, node=body.node,
                                                 call_id=body.call_id)
        except FrugalflowError as e:
            raise _translate(e) from None
        return {"run_id": run_id, "answers": n, "good": body.good}

    @router.get("/runs/{run_id}/events")
    async def run_events(run_id: str, request: Request) -> StreamingResponse:
        try:
            row = await runner.ledger.get_run(run_id)
        except FrugalflowError as e:
            raise _translate(e) from None
        return StreamingResponse(_sse(runner, run_id, row.status, request),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    @router.get("/catalog")
    async def catalog() -> list[dict[str, Any]]:
        cat = runner.catalog
        breakers = runner.breakers
        return [
            {"model": s.key, "provider": s.provider, "simulated": s.simulated,
             "input_per_mtok": s.input_price_per_mtok, "output_per_mtok": s.output_price_per_mtok,
             "context_window": s.window,
             "capabilities": [c for c, v in s.caps.model_dump().items() if v],
             "quality": s.quality, "available": cat.is_available(s),
             "unavailable_reason": cat.unavailable_reason(s),
             "provider_health": breakers.state(s.provider).value}
            for s in cat
        ]

    @router.get("/health")
    async def health() -> dict[str, Any]:
        from .fallback import acheck_shared_state

        # "unavailable": Redis (shared breakers / rate limits) is down and this process
        # uses in-process state until it is back; "local": nothing is shared.
        return {"ok": True,
                "shared_state": await acheck_shared_state(runner.breakers, runner.limiter)}

    return router


def _result(result: Any) -> dict[str, Any]:
    return {"run_id": result.run_id, "status": result.status, "cost_usd": result.cost_usd,
            "error": result.error, "interrupts": result.interrupts, "state": result.state}


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


class BodyLimitMiddleware(BaseHTTPMiddleware):
    """Refuse request bodies over `max_bytes` with 413 before reading them."""

    def __init__(self, app: Any, max_bytes: int = 1_000_000) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def dispatch(self, request: Request, call_next: Callable[..., Any]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return JSONResponse(
                {"detail": {"error": "PayloadTooLarge",
                            "message": f"request body over {self.max_bytes} bytes"}},
                status_code=413)
        return await call_next(request)  # type: ignore[no-any-return]


def create_app(
    runner: Runner,
    *,
    token: str | None = None,
    host: str = "127.0.0.1",
    max_body_bytes: int = 1_000_000,
) -> FastAPI:
    """A stand-alone app around `runner`. Refuses to run unauthenticated off loopback."""
    if token is None and not is_loopback(host):
        raise UserError(
            f"refusing to serve on {host} without a bearer token: set FRUGALFLOW_TOKEN "
            "(or pass token=...) or bind to 127.0.0.1"
        )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await runner.setup()
        yield
        await runner.close()  # running runs stop as `paused`, resumable later

    app = FastAPI(title="frugalflow", version="1", lifespan=lifespan)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.include_router(create_router(runner, token=token))
    return app
