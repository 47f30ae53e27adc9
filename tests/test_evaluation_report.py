"""The evaluation report: statistics per node and model, the choice for a target, its JSON,
summary lines, node policy and chart, and savings re-priced on a real (sqlite) ledger."""

from __future__ import annotations

import asyncio
import json
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from frugalflow import Catalog
from frugalflow.evaluation import (
    WHOLE_FLOW,
    Measured,
    build_report,
    cheapest_policy,
    plot_report,
    recent_volume,
    reprice,
    save_chart,
    wilson,
)
from frugalflow.evaluation.cases import Cell, CellOutcome
from frugalflow.evaluation.savings import Method
from frugalflow.exceptions import UserError
from frugalflow.persistence.ledger import Ledger
from frugalflow.persistence.store import Store
from frugalflow.persistence.tables import AttemptRow
from frugalflow.policies import Choice
from frugalflow.policies import Policy as NodePolicies

PNG = b"\x89PNG\r\n\x1a\n"


def cells(model: str, passes: int, fails: int, cost: float, *, node: str | None = "draft",
          errors: int = 0) -> list[Cell]:
    out = [Cell(f"p{i}", model, 0, CellOutcome.PASS, node=node, cost_usd=cost)
           for i in range(passes)]
    out += [Cell(f"f{i}", model, 0, CellOutcome.FAIL, node=node, cost_usd=cost)
            for i in range(fails)]
    out += [Cell(f"e{i}", model, 0, CellOutcome.ERROR, node=node, reason="outage")
            for i in range(errors)]
    return out


def test_statistics_per_model_count_errors_apart_and_match_the_textbook() -> None:
    def cell(i: int, outcome: CellOutcome, cost: float) -> Cell:
        return Cell(f"c{i}", "a/m", 0, outcome, node="draft", cost_usd=cost,
                    latency_ms=100.0 * (i + 1), output_tokens=10 * (i + 1),
                    reasoning_tokens=[0, 0, 5, 5, 10, 0][i])
    answered = [cell(i, CellOutcome.PASS, 0.001) for i in range(4)] + \
        [cell(4, CellOutcome.FAIL, 0.002)]
    error = Cell("c5", "a/m", 0, CellOutcome.ERROR, node="draft", cost_usd=0.0005,
                 latency_ms=99_999.0, output_tokens=9_999)
    (row,) = build_report(answered + [error]).rows
    assert (row.cells, row.n, row.passes, row.errors) == (6, 5, 4, 1)
    assert row.rate == 0.8 and row.error_rate == pytest.approx(1 / 6)
    assert row.interval == wilson(4, 5)
    assert row.cost_per_call == pytest.approx(0.0012)  # answered cells only
    assert row.cost_per_success == pytest.approx((0.004 + 0.002 + 0.0005) / 4)  # all paid
    latencies = [100.0, 200.0, 300.0, 400.0, 500.0]  # the error's latency is not a sample
    assert row.latency_ms_p50 == pytest.approx(np.percentile(latencies, 50)) == 300.0
    assert row.latency_ms_p95 == pytest.approx(np.percentile(latencies, 95)) == 480.0
    assert row.output_tokens_mean == 30.0 and row.reasoning_tokens_mean == 4.0
    assert row.output_tokens_p50 == 30.0 and row.output_tokens_p90 == pytest.approx(46.0)


def test_no_success_has_no_cost_per_success_and_the_interval_of_zero() -> None:
    report = build_report(cells("a/m", 0, 10, 0.002, errors=2))
    (row,) = report.rows
    assert row.cost_per_success is None and row.rate == 0.0 and row.error_rate == 2 / 12
    assert row.interval == wilson(0, 10) and row.interval.low == 0.0
    assert report.to_json()["nodes"][0]["models"][0]["cost_per_success_usd"] is None
    only_errors = build_report(cells("a/m", 0, 0, 0.0, errors=3)).rows[0]
    assert (only_errors.n, only_errors.interval.high, only_errors.latency_ms_p50) == (0, 1.0, None)


def test_the_cheapest_model_whose_lower_bound_meets_the_target_is_chosen_alone() -> None:
    report = build_report(cells("a/flash", 96, 4, 0.0041) + cells("b/chat", 96, 4, 0.0015)
                          + cells("c/nano", 60, 40, 0.002), current={"draft": "a/flash"})
    node = report.per_node["draft"]
    assert node.choice is not None and node.choice.shares == (("b/chat", 1.0),)
    assert [r.model for r in node.rows] == ["b/chat", "c/nano", "a/flash"]  # cheapest first
    assert node.frontier == ("b/chat",)  # the others are no better and dearer
    ci = wilson(96, 100)
    assert report.summary_lines() == [
        f"draft: a/flash -> b/chat, pass 0.96 [{ci.low:.2f}, {ci.high:.2f}], -63% cost, "
        "$41 -> $15 per 10k calls"]
    assert repr(report).splitlines()[1:] == report.summary_lines()  # a notebook's text form


def test_a_target_between_two_hull_models_is_met_by_a_stated_mix() -> None:
    cs = cells("cheap", 70, 30, 0.001) + cells("mid", 85, 15, 0.004) + cells("big", 97, 3, 0.02)
    node = build_report(cs, target=0.8).per_node["draft"]
    expected = cheapest_policy([Measured("cheap", 100, 70, 0.001), Measured("mid", 100, 85, 0.004),
                                Measured("big", 100, 97, 0.02)], 0.8)
    assert node.choice is not None and expected is not None
    assert [m for m, _ in node.choice.shares] == ["mid", "big"]
    assert [s for _, s in node.choice.shares] == pytest.approx([s for _, s in expected.shares])
    assert node.hull == ("cheap", "mid", "big")
    line = node.summary_line()
    assert line.startswith("draft: ") and "% mid + " in line and "% big, pass " in line
    assert "->" not in line.split(",")[0]  # no current model to move from
    assert "(>= 0.80)" in line and line.endswith("per 10k calls")


def test_no_model_good_enough_says_so_with_the_best_lower_bound() -> None:
    report = build_report(cells("a/m", 90, 10, 0.001) + cells("b/m", 50, 50, 0.0001))
    node = report.per_node["draft"]
    assert node.choice is None
    low = wilson(90, 100).low
    assert report.summary_lines() == [
        f"draft: no model meets 0.90 at this n (best lower bound {low:.2f}: add cases)"]
    assert report.to_json()["nodes"][0]["choice"] is None
    assert report.policy("f").nodes["draft"].choice is None


ROW_KEYS = ["cells", "cost_per_call_usd", "cost_per_success_usd", "error_rate", "errors",
            "interval", "latency_ms_p50", "latency_ms_p95", "model", "n", "on_frontier",
            "on_hull", "output_tokens_mean", "output_tokens_p50", "output_tokens_p90",
            "pass_rate", "passes", "reasoning_tokens_mean", "reasoning_tokens_p50",
            "reasoning_tokens_p90", "share", "total_cost_usd"]


def test_json_keys_are_stable_and_serialisable() -> None:
    report = build_report(cells("a/m", 96, 4, 0.001) + cells("b/m", 5, 5, 0.01, node=None))
    data = report.to_json()
    assert sorted(data) == ["confidence", "nodes", "savings", "target", "version"]
    assert data["version"] == 1 and data["savings"] is None
    assert [n["node"] for n in data["nodes"]] == ["draft", None]
    assert sorted(data["nodes"][0]) == ["choice", "current", "frontier", "hull", "models",
                                        "node", "savings", "summary", "verdict"]
    assert sorted(data["nodes"][0]["choice"]) == ["assured_pass", "expected_cost_usd",
                                                  "expected_pass", "models", "shares"]
    assert sorted(data["nodes"][0]["models"][0]) == ROW_KEYS
    assert data["nodes"][0]["models"][0]["share"] == 1.0
    assert json.loads(json.dumps(data)) == report.to_json()  # plain JSON, same every time


def test_the_report_becomes_a_node_policy_with_evidence_and_choice() -> None:
    cs = cells("a/m", 96, 4, 0.001, errors=1) + cells("b/m", 99, 1, 0.01, node=None)
    policy = build_report(cs).policy("support", source="eval:7")
    assert isinstance(policy, NodePolicies) and policy.flow == "support"
    assert policy.source == "eval:7" and sorted(policy.nodes) == [WHOLE_FLOW, "draft"]
    evidence = policy.nodes["draft"].models["a/m"]
    assert (evidence.n, evidence.passes, evidence.errors) == (100, 96, 1)
    assert evidence.cost_usd == pytest.approx(0.001) and evidence.source == "eval:7"
    choice = policy.nodes["draft"].choice
    assert choice is not None and choice.models == ("a/m",) and choice.shares == ()
    assert choice.target == 0.9 and choice.expected_pass == pytest.approx(0.96)
    assert NodePolicies.model_validate(policy.model_dump()) == policy


def test_bad_input_is_refused_in_one_line() -> None:
    with pytest.raises(UserError, match="target pass rate"):
        build_report(cells("a/m", 1, 0, 0.001), target=1.5)
    with pytest.raises(UserError, match="confidence must be between 0 and 1"):
        build_report(cells("a/m", 1, 0, 0.001), confidence=95)
    empty = build_report([])
    assert empty.summary_lines() == [] and empty.to_json()["nodes"] == []
    with pytest.raises(UserError, match="nothing to chart"):
        plot_report(empty)


def test_the_rich_table_lists_every_model_and_marks_the_choice() -> None:
    from rich.console import Console

    report = build_report(cells("a/m", 96, 4, 0.001) + cells("b/m", 99, 1, 0.01),
                          current={"draft": "b/m"})
    console = Console(width=200, record=True)
    console.print(report)
    text = console.export_text()
    assert "a/m" in text and "b/m" in text and "chosen 100%" in text and "current" in text
    assert "b/m -> a/m, pass 0.96" in text  # the node's summary closes its section


async def test_the_chart_is_a_png_with_one_panel_per_node(tmp_path: Path) -> None:
    cs = (cells("a/m", 96, 4, 0.001) + cells("b/m", 50, 50, 0.0)  # a free model: log-safe
          + cells("a/m", 9, 1, 0.002, node="critique") + cells("a/m", 5, 5, 0.01, node=None))
    report = build_report(cs)
    assert len(plot_report(report).axes) == 3
    # drawn off the event loop, in a worker thread: no pyplot global state
    path = await asyncio.to_thread(save_chart, report, tmp_path / "chart.png")
    assert path.read_bytes().startswith(PNG) and path.stat().st_size > 10_000
    assert report._repr_png_().startswith(PNG)


def test_without_matplotlib_the_chart_asks_for_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(UserError, match=r"frugalflow\[evals\]"):
        plot_report(build_report(cells("a/m", 1, 0, 0.001)))


NOW = datetime(2026, 6, 1, tzinfo=timezone.utc)


def _attempt(run: str, node: str, model: str, cost: float, *, flow: str = "f",
             outcome: str = "ok", age_days: float = 1.0) -> dict[str, object]:
    row = AttemptRow(run_id=run, call_id=f"{run}-{node}-{model}-{age_days}", flow=flow,
                     node=node, model=model, provider=model.split("/")[0], try_number=1,
                     outcome=outcome, input_tokens=1000, output_tokens=200, cost_usd=cost,
                     started_at=NOW - timedelta(days=age_days))
    return row.model_dump(exclude={"id"})


@pytest.fixture
async def ledger(db_url: str) -> object:
    """A real ledger (SQLite file, and a PostgreSQL database) with a month of calls."""
    store = Store(db_url)
    await store.setup()
    rows = [_attempt(f"r{i}", "draft", "a/flash", 0.004) for i in range(10)]
    rows += [_attempt(f"r{i}", "critique", "c/big", 0.01) for i in range(5)]
    rows += [_attempt("r0", "draft", "a/flash", 0.004, outcome="error"),  # not an answer
             _attempt("old", "draft", "a/flash", 0.004, age_days=45),  # outside the window
             _attempt("x", "draft", "a/flash", 0.004, flow="other")]  # another flow
    async with store.write() as conn:
        await conn.execute(AttemptRow.__table__.insert(), rows)  # type: ignore[attr-defined]
    yield Ledger(store)
    await store.close()


async def test_recent_volume_counts_the_flows_answered_calls_in_the_window(
        ledger: Ledger) -> None:
    volume = await recent_volume(ledger, flow="f", days=30, now=NOW)
    assert volume.runs == 10 and sorted(volume.nodes) == ["critique", "draft"]
    draft = volume.nodes["draft"]
    assert (draft.calls, draft.runs, draft.input_tokens, draft.output_tokens) == \
        (10, 10, 10_000, 2_000)
    assert draft.cost_usd == pytest.approx(0.04)
    assert volume.current() == {"critique": "c/big", "draft": "a/flash"}
    with pytest.raises(UserError, match="days must be positive"):
        await recent_volume(ledger, flow="f", days=0)


async def test_reprice_by_measured_ratio_or_catalog_prices(ledger: Ledger) -> None:
    volume = await recent_volume(ledger, flow="f", days=30, now=NOW)
    choice = cheapest_policy([Measured("sim-deepseek/deepseek-chat", 100, 99, 0.001)], 0.9)
    assert choice is not None
    measured = reprice(volume, {"draft": choice},
                       measured={"draft": {"a/flash": 0.004, "sim-deepseek/deepseek-chat": 0.001}})
    draft = measured.nodes["draft"]
    assert draft.method == Method.MEASURED and draft.after_usd == pytest.approx(0.01)
    assert draft.change_pct == pytest.approx(-75) and draft.per_10k() == pytest.approx((40, 10))
    critique = measured.nodes["critique"]  # no choice: as recorded
    assert critique.method == Method.UNCHANGED and critique.after_usd == critique.before_usd
    catalog = Catalog.simulated()
    priced = reprice(volume, {None: choice}, catalog)  # None: every node
    spec = catalog["sim-deepseek/deepseek-chat"]
    assert priced.nodes["draft"].method == Method.CATALOG
    assert priced.nodes["draft"].after_usd == pytest.approx(spec.estimate_cost(10_000, 2_000))
    assert priced.nodes["critique"].after_usd == pytest.approx(spec.estimate_cost(5_000, 1_000))
    assert priced.total_line().endswith("re-priced at catalog prices (same answer lengths assumed)")
    stored = Choice(models=("sim-deepseek/deepseek-chat", "sim-openai/gpt-4.1"), shares=(0.5, 0.5))
    mixed = reprice(volume, {"draft": stored}, catalog).nodes["draft"]  # a stored policy's
    big = catalog["sim-openai/gpt-4.1"]
    assert mixed.after_usd == pytest.approx(
        0.5 * spec.estimate_cost(10_000, 2_000) + 0.5 * big.estimate_cost(10_000, 2_000))
    assert mixed.proposed == "50.0% sim-deepseek/deepseek-chat + 50.0% sim-openai/gpt-4.1"
    with pytest.raises(UserError, match="pass a catalog"):
        reprice(volume, {"draft": choice})


async def test_the_report_states_the_saving_on_recorded_volume(ledger: Ledger) -> None:
    volume = await recent_volume(ledger, flow="f", days=30, now=NOW)
    report = build_report(cells("a/flash", 96, 4, 0.004) + cells("b/chat", 97, 3, 0.001),
                          volume=volume)
    ci = wilson(97, 100)
    first, total = report.summary_lines()[0], report.summary_lines()[-1]
    assert first == (f"draft: a/flash -> b/chat, pass 0.97 [{ci.low:.2f}, {ci.high:.2f}], "
                     "-75% cost, $40 -> $10 per 10k runs")
    assert report.savings is not None and report.savings.after_usd == pytest.approx(0.06)
    assert total.startswith("f (last 30 days, 15 calls): $0.09 -> $0.06")
    assert total.endswith("re-priced by measured cost per call")
    data = report.to_json()
    assert data["savings"]["nodes"][0]["method"] in ("measured", "unchanged")
    assert data["nodes"][0]["savings"]["method"] == "measured"


def test_a_small_share_of_a_mix_is_never_shown_as_zero() -> None:
    node = build_report(cells("a/flash", 96, 4, 0.0041) + cells("b/chat", 96, 4, 0.0015)
                        + cells("c/nano", 60, 40, 0.0002)).per_node["draft"]
    assert node.choice is not None and node.choice.shares[0][0] == "c/nano"
    assert node.choice.shares[0][1] < 0.005  # barely worth mixing, yet cheaper: stated
    assert "0.4% c/nano + 99.6% b/chat" in node.summary_line()
    assert "0.4% c/nano + 99.6% b/chat" in node.verdict()
