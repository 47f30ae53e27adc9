"""The service's endpoints as a FastAPI router: runs, their actions, events, catalog, health."""

from __future__ import annotations

import asyncio
import json
import logging
import warnings
from collections.abc import Awaitable, Callable, Mapping
from os import PathLike
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse
from starlette.responses import Response

from ..costs import MAX_DAYS, CostSummary, cost_summary
from ..exceptions import FrugalflowError, StoreError
from ..flow_listing import flows_json
from ..inputs import InputError
from ..persistence.tables import RunRow
from ..runner import Runner
from ..statuses import RunStatus
from . import models as m
from .auth import Auth, Principal, UnauthenticatedServiceWarning
from .bodies import (
    MAX_BODY_BYTES,
    MAX_JSON_DEPTH,
    Feedback,
    ResumeRun,
    StartRun,
    invalid,
    route_class,
)
from .parked import parked_requests
from .openapi import EventStream, errors, event_stream, one_line_errors
from .responses import http_error, not_found, render, result_json, row_json, run_json, translate
from .stream import parse_after, sse

log = logging.getLogger("frugalflow.service")


def create_router(
    runner: Runner,
    *,
    token: str | None = None,
    tokens: Mapping[str, Principal] | str | PathLike[str] | None = None,
    allow_unauthenticated: bool = False,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_json_depth: int = MAX_JSON_DEPTH,
    ui: bool = False,
    heartbeat: float = 15.0,
) -> APIRouter:
    """The API as a router. `token` (an admin) and/or `tokens` (token -> Principal, or a TOML
    file for `load_tokens`) are required as `Authorization: Bearer <token>`. Without either,
    the API is open to whoever reaches the app: that warns (`UnauthenticatedServiceWarning`)
    unless `allow_unauthenticated=True` says it is meant (an app bound to loopback).
    `ui=True` adds the run viewer's pages under /ui (off by default in a router: your app
    decides what it serves; `create_app` turns it on).
    `heartbeat`: seconds of silence after which an event stream sends a keep-alive."""
    auth = Auth(token, tokens)
    if auth.open and not allow_unauthenticated:
        message = ("frugalflow: create_router() without token= or tokens=: anyone who reaches "
                   "this app can start runs (spending money) and read, resume and cancel "
                   "every run. Pass token=... (e.g. FRUGALFLOW_TOKEN), or "
                   "allow_unauthenticated=True if the app is bound to loopback only")
        log.warning(message)
        warnings.warn(message, UnauthenticatedServiceWarning, stacklevel=2)
    route_cls = one_line_errors(route_class(max_body_bytes, max_json_depth))
    router = APIRouter(route_class=route_cls)
    api = APIRouter(route_class=route_cls, dependencies=[Depends(auth.require)])
    _add_run_routes(api, runner, auth.require)
    _add_run_action_routes(api, runner, auth.require, heartbeat)
    _add_status_routes(api, router, runner, auth)
    _add_cost_routes(api, runner, auth.require)
    router.include_router(api)
    if ui:
        from .ui import create_ui_router  # jinja2 (the service extra) only when asked

        router.include_router(create_ui_router(runner, auth))
    return router


_Require = Callable[[Request], Awaitable["Principal | None"]]


async def _own_run(runner: Runner, run_id: str, who: Principal | None) -> RunRow:
    """The run, if `who` may see it; else 404, the same as for a missing run."""
    try:
        row = await runner.ledger.get_run(run_id)
    except FrugalflowError as e:
        raise translate(e, run_id) from None
    if who is not None and not who.is_admin and row.principal != who.name:
        raise not_found(run_id)
    return row


def _add_run_routes(api: APIRouter, runner: Runner, require: _Require) -> None:
    """The flows, and runs: start one, list them, read one."""

    @api.get("/flows", response_model=list[m.FlowDescription], responses=errors(401))
    async def list_flows() -> Response:
        """Each flow: description, nodes (and their needs), input fields (name, type,
        required)."""
        return render(flows_json(list(runner.flows.values())))

    @api.post("/runs", status_code=202, response_model=m.RunActionResult,
              responses={200: {"model": m.RunActionResult,
                               "description": "With `wait`: where the run stopped."},
                         **errors(401, 404, 409, 413, 422, 503)})
    async def start_run(body: StartRun,
                        who: Principal | None = Depends(require)) -> Response:
        if body.flow not in runner.flows:
            raise HTTPException(404, detail={
                "error": "UnknownFlow",
                "message": f"no flow {body.flow!r}; flows: {', '.join(sorted(runner.flows))}"})
        try:
            result = await runner.start(body.flow, body.input, budget=body.budget,
                                        wait=body.wait, principal=who.name if who else None,
                                        deadline=body.deadline)
        except InputError as e:  # missing, unknown or mistyped fields: nothing was written
            raise http_error(422, e) from None
        except FrugalflowError as e:
            raise translate(e) from None
        except ValueError as e:  # a budget the model's constraints let through
            raise invalid(str(e)) from None
        return render(result_json(result), status_code=200 if body.wait else 202)

    @api.get("/runs", response_model=list[m.RunSummary], responses=errors(401, 422, 503))
    async def list_runs(flow: str | None = None, status: RunStatus | None = None,
                        limit: int = 50, who: Principal | None = Depends(require)) -> Response:
        limit = max(1, min(limit, 500))
        mine = who.name if who is not None and not who.is_admin else None
        try:
            rows = await runner.ledger.list_runs(flow=flow, status=status, limit=limit,
                                                 principal=mine)
        except FrugalflowError as e:
            raise translate(e) from None
        # Up to 500 stored inputs, each up to the body limit: render off the event loop.
        return await asyncio.to_thread(lambda: render([run_json(r) for r in rows]))

    @api.get("/runs/{run_id}", response_model=m.RunDetail,
             responses=errors(401, 404, 422, 503))
    async def get_run(run_id: str, who: Principal | None = Depends(require)) -> Response:
        await _own_run(runner, run_id, who)
        try:
            record = await runner.get(run_id)
        except FrugalflowError as e:
            raise translate(e, run_id) from None
        return await asyncio.to_thread(lambda: render({
            **run_json(record.run),
            "cost_by_node": record.cost_by("node"),
            "cost_by_model": record.cost_by("model"),
            "nodes": [n.model_dump(mode="json") for n in record.nodes],
            "calls": [row_json(a, ("response", "request")) for a in record.attempts],
        }))

    @api.get("/runs/{run_id}/parked", response_model=list[m.ParkedRequest],
             responses=errors(401, 404, 422, 503))
    async def get_parked(run_id: str, who: Principal | None = Depends(require)) -> Response:
        """The run's parked requests, oldest first: calls waiting in a provider batch or for
        a cheaper hour (a `waiting` run), and those that were answered, given up or used.
        Request and answer bodies are not shown (the answer, once used, is the call's
        attempt in `GET /runs/{run_id}`)."""
        await _own_run(runner, run_id, who)
        try:
            items = await parked_requests(runner.parked, run_id)
        except FrugalflowError as e:
            raise translate(e, run_id) from None
        return render(items)


def _add_run_action_routes(api: APIRouter, runner: Runner, require: _Require,
                           heartbeat: float = 15.0) -> None:
    """What a principal does to one of its runs: resume, cancel, feedback, follow."""

    @api.post("/runs/{run_id}/resume", status_code=202, response_model=m.RunActionResult,
              responses={200: {"model": m.RunActionResult,
                               "description": "With `wait`: where the run stopped."},
                         **errors(401, 404, 409, 413, 422, 503)})
    async def resume_run(run_id: str, body: ResumeRun,
                         who: Principal | None = Depends(require)) -> Response:
        await _own_run(runner, run_id, who)
        try:
            result = await runner.resume(run_id, body.value, budget=body.budget, wait=body.wait)
        except FrugalflowError as e:
            raise translate(e, run_id) from None
        except ValueError as e:
            raise invalid(str(e)) from None
        return render(result_json(result), status_code=200 if body.wait else 202)

    @api.post("/runs/{run_id}/cancel", response_model=m.RunActionResult,
              responses=errors(401, 404, 409, 422, 503))
    async def cancel_run(run_id: str, who: Principal | None = Depends(require)) -> Response:
        await _own_run(runner, run_id, who)
        try:
            return render(result_json(await runner.cancel(run_id)))
        except FrugalflowError as e:
            raise translate(e, run_id) from None

    @api.post("/runs/{run_id}/feedback", response_model=m.FeedbackResult,
              responses=errors(401, 404, 413, 422, 503))
    async def run_feedback(run_id: str, body: Feedback,
                           who: Principal | None = Depends(require)) -> Response:
        """Was an answer good? Learned routers trained afterwards learn from it."""
        await _own_run(runner, run_id, who)
        try:
            n = await runner.ledger.run_feedback(run_id, body.good, node=body.node,
                                                 call_id=body.call_id)
        except FrugalflowError as e:
            raise translate(e, run_id) from None
        return render({"run_id": run_id, "answers": n, "good": body.good})

    @api.get("/runs/{run_id}/events", response_class=EventStream, responses=event_stream())
    async def run_events(run_id: str, request: Request, after: str | None = None,
                         who: Principal | None = Depends(require)) -> StreamingResponse:
        """The run's events as server-sent events, each with its `id:`; `Last-Event-ID`
        (or `?after=<id>`) replays those after that id from the event log."""
        try:
            since = parse_after(after, request.headers.get("last-event-id"))
        except ValueError as e:
            raise invalid(str(e)) from None
        row = await _own_run(runner, run_id, who)
        return StreamingResponse(sse(runner, run_id, row.status, request, after=since,
                                     heartbeat=heartbeat),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})


def _add_status_routes(api: APIRouter, router: APIRouter, runner: Runner, auth: Auth) -> None:
    """The catalog with provider health (authenticated), and /health (liveness for all)."""

    @api.get("/catalog", response_model=list[m.CatalogEntry], responses=errors(401))
    async def catalog() -> Response:
        """Each model: prices, profile, whether it can be called here, its provider's
        breaker state (shared by the fleet with Redis breakers)."""
        cat = runner.catalog
        health = await _provider_health(runner)
        return render([
            {"model": s.key, "provider": s.provider, "simulated": s.simulated,
             "input_per_mtok": s.input_price_per_mtok, "output_per_mtok": s.output_price_per_mtok,
             "context_window": s.window,
             "capabilities": [c for c, v in s.caps.model_dump().items() if v],
             "quality": s.quality, "available": cat.is_available(s),
             "unavailable_reason": cat.unavailable_reason(s),
             "provider_health": health[s.provider]}
            for s in cat
        ])

    @router.get("/health", response_model=m.HealthDetails | m.HealthPublic)
    async def health(request: Request) -> Response:
        """Liveness for anyone; with a valid token (or on an open API) also the details."""
        if not auth.open and auth.identify(request) is None:
            return render({"ok": True})
        return render({"ok": True, **await _health_details(runner)})


async def _provider_health(runner: Runner) -> dict[str, str]:
    """Each catalog provider's breaker state (shared by the fleet with Redis breakers)."""
    providers = sorted({s.provider for s in runner.catalog})
    return {p: (await runner.breakers.astate(p)).value for p in providers}


async def _health_details(runner: Runner) -> dict[str, Any]:
    from .. import __version__
    from ..scale.redis import acheck_shared_state

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


_DAYS_PARAMETER = {
    "name": "days", "in": "query", "required": False,
    "description": f"The window: today (UTC) and the days before it, 1 to {MAX_DAYS}.",
    "schema": {"type": "integer", "minimum": 1, "maximum": MAX_DAYS, "default": 30},
}


def _days(request: Request) -> int:
    """`?days=`, or 422 in one line (FastAPI's own answer is a list of pydantic errors)."""
    text = request.query_params.get("days")
    if text is None:
        return 30
    try:
        days = int(text)
    except ValueError:
        raise invalid(f"days={text[:40]!r} is not a number: give a whole number of days "
                      f"from 1 to {MAX_DAYS}") from None
    if not 1 <= days <= MAX_DAYS:
        raise invalid(f"days={days} is out of range: give a whole number of days from 1 "
                      f"to {MAX_DAYS}")
    return days


def _add_cost_routes(api: APIRouter, runner: Runner, require: _Require) -> None:
    """What the calls cost: totals and by day, model, node and flow."""

    @api.get("/costs", response_model=CostSummary, responses=errors(401, 422, 503),
             openapi_extra={"parameters": [_DAYS_PARAMETER]})
    async def costs(flow: str | None = None, days: int = Depends(_days),
                    who: Principal | None = Depends(require)) -> Response:
        """Spending of the last `days` UTC days (today included), optionally of one flow.
        An admin sees every run's; a `user` only the costs of the runs it started."""
        mine = who.name if who is not None and not who.is_admin else None
        try:
            summary = await cost_summary(runner.store, days=days, flow=flow, principal=mine)
        except FrugalflowError as e:
            raise translate(e) from None
        return render(summary.model_dump(mode="json"))
