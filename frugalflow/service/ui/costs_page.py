"""The run viewer's Costs page: what model calls cost over the last 1, 7, 30 or 90 days, by
day, model, node, flow and service tier, as charts; a user principal sees only its own
runs' costs."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from markupsafe import Markup
from starlette.responses import HTMLResponse

from ...costs import CostBucket, CostSummary, cost_summary
from ...exceptions import FrugalflowError
from .charts import DayBar, bar_chart, day_chart, usd_label
from .context import UI, Viewer
from .pages import _store_error

__all__ = ["WINDOWS", "CostsView", "add_costs_page", "costs_view"]

WINDOWS = (1, 7, 30, 90)
"""The windows the page offers, in days (today, UTC, and the days before it)."""
DEFAULT_WINDOW = 7


@dataclass(frozen=True)
class CostsView:
    """The summary and its charts, ready for the template."""

    summary: CostSummary
    by_day: Markup
    by_model: Markup
    by_node: Markup
    by_flow: Markup
    by_tier: Markup


def _node_label(bucket: CostBucket, one_flow: bool) -> str:
    """A node's name, with its flow's when nodes of several flows share the chart."""
    return bucket.key if one_flow or not bucket.flow else f"{bucket.flow} · {bucket.key}"


def costs_view(summary: CostSummary) -> CostsView:
    """The five charts of a summary (pure: no I/O)."""
    one_flow = summary.flow is not None or len(summary.by_flow) <= 1
    span = "today" if summary.days == 1 else f"the last {summary.days} days"
    return CostsView(
        summary=summary,
        # stacked by model (the chart keeps the dearest few and sums the rest)
        by_day=day_chart([DayBar(b.key, b.models or {"cost": b.cost_usd})
                          for b in summary.by_day],
                         chart_id="chart-day", title=f"Cost by day, {span} (UTC)"),
        by_model=bar_chart([(b.key, b.cost_usd) for b in summary.by_model],
                           chart_id="chart-model", title=f"Cost by model, {span}"),
        by_node=bar_chart([(_node_label(b, one_flow), b.cost_usd) for b in summary.by_node],
                          chart_id="chart-node", title=f"Cost by node, {span}"),
        by_flow=bar_chart([(b.key or "(no flow)", b.cost_usd) for b in summary.by_flow],
                          chart_id="chart-flow", title=f"Cost by flow, {span}"),
        by_tier=bar_chart([(b.key.replace("_", "-"), b.cost_usd) for b in summary.by_tier],
                          chart_id="chart-tier", title=f"Cost by service tier, {span}"),
    )


def _window(days: str) -> tuple[int, str | None]:
    """The window asked for, or the default and the one-line problem with the request."""
    try:
        n = int(days)
    except ValueError:
        n = 0
    if n in WINDOWS:
        return n, None
    return DEFAULT_WINDOW, (f"days {days[:20]!r} is not offered: use one of "
                            f"{', '.join(map(str, WINDOWS))}")


def add_costs_page(router: APIRouter, ui: UI) -> None:
    """/ui/costs?days=7&flow=...: totals and charts over a window."""
    ui.env.filters.setdefault("cost", usd_label)  # three significant digits: $0.000097

    @router.get("/ui/costs", name="frugalflow_ui_costs", include_in_schema=False)
    async def costs_page(request: Request, days: str = str(DEFAULT_WINDOW), flow: str = "",
                         viewer: Viewer = Depends(ui.viewer)) -> HTMLResponse:
        n, problem = _window(days)
        try:
            summary = await cost_summary(ui.runner.store, days=n, flow=flow or None,
                                         principal=viewer.only)
        except FrugalflowError as e:
            raise _store_error(e) from None
        flows = sorted(set(ui.runner.flows) | {b.key for b in summary.by_flow if b.key})
        return await ui.page(request, "costs.html", viewer=viewer, nav="costs",
                             v=costs_view(summary), windows=WINDOWS, flows=flows,
                             problems=[problem] if problem else [],
                             filters={"days": n, "flow": flow})
