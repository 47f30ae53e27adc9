"""`frugalflow eval` on the simulated catalog: estimate, confirm, run, resume, report, store."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from frugalflow.cli import app
from frugalflow.evaluation.results import EvalStatus, EvalStore
from frugalflow.persistence import Store
from frugalflow.persistence.policy_store import PolicyStore

ROOT = Path(__file__).resolve().parents[1]
TICKETS = [
    ("t1", "I was charged twice for order 88231. Please refund the duplicate.", "billing"),
    ("t2", "My parcel for order 77120 has been stuck in transit for nine days.", "shipping"),
    ("t3", "I cannot log in: the password reset email never arrives.", "account"),
    ("t4", "The app crashes when I open the settings page.", "technical"),
]
MODELS = "sim-openai/gpt-4.1-nano,sim-google/*"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(ROOT)  # flows/ is found from the repository root
    with (tmp_path / "cases.jsonl").open("w") as f:
        for cid, ticket, category in TICKETS:
            f.write(json.dumps({"id": cid, "ticket": ticket,
                                "expected": {"category": category}}) + "\n")
    return tmp_path


def invoke(*args: str, input: str | None = None) -> Any:
    result = CliRunner().invoke(app, ["eval", *args], input=input)
    assert "Traceback" not in result.output, result.output
    return result


def base(workdir: Path) -> list[str]:
    return ["support_triage", "--node", "classify", "--data", str(workdir / "cases.jsonl"),
            "--db", f"sqlite:///{workdir / 'eval.db'}", "--models", MODELS]


def stored(workdir: Path, eval_id: str) -> tuple[Any, list[Any]]:
    async def read() -> tuple[Any, list[Any]]:
        store = Store(f"sqlite:///{workdir / 'eval.db'}")
        try:
            evals = EvalStore(store)
            return await evals.get(eval_id), await evals.cells(eval_id)
        finally:
            await store.close()

    return asyncio.run(read())


def test_eval_runs_reports_and_a_rerun_pays_nothing_again(workdir: Path, sim: Any) -> None:
    result = invoke(*base(workdir), "--yes", "--json", "--target", "0.2")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "completed" and out["cells"] == 4 * 4  # nano + 3 sim-google
    assert out["cost_usd"] > 0 and out["estimate_usd"] > 0
    (node,) = out["report"]["nodes"]
    assert node["node"] == "classify" and len(node["models"]) == 4
    calls = sum(sim.calls[k] for k in sim.calls if "/" in k)
    assert calls == 16
    record, cells = stored(workdir, out["eval_id"])
    assert record.status == EvalStatus.COMPLETED and len(cells) == 16
    again = invoke(*base(workdir), "--yes", "--json")
    assert again.exit_code == 0, again.output
    second = json.loads(again.stdout)
    assert second["eval_id"] == out["eval_id"] and second["new_cost_usd"] == 0
    assert sum(sim.calls[k] for k in sim.calls if "/" in k) == calls  # nothing paid again
    fresh = invoke(*base(workdir), "--yes", "--json", "--fresh")
    assert fresh.exit_code == 0, fresh.output
    third = json.loads(fresh.stdout)
    assert third["eval_id"] != out["eval_id"] and third["new_cost_usd"] > 0


def test_eval_table_progress_and_policy(workdir: Path) -> None:
    result = invoke(*base(workdir), "--yes", "--target", "0.2", "--save-policy", "triage")
    assert result.exit_code == 0, result.output
    for text in ("estimated $", "all models", "sim-openai/gpt-4.1-nano", "classify",
                 "completed", "policy triage version 1 stored"):
        assert text in result.output, result.output

    async def policy() -> Any:
        store = Store(f"sqlite:///{workdir / 'eval.db'}")
        try:
            return await PolicyStore(store).load("triage")
        finally:
            await store.close()

    saved = asyncio.run(policy())
    assert saved is not None and saved.flow == "support_triage" and saved.version == 1
    assert "classify" in saved.policy.nodes
    assert saved.source is not None and saved.source.startswith("eval:ev-")


@pytest.mark.slow
def test_eval_saves_its_chart(workdir: Path) -> None:
    chart = workdir / "frontier.png"
    result = invoke(*base(workdir), "--yes", "--chart", str(chart))
    assert result.exit_code == 0, result.output
    assert f"chart: {chart}" in result.output
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_declining_the_estimate_pays_and_records_nothing(workdir: Path, sim: Any) -> None:
    result = invoke(*base(workdir), input="n\n")
    assert result.exit_code == 1
    assert "estimated $" in result.output and "not started: nothing was paid" in result.output
    assert not sim.calls

    async def evaluations() -> list[Any]:
        store = Store(f"sqlite:///{workdir / 'eval.db'}")
        try:
            return await EvalStore(store).list()
        finally:
            await store.close()

    assert asyncio.run(evaluations()) == []


def test_budget_reached_stops_with_the_command_that_continues(workdir: Path) -> None:
    # classify expects 5 output tokens; the simulated models answer ~70: the estimate fits
    # a budget the actual spend soon reaches.
    result = invoke(*base(workdir), "--yes", "--budget", "0.001", "--concurrency", "1")
    assert result.exit_code == 1, result.output
    assert "stopped (budget reached)" in result.output
    assert "--resume ev-" in result.output and "--budget <more USD>" in result.output
    eval_id = result.output.split("--resume ")[1].split()[0]
    record, cells = stored(workdir, eval_id)
    assert record.status == EvalStatus.STOPPED and 0 < len(cells) < 16
    resumed = invoke("support_triage", "--resume", eval_id, "--budget", "1", "--yes",
                     "--db", f"sqlite:///{workdir / 'eval.db'}", "--json")
    assert resumed.exit_code == 0, resumed.output
    out = json.loads(resumed.stdout)
    assert out["eval_id"] == eval_id and out["status"] == "completed" and out["cells"] == 16


@pytest.mark.parametrize(("extra", "message"), [
    (["--node", "clasify"], "no node 'clasify'; did you mean 'classify'"),
    (["--models", "sim-openai/gpt-4.1-nanoo"], "did you mean sim-openai/gpt-4.1-nano"),
    (["--from-ledger"], "give --data FILE or --from-ledger, not both"),
    (["--since", "2026-11-01"], "use them with --from-ledger"),
    (["--budget", "0.0000001"], "is over the budget left"),
    (["--budget", "nan"], "--budget"),
    (["--target", "1.5"], "--target is a pass rate between 0 and 1"),
    (["--scorer", "nonsense"], "unknown scorer 'nonsense'"),
    (["--repeats", "0"], "repeats must be at least 1"),
    (["--chart", "out.svg"], "PNG"),
])
def test_bad_input_is_one_line_and_exit_code_2(workdir: Path, sim: Any, extra: list[str],
                                               message: str) -> None:
    result = invoke(*base(workdir), "--yes", *extra)
    assert result.exit_code == 2, result.output
    assert result.output.startswith("error: ") or "\nerror: " in result.output
    assert message in " ".join(result.output.split()), result.output
    assert not sim.calls


def test_bad_data_and_flows_are_refused_before_anything_is_paid(workdir: Path,
                                                                 sim: Any) -> None:
    (workdir / "bad.jsonl").write_text(json.dumps({"id": "x", "tikcet": "typo"}) + "\n")
    db = f"sqlite:///{workdir / 'eval.db'}"
    cases = [
        (["support_triage", "--node", "classify", "--data", str(workdir / "bad.jsonl")],
         "do not fit flow 'support_triage'"),
        (["support_triage", "--node", "classify", "--data", str(workdir / "none.jsonl")],
         "does not exist"),
        (["support_triage", "--node", "classify"], "no cases: give --data FILE"),
        (["support_triage", "--from-ledger"], "name it with --node"),
        (["nosuchflow", "--data", str(workdir / "cases.jsonl")], "no flow 'nosuchflow'"),
        (["support_triage", "--resume", "ev-nope"], "no evaluation 'ev-nope'"),
        (["support_triage", "--node", "classify", "--from-ledger", "--since", "yesterday"],
         "--since 'yesterday' is not a date"),
    ]
    for args, message in cases:
        result = invoke(*args, "--db", db, "--yes")
        assert result.exit_code == 2, (args, result.output)
        assert message in " ".join(result.output.split()), result.output
    assert not sim.calls


def test_from_ledger_replays_recorded_calls(workdir: Path, sim: Any) -> None:
    db = f"sqlite:///{workdir / 'eval.db'}"
    for _, ticket, _ in TICKETS[:3]:
        ran = CliRunner().invoke(app, ["run", "support_triage", "--input",
                                       json.dumps({"ticket": ticket}), "--db", db, "--json"])
        assert ran.exit_code == 0, ran.output
    empty = invoke("support_triage", "--node", "classify", "--from-ledger", "--db", db,
                   "--until", "2000-01-01", "--yes")
    assert empty.exit_code == 2 and "error:" in empty.output
    sim.calls.clear()
    result = invoke("support_triage", "--node", "classify", "--from-ledger", "--sample", "2",
                    "--models", "sim-openai/gpt-4.1-nano,sim-openai/gpt-4o-mini", "--db", db,
                    "--yes", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["status"] == "completed" and out["cells"] == 4
    assert sum(sim.calls[k] for k in sim.calls if "/" in k) == 4
    record, _ = stored(workdir, out["eval_id"])
    assert record.spec["data"]["ledger"]["sample"] == 2
    assert record.spec["data"]["scorer"] == "normalized"


def test_the_whole_flow_end_to_end(workdir: Path, sim: Any) -> None:
    result = invoke("support_triage", "--data", str(workdir / "cases.jsonl"), "--db",
                    f"sqlite:///{workdir / 'eval.db'}", "--models", "sim-openai/gpt-4.1-nano",
                    "--scorer", "fields:category", "--yes", "--json")
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["node"] is None and out["cells"] == 4 and out["status"] == "completed"
    (node,) = out["report"]["nodes"]
    assert node["node"] is None
    # every node of the flow ran on the candidate: 4 tickets x 4 nodes (a rejected
    # extraction fails its case and ends that run early)
    assert 4 <= sim.calls["sim-openai/gpt-4.1-nano"] <= 16
    assert sum(sim.calls[k] for k in sim.calls if "/" in k) == sim.calls[
        "sim-openai/gpt-4.1-nano"]


def test_no_answer_to_the_question_is_not_a_yes(workdir: Path, sim: Any) -> None:
    result = invoke(*base(workdir), input="")
    assert result.exit_code == 1 and "not started: nothing was paid" in result.output
    assert not sim.calls
