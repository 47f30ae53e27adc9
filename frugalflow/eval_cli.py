"""`frugalflow eval`: measure candidate models on a flow's node (or the whole flow), then report.

    frugalflow eval support_triage --node extract --data cases.jsonl --models "sim-openai/*"
    frugalflow eval support_triage --node extract --from-ledger --since 2026-11-01 --sample 200

It shows the estimated cost and asks before paying (`--yes` skips the question), shows live
progress per model, records every cell as it completes (`--resume ID` continues a stopped
evaluation without paying a recorded cell again; re-running the same command does too), then
prints the report; `--save-policy NAME` stores its node policy for `--policy NAME` runs.
Exit codes: 0 done, 1 the evaluation did not complete (budget, outage, declined), 2 bad input.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from .catalog import Catalog
from .exceptions import FrugalflowError, StoreError, UserError
from .flow import Flow, check_budget
from .persistence.store import Store

if TYPE_CHECKING:
    from .evaluation.cases import EvalCase, Scorer
    from .evaluation.report import Report
    from .evaluation.results import EvalRecord
    from .evaluation.run import EvalPlan, EvalProgress, EvalResult, Evaluation

__all__ = ["EvalArgs", "add_eval_command", "eval_command"]

console = Console(width=None if sys.stdout.isatty() else 160)

BAD_INPUT = 2
INCOMPLETE = 1


@dataclass
class _Hooks:
    """What the command takes from `frugalflow.cli` (which imports this module, so this
    module cannot import it): how flows and catalogs are found."""

    load_flow: Callable[[str], Flow[Any]] | None = None
    catalog: Callable[[str | None], Catalog] | None = None


_hooks = _Hooks()


@dataclass
class EvalArgs:
    """The command's options, as given."""

    flow: str
    node: str | None = None
    data: str | None = None
    from_ledger: bool = False
    since: str | None = None
    until: str | None = None
    sample: int | None = None
    models: str | None = None
    scorer: str | None = None
    repeats: int | None = None
    budget: float | None = None
    concurrency: int = 4
    yes: bool = False
    resume: str | None = None
    target: float = 0.9
    save_policy: str | None = None
    chart: str | None = None
    as_json: bool = False
    db: str | None = None
    catalog: str | None = None
    seed: int = 0
    fresh: bool = False


def add_eval_command(app: typer.Typer, *, load_flow: Callable[[str], Flow[Any]],
                     catalog: Callable[[str | None], Catalog]) -> None:
    """Register `eval` on the CLI `app`, finding flows and catalogs as the CLI does."""
    _hooks.load_flow, _hooks.catalog = load_flow, catalog
    app.command("eval")(eval_command)


def eval_command(
    flow: str = typer.Argument(..., help="A flow in flows/ (e.g. support_triage) or path/to/file.py:attr."),
    node: str = typer.Option(None, "--node", help="The node to evaluate (default: the whole flow, end to end)."),
    data: str = typer.Option(None, "--data", help="Cases: JSONL, CSV or a pydantic-evals data set (.yaml/.json)."),
    from_ledger: bool = typer.Option(False, "--from-ledger", help="Replay the node's recorded production calls."),
    since: str = typer.Option(None, "--since", help="--from-ledger: calls from this date (ISO 8601)."),
    until: str = typer.Option(None, "--until", help="--from-ledger: calls before this date."),
    sample: int = typer.Option(None, "--sample", help="--from-ledger: at most this many calls (seeded sample)."),
    models: str = typer.Option(None, "--models", help="Candidates: keys and globs, comma separated (default: every model that passes the node's hard needs)."),
    scorer: str = typer.Option(None, "--scorer", help="validator, exact, normalized, numeric:TOL, judge:CRITERIA or module:function."),
    repeats: int = typer.Option(None, "--repeats", help="Answers per case and model (non-determinism); default 1."),
    budget: float = typer.Option(None, "--budget", help="USD the whole evaluation may spend."),
    concurrency: int = typer.Option(4, "--concurrency", help="Cells run at once (each model within its rate limits)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Start without asking to confirm the estimated cost."),
    resume: str = typer.Option(None, "--resume", help="Continue this evaluation (its data and options are reused)."),
    fresh: bool = typer.Option(False, "--fresh", help="A new evaluation, even if the same one was run before (default: continue it)."),
    target: float = typer.Option(0.9, "--target", help="Pass rate the chosen policy must meet (on the interval's lower bound)."),
    save_policy: str = typer.Option(None, "--save-policy", help="Store the report's node policy as the next version of NAME."),
    chart: str = typer.Option(None, "--chart", help="Save the cost-quality chart to this PNG file."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    db: str = typer.Option(None, "--db", help="Database URL (default: FRUGALFLOW_DATABASE_URL or sqlite:///frugalflow.db)."),
    catalog: str = typer.Option(None, "--catalog", help="Catalog file (default: FRUGALFLOW_CATALOG, else built-in)."),
) -> None:
    """Measure candidate models on a node (or the whole flow): pass rates, cost, the policy."""
    args = EvalArgs(flow=flow, node=node, data=data, from_ledger=from_ledger, since=since,
                    until=until, sample=sample, models=models, scorer=scorer, repeats=repeats,
                    budget=budget, concurrency=concurrency, yes=yes, resume=resume,
                    target=target, save_policy=save_policy, chart=chart, as_json=as_json,
                    db=db, catalog=catalog, fresh=fresh)
    try:
        code = asyncio.run(evaluate(args))
    except (UserError, ValueError) as e:
        _fail(e, BAD_INPUT)
    except StoreError as e:
        _fail(e, INCOMPLETE)
    except FrugalflowError as e:  # a flow that does not load or compile: the input's fault
        _fail(e, BAD_INPUT)
    except KeyboardInterrupt:
        _fail(UserError("interrupted: the recorded cells are kept; run the same command "
                        "(or --resume ID) to continue"), INCOMPLETE)
    if code:
        raise typer.Exit(code=code)


def _fail(error: BaseException, code: int) -> NoReturn:
    lines = str(error).splitlines() or [type(error).__name__]
    console.print(f"[red]error:[/] {lines[0]}", highlight=False, markup=True)
    for line in lines[1:]:
        console.print(f"  {line}", highlight=False, markup=False)
    raise typer.Exit(code=code)


# -- the steps ------------------------------------------------------------------------------


def _date(text: str | None, option: str) -> datetime | None:
    if text is None:
        return None
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise UserError(f"{option} {text!r} is not a date: use ISO 8601, e.g. 2026-11-01 "
                        "or 2026-11-01T12:00") from None
    return value if value.tzinfo is not None else value.replace(tzinfo=timezone.utc)


def _check_args(args: EvalArgs) -> None:
    if args.fresh and args.resume:
        raise UserError("--fresh starts a new evaluation; --resume continues one: choose one")
    if args.data and args.from_ledger:
        raise UserError("give --data FILE or --from-ledger, not both")
    if not args.data and not args.from_ledger:
        raise UserError("no cases: give --data FILE (JSONL, CSV, pydantic-evals) or "
                        "--from-ledger (the node's recorded calls)")
    if args.from_ledger and not args.node:
        raise UserError("--from-ledger replays one node's calls: name it with --node")
    if not args.from_ledger and (args.since or args.until or args.sample is not None):
        raise UserError("--since, --until and --sample choose recorded calls: use them "
                        "with --from-ledger")
    if args.sample is not None and args.sample < 1:
        raise UserError(f"--sample must be at least 1, got {args.sample}")
    if not 0.0 <= args.target <= 1.0:
        raise UserError(f"--target is a pass rate between 0 and 1, got {args.target}")
    if args.chart and not args.chart.lower().endswith(".png"):
        raise UserError(f"--chart {args.chart!r}: the chart is a PNG file (name it *.png)")
    try:
        check_budget(args.budget)
    except ValueError as e:
        raise UserError(f"--budget: {e}") from None


def _reuse(args: EvalArgs, record: EvalRecord) -> None:
    """--resume ID: what was not given again comes from the stored evaluation."""
    spec = record.spec
    args.node = args.node or record.node
    data = spec.get("data") or {}
    if not args.data and not args.from_ledger:
        if data.get("file"):
            args.data = str(data["file"])
        elif isinstance(data.get("ledger"), dict):
            ledger = data["ledger"]
            args.from_ledger = True
            args.since, args.until = ledger.get("since"), ledger.get("until")
            args.sample, args.seed = ledger.get("sample"), int(ledger.get("seed") or 0)
    args.scorer = args.scorer or data.get("scorer")
    if args.models is None and spec.get("candidates"):
        args.models = ",".join(spec["candidates"])
    if args.repeats is None and spec.get("repeats"):
        args.repeats = int(spec["repeats"])
    if args.budget is None and spec.get("budget") is not None:
        args.budget = float(spec["budget"])


async def _cases(args: EvalArgs, flow: Flow[Any], store: Store) -> list[EvalCase]:
    if args.data:
        from .evaluation.datasets import aload_cases

        return await aload_cases(args.data)
    from .evaluation.from_ledger import cases_from_ledger
    from .persistence.ledger import Ledger

    assert args.node is not None
    cases = await cases_from_ledger(
        Ledger(store), flow=flow.name, node=args.node, since=_date(args.since, "--since"),
        until=_date(args.until, "--until"), limit=args.sample, seed=args.seed)
    if not cases:
        raise UserError(f"no recorded calls of {flow.name}/{args.node} to replay"
                        + (" in that time range" if args.since or args.until else "")
                        + ": run the flow first (durable runs record their calls)")
    return cases


def _scorer(args: EvalArgs, flow: Flow[Any], cases: list[EvalCase]) -> Scorer:
    from .evaluation.scorers import scorer_from_spec

    validator = flow.nodes[args.node].validator if args.node in flow.nodes else None
    spec = args.scorer
    if spec is None:
        if validator is not None:
            spec = "validator"
        elif any(c.expected is not None for c in cases):  # the others: error cells, say why
            spec = "normalized"
        else:
            raise UserError("nothing to score the answers with: the node has no validator and "
                            "the cases no expected answers; give --scorer (validator, exact, "
                            "normalized, numeric:TOL, judge:CRITERIA or module:function)")
        args.scorer = spec
    return scorer_from_spec(spec, validator=validator)


def _data_spec(args: EvalArgs) -> dict[str, Any]:
    if args.data:
        return {"file": args.data, "scorer": args.scorer}
    return {"ledger": {"since": args.since, "until": args.until, "sample": args.sample,
                       "seed": args.seed}, "scorer": args.scorer}


async def evaluate(args: EvalArgs) -> int:
    """The whole command; returns its exit code (raises UserError for bad input)."""
    from .evaluation.datasets import check_cases
    from .evaluation.results import EvalStore
    from .evaluation.run import Evaluation, check_node

    assert _hooks.load_flow is not None and _hooks.catalog is not None
    store = Store(args.db)
    try:
        if args.resume:
            _reuse(args, await EvalStore(store).get(args.resume))
        _check_args(args)
        # Executing the flow's module and reading the catalog block: off the event loop.
        flow = await asyncio.to_thread(_hooks.load_flow, args.flow)
        cat = await asyncio.to_thread(_hooks.catalog, args.catalog)
        if args.node is not None:
            check_node(flow, args.node)  # before reading any case
        cases = check_cases(await _cases(args, flow, store), flow, args.node)
        scorer = _scorer(args, flow, cases)
        ev = Evaluation(flow, cases, scorer, node=args.node, catalog=cat,
                        candidates=args.models, budget=args.budget,
                        repeats=1 if args.repeats is None else args.repeats,
                        concurrency=args.concurrency, store=EvalStore(store),
                        data=_data_spec(args), eval_id=args.resume, fresh=args.fresh)
        plan = await ev.plan()
        if not await _confirmed(args, plan):
            return INCOMPLETE
        result = await _run(ev, plan, args)
        report = await _report(result, args, cat, store)
        await _finish(result, report, args, store, plan)
    finally:
        await store.close()
    return 0 if result.complete and any(c.scored for c in result.cells) else INCOMPLETE


async def _confirmed(args: EvalArgs, plan: EvalPlan) -> bool:
    out = Console(stderr=True) if args.as_json else console
    out.print(f"evaluation [bold]{plan.eval_id}[/]"
              + (" (resumed)" if plan.resumed else "") + f": {plan.describe()}",
              highlight=False)
    for model, why in plan.unavailable.items():
        out.print(f"  [yellow]{model}: {why}: its cells will be recorded as errors[/]",
                  highlight=False)
    for model, why in plan.dropped.items():
        out.print(f"  [dim]left out {model}: {why}[/]", highlight=False)
    if not plan.todo or args.yes:
        return True
    try:
        ok = await asyncio.to_thread(typer.confirm, f"Spend about ${plan.estimate_usd:.6f}?",
                                     default=False, err=args.as_json)
    except typer.Abort:  # no answer (stdin closed): not a yes
        ok = False
    if not ok:
        out.print("not started: nothing was paid")
    return bool(ok)


async def _run(ev: Evaluation, plan: EvalPlan, args: EvalArgs) -> EvalResult:
    if args.as_json or not plan.todo:
        return await ev.run(plan)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, transient=False) as bar:
        tasks: dict[str, TaskID] = {}
        for m in plan.candidates:
            done = sum(1 for c in plan.done if c.model == m)
            tasks[m] = bar.add_task(m, total=plan.cases * plan.repeats, completed=done, info="")
        every = bar.add_task("all models", total=plan.total_cells, completed=len(plan.done),
                             info="")

        def show(p: EvalProgress) -> None:
            for m, mp in p.models.items():
                errors = f", {mp.errors} errors" if mp.errors else ""
                bar.update(tasks[m], completed=mp.done, info=f"${mp.cost_usd:.6f}{errors}")
            eta = f", ETA {p.eta_s:.0f} s" if p.eta_s is not None else ""
            bar.update(every, completed=p.done, info=f"${p.cost_usd:.6f}{eta}")

        result = await ev.run(plan, on_progress=show)
    return result


async def _report(result: EvalResult, args: EvalArgs, cat: Catalog, store: Store) -> Report:
    from .evaluation.report import build_report
    from .evaluation.savings import recent_volume
    from .persistence.ledger import Ledger

    volume = await recent_volume(Ledger(store), flow=result.flow)
    report = build_report(result.cells, catalog=cat, target=args.target,
                          volume=volume if volume.runs else None)
    if args.chart and result.cells:
        from .evaluation.chart import save_chart

        await asyncio.to_thread(save_chart, report, args.chart)
    return report


async def _finish(result: EvalResult, report: Report, args: EvalArgs, store: Store,
                  plan: EvalPlan) -> None:
    saved: dict[str, Any] | None = None
    if args.save_policy:
        from .persistence.policy_store import PolicyStore

        source = f"eval:{result.eval_id}"
        policy = report.policy(result.flow, source=source)
        version = await PolicyStore(store).save(args.save_policy, policy, source=source)
        saved = {"name": args.save_policy, "version": version}
    if args.as_json:
        print(json.dumps({
            "eval_id": result.eval_id, "flow": result.flow, "node": result.node,
            "status": result.status.value, "stop_reason": result.stop_reason,
            "cost_usd": result.cost_usd, "new_cost_usd": result.new_cost_usd,
            "estimate_usd": plan.estimate_usd, "candidates": result.candidates,
            "cells": len(result.cells), "report": report.to_json(), "policy": saved,
            "chart": args.chart}, indent=2, default=str))
        return
    console.print(report.rich_table())
    for line in report.summary_lines():
        console.print(line, highlight=False)
    color = "green" if result.complete else "yellow"
    console.print(f"evaluation [bold]{result.eval_id}[/]: [{color}]{result.status.value}[/]"
                  + (f" ({result.stop_reason})" if result.stop_reason else "")
                  + f", {len(result.cells)} cells, ${result.cost_usd:.6f}"
                  + (f" (${result.new_cost_usd:.6f} this run)" if plan.resumed else ""),
                  highlight=False)
    if not result.complete:
        more = " --budget <more USD>" if result.stop_reason == "budget reached" else ""
        console.print(f"  continue with: frugalflow eval {args.flow} --resume "
                      f"{result.eval_id}{more}", highlight=False)
    if saved:
        console.print(f"policy [bold]{saved['name']}[/] version {saved['version']} stored: "
                      f"runs started with --policy {saved['name']} use it", highlight=False)
    if args.chart and result.cells:
        console.print(f"chart: {args.chart}", highlight=False)
