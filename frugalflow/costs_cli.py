"""The command line's spending views: `frugalflow costs` (the ledger's spend grouped by model,
node, provider, flow, run, day or service tier) and the plan `frugalflow explain` prints
(with `--deadline`: each model's tiers, the chosen one, and why other tiers could not serve)."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, NoReturn, cast, get_args

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .cli_options import DbOption, JsonOption
from .exceptions import FrugalflowError

if TYPE_CHECKING:
    from .flow import CompiledFlow
    from .measured import Measurements
    from .needs import Needs
    from .persistence.ledger import CostRow, GroupBy

__all__ = ["add_costs_command", "explain_plan", "print_plan"]

console = Console(width=None if sys.stdout.isatty() else 160)


class _Hooks:
    """How the CLI reports an error (set by `add_costs_command`)."""

    fail: Callable[[BaseException], NoReturn]


_hooks = _Hooks()


def add_costs_command(app: typer.Typer, *, fail: Callable[[BaseException], NoReturn]) -> None:
    """Register `costs` on the CLI `app`, failing as the CLI does."""
    _hooks.fail = fail
    app.command("costs")(costs_cmd)


def _groups() -> tuple[str, ...]:
    from .persistence.ledger import GroupBy

    return cast("tuple[str, ...]", get_args(GroupBy))


def costs_cmd(
    by: str = typer.Option("model", "--by", help="Group by model, node, provider, flow, run, "
                                                 "day or tier (standard, batch, flex, off_peak)."),
    run_id: str = typer.Option(None, "--run", help="Only this run's attempts."),
    flow: str = typer.Option(None, "--flow", help="Only this flow's attempts."),
    db: str = DbOption, as_json: bool = JsonOption,
) -> None:
    """What model calls cost, from the ledger, grouped (dearest first)."""
    if by not in _groups():
        raise typer.BadParameter(f"{by!r} is not one of {', '.join(_groups())}",
                                 param_hint="--by")
    try:
        rows = asyncio.run(_costs(db, cast("GroupBy", by), run_id, flow))
    except FrugalflowError as e:
        _hooks.fail(e)
    if as_json:
        print(json.dumps([asdict(r) for r in rows], indent=2))
        return
    table = Table(title=f"costs by {by}")
    for col in (by, "cost $", "calls ok", "attempts", "input tokens", "output tokens"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(r.key), f"{r.cost_usd:.6f}", str(r.calls), str(r.attempts),
                      str(r.input_tokens), str(r.output_tokens))
    console.print(table)


async def _costs(db: str | None, by: GroupBy, run_id: str | None,
                 flow: str | None) -> list[CostRow]:
    from .persistence import Store
    from .persistence.ledger import Ledger

    store = Store(db, create=False)
    try:
        return await Ledger(store).costs(by, run_id=run_id, flow=flow)
    finally:
        await store.close()


# -- explain ---------------------------------------------------------------------------


def node_deadline(needs: Needs, deadline_s: float | None) -> float | None:
    """The seconds a node's answers may take, as at run time: its own `Needs.deadline`
    first (`timedelta(0)`: none, it answers now), else `--deadline` (the run's default)."""
    if needs.answers_now:
        return None
    if needs.deadline is not None:
        return needs.deadline.total_seconds()
    return deadline_s


def explain_plan(compiled: CompiledFlow, tokens: int, deadline_s: float | None,
                 measured: Measurements | None = None) -> dict[str, list[dict[str, Any]]]:
    """Per model node, `ranking.explain` with the node's deadline (see `node_deadline`);
    without measurements or deadlines, `CompiledFlow.explain` as before tiers."""
    from .ranking import explain as explain_rows

    needs = [spec.needs for spec in compiled.flow.nodes.values() if spec.needs is not None]
    if measured is None and all(node_deadline(n, deadline_s) is None for n in needs):
        return compiled.explain(input_tokens=tokens)
    return {n: explain_rows(compiled.catalog, spec.needs, input_tokens=tokens, node=n,
                            measured=measured, deadline_s=node_deadline(spec.needs, deadline_s))
            for n, spec in compiled.flow.nodes.items() if spec.needs is not None}


def print_plan(compiled: CompiledFlow, plan: dict[str, list[dict[str, Any]]],
               out: Console) -> None:
    """`frugalflow explain`'s text: per node its candidates in order (with their tier when
    the node has a deadline, the chosen one marked `*`), then what was rejected and why."""
    for node, rows in plan.items():
        ok = [r for r in rows if r["accepted"]]
        costs = [r["expected_cost_usd"] for r in ok]
        needs = cast("Needs", compiled.flow.nodes[node].needs)  # explain lists model nodes only
        span = f"${min(costs):.6f} .. ${max(costs):.6f} per call" if costs else "no candidate"
        out.print(f"[bold]{escape(node)}[/] ({escape(needs.describe())}): "
                  f"{len(ok)} candidates, {span}")
        for r in ok:
            mark = "*" if r.get("chosen") else " "
            tier = f" [{r['tier']}]" if "tier" in r else ""
            out.print(f" {mark}{r['rank']:>2}. {escape(r['model'])}{escape(tier)}  "
                      f"${r['expected_cost_usd']:.6f}  ~{r['output_tokens']} out tokens "
                      f"({r['output_source']})  [dim]{escape(str(r['measured']))}[/]")
        for r in rows:
            if not r["accepted"]:
                tier = f" [{r['tier']}]" if r.get("tier") else ""
                out.print(f"   [dim]x {escape(r['model'])}{escape(tier)}: "
                          f"{escape('; '.join(r['reasons']))}[/]")
