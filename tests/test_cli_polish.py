"""The CLI tells the truth: read-only commands create no database, errors are one line
(bad option values, malformed catalogs, markup-safe), --version, help on every option,
--json everywhere, scores in `catalog`, `router train` refusing one-class outcomes, timeouts."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

import frugalflow
from frugalflow import Catalog, StoreUnavailableError
from frugalflow.cli import app
from frugalflow.persistence import Store

ROOT = Path(__file__).resolve().parents[1]
cli = CliRunner()


def _one_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, text
    assert "Traceback" not in text and "╭" not in text, text
    return lines[0]


# -- read-only commands never create a database ---------------------------------------------

@pytest.mark.parametrize("args", [
    ["runs"], ["runs", "show", "abc"], ["router", "list"], ["policy", "list"],
    ["runs", "feedback", "abc", "--good", "--node", "n"],
    ["explain", "support_triage"],
    ["explain", "support_triage", "--policy", "p"],
    ["resume", "abc"],
])
def test_read_only_commands_do_not_create_a_database(
        args: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    db = f"sqlite:///{tmp_path / 'typo.db'}"
    out = cli.invoke(app, [*args, "--db", db])
    line = _one_line(out.output)
    assert out.exit_code == 2, out.output
    assert f"database {db} does not exist (no file " in line and "--db" in line
    assert list(tmp_path.iterdir()) == []


def test_an_existing_database_opens_read_only(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ok.db'}"

    async def create() -> None:
        store = Store(db)
        await store.setup()
        await store.close()

    asyncio.run(create())
    out = cli.invoke(app, ["runs", "--db", db, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == []


def test_a_file_without_frugalflow_tables_is_not_changed(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    path.write_bytes(b"")
    out = cli.invoke(app, ["runs", "--db", f"sqlite:///{path}"])
    assert out.exit_code == 2
    assert "is not a frugalflow database (no frugalflow tables in it)" in _one_line(out.output)
    assert path.read_bytes() == b""


async def test_store_create_false_on_postgres_does_not_create_the_database() -> None:
    url = f"postgresql://postgres@127.0.0.1:5432/ff_missing_{uuid.uuid4().hex[:10]}"
    store = Store(url, create=False)
    try:
        with pytest.raises(StoreUnavailableError) as caught:
            await store.setup()
    finally:
        await store.close()
    assert caught.value.missing and not caught.value.retryable
    assert "does not exist (the server has no such database)" in str(caught.value)


# -- one-line errors ------------------------------------------------------------------------

def test_malformed_yaml_catalog_is_one_line_with_position_and_fix(tmp_path: Path) -> None:
    bad = tmp_path / "cat.yaml"
    bad.write_text("models:\n  - name: a\n   bad: [1\n")
    out = cli.invoke(app, ["catalog", "--catalog", str(bad)])
    line = _one_line(out.output)
    assert out.exit_code == 1
    assert f"catalog file {str(bad)!r} does not parse" in line
    assert "(at line 3, column 4)" in line and "fix the YAML" in line


def test_malformed_toml_catalog_names_the_fix(tmp_path: Path) -> None:
    bad = tmp_path / "cat.toml"
    bad.write_text("[[models]]\nname = \n")
    line = _one_line(cli.invoke(app, ["catalog", "--catalog", str(bad)]).output)
    assert "(at line 2, column 8)" in line and "fix the TOML" in line


def test_brackets_in_messages_survive_rich_markup(tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("models: []\n")
    line = _one_line(cli.invoke(app, ["catalog", "--catalog", str(empty)]).output)
    assert "add [[models]] entries" in line


@pytest.mark.parametrize("args, expected", [
    (["run", "x", "--budget", "abc"], "error: --budget: 'abc' is not a number (e.g. --budget 0.05)"),
    (["run", "x", "--budget=abc"], "error: --budget: 'abc' is not a number (e.g. --budget 0.05)"),
    (["runs", "--limit", "ten"], "error: --limit: 'ten' is not a whole number (e.g. --limit 10)"),
    (["demo", "--tickets", "9"], "error: --tickets: "),
    (["runs", "--bogus"], "error: No such option: --bogus"),
    (["nosuch"], "error: No such command 'nosuch'."),
    (["runs", "feedback"], "error: Missing argument"),
])
def test_every_bad_option_value_is_one_line(args: list[str], expected: str) -> None:
    out = cli.invoke(app, args)
    assert out.exit_code == 2, out.output
    assert _one_line(out.output).startswith(expected), out.output


def test_a_bad_timeout_from_the_environment_names_the_variable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRUGALFLOW_TIMEOUT", "soon")
    out = cli.invoke(app, ["demo"])
    assert out.exit_code == 2
    assert _one_line(out.output).startswith("error: FRUGALFLOW_TIMEOUT: 'soon' is not a number")


# -- version, help, --json ------------------------------------------------------------------

def test_version() -> None:
    out = cli.invoke(app, ["--version"])
    assert out.exit_code == 0 and out.output.strip() == f"frugalflow {frugalflow.__version__}"


def _commands(command: Any, path: str = "") -> list[tuple[str, Any]]:
    subs = getattr(command, "commands", None)
    if not subs:
        return [(path, command)]
    out = [(path, command)] if path else []
    for name, sub in subs.items():
        out += _commands(sub, f"{path} {name}".strip())
    return out


def test_every_option_has_help_and_flags_show_as_flags() -> None:
    root = typer.main.get_command(app)
    checked = ("runs", "serve", "worker", "router", "policy", "catalog", "explain", "demo")
    missing = [f"{path} {'/'.join(p.opts)}" for path, cmd in _commands(root)
               if path.split(" ")[0] in checked for p in cmd.params
               if getattr(p, "param_type_name", "") == "option" and not p.help]
    assert missing == []
    for args in (["runs", "feedback", "--help"], ["router", "train", "--help"], ["--help"]):
        out = cli.invoke(app, args, terminal_width=140)
        assert out.exit_code == 0 and "<bool>" not in out.output, out.output
    assert "--json" in cli.invoke(app, ["runs", "feedback", "--help"]).output


def test_runs_feedback_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flows.document_extraction import flow as extraction, sample_invoices
    from frugalflow.runner import Runner

    monkeypatch.chdir(ROOT)
    db = f"sqlite:///{tmp_path / 'fb.db'}"

    async def one_run() -> str:
        runner = Runner(db, flows=[extraction], catalog=Catalog.simulated())
        try:
            return (await runner.start(extraction.name,
                                       {"document": sample_invoices(1, seed=3)[0]})).run_id
        finally:
            await runner.close()

    run_id = asyncio.run(one_run())
    out = cli.invoke(app, ["runs", "feedback", run_id, "--bad", "--node", "extract",
                           "--db", db, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {"run_id": run_id, "good": False, "node": "extract",
                                      "call_id": None, "marked": 1}


def test_serve_json_prints_a_json_startup_line(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    import uvicorn

    monkeypatch.chdir(ROOT)
    started: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda application, **kw: started.append(kw))
    out = cli.invoke(app, ["serve", "--json", "--port", "8123", "--timeout", "7",
                           "--db", f"sqlite:///{tmp_path / 's.db'}"])
    assert out.exit_code == 0, out.output
    line = json.loads(out.output.splitlines()[0])
    assert line["event"] == "serving" and line["url"] == "http://127.0.0.1:8123"
    assert line["viewer"] == "http://127.0.0.1:8123/ui"
    assert "support_triage" in line["flows"]
    assert started == [{"host": "127.0.0.1", "port": 8123, "log_level": "info"}]


# -- catalog, router train, timeouts --------------------------------------------------------

def test_catalog_shows_quality_per_skill() -> None:
    out = cli.invoke(app, ["catalog"], terminal_width=250)
    assert out.exit_code == 0, out.output
    header = next(line for line in out.output.splitlines() if "model" in line)
    assert "reason." in header and "classi." in header and "breaker" in header
    assert "classi. classification" in " ".join(out.output.split())  # the legend
    assert "—" in out.output  # a model without a score for some skill
    rows = json.loads(cli.invoke(app, ["catalog", "--json"]).output)
    spec = next(s for s in Catalog.simulated() if s.key == rows[0]["model"])
    assert rows[0]["quality"] == spec.quality
    assert "shared state: local (this process's breakers only" in out.output


def _examples(n: int, success: bool | None) -> list[Any]:
    from frugalflow.learning import Example

    models = [s.key for s in Catalog.simulated()][:2]
    return [Example(node="extract", text=f"input {i}", model=models[i % 2],
                    success=(i % 3 != 0) if success is None else success)
            for i in range(n)]


def test_router_train_refuses_too_few_or_one_class_outcomes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import frugalflow.learning as learning

    db = f"sqlite:///{tmp_path / 'r.db'}"
    monkeypatch.setattr(learning, "examples_from", lambda calls: _examples(5, True))
    few = cli.invoke(app, ["router", "train", "--db", db, "--min-examples", "10"])
    assert few.exit_code == 1
    assert "only 5 outcomes in the ledger; need 10 (--min-examples)" in _one_line(few.output)

    monkeypatch.setattr(learning, "examples_from", lambda calls: _examples(21, True))
    same = cli.invoke(app, ["router", "train", "--db", db])
    assert same.exit_code == 1
    assert ("21 outcomes, all successes: a router cannot learn which inputs fail; "
            "collect failures or bad feedback first") in _one_line(same.output)
    assert json.loads(cli.invoke(app, ["router", "list", "--db", db, "--json"]).output) == []

    forced = cli.invoke(app, ["router", "train", "--db", db, "--force", "--json"])
    assert forced.exit_code == 0, forced.output
    assert json.loads(forced.output)["examples"] == 21

    monkeypatch.setattr(learning, "examples_from", lambda calls: _examples(21, None))
    mixed = cli.invoke(app, ["router", "train", "--db", db, "--json"])
    assert mixed.exit_code == 0, mixed.output
    assert json.loads(mixed.output)["version"] == 2


def test_timeout_from_option_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from frugalflow.cli import _runner
    from frugalflow.cli_options import fallback_policy
    from frugalflow.exceptions import FrugalflowError

    monkeypatch.delenv("FRUGALFLOW_TIMEOUT", raising=False)
    assert fallback_policy(None) is None
    assert fallback_policy(4.5).timeout == 4.5  # type: ignore[union-attr]
    monkeypatch.setenv("FRUGALFLOW_TIMEOUT", "12")
    assert fallback_policy(None).timeout == 12.0  # type: ignore[union-attr]
    assert fallback_policy(3.0).timeout == 3.0  # type: ignore[union-attr]  # the option wins
    runner = _runner("sqlite:///unused.db", None, [])
    assert runner.fallback is not None and runner.fallback.timeout == 12.0
    for bad in ("0", "-1", "inf", "nan", "soon"):
        monkeypatch.setenv("FRUGALFLOW_TIMEOUT", bad)
        with pytest.raises(FrugalflowError, match="FRUGALFLOW_TIMEOUT"):
            fallback_policy(None)


def test_timeout_option_reaches_the_demo(monkeypatch: pytest.MonkeyPatch) -> None:
    import frugalflow.cli as cli_module

    monkeypatch.chdir(ROOT)
    seen: list[float | None] = []
    monkeypatch.setattr(cli_module, "_demo",
                        lambda n, seed, as_json, timeout=None: seen.append(timeout))
    out = cli.invoke(app, ["demo", "--timeout", "2.5"])
    assert out.exit_code == 0, out.output
    assert seen == [2.5]


def test_explain_keeps_brackets_in_reasons(monkeypatch: pytest.MonkeyPatch) -> None:
    import frugalflow.cli as cli_module

    monkeypatch.chdir(ROOT)
    real = cli_module.load_flow

    def with_brackets(name: str) -> Any:
        flow = real(name)
        compiled = flow.compile(Catalog.simulated())
        plan = compiled.explain()
        for rows in plan.values():
            for r in rows:
                r["accepted"], r["reasons"] = False, ["needs [[models]] [bold]x[/bold]"]
            rows[0]["accepted"] = True
        monkeypatch.setattr(type(compiled), "explain", lambda self, **kw: plan)
        return flow

    monkeypatch.setattr(cli_module, "load_flow", with_brackets)
    out = cli.invoke(app, ["explain", "support_triage", "--catalog", ""], terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "needs [[models]] [bold]x[/bold]" in out.output


def test_timeout_option_reaches_run_and_resume(monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    import frugalflow.cli as cli_module

    monkeypatch.chdir(ROOT)
    seen: list[float | None] = []
    real = cli_module._runner

    def spy(*args: Any, **kwargs: Any) -> Any:
        runner = real(*args, **kwargs)
        seen.append(runner.fallback.timeout if runner.fallback is not None else None)
        return runner

    monkeypatch.setattr(cli_module, "_runner", spy)
    monkeypatch.delenv("FRUGALFLOW_TIMEOUT", raising=False)
    db = f"sqlite:///{tmp_path / 'runs.db'}"
    out = cli.invoke(app, ["run", "support_triage", "-i", '{"ticket": "Order 12 is late"}',
                           "--db", db, "--json", "--timeout", "7"])
    assert out.exit_code == 0, out.output
    run_id = json.loads(out.output)["run_id"]
    out = cli.invoke(app, ["resume", run_id, "--db", db, "--json", "--timeout", "8"])
    assert seen == [7.0, 8.0], out.output
