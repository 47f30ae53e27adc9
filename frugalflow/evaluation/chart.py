"""The report's chart: one panel per node, cost per call (log scale) against pass rate with
its interval per model, the frontier, the hull of lower bounds, the target and the choice.

Drawn on a bare matplotlib `Figure` with the Agg canvas, never through pyplot: no global
state, so it works headless and from any thread. matplotlib is in the `evals` extra.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..exceptions import UserError

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .report import NodeReport, Report

__all__ = ["plot_report", "png_bytes", "save_chart"]

_COLUMNS = 2


def _figure_class() -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError("the evaluation chart needs matplotlib: "
                        "install frugalflow[evals]") from None
    return Figure, FigureCanvasAgg


def _floor(node: NodeReport) -> float:
    """Where a free model sits on the log axis: a decade below the cheapest paid one."""
    paid = [r.cost_per_call for r in node.rows if r.cost_per_call > 0]
    return min(paid) / 10 if paid else 1e-6


def _panel(ax: Axes, node: NodeReport) -> None:
    floor = _floor(node)

    def x(cost: float) -> float:
        return max(cost, floor)

    rows = [r for r in node.rows if r.n]
    # Limits first: autoscaling on one model alone would warn of an empty range.
    xs = [x(r.cost_per_call) for r in rows] or [floor]
    ax.set_xscale("log")
    ax.set_xlim(min(xs) / 2, max(xs) * 4)  # room for the labels
    ax.set_autoscalex_on(False)
    placed: list[tuple[float, float, int]] = []  # (x, rate, label line) of labels drawn
    for r in sorted(rows, key=lambda r: r.cost_per_call):
        err = [[r.rate - r.interval.low], [r.interval.high - r.rate]]
        current = r.model == node.current
        ax.errorbar([x(r.cost_per_call)], [r.rate], yerr=err, fmt="s" if current else "o",
                    color="tab:orange" if current else "tab:blue", capsize=3, markersize=5)
        label = r.model + (" (free)" if r.cost_per_call <= 0 else "") + (
            " (current)" if current else "")
        # Models of about the same cost and rate would print their names over each other:
        # each takes the first line no nearby label uses.
        taken = {level for px, py, level in placed
                 if abs(math.log10(x(r.cost_per_call) / px)) < 1.1 and abs(r.rate - py) < 0.06}
        level = next(k for k in range(len(placed) + 1) if k not in taken)
        placed.append((x(r.cost_per_call), r.rate, level))
        ax.annotate(label, (x(r.cost_per_call), r.rate), textcoords="offset points",
                    xytext=(5, 4 - 9 * level), fontsize=7)
    by_model = {r.model: r for r in rows}
    front = [by_model[m] for m in node.frontier if m in by_model]
    if front:
        ax.step([x(r.cost_per_call) for r in front], [r.rate for r in front], where="post",
                color="tab:gray", linestyle=":", label="frontier")
    hull = [by_model[m] for m in node.hull if m in by_model]
    if hull:
        ax.plot([x(r.cost_per_call) for r in hull], [r.interval.low for r in hull],
                color="tab:green", linestyle="--", marker=".", label="hull (lower bounds)")
    ax.axhline(node.target, color="tab:red", linewidth=0.8, label=f"target {node.target:.2f}")
    if node.choice is not None:
        ax.plot([x(node.choice.expected_cost)], [node.choice.assured_rate], marker="*",
                markersize=16, color="gold", markeredgecolor="black", linestyle="none",
                label="chosen", zorder=5)
    ax.set_ylim(0.0, 1.05)
    ax.set_xlabel("cost per call (USD, log)")
    ax.set_ylabel("pass rate")
    ax.set_title(f"{node.name}: {node.verdict()}", fontsize=8)
    ax.grid(True, which="both", alpha=0.2)
    ax.legend(fontsize=7, loc="lower right")


def plot_report(report: Report) -> Figure:
    """The report's chart, one panel per node (a bare Figure: no pyplot state)."""
    figure_class, canvas_class = _figure_class()
    nodes = list(report.per_node.values())
    if not nodes:
        raise UserError("nothing to chart: the evaluation has no cells yet")
    cols = min(_COLUMNS, len(nodes))
    rows = math.ceil(len(nodes) / cols)
    fig: Figure = figure_class(figsize=(6.0 * cols, 4.5 * rows), layout="constrained")
    canvas_class(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, node in enumerate(nodes):
        _panel(axes[i // cols][i % cols], node)
    for j in range(len(nodes), rows * cols):
        fig.delaxes(axes[j // cols][j % cols])
    return fig


def png_bytes(report: Report) -> bytes:
    """The chart as PNG bytes (a notebook's inline image)."""
    buf = io.BytesIO()
    plot_report(report).savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def save_chart(report: Report, path: str | Path) -> Path:
    """Write the chart to `path` as PNG; returns the path. Blocking: from async code, call
    it through `asyncio.to_thread`."""
    out = Path(path)
    plot_report(report).savefig(out, format="png", dpi=100)
    return out
