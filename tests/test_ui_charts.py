"""The run viewer's SVG charts: well-formed, escaped, accessible, readable for tiny and large
amounts, and honest about empty data."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from frugalflow.service.ui.charts import (
    DayBar,
    bar_chart,
    day_chart,
    nice_ticks,
    usd_label,
    usd_tick,
)

NS = {"s": "http://www.w3.org/2000/svg"}
HOSTILE = ['<script>alert(1)</script>', 'a"onload="alert(2)', "it's & <b>", "\x00nul\x1besc",
           "\ud800lone", "]]>cdata"]


def parse(svg: str) -> ET.Element:
    root = ET.fromstring(svg)  # raises on anything not well-formed
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    return root


def bars(root: ET.Element) -> list[ET.Element]:
    return root.findall(".//s:g[@class='ff-bar']/s:rect", NS)


def texts(root: ET.Element) -> str:
    return " ".join("".join(e.itertext()) for e in root.iter())


def test_hostile_labels_are_text_not_markup() -> None:
    for svg in (bar_chart([(h, 0.5) for h in HOSTILE], chart_id="x", title="<i>t</i>"),
                day_chart([DayBar("<script>", {h: 0.1 for h in HOSTILE})], chart_id="y",
                          title='"q"')):
        root = parse(svg)
        assert "<script>" not in svg and 'onload="' not in svg
        assert not root.findall(".//s:script", NS) and not root.findall(".//s:b", NS)
        shown = texts(root)
        assert "<script>alert(1)</script>" in shown or "<script>alert(1)</scri" in shown
        assert "it's & <b>" in shown
        # Every attribute of every element is one the chart wrote: nothing injected.
        for e in root.iter():
            assert not any(a.startswith("on") for a in e.attrib)


def test_empty_data_says_so() -> None:
    for svg in (bar_chart([], chart_id="e", title="By model"),
                bar_chart({"m": 0.0}, chart_id="e", title="By model"),
                day_chart([], chart_id="d", title="By day"),
                day_chart([DayBar("2026-11-30", {})], chart_id="d", title="By day")):
        root = parse(svg)
        assert not bars(root)
        assert "Nothing spent in this window" in texts(root)
        assert root.get("role") == "img"


def test_one_bar() -> None:
    root = parse(bar_chart([("sim:fast", 0.000097)], chart_id="one", title="By model"))
    (rect,) = bars(root)
    assert float(rect.get("width", "0")) > 300  # the one bar spans (most of) the plot
    assert "$0.000097" in texts(root)


def test_many_bars_fold_into_other() -> None:
    items = {f"model-{i:02d}": float(i + 1) for i in range(40)}
    root = parse(bar_chart(items, chart_id="many", title="By model", limit=12))
    rects = bars(root)
    assert len(rects) == 12
    shown = texts(root)
    assert "model-39" in shown and "other (29)" in shown
    widths = [float(r.get("width", "0")) for r in rects[:-1]]
    assert widths == sorted(widths, reverse=True)  # dearest first
    total = sum(float(r.get("data-value", "0")) for r in rects)
    assert total == pytest.approx(sum(items.values()))


def test_accessible_title_and_desc() -> None:
    root = parse(bar_chart({"a": 1.0, "b": 2.0}, chart_id="acc 1", title="Cost by node"))
    cid = root.get("id")
    assert cid == "acc-1"
    assert root.get("aria-labelledby") == f"{cid}-title {cid}-desc"
    assert root.find("s:title", NS) is not None and root.find("s:desc", NS) is not None
    assert "Cost by node" in (root.find("s:title", NS).text or "")  # type: ignore[union-attr]
    assert "b: $2.00" in (root.find("s:desc", NS).text or "")  # type: ignore[union-attr]


def test_tiny_and_large_values() -> None:
    assert usd_label(0.000097) == "$0.000097"
    assert usd_label(0.0000004) == "$0.0000004"
    assert usd_label(0.5) == "$0.5"
    assert usd_label(1234.5) == "$1,234.50"
    assert usd_label(0) == "$0"
    assert usd_tick(0.00004, 0.00002) == "$0.00004"
    assert usd_tick(300.0, 100.0) == "$300"
    assert usd_tick(0.5, 0.25) == "$0.50"
    assert nice_ticks(0.000097) == pytest.approx([0, 0.00002, 0.00004, 0.00006, 0.00008, 0.0001])
    assert nice_ticks(1234.0)[-1] >= 1234.0
    assert nice_ticks(0) == [0.0, 1.0]
    root = parse(bar_chart({"tiny": 0.0000012, "huge": 12_345.6}, chart_id="r", title="t"))
    tiny = next(r for r in bars(root) if r.get("data-value") == repr(0.0000012))
    assert float(tiny.get("width", "0")) >= 1  # visible, however small next to the big one
    shown = texts(root)
    assert "$12,345.60" in shown and "$0.0000012" in shown
    for svg in (bar_chart({"x": float("nan"), "y": float("inf"), "z": -1.0}, chart_id="n",
                          title="t"),):
        assert "Nothing spent" in texts(parse(svg))


def test_days_stacked_by_series_with_a_legend() -> None:
    days = [DayBar(f"2026-11-{d:02d}", {"sim:fast": 0.00001 * d, "sim:smart": 0.00003})
            for d in range(1, 31)] + [DayBar("2026-12-01", {})]
    root = parse(day_chart(days, chart_id="days", title="By day"))
    columns = root.findall(".//s:g[@class='ff-bar']", NS)
    assert len(columns) == 31
    assert not columns[-1].findall("s:rect", NS)  # an empty day is an empty column
    assert len(columns[0].findall("s:rect", NS)) == 2  # two series stacked
    legend = texts(root.find(".//s:g[@class='ff-legend']", NS))  # type: ignore[arg-type]
    assert "sim:smart" in legend and "sim:fast" in legend
    labels = [t.text for t in root.findall(".//s:g[@class='ff-axis']/s:text", NS)]
    assert "2026-12-01" in labels and len([x for x in labels if x and "2026" in x]) <= 10


def test_one_series_is_not_stacked() -> None:
    root = parse(day_chart([DayBar("2026-11-30", {"total": 2.5})], chart_id="d", title="t"))
    assert root.find(".//s:g[@class='ff-legend']", NS) is None
    assert len(bars(root)) == 1 and "$2.50" in texts(root)
