"""The run viewer's run pages: the runs list (filters by flow, status and date) and a run
(graph, timeline, what a waiting run waits for, input and output, actions), with the
fragment its script re-fetches live."""

from __future__ import annotations

import logging
from datetime import date, datetime, time, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.responses import HTMLResponse, RedirectResponse, Response

from ...exceptions import FrugalflowError, RunNotFoundError, StoreUnavailableError
from ...persistence.ledger import RunRecord, RunStats
from ...statuses import RunStatus
from .context import RUNS_ROUTE, UI, Viewer, paths
from .graph import Drawing, layout
from ..parked import parked_items
from .views import Parked, StandardPrice, as_text, run_lines, run_view

log = logging.getLogger("frugalflow.service")

_STATUSES = [s.value for s in RunStatus]


def _day(value: str | None, what: str) -> tuple[date | None, str | None]:
    """A YYYY-MM-DD filter value, or the one-line problem with it."""
    if not value:
        return None, None
    try:
        return date.fromisoformat(value), None
    except ValueError:
        return None, f"{what} {value[:40]!r} is not a date: use YYYY-MM-DD"


def _store_error(e: FrugalflowError) -> HTTPException:
    if isinstance(e, StoreUnavailableError):
        return HTTPException(503, detail="the database is unavailable; try again later")
    log.error("frugalflow run viewer: %s: %s", type(e).__name__, e)  # may name the database
    return HTTPException(500, detail="a database error; the server's log has the details")


def add_run_pages(router: APIRouter, ui: UI) -> None:
    """/ui (to the runs), /ui/runs, /ui/runs/{id} and its live fragment."""

    @router.get("/ui", include_in_schema=False)
    async def home(request: Request) -> Response:
        return RedirectResponse(f"{paths(request).ui}/runs", status_code=303)

    @router.get("/ui/runs", name=RUNS_ROUTE, include_in_schema=False)
    async def runs_page(request: Request, flow: str = "", status: str = "", since: str = "",
                        until: str = "", limit: int = 50,
                        viewer: Viewer = Depends(ui.viewer)) -> HTMLResponse:
        limit = max(1, min(limit, 500))
        first, bad_since = _day(since, "from")
        last, bad_until = _day(until, "to")
        problems = [p for p in (bad_since, bad_until) if p]
        if status and status not in _STATUSES:
            problems.append(f"status {status[:40]!r} is unknown: use one of "
                            f"{', '.join(_STATUSES)}")
        lines = []
        if not problems:
            try:
                rows = await ui.runner.ledger.list_runs(
                    flow=flow or None, status=status or None, limit=limit, principal=viewer.only,
                    created_since=_midnight(first),
                    created_before=_midnight(last + timedelta(days=1) if last else None))
                lines = run_lines(rows, await ui.runner.ledger.run_stats([r.id for r in rows]))
            except FrugalflowError as e:
                raise _store_error(e) from None
        return await ui.page(
            request, "runs.html", viewer=viewer, nav="runs", lines=lines, problems=problems,
            flows=sorted(ui.runner.flows), statuses=_STATUSES, limit=limit,
            filters={"flow": flow, "status": status, "since": since, "until": until})

    async def record_of(run_id: str, viewer: Viewer) -> RunRecord:
        try:
            record = await ui.runner.ledger.run_record(run_id)
        except RunNotFoundError:
            record = None
        except FrugalflowError as e:
            raise _store_error(e) from None
        if record is None or (viewer.only is not None and record.run.principal != viewer.only):
            raise HTTPException(404, detail="no such run")  # another's: the same as missing
        return record

    async def view(run_id: str, viewer: Viewer) -> dict[str, Any]:
        record = await record_of(run_id, viewer)
        try:
            stats = (await ui.runner.ledger.run_stats([run_id])).get(run_id)
            items, batches = await parked_items(ui.runner.parked, run_id)
        except FrugalflowError as e:
            raise _store_error(e) from None
        drawing = _drawing(ui, record.run.flow)
        parked = [Parked(i, batches.get(i.batch_id or "")) for i in items]
        return {"v": run_view(record, drawing, stats or RunStats(), parked=parked,
                              standard=_standard_price(ui)),
                "input": as_text(record.run.input)}

    @router.get("/ui/runs/{run_id}", include_in_schema=False)
    async def run_page(request: Request, run_id: str,
                       viewer: Viewer = Depends(ui.viewer)) -> HTMLResponse:
        return await ui.page(request, "run.html", viewer=viewer, nav="runs",
                             **await view(run_id, viewer))

    @router.get("/ui/runs/{run_id}/live", include_in_schema=False)
    async def run_fragment(request: Request, run_id: str,
                           viewer: Viewer = Depends(ui.viewer)) -> HTMLResponse:
        """The part of the run page that changes, for the page's script to swap in."""
        return await ui.page(request, "run_live.html", viewer=viewer,
                             **await view(run_id, viewer))


def _midnight(day: date | None) -> datetime | None:
    return None if day is None else datetime.combine(day, time(), tzinfo=timezone.utc)


def _standard_price(ui: UI) -> StandardPrice:
    """Prices tokens at a catalog model's standard price (None for a model it lacks)."""
    catalog = ui.runner.catalog

    def price(model: str, input_tokens: int, output_tokens: int) -> float | None:
        if model not in catalog:
            return None
        return catalog[model].estimate_cost(input_tokens, output_tokens)

    return price


def _drawing(ui: UI, flow: str) -> Drawing | None:
    """The flow's graph laid out (once per compiled flow); None when this runner does not
    know the flow."""
    if flow not in ui.runner.flows:
        return None
    compiled = ui.runner.compiled(flow)
    hit = ui.drawings.get(flow)
    if hit is None or hit[0] is not compiled:
        hit = ui.drawings[flow] = (compiled, layout(compiled.graph.get_graph()))
    return hit[1]
