"""`frugalflow run`/`resume` exit with the run's status, show its result, check its input and
print a resume command that works as printed; `frugalflow flows` lists each flow's input."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner, Result

from frugalflow.cli import app
from frugalflow.run_display import ExitCode, exit_code, fold, resume_command
from frugalflow.runner import Runner
from frugalflow.statuses import RunStatus

ROOT = Path(__file__).resolve().parents[1]

FLOW = '''
import asyncio
from typing import Required, TypedDict

from langgraph.types import interrupt

from frugalflow import END, START, Flow

STARTED = asyncio.Event()


class S(TypedDict, total=False):
    mode: Required[str]
    answer: str
    long: str


flow = Flow("modes", S)


@flow.node()
async def step(state: S, model) -> S:
    mode = state["mode"]
    if mode == "fail":
        raise RuntimeError("boom [on purpose]")
    if mode == "interrupt":
        return {"answer": str(interrupt("approve? [y/n]"))}
    if mode == "hang":
        STARTED.set()
        await asyncio.sleep(60)
    reply = await model.ainvoke("say something")
    return {"answer": str(reply.content)[:20], "long": "x" * 500}


flow.add_edge(START, "step")
flow.add_edge("step", END)
'''


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, str]:
    """(flow as path.py:attr, database URL), run from a directory with no flows/ in it."""
    (tmp_path / "my_flows.py").write_text(FLOW)
    monkeypatch.chdir(tmp_path)
    return "my_flows.py:flow", f"sqlite:///{tmp_path / 'runs.db'}"


def _cli(*args: str) -> Result:
    return CliRunner().invoke(app, list(args))


def _flat(output: str) -> str:
    """The output with table borders and line wraps removed (folded cells read on)."""
    return re.sub(r"[\s│┃|]+", " ", output)


@pytest.mark.parametrize("as_json", [False, True])
@pytest.mark.parametrize(("mode", "budget", "status", "code"), [
    ("ok", None, RunStatus.SUCCEEDED, 0),
    ("fail", None, RunStatus.FAILED, 1),
    ("ok", "0.0000001", RunStatus.BUDGET_EXCEEDED, 3),
    ("interrupt", None, RunStatus.INTERRUPTED, 4),
])
def test_run_exits_with_its_status_in_every_mode(env: tuple[str, str], mode: str,
                                                 budget: str | None, status: RunStatus,
                                                 code: int, as_json: bool) -> None:
    flow, db = env
    args = ["run", flow, "-i", json.dumps({"mode": mode}), "--db", db]
    args += ["--budget", budget] if budget else []
    result = _cli(*args, *(["--json"] if as_json else []))
    assert result.exit_code == code, result.output
    if as_json:
        out = json.loads(result.output)
        assert out["status"] == status and out["exit_code"] == code
    else:
        assert f": {status}," in result.output


def test_cancelled_run_exits_5(env: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    flow, db = env
    real_start = Runner.start

    async def start_then_cancel(self: Runner, name: Any, value: Any, **kw: Any) -> Any:
        started = await real_start(self, name, value, **{**kw, "wait": False})
        await sys.modules["_frugalflow_flow_my_flows"].STARTED.wait()
        return await self.cancel(started.run_id)

    monkeypatch.setattr(Runner, "start", start_then_cancel)
    result = _cli("run", flow, "-i", '{"mode": "hang"}', "--db", db)
    assert result.exit_code == ExitCode.CANCELLED == 5, result.output
    assert ": cancelled," in result.output


def test_exit_codes_cover_every_stopping_status() -> None:
    assert [exit_code(s) for s in (RunStatus.SUCCEEDED, RunStatus.FAILED,
                                   RunStatus.BUDGET_EXCEEDED, RunStatus.INTERRUPTED,
                                   RunStatus.CANCELLED, RunStatus.PAUSED)] == [0, 1, 3, 4, 5, 6]
    assert exit_code("no such status") == ExitCode.FAILED
    help_text = _flat(_cli("run", "--help").output + _cli("resume", "--help").output)
    assert help_text.count("3 budget_exceeded") == 2 and "4 interrupted" in help_text


def test_printed_resume_commands_work_as_printed(env: tuple[str, str]) -> None:
    flow, db = env
    stopped = _cli("run", flow, "-i", '{"mode": "interrupt"}', "--db", db)
    assert stopped.exit_code == 4
    command = re.search(r"resume with: (frugalflow resume .*)", stopped.output)
    assert command is not None and f"--flow {flow}" in command.group(1)
    args = shlex.split(command.group(1).replace('"..."', '"yes [sure]"'))
    resumed = _cli(*args[1:])
    assert resumed.exit_code == 0, resumed.output
    assert "yes [sure]" in resumed.output  # the result, brackets and all

    stopped = _cli("run", flow, "-i", '{"mode": "ok"}', "--db", db, "--budget", "0.0000001")
    assert stopped.exit_code == 3
    command = re.search(r"resume with: (frugalflow resume .*)", stopped.output)
    assert command is not None
    resumed = _cli(*shlex.split(command.group(1).replace("<USD>", "1"))[1:])
    assert resumed.exit_code == 0, resumed.output


def test_bad_input_is_one_line_exit_2_and_nothing_is_written(env: tuple[str, str]) -> None:
    flow, db = env
    for given, says in (("{}", "missing required field 'mode'"),
                        ('{"mdoe": "ok"}', "unknown field 'mdoe' (did you mean 'mode'?)"),
                        ('{"mode": 3}', "field 'mode' should be str, got int")):
        result = _cli("run", flow, "-i", given, "--db", db)
        assert result.exit_code == 2, result.output
        # One line, and nothing before it (the run's header is not printed either).
        line = [x for x in result.output.splitlines() if x.strip()]
        assert len(line) == 1 and line[0].startswith("error:"), result.output
        assert f"{says}; expected fields: mode (str), answer (str, " \
            "optional), long (str, optional)" in line[0]
        assert "Traceback" not in result.output
    listed = _cli("runs", "--db", db, "--json")
    # Nothing written, not even the database (which `runs`, read-only, does not create).
    assert listed.exit_code == 2 and "does not exist" in listed.output, listed.output


def test_default_input_on_a_ready_made_flow(monkeypatch: pytest.MonkeyPatch,
                                            tmp_path: Path) -> None:
    monkeypatch.chdir(ROOT)
    result = _cli("run", "support_triage", "--db", f"sqlite:///{tmp_path / 'r.db'}")
    assert result.exit_code == 2
    assert ("error: input for support_triage: missing required field 'ticket'; "
            "expected fields: ticket (str)") in result.output
    assert "KeyError" not in result.output


def test_run_and_runs_show_print_the_result_folded(env: tuple[str, str]) -> None:
    flow, db = env
    ran = _cli("run", flow, "-i", '{"mode": "ok"}', "--db", db)
    assert ran.exit_code == 0, ran.output
    run_id = re.search(r"run (\w+): succeeded", ran.output)
    assert run_id is not None
    for output in (ran.output, _cli("runs", "show", run_id.group(1), "--db", db).output):
        dense = _flat(output).replace(" ", "")
        assert "result" in dense and "x" * 200 + "…(300morechars)" in dense
        assert "x" * 201 not in dense
    shown = json.loads(_cli("runs", "show", run_id.group(1), "--db", db, "--json").output)
    assert shown["result"]["long"] == "x" * 500 and shown["result"]["mode"] == "ok"


def test_flows_command_shows_each_input(env: tuple[str, str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    flow, _db = env
    one = json.loads(_cli("flows", flow, "--json").output)
    assert one[0]["input"][0] == {"name": "mode", "type": "str", "required": True}
    monkeypatch.chdir(ROOT)
    listed = _cli("flows")
    assert listed.exit_code == 0
    assert "support_triage" in listed.output and "ticket (str)" in listed.output


def test_fold_and_resume_command() -> None:
    assert fold("short") == "short"
    assert fold({"a": [1, 2]}) == '{"a": [1, 2]}'
    assert fold("y" * 250) == "y" * 200 + "… (50 more chars)"
    assert resume_command("r1", flow="support_triage") == "frugalflow resume r1"
    assert resume_command("r1", flow="my dir/f.py:flow", db="sqlite:///a.db",
                          then="--budget 1") == (
        "frugalflow resume r1 --flow 'my dir/f.py:flow' --db sqlite:///a.db --budget 1")
