"""Server-rendered SVG charts (bars by category, bars by day, stacked or not) as pure functions.

No script: hovering a bar shows its native `<title>` tooltip. Every label is escaped and
stripped of the characters XML cannot carry, so a hostile flow, node or model name renders as
text and the SVG stays well-formed. Colours and sizes are presentation attributes and classes,
never `style=` attributes, which the viewer's Content-Security-Policy (no inline style) blocks.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from html import escape

from markupsafe import Markup

__all__ = ["PALETTE", "DayBar", "bar_chart", "day_chart", "nice_ticks", "usd_label",
           "usd_tick"]

PALETTE: tuple[str, ...] = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2",
                            "#edc948", "#b07aa1", "#9c755f", "#ff9da7", "#bab0ac")
"""Series colours (Tableau 10: distinguishable, readable on white)."""

OTHER_COLOUR = "#9aa0a6"

# XML 1.0 forbids these even as character references; a stored name may hold them.
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ufffe\uffff\ud800-\udfff]")
_ID_SAFE = re.compile(r"[^A-Za-z0-9_-]")

Format = Callable[[float], str]


def text(value: object) -> str:
    """`value` as text safe in XML content and in quoted attributes."""
    return escape(_NOT_XML.sub("\ufffd", str(value)), quote=True)


def _clip(label: str, width: int) -> str:
    """A label cut to `width` characters (the full one is in the bar's tooltip)."""
    return label if len(label) <= width else label[: width - 1] + "…"


def _finite(value: float) -> float:
    """Costs are never negative nor infinite; a stored NaN is shown as nothing spent."""
    return value if math.isfinite(value) and value > 0 else 0.0


def usd_label(value: float) -> str:
    """A dollar amount with three significant digits however small: $0.000097, $1.23,
    $1,234.50."""
    if not math.isfinite(value):
        return "-"
    if value == 0:
        return "$0"
    sign = "-" if value < 0 else ""
    value = abs(value)
    if value >= 1:
        return f"{sign}${value:,.2f}"
    decimals = min(12, 2 - math.floor(math.log10(value)))
    shown = f"{value:.{decimals}f}".rstrip("0").rstrip(".")
    return f"{sign}${shown}"


def usd_tick(value: float, step: float) -> str:
    """An axis tick: as many decimals as the step between ticks needs ($0.00002 steps show
    $0.00004, $100 steps show $300)."""
    if value == 0:
        return "$0"
    decimals = max(0, -math.floor(math.log10(step) + 1e-9)) if step > 0 else 2
    if step < 1 and decimals < 2:
        decimals = 2
    return f"${value:,.{decimals}f}"


def nice_ticks(top: float, count: int = 4) -> list[float]:
    """Ticks 0..>=top on a 1-2-5 grid, so tick labels stay short (about `count` intervals);
    [0, 1] when top is 0."""
    if not math.isfinite(top) or top <= 0:
        return [0.0, 1.0]
    power = 10.0 ** math.floor(math.log10(top / count))
    # The 1-2-5 step whose number of intervals is nearest `count` (ties: fewer intervals).
    steps = [m * power * z for z in (0.1, 1, 10) for m in (1, 2, 5)]
    step = min(steps, key=lambda st: (abs(math.ceil(top / st - 1e-9) - count), -st))
    n = max(1, math.ceil(top / step - 1e-9))
    return [round(i * step, 12) for i in range(n + 1)]


def _open(chart_id: str, width: int, height: int, title: str, desc: str, *,
          fluid: bool = False) -> list[str]:
    """The `<svg>` start tag with its title and description. `fluid`: as wide as the page
    (scaled); else drawn at its own size, so that its text keeps the page's size."""
    cid = _ID_SAFE.sub("-", chart_id) or "chart"
    size = 'width="100%"' if fluid else f'width="{width}" height="{height}"'
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="ff-chart" id="{cid}" '
        f'viewBox="0 0 {width} {height}" {size} role="img" '
        f'aria-labelledby="{cid}-title {cid}-desc" font-family="system-ui, sans-serif" '
        f'font-size="12">',
        f'<title id="{cid}-title">{text(title)}</title>',
        f'<desc id="{cid}-desc">{text(desc)}</desc>',
    ]


def _empty(chart_id: str, title: str, message: str) -> Markup:
    parts = _open(chart_id, 640, 80, title, message)
    parts.append(f'<text class="ff-chart-empty" x="320" y="45" text-anchor="middle" '
                 f'fill="#666">{text(message)}</text></svg>')
    return Markup("".join(parts))


def _summary(items: Sequence[tuple[str, float]], fmt: Format, limit: int = 5) -> str:
    shown = "; ".join(f"{k}: {fmt(v)}" for k, v in items[:limit])
    more = f"; and {len(items) - limit} more" if len(items) > limit else ""
    return shown + more


def bar_chart(items: Sequence[tuple[str, float]] | Mapping[str, float], *, chart_id: str,
              title: str, fmt: Format = usd_label, limit: int = 12,
              empty: str = "Nothing spent in this window") -> Markup:
    """Horizontal bars, one per category, dearest first; beyond `limit` the rest are summed
    into one "other" bar. Returns the `<svg>` element, ready to place in a page."""
    pairs = list(items.items()) if isinstance(items, Mapping) else list(items)
    rows = sorted(((str(k), _finite(v)) for k, v in pairs), key=lambda kv: -kv[1])
    if not any(v for _, v in rows):
        return _empty(chart_id, title, empty)
    folded = len(rows) > limit
    if folded:
        rest = rows[limit - 1:]
        rows = rows[: limit - 1] + [(f"other ({len(rest)})", sum(v for _, v in rest))]
    label_w, plot_w, value_w, row_h, top = 210, 380, 90, 26, 28
    width, height = label_w + plot_w + value_w, top + row_h * len(rows) + 6
    ticks = nice_ticks(max(v for _, v in rows))
    step, span = ticks[1] - ticks[0], ticks[-1]
    parts = _open(chart_id, width, height, title,
                  f"{title}, {len(rows)} bars: {_summary(rows, fmt)}")
    parts.append('<g class="ff-axis" fill="#555" font-size="10">')
    for t in ticks:
        x = label_w + plot_w * t / span
        parts.append(f'<line x1="{x:.1f}" y1="{top - 6}" x2="{x:.1f}" y2="{height - 4}" '
                     f'stroke="#ddd"/><text x="{x:.1f}" y="{top - 10}" '
                     f'text-anchor="middle">{text(usd_tick(t, step))}</text>')
    parts.append("</g>")
    for i, (label, value) in enumerate(rows):
        y = top + i * row_h
        w = plot_w * value / span
        colour = OTHER_COLOUR if folded and i == len(rows) - 1 else PALETTE[0]
        parts.append(
            f'<g class="ff-bar"><title>{text(label)}: {text(fmt(value))}</title>'
            f'<text x="{label_w - 8}" y="{y + row_h / 2 + 4:.1f}" text-anchor="end" '
            f'fill="#222">{text(_clip(label, 30))}</text>'
            f'<rect x="{label_w}" y="{y + 4}" width="{max(w, 1.0 if value else 0):.2f}" '
            f'height="{row_h - 8}" fill="{colour}" data-value="{value!r}"/>'
            f'<text x="{label_w + w + 6:.1f}" y="{y + row_h / 2 + 4:.1f}" '
            f'fill="#222">{text(fmt(value))}</text></g>')
    parts.append("</svg>")
    return Markup("".join(parts))


@dataclass(frozen=True)
class DayBar:
    """One day's column: its label (e.g. 2026-11-30) and the amount of each series."""

    day: str
    parts: Mapping[str, float]

    @property
    def total(self) -> float:
        return sum(_finite(v) for v in self.parts.values())


def _series(days: Sequence[DayBar], limit: int) -> list[str]:
    """Series names dearest first; beyond `limit` the rest share one "other" colour."""
    totals: dict[str, float] = {}
    for d in days:
        for k, v in d.parts.items():
            totals[k] = totals.get(k, 0.0) + _finite(v)
    return sorted(totals, key=lambda k: -totals[k])[:limit]


def day_chart(days: Sequence[DayBar], *, chart_id: str, title: str, fmt: Format = usd_label,
              limit: int = 6, empty: str = "Nothing spent in this window") -> Markup:
    """Vertical bars, one per day in the order given, stacked by series (e.g. models) when
    the days have more than one; a legend names the series. Days with nothing are kept (an
    empty column is information)."""
    if not days or not any(d.total for d in days):
        return _empty(chart_id, title, empty)
    names = _series(days, limit)
    stacked = len({k for d in days for k, v in d.parts.items() if _finite(v)}) > 1
    legend_h = 22 * (1 + (len(names) // 4)) if stacked else 0
    left, plot_w, plot_h, top = 78, 860, 190, 16
    width, height = left + plot_w + 12, top + plot_h + 40 + legend_h
    ticks = nice_ticks(max(d.total for d in days))
    step, span = ticks[1] - ticks[0], ticks[-1]
    slot = plot_w / len(days)
    bar_w = max(1.0, slot * 0.78)
    every = max(1, math.ceil(len(days) / 10))  # at most ~10 date labels
    parts = _open(chart_id, width, height, title,
                  f"{title}, {len(days)} days from {days[0].day} to {days[-1].day}, "
                  f"total {fmt(sum(d.total for d in days))}", fluid=True)
    parts.append('<g class="ff-axis" fill="#555" font-size="10">')
    for t in ticks:
        y = top + plot_h - plot_h * t / span
        parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                     f'stroke="#ddd"/><text x="{left - 6}" y="{y + 3:.1f}" '
                     f'text-anchor="end">{text(usd_tick(t, step))}</text>')
    for i, d in enumerate(days):
        if (len(days) - 1 - i) % every == 0:  # counted back from the last day (today)
            x = left + slot * (i + 0.5)
            parts.append(f'<text x="{x:.1f}" y="{top + plot_h + 14}" '
                         f'text-anchor="middle">{text(_clip(d.day, 12))}</text>')
    parts.append("</g>")
    for i, d in enumerate(days):
        parts.append(_day_column(d, names, left + slot * i + (slot - bar_w) / 2, bar_w,
                                 top + plot_h, plot_h / span, fmt, stacked))
    if stacked:
        parts.append(_legend(names, any(set(d.parts) - set(names) for d in days),
                             left, top + plot_h + 30))
    parts.append("</svg>")
    return Markup("".join(parts))


def _day_column(day: DayBar, names: list[str], x: float, w: float, base: float,
                scale: float, fmt: Format, stacked: bool) -> str:
    """One day's stacked segments (series in legend order, then "other"), bottom up."""
    other = sum(_finite(v) for k, v in day.parts.items() if k not in names)
    segments = [(k, _finite(day.parts.get(k, 0.0)), PALETTE[j % len(PALETTE)])
                for j, k in enumerate(names)] + [("other", other, OTHER_COLOUR)]
    detail = ", ".join(f"{k} {fmt(v)}" for k, v, _ in segments if v) if stacked else ""
    out = [f'<g class="ff-bar"><title>{text(day.day)}: '
           f'{text(fmt(day.total))}{text(" (" + detail + ")") if detail else ""}</title>']
    y = base
    for name, value, colour in segments:
        if not value:
            continue
        h = max(value * scale, 1.0)
        y -= h
        out.append(f'<rect x="{x:.2f}" y="{y:.2f}" width="{w:.2f}" height="{h:.2f}" '
                   f'fill="{colour}" data-series="{text(name)}" data-value="{value!r}"/>')
    out.append("</g>")
    return "".join(out)


def _legend(names: list[str], other: bool, x0: float, y0: float) -> str:
    out = ['<g class="ff-legend" fill="#222" font-size="11">']
    entries = [(n, PALETTE[j % len(PALETTE)]) for j, n in enumerate(names)]
    if other:
        entries.append(("other", OTHER_COLOUR))
    for j, (name, colour) in enumerate(entries):
        x, y = x0 + 200 * (j % 4), y0 + 22 * (j // 4)
        out.append(f'<rect x="{x:.0f}" y="{y - 9:.0f}" width="10" height="10" '
                   f'fill="{colour}"/><text x="{x + 14:.0f}" y="{y:.0f}">'
                   f'{text(_clip(name, 28))}<title>{text(name)}</title></text>')
    out.append("</g>")
    return "".join(out)
