"""The CLI's live view of a run: per node its model, tries, cost and time, from the events."""

from __future__ import annotations

import io
from itertools import count

from rich.console import Console

from frugalflow.progress import RunProgress


def events() -> list[dict[str, object]]:
    ok = {"event": "attempt", "node": "classify", "model": "sim-groq/llama-3.1-8b-instant",
          "outcome": "ok", "cost_usd": 0.00002, "input_tokens": 90, "output_tokens": 12,
          "latency_ms": 210.0, "error_class": None, "action": None}
    return [
        {"event": "node_started", "node": "classify", "task_id": "t1"},
        {**ok, "model": "sim-openai/gpt-4.1-nano", "outcome": "error", "cost_usd": 0.0,
         "error_class": "rate_limit", "action": "next"},
        ok,
        {"event": "node_finished", "node": "classify", "task_id": "t1", "status": "done"},
        {"event": "node_started", "node": "draft[1]", "task_id": "t2"},
        {"event": "node_finished", "node": "draft[1]", "task_id": "t2", "status": "error"},
        {"event": "run_finished", "status": "failed"},
    ]


def test_off_a_terminal_each_event_is_one_line_as_it_comes() -> None:
    out = io.StringIO()
    progress = RunProgress(Console(file=out, width=120), clock=lambda: 0.0)
    with progress:
        for e in events()[:3]:
            progress.event(e)
        assert "sim-groq/llama-3.1-8b-instant  90/12 tok  $0.000020  210 ms" in out.getvalue()
        for e in events()[3:]:
            progress.event(e)
    text = out.getvalue()
    assert "> classify" in text and "sim-openai/gpt-4.1-nano rate_limit -> next" in text
    # Brackets in names are text, not markup (rich would eat "[1]").
    assert "draft[1] error" in text


def test_on_a_terminal_the_table_shows_model_tries_cost_and_time_per_node() -> None:
    ticks = count()
    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    progress = RunProgress(console, clock=lambda: float(next(ticks)))
    with progress:
        for e in events():
            progress.event(e)
    console_text = Console(file=io.StringIO(), width=120, record=True)
    console_text.print(progress.render())
    table = console_text.export_text()
    row = next(line for line in table.splitlines() if line.startswith("classify"))
    assert "done" in row and "sim-groq/llama-3.1-8b-instant" in row and " 2 " in row
    assert "0.000020" in row
    assert "draft[1]" in table and "error" in table
    assert "$0.000020 so far, failed" in table
    assert progress.cost_usd == 0.00002


def _terminal(monkeypatch) -> io.StringIO:  # type: ignore[no-untyped-def]
    import frugalflow.cli as cli

    out = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=out, width=120, force_terminal=True,
                                                color_system=None))
    return out


def test_the_demo_shows_its_progress_while_the_tickets_run(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from frugalflow.cli import app

    out = _terminal(monkeypatch)
    assert CliRunner().invoke(app, ["demo", "--tickets", "3"]).exit_code == 0
    assert "ticket 1/3" in out.getvalue() and "ticket 3/3" in out.getvalue()


def test_router_training_says_what_it_does_meanwhile(monkeypatch, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    import frugalflow.learning as learning
    from frugalflow.cli import app
    from frugalflow.learning import Example

    models = ["sim-groq/llama-3.1-8b-instant", "sim-openai/gpt-4.1-nano"]
    monkeypatch.setattr(learning, "examples_from", lambda calls: [
        Example(text=f"input {i}", node="n", model=models[i % 2], success=i % 3 != 0)
        for i in range(30)])
    out = _terminal(monkeypatch)
    result = CliRunner().invoke(app, ["router", "train", "--db", f"sqlite:///{tmp_path}/r.db"])
    assert result.exit_code == 0, result.output
    assert "training router 'default' on 30 outcomes" in out.getvalue()
