"""The offline demo runs, routes, falls back, and beats the single strongest model."""

from __future__ import annotations

import json
import os
from pathlib import Path

from typer.testing import CliRunner

from frugalflow.cli import app

ROOT = Path(__file__).resolve().parents[1]


def test_demo_shows_routing_fallback_and_savings(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["demo", "--json"])
    assert result.exit_code == 0, result.output
    figures = json.loads(result.output)
    assert figures["attempts"] > figures["calls"] == 12  # 3 tickets x 4 nodes, with fallbacks
    assert {f["provider"] for f in figures["fallbacks"]} >= {"sim-groq"}
    assert 0 < figures["cost_usd"] < figures["strongest_cost_usd"]


def test_demo_table(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(ROOT)
    result = CliRunner().invoke(app, ["demo", "--tickets", "2"])
    assert result.exit_code == 0, result.output
    for text in ("classify", "extract", "draft", "review", "sim-groq", "strongest model"):
        assert text in result.output


def test_unknown_flow_is_one_clear_line(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # Outside the repository the demo runs the installed ready-made flow; a flow that exists
    # nowhere is one line naming the flows there are.
    monkeypatch.chdir(tmp_path)
    assert CliRunner().invoke(app, ["demo"]).exit_code == 0
    result = CliRunner().invoke(app, ["run", "support_triag"])
    assert result.exit_code != 0
    assert "error: no flow 'support_triag'" in result.output and "support_triage" in result.output
    assert "Traceback" not in result.output
    assert os.getcwd() == str(tmp_path)
