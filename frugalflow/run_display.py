"""How the command line reports a run: its exit code, its result folded to fit a terminal, and
the command that resumes it.

Exit codes of `frugalflow run` and `frugalflow resume` (in every output mode):

    0  succeeded
    1  failed (the error is printed; resumable from its last checkpoint), or another error
    2  bad input: an unknown option value, or an input that does not fit the flow's fields
    3  budget_exceeded (resume with --budget)
    4  interrupted: waiting for an answer (resume with --value)
    5  cancelled
    6  paused (the database went away or the process is shutting down; resume later)
"""

from __future__ import annotations

import functools
import json
import shlex
from collections.abc import Mapping
from enum import IntEnum
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .statuses import Outcome, RunStatus

if TYPE_CHECKING:
    from .persistence.ledger import RunRecord
    from .runner import RunResult

__all__ = ["ExitCode", "cost_table", "exit_code", "fold", "report", "resume_command",
           "result_table"]

FOLD_AT = 200
"""Characters of a value shown before it is folded."""


class ExitCode(IntEnum):
    """What `frugalflow run` and `resume` exit with."""

    SUCCEEDED = 0
    FAILED = 1
    BAD_INPUT = 2
    BUDGET_EXCEEDED = 3
    INTERRUPTED = 4
    CANCELLED = 5
    PAUSED = 6


_BY_STATUS = {
    RunStatus.SUCCEEDED: ExitCode.SUCCEEDED,
    RunStatus.FAILED: ExitCode.FAILED,
    RunStatus.BUDGET_EXCEEDED: ExitCode.BUDGET_EXCEEDED,
    RunStatus.INTERRUPTED: ExitCode.INTERRUPTED,
    RunStatus.CANCELLED: ExitCode.CANCELLED,
    RunStatus.PAUSED: ExitCode.PAUSED,
}


def exit_code(status: str) -> ExitCode:
    """The exit code for a run that stopped in `status` (FAILED for any other)."""
    try:
        return _BY_STATUS.get(RunStatus(status), ExitCode.FAILED)
    except ValueError:  # not a status at all
        return ExitCode.FAILED


def fold(value: Any, limit: int = FOLD_AT) -> str:
    """`value` on one line (strings as they are, the rest as compact JSON), cut after `limit`
    characters with "… (N more chars)"."""
    text = value if isinstance(value, str) else json.dumps(
        value, default=str, ensure_ascii=False, separators=(", ", ": "))
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text) - limit} more chars)"


def result_table(state: Mapping[str, Any] | None, title: str = "result") -> Table | None:
    """The run's final state, one row per field (None when there is none)."""
    if not state:
        return None
    table = Table(title=title, show_lines=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, value in state.items():
        table.add_row(Text(str(key)), Text(fold(value)))  # Text: brackets are not markup
    return table


def resume_command(run_id: str, *, flow: str | None = None, db: str | None = None,
                   catalog: str | None = None, then: str = "") -> str:
    """`frugalflow resume RUN ...` that works as printed: it names the flow when it was given
    as a file (`path.py:attr`, not a name in flows/), and the database and catalog given."""
    parts = ["frugalflow", "resume", run_id]
    if flow is not None and (":" in flow or flow.endswith(".py")):
        parts += ["--flow", flow]
    if db is not None:
        parts += ["--db", db]
    if catalog is not None:
        parts += ["--catalog", catalog]
    return " ".join(shlex.quote(p) for p in parts) + (f" {then}" if then else "")


_VALUE_HINT = "--value '\"...\"'"  # the answer as JSON: here a string


def report(console: Console, result: RunResult, record: RunRecord, *, flow_arg: str | None,
           db: str | None, catalog: str | None) -> None:
    """A finished run for a person: its result, calls, status and how to go on (`flow_arg`,
    `db` and `catalog` as the user gave them, for the resume command)."""
    table = result_table(result.state)
    if table is not None:
        console.print(table)
    console.print(cost_table(record))
    color = "green" if result.status == RunStatus.SUCCEEDED else "yellow"
    console.print(f"run [bold]{result.run_id}[/]: [{color}]{result.status}[/], "
                  f"${result.cost_usd:.6f}")
    if result.error:
        console.print(Text(f"  {result.error.splitlines()[0]}"))
    hint = functools.partial(resume_command, result.run_id, flow=flow_arg, db=db,
                             catalog=catalog)
    # soft_wrap: a command cut at the terminal's width would not work when copied
    if result.interrupts:
        console.print(Text(f"  waiting on: {fold(result.interrupts, 300)}"))
        console.print(Text(f"  resume with: {hint(then=_VALUE_HINT)}"), soft_wrap=True)
    if result.status == RunStatus.BUDGET_EXCEEDED:
        console.print(Text(f"  resume with: {hint(then='--budget <USD>')}"), soft_wrap=True)


def cost_table(record: RunRecord) -> Table:
    """Every model call of the run: node, model, outcome, tokens, cost, latency."""
    table = Table(title=f"run {record.run.id}: calls")
    for col in ("node", "model", "outcome", "tokens in/out", "cost $", "latency ms"):
        table.add_column(col)
    for a in record.attempts:
        outcome = "ok" if a.outcome == Outcome.OK else f"{a.error_class} -> {a.action}"
        table.add_row(a.node, a.model, outcome, f"{a.input_tokens}/{a.output_tokens}",
                      f"{a.cost_usd:.6f}", f"{a.latency_ms:.0f}")
    return table
