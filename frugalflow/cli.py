"""The `frugalflow` command line."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from datetime import timedelta
from pathlib import Path
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .catalog import Catalog
from .cli_options import (CatalogOption, DbOption, DeadlineOption, JsonOption, PolicyOption,
                          RouterOption, RunDeadlineOption, TimeoutOption, duration_seconds,
                          fallback_policy as _fallback, timeout_seconds as _timeout)
from .cli_usage import OneLineErrorsGroup as _Cli
from .costs_cli import add_costs_command, explain_plan, print_plan
from .exceptions import FrugalflowError, StoreUnavailableError
from .resilience import BreakerRegistry, FallbackPolicy
from .usage import Attempt
from .flow import Flow
from .inputs import InputError, check_input
from .run_display import ExitCode, cost_table, exit_code, report, result_table
from .statuses import Outcome, RunStatus

if TYPE_CHECKING:
    from .flow import CompiledFlow
    from .needs import Needs
    from .persistence import Store
    from .persistence.ledger import Ledger, RunRecord
    from .runner import RunResult, Runner
    from .service import Docs

T = TypeVar("T")

app = typer.Typer(
    cls=_Cli,
    add_completion=False,
    no_args_is_help=True,
    help="frugalflow: run each workflow step on the cheapest capable model.",
)
console = Console(width=None if sys.stdout.isatty() else 160)


def _version(show: bool) -> None:
    if show:
        from . import __version__

        print(f"frugalflow {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print frugalflow's version and exit."),
) -> None:
    """frugalflow: run each workflow step on the cheapest capable model."""


# The ready-made flows as the wheel installs them (the repository's flows/, see pyproject.toml).
_INSTALLED_FLOWS = "frugalflow_flows"


def installed_flow_names() -> list[str]:
    """The ready-made flows installed with frugalflow (none when run from a plain checkout)."""
    spec = importlib.util.find_spec(_INSTALLED_FLOWS)
    folders = (spec.submodule_search_locations or []) if spec is not None else []
    return sorted({p.stem for folder in folders for p in Path(folder).glob("*.py")
                   if not p.stem.startswith("_")})


def load_flow(name: str) -> Flow[Any]:
    """A flow named `flows/<name>.py` here or among the installed ready-made flows (its `flow`),
    or `path/to/file.py:attr`."""
    path_text, _, attr = name.partition(":")
    path = Path(path_text)
    attr = attr or "flow"
    if path.suffix != ".py":
        path = Path("flows") / f"{path_text}.py"
        if not path.exists() and path_text in installed_flow_names():
            module = importlib.import_module(f"{_INSTALLED_FLOWS}.{path_text}")
            return _flow_attr(module, attr, f"{_INSTALLED_FLOWS}.{path_text}")
    if not path.exists():
        available = sorted({p.stem for p in Path("flows").glob("*.py") if p.stem != "__init__"}
                           | set(installed_flow_names()))
        raise FrugalflowError(
            f"no flow {name!r}: {path} does not exist"
            + (f" (flows: {', '.join(available)})" if available else
               " (run from the repository root, or name a file: path/to/file.py:attr)")
        )
    if str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    module_name = f"_frugalflow_flow_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return _flow_attr(module, attr, str(path))


def _flow_attr(module: object, attr: str, where: str) -> Flow[Any]:
    flow = getattr(module, attr, None)
    if not isinstance(flow, Flow):
        raise FrugalflowError(f"{where}:{attr} is not a frugalflow Flow")
    return flow


_TICKETS = [
    "Hi, I'm Dana Reyes. I was charged twice for order 88231 (the standing desk). "
    "Please refund the duplicate charge, this is urgent.",
    "My parcel for order 77120 has been stuck in transit for nine days. Where is it? - Omar",
    "I can't log in since the password reset email never arrives. Account: li.wei@example.com",
]


@app.command()
def demo(
    tickets: int = typer.Option(3, min=1, max=len(_TICKETS), help="How many tickets to triage."),
    seed: int = typer.Option(7, help="Seed of the simulated providers."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
    timeout: float = TimeoutOption,
) -> None:
    """Offline demo: support triage on simulated providers, one failing mid-run."""
    try:
        _demo(tickets, seed, as_json, _timeout(timeout))
    except FrugalflowError as e:
        _fail(e)


async def _demo_tickets(compiled: CompiledFlow, n_tickets: int, as_json: bool) -> list[Attempt]:
    """Run the demo's tickets, showing progress meanwhile (nothing in --json); every attempt."""
    from rich.progress import Progress

    attempts: list[Attempt] = []
    with Progress(console=console, transient=True, disable=as_json) as bar:
        task = bar.add_task("tickets", total=n_tickets)
        for i, ticket in enumerate(_TICKETS[:n_tickets], 1):
            ctx = compiled.new_context(listeners=[attempts.append])
            await compiled.ainvoke({"ticket": ticket}, context=ctx)
            spent = sum(a.cost_usd for a in attempts)
            bar.update(task, completed=i, description=f"ticket {i}/{n_tickets}, "
                                                      f"{len(attempts)} calls, ${spent:.6f}")
    return attempts


def _demo(n_tickets: int, seed: int, as_json: bool, timeout: float | None = None) -> None:
    from .testing.simulator import simulator

    flow = load_flow("support_triage")
    catalog = Catalog.simulated()
    simulator.reset(seed=seed)
    simulator.latency_scale = 0.02  # 2% of each model's typical latency: quick but visible
    # sim-groq answers its first two calls, then goes down for the rest of the run;
    # sim-openai rate-limits its second call with a short Retry-After.
    simulator.fail("sim-groq", "unavailable", calls=range(3, 10_000))
    simulator.fail("sim-openai", "rate_limit", calls=[2], retry_after=0.05)
    compiled = flow.compile(
        catalog,
        policy=FallbackPolicy(backoff_base=0.01, backoff_max=0.05,
                              timeout=timeout if timeout is not None else FallbackPolicy.timeout),
        breakers=BreakerRegistry(),
    )

    attempts = asyncio.run(_demo_tickets(compiled, n_tickets, as_json))

    ok = [a for a in attempts if a.outcome == Outcome.OK]
    strongest = catalog.strongest()
    actual = sum(a.cost_usd for a in attempts)
    baseline = sum(strongest.cost(a.usage) for a in ok if a.usage is not None)
    if as_json:
        print(json.dumps({
            "calls": len(ok), "attempts": len(attempts),
            "cost_usd": actual, "strongest_model": strongest.key,
            "strongest_cost_usd": baseline,
            "saving": 1 - actual / baseline if baseline else None,
            "fallbacks": [a.__dict__ | {"usage": None} for a in attempts if a.outcome != Outcome.OK],
        }, indent=2, default=str))
        return

    console.print(f"[bold]frugalflow demo[/] - flow [cyan]{flow.name}[/] on catalog "
                  f"[cyan]{catalog.name}[/] (SIMULATED providers, no network), "
                  f"{n_tickets} tickets")
    console.print("Scripted faults: sim-groq goes down after its 2nd call; "
                  "sim-openai answers its 2nd call with 429 Retry-After 0.05 s\n")
    table = Table(title="Per node, per ticket")
    for col in ("ticket", "node", "model", "attempts", "tokens in/out", "cost $", "fallback"):
        table.add_column(col, justify="right" if col in ("attempts", "cost $") else "left")
    call_ids: dict[str, list[Attempt]] = {}
    for a in attempts:
        call_ids.setdefault(a.call_id, []).append(a)
    ticket_of: dict[str | None, int] = {}
    for tries in call_ids.values():
        final = tries[-1]
        ticket = ticket_of.setdefault(final.run_id, len(ticket_of) + 1)
        counts: dict[tuple[str, str | None], int] = {}
        for t in tries:
            if t.outcome != Outcome.OK:
                counts[(t.model, t.error_class)] = counts.get((t.model, t.error_class), 0) + 1
        why = "; ".join(f"{m} {cls} x{n}" for (m, cls), n in counts.items())
        usage = final.usage
        table.add_row(
            str(ticket), final.node, final.model if final.outcome == Outcome.OK else "FAILED",
            str(len(tries)),
            f"{usage.input_tokens}/{usage.output_tokens}" if usage else "-",
            f"{final.cost_usd:.6f}", why or "-",
        )
    console.print(table)
    console.print(
        f"\nTotal: [bold]${actual:.6f}[/] for {len(ok)} calls ({len(attempts)} attempts). "
        f"Every node on the single strongest model ({strongest.key}): ${baseline:.6f} "
        f"for the same tokens -> frugalflow cost {actual / baseline:.1%} of it "
        f"({baseline / actual:.1f}x cheaper)." if actual else "no cost recorded"
    )


# -- durable runs -------------------------------------------------------------------------

def _catalog(path: str | None) -> Catalog:
    return Catalog.from_file(path) if path else Catalog.default()


def _runner(db: str | None, catalog: str | None, flows: list[Flow[Any]],
            router: str | None = None, policy: str | None = None,
            timeout: float | None = None) -> Runner:
    """A runner for one command; `timeout`: --timeout (else FRUGALFLOW_TIMEOUT)."""
    from .runner import Runner

    return Runner(db, flows=flows, catalog=_catalog(catalog), router=router, policy=policy,
                  fallback=_fallback(timeout))


def _existing_store(db: str | None) -> Store:
    """A store for a read-only command: a database that does not exist is an error saying
    so (`StoreUnavailableError`, one line), never created (no file left by a typo)."""
    from .persistence import Store

    return Store(db, create=False)


def _check_policy(db: str | None, name: str | None, *, create: bool = True) -> None:
    """An unknown policy name: one line before anything runs (its own short-lived store;
    `create=False` for read-only commands)."""
    if not name:
        return
    from .measured import unknown_policy
    from .persistence import Store
    from .persistence.policy_store import PolicyStore

    async def check() -> None:
        store = Store(db, create=create)
        try:
            policies = PolicyStore(store)
            if await policies.version(name) is None:
                raise unknown_policy(name, {p.name for p in await policies.list()})
        finally:
            await store.close()

    asyncio.run(check())


def _parse_json(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise FrugalflowError(f"{what} is not valid JSON ({e.msg} at column {e.colno}): {text[:80]!r}") from None


async def _run_with_progress(runner: Runner,
                             start: Callable[[], Coroutine[Any, Any, RunResult]],
                             as_json: bool) -> RunResult:
    """Run `start()` showing its live progress (`frugalflow.progress`) unless `as_json`."""
    from .progress import RunProgress

    if as_json:
        return await start()
    async with runner.events.queue() as queue:
        with RunProgress(console) as progress:
            async def show() -> None:
                while True:
                    progress.event(await queue.get())

            printer = asyncio.create_task(show())
            try:
                return await start()
            finally:
                printer.cancel()
                # Events published before the run returned are shown, none is lost.
                while not queue.empty():
                    progress.event(queue.get_nowait())


_EXIT_CODES = ("Exit codes: 0 succeeded, 1 failed (or another error), 2 bad input, "
               "3 budget_exceeded, 4 interrupted (waiting for an answer), 5 cancelled, "
               "6 paused.")


@app.command(epilog=_EXIT_CODES)
def run(
    flow: str = typer.Argument(..., help="A flow in flows/ (e.g. support_triage) or path/to/file.py:attr."),
    input: str = typer.Option("{}", "--input", "-i",
                              help="The run's input as a JSON object (`frugalflow flows` "
                                   "lists each flow's fields)."),
    budget: float = typer.Option(None, "--budget", help="USD the run may spend."),
    db: str = DbOption, catalog: str = CatalogOption, as_json: bool = JsonOption,
    router: str = RouterOption, policy: str = PolicyOption, timeout: float = TimeoutOption,
    deadline: str = RunDeadlineOption,
) -> None:
    """Start a durable run: live per-node progress, then its result and a cost table."""
    due = timedelta(seconds=duration_seconds(deadline)) if deadline is not None else None
    try:
        _check_budget(budget)
        f = load_flow(flow)
        value = _parse_json(input, "--input")
        check_input(f, value)  # before anything is printed, opened or written
        asyncio.run(_start_or_resume(
            f, db, catalog, as_json, lambda r: r.start(f.name, value, budget=budget, deadline=due),
            router, policy, flow_arg=flow, timeout=timeout))
    except InputError as e:
        _bad_input(e)
    except FrugalflowError as e:
        _fail(e)


def _bad_input(error: InputError) -> NoReturn:
    """An input that does not fit the flow: one line, exit 2 (nothing was written)."""
    console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
    raise typer.Exit(code=ExitCode.BAD_INPUT)


@app.command(epilog=_EXIT_CODES)
def resume(
    run_id: str = typer.Argument(..., help="The run's id."),
    value: str = typer.Option(None, "--value", help="Answer to an interrupt, as JSON."),
    budget: float = typer.Option(None, "--budget", help="A new budget in USD."),
    flow: str = typer.Option(None, "--flow", help="Where the run's flow is defined, if not in flows/."),
    db: str = DbOption, catalog: str = CatalogOption, as_json: bool = JsonOption,
    router: str = RouterOption, policy: str = PolicyOption, timeout: float = TimeoutOption,
) -> None:
    """Resume a run from its last checkpoint (after a crash, a budget stop or an interrupt)."""
    try:
        _check_budget(budget)
        answer = _parse_json(value, "--value")
        asyncio.run(_resume(run_id, answer, budget, flow, db, catalog, as_json, router, policy,
                            timeout))
    except InputError as e:
        _bad_input(e)
    except FrugalflowError as e:
        _fail(e)


def _check_budget(budget: float | None) -> None:
    """--budget nan, inf, 0 or below would lift or break the cap: one line, exit 1."""
    from .flow import check_budget

    try:
        check_budget(budget)
    except ValueError as e:
        raise FrugalflowError(f"--budget: {e}") from None


async def _resume(run_id: str, answer: Any, budget: float | None, flow: str | None,
                  db: str | None, catalog: str | None, as_json: bool,
                  router: str | None = None, policy: str | None = None,
                  timeout: float | None = None) -> None:
    from .persistence.ledger import Ledger

    store = _existing_store(db)  # a mistyped --db or run id never creates a database
    try:
        row = await Ledger(store).get_run(run_id)
    finally:
        await store.close()
    f = load_flow(flow or row.flow)
    await _start_or_resume(f, db, catalog, as_json,
                           lambda r: r.resume(run_id, answer, budget=budget), router, policy,
                           flow_arg=flow, timeout=timeout)


async def _start_or_resume(f: Flow[Any], db: str | None, catalog: str | None, as_json: bool,
                           action: Callable[[Runner], Coroutine[Any, Any, RunResult]],
                           router: str | None = None, policy: str | None = None, *,
                           flow_arg: str | None = None, timeout: float | None = None) -> None:
    """Run `action`, then print its result, cost table and resume hint; exit with the
    run's status (`run_display.ExitCode`). `flow_arg` is the flow as the user named it."""
    runner = _runner(db, catalog, [f], router, policy, timeout)
    try:
        stored, _label = await runner.current_policy()  # an unknown name: one line, no run
        if stored is not None and stored.flow != f.name:
            raise FrugalflowError(f"policy {policy!r} is for flow {stored.flow!r}, not "
                                  f"{f.name!r}: name a policy stored for {f.name!r}")
        if not as_json:
            console.print(f"[bold]{f.name}[/] on catalog [cyan]{runner.catalog.name}[/], "
                          f"database {runner.store!r}")
        result = await _run_with_progress(runner, lambda: action(runner), as_json)
        record = await runner.get(result.run_id)
    finally:
        await runner.close()
    if as_json:
        print(json.dumps({"run_id": result.run_id, "status": result.status,
                          "cost_usd": result.cost_usd, "error": result.error,
                          "interrupts": result.interrupts, "state": result.state,
                          "cost_by_node": record.cost_by("node"),
                          "cost_by_model": record.cost_by("model"),
                          "exit_code": int(exit_code(result.status))}, indent=2, default=str))
    else:
        report(console, result, record, flow_arg=flow_arg, db=db, catalog=catalog)
    code = exit_code(result.status)
    if code != ExitCode.SUCCEEDED:
        raise typer.Exit(code=code)


runs_app = typer.Typer(help="Runs in the ledger.", invoke_without_command=True)
app.add_typer(runs_app, name="runs")


@runs_app.callback()
def runs(
    ctx: typer.Context,
    flow: str = typer.Option(None, "--flow", help="Only runs of this flow."),
    status: str = typer.Option(None, "--status",
                               help="Only runs in this status (succeeded, failed, "
                                    "budget_exceeded, interrupted, running, ...)."),
    limit: int = typer.Option(20, "--limit", min=1, help="How many runs to list."),
    db: str = DbOption, as_json: bool = JsonOption,
) -> None:
    """List recent runs (newest first)."""
    if ctx.invoked_subcommand is not None:
        return
    try:
        rows = asyncio.run(_ledger_call(db, lambda l: l.list_runs(flow=flow, status=status, limit=limit)))
    except FrugalflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    table = Table(title="runs")
    for col in ("id", "flow", "status", "cost $", "budget $", "created"):
        table.add_column(col)
    for r in rows:
        table.add_row(escape(r.id), escape(r.flow), r.status, f"{r.cost_usd:.6f}",
                      "-" if r.budget_usd is None else f"{r.budget_usd}", str(r.created_at)[:19])
    console.print(table)


@runs_app.command("show")
def runs_show(run_id: str, db: str = DbOption, as_json: bool = JsonOption) -> None:
    """One run: status, result (its final state), cost per node and model, every call."""
    try:
        record = asyncio.run(_ledger_call(db, lambda l: l.run_record(run_id)))
    except FrugalflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps({"run": record.run.model_dump(mode="json"),
                          "nodes": [n.model_dump(mode="json") for n in record.nodes],
                          "attempts": [a.model_dump(mode="json") for a in record.attempts],
                          "result": record.run.output},
                         indent=2))
        return
    r = record.run
    console.print(f"run [bold]{r.id}[/] flow {r.flow}: {r.status}, ${r.cost_usd:.6f}"
                  + (f" of ${r.budget_usd}" if r.budget_usd is not None else ""))
    if r.error:
        console.print(f"  error: {r.error.splitlines()[0]}")
    tiers = ("tier",) if any(a.tier not in (None, "standard") for a in record.attempts) else ()
    for key in ("node", "model", "provider", *tiers):
        costs = record.cost_by(key)
        console.print(f"  by {key}: " + ", ".join(f"{k} ${v:.6f}" for k, v in costs.items()))
    table = result_table(r.output)
    if table is not None:
        console.print(table)
    console.print(cost_table(record))


@app.command("flows")
def flows_cmd(
    flow: str = typer.Argument(None, help="Only this flow (a name in --flows, or "
                                          "path/to/file.py:attr)."),
    folder: str = typer.Option("flows", "--flows", help="Folder of flow modules."),
    as_json: bool = JsonOption,
) -> None:
    """Flows and the input each takes: its fields, their types, which are required."""
    from .flow_listing import flows_json, flows_table

    try:
        found = [load_flow(flow)] if flow else load_all_flows(folder)
    except FrugalflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps(flows_json(found), indent=2))
    else:
        console.print(flows_table(found))


@runs_app.command("feedback")
def runs_feedback(
    run_id: str = typer.Argument(..., help="The run's id (see `frugalflow runs`)."),
    good: bool = typer.Option(..., "--good/--bad", help="Was the answer good?"),
    node: str = typer.Option(None, "--node", help="Every answer of this node in the run."),
    call_id: str = typer.Option(None, "--call", help="Or this one call."),
    db: str = DbOption, as_json: bool = JsonOption,
) -> None:
    """Record whether a run's answer was good; `frugalflow router train` learns from it."""
    try:
        n = asyncio.run(_ledger_call(
            db, lambda l: l.run_feedback(run_id, good, node=node, call_id=call_id)))
    except FrugalflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps({"run_id": run_id, "good": good, "node": node, "call_id": call_id,
                          "marked": n}))
        return
    console.print(f"run {escape(run_id)}: {n} answer(s) marked {'good' if good else 'bad'}")


async def _ledger_call(db: str | None, fn: Callable[[Ledger], Awaitable[T]],
                       *, create: bool = False) -> T:
    """`fn` on the ledger of `db` (which must exist unless `create`)."""
    from .persistence import Store
    from .persistence.ledger import Ledger

    store = Store(db, create=create)
    try:
        return await fn(Ledger(store))
    finally:
        await store.close()


policy_app = typer.Typer(help="Stored node policies: measured pass rates and choices per node.",
                         no_args_is_help=True)
app.add_typer(policy_app, name="policy")


@policy_app.command("list")
def policy_list(db: str = DbOption, as_json: bool = JsonOption) -> None:
    """Stored node policies and their versions (runs use the newest version of a name)."""
    from .persistence.policy_store import PolicyStore, StoredPolicy

    async def stored() -> list[StoredPolicy]:
        store = _existing_store(db)
        try:
            return await PolicyStore(store).list()
        finally:
            await store.close()

    try:
        rows = asyncio.run(stored())
    except FrugalflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps([{"name": p.name, "version": p.version, "flow": p.flow,
                           "source": p.source, "created_at": str(p.created_at),
                           "policy": p.policy.model_dump(mode="json")} for p in rows], indent=2))
        return
    table = Table(title="node policies")
    for col in ("name", "version", "flow", "nodes (choice)", "source", "created"):
        table.add_column(col)
    for p in rows:
        nodes = ", ".join(f"{n} ({' / '.join(np.choice.models) if np.choice else '-'})"
                          for n, np in p.policy.nodes.items())
        table.add_row(escape(p.name), str(p.version), escape(p.flow), escape(nodes),
                      escape(p.source or ""), str(p.created_at)[:19])
    console.print(table)


router_app = typer.Typer(help="Learned routers stored in the database.", no_args_is_help=True)
app.add_typer(router_app, name="router")


@router_app.command("train")
def router_train(
    name: str = typer.Option("default", "--name", help="Stored as the next version of this name."),
    flow: str = typer.Option(None, "--flow", help="Only this flow's outcomes."),
    node: str = typer.Option(None, "--node", help="Only this node's outcomes."),
    min_examples: int = typer.Option(20, "--min-examples", min=1,
                                     help="Refuse to train on fewer outcomes than this."),
    force: bool = typer.Option(False, "--force",
                               help="Train even when every outcome is of one class "
                                    "(all successes or all failures)."),
    embeddings: bool = typer.Option(False, "--embeddings",
                                    help="MiniLM sentence embeddings (the embeddings extra) "
                                         "instead of lexical features."),
    db: str = DbOption, catalog: str = CatalogOption, as_json: bool = JsonOption,
) -> None:
    """Train a router on the ledger's outcomes (validator verdicts, feedback) and store it."""
    try:
        out = asyncio.run(_router_train(name, flow, node, min_examples, embeddings, db, catalog,
                                        force))
    except FrugalflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps(out, indent=2, default=str))
        return
    console.print(f"router [bold]{escape(out['name'])}[/] version {out['version']}: "
                  f"{out['examples']} outcomes ({out['successes']} successes) on "
                  f"{len(out['models'])} models; runs started with --router {out['name']} use it")


async def _router_train(name: str, flow: str | None, node: str | None, min_examples: int,
                        embeddings: bool, db: str | None, catalog: str | None,
                        force: bool = False) -> dict[str, Any]:
    from .learning import EmbeddingFeaturizer, embeddings_available, examples_from

    if embeddings and not embeddings_available():
        raise FrugalflowError("--embeddings needs the embeddings extra: "
                              "pip install 'frugalflow[embeddings]'")
    runner = _runner(db, catalog, [])
    try:
        examples = examples_from(await runner.ledger.outcomes(flow=flow, node=node))
        _check_outcomes([e.success for e in examples], min_examples, flow, node, force)
        # Training is CPU work off the event loop; a spinner says what is going on meanwhile.
        with console.status(f"training router {name!r} on {len(examples)} outcomes"
                            + (" (sentence embeddings)" if embeddings else "") + " ..."):
            router = await runner.retrain_router(
                name, flow=flow, node=node, min_examples=min_examples,
                featurizer=EmbeddingFeaturizer() if embeddings else None)
        if router is None:  # outcomes deleted between the check above and the training
            raise FrugalflowError(f"fewer than {min_examples} outcomes in the ledger now "
                                  "(--min-examples): try again")
        stored = [r for r in await runner.ledger.routers() if r["name"] == name][-1]
    finally:
        await runner.close()
    return {"name": name, "version": stored["version"], "examples": stored["examples"],
            "successes": stored["metrics"]["successes"], "models": router.models}


def _check_outcomes(successes: list[bool], min_examples: int, flow: str | None,
                    node: str | None, force: bool) -> None:
    """Too few outcomes, or (unless `force`) all of one class: one line, nothing stored."""
    where = " and ".join(f"{k} {v!r}" for k, v in (("flow", flow), ("node", node)) if v)
    scope = f" for {where}" if where else ""
    if len(successes) < min_examples:
        raise FrugalflowError(
            f"only {len(successes)} outcomes in the ledger{scope}; need {min_examples} "
            "(--min-examples): run flows whose nodes have a validator, or record feedback "
            "on their calls (frugalflow runs feedback)")
    if not force and len(set(successes)) == 1:
        kind = "successes" if successes[0] else "failures"
        other = "failures or bad feedback" if successes[0] else "successes or good feedback"
        raise FrugalflowError(
            f"{len(successes)} outcomes{scope}, all {kind}: a router cannot learn which inputs "
            f"fail; collect {other} first (frugalflow runs feedback RUN_ID --bad), "
            "or train anyway with --force")


@router_app.command("list")
def router_list(db: str = DbOption, as_json: bool = JsonOption) -> None:
    """Stored routers and their versions (the newest version of a name is the one used)."""
    try:
        rows = asyncio.run(_ledger_call(db, lambda l: l.routers()))
    except FrugalflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps(rows, indent=2, default=str))
        return
    table = Table(title="routers")
    for col in ("name", "version", "outcomes", "trained on", "created"):
        table.add_column(col)
    for r in rows:
        scope = ", ".join(f"{k}={v}" for k, v in (r["metrics"] or {}).items()
                          if k in ("flow", "node") and v) or "all outcomes"
        table.add_row(escape(r["name"]), str(r["version"]), str(r["examples"]), escape(scope),
                      str(r["created_at"])[:19])
    console.print(table)


@app.command()
def explain(
    flow: str = typer.Argument(..., help="A flow in flows/ or path/to/file.py:attr."),
    tokens: int = typer.Option(1000, "--tokens", help="Input tokens of the call to price."),
    catalog: str = CatalogOption, as_json: bool = JsonOption, policy: str = PolicyOption,
    db: str = typer.Option(None, "--db", help="Judge quality on what this database measured "
                                              "(production verdicts, and --policy)."),
    deadline: str = DeadlineOption,
) -> None:
    """Per node: candidate models in order, rejected models and why, expected cost range,
    and what was measured of each (with --policy or --db; else the prior only). With a
    deadline (a node's own Needs.deadline, else --deadline as the run's default, as at run
    time): each model's tiers and why others cannot serve."""
    left = duration_seconds(deadline) if deadline is not None else None
    try:
        compiled = load_flow(flow).compile(_catalog(catalog))
        if policy or db:
            _check_policy(db, policy, create=False)
            plan = asyncio.run(_measured_plan(compiled, db, policy, tokens, left))
        else:
            plan = explain_plan(compiled, tokens, left)
    except FrugalflowError as e:
        _fail(e)
    if as_json:
        print(json.dumps(plan, indent=2))
        return
    print_plan(compiled, plan, console)


async def _measured_plan(compiled: CompiledFlow, db: str | None, name: str | None,
                         tokens: int, deadline_s: float | None) -> dict[str, list[dict[str, Any]]]:
    """`explain_plan` with quality judged on what `db` measured (and policy `name`)."""
    from .measured import load_measurements
    from .persistence.policy_store import PolicyStore

    flow = compiled.flow
    store = _existing_store(db)
    try:
        stored = await PolicyStore(store).load(name) if name else None
        measured = await load_measurements(
            store, flow.name, policy=stored.policy if stored else None,
            label=f"policy {stored.name} v{stored.version}" if stored else None,
            validated={n for n, spec in flow.nodes.items() if spec.validator is not None})
    finally:
        await store.close()
    return explain_plan(compiled, tokens, deadline_s, measured)


def load_all_flows(folder: str = "flows") -> list[Flow[Any]]:
    """Every flow defined in `folder/*.py` (each module's `flow`); without a `flows` folder
    here, the installed ready-made flows."""
    if folder == "flows" and not Path(folder).is_dir():
        return [load_flow(name) for name in installed_flow_names()]
    if not Path(folder).is_dir():
        raise FrugalflowError(f"no flow folder {folder!r}: give --flows an existing folder")
    out = []
    for path in sorted(Path(folder).glob("*.py")):
        if path.stem.startswith("_"):
            continue
        out.append(load_flow(str(path)))
    return out


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host",
                             help="Interface to bind (0.0.0.0: every interface; then a token "
                                  "is required)."),
    port: int = typer.Option(8000, "--port", help="TCP port to listen on."),
    flows: str = typer.Option("flows", "--flows", help="Folder of flow modules to serve."),
    token: str = typer.Option(None, "--token", envvar="FRUGALFLOW_TOKEN",
                              help="Bearer token of an admin (a token or --tokens is required "
                                   "unless bound to loopback)."),
    tokens: str = typer.Option(None, "--tokens", envvar="FRUGALFLOW_TOKENS",
                               help="TOML file of named tokens: a table per name with "
                                    "token = \"...\" and role = \"admin\" or \"user\" "
                                    "(users see only their own runs)."),
    docs: str = typer.Option("token", "--docs",
                             help="OpenAPI schema and /docs: token (need a token), public, off."),
    max_concurrency: int = typer.Option(64, "--max-concurrency", min=1,
                                        help="Runs executed at once by this process."),
    db: str = DbOption, catalog: str = CatalogOption, router: str = RouterOption,
    policy: str = PolicyOption, timeout: float = TimeoutOption,
    as_json: bool = typer.Option(False, "--json",
                                 help="Print a JSON startup line (address, flows, catalog, "
                                      "database) instead of the readable one."),
) -> None:
    """Serve the HTTP API (runs, events, resume, cancel, flows, catalog) with uvicorn."""
    import uvicorn

    from .runner import Runner
    from .service import create_app

    try:
        _check_policy(db, policy)
        runner = Runner(db, flows=load_all_flows(flows), catalog=_catalog(catalog),
                        max_concurrency=max_concurrency, router=router, policy=policy,
                        fallback=_fallback(timeout))
        application = create_app(runner, token=token, tokens=tokens, host=host,
                                 docs=cast("Docs", docs))  # create_app checks the value
    except FrugalflowError as e:
        _fail(e)
    _startup_line(as_json, {"event": "serving", "url": f"http://{host}:{port}",
                            "viewer": f"http://{host}:{port}/ui",
                            "flows": sorted(runner.flows), "catalog": runner.catalog.name,
                            "database": repr(runner.store)})
    uvicorn.run(application, host=host, port=port, log_level="info")


def _startup_line(as_json: bool, facts: dict[str, Any]) -> None:
    """What a long-running command serves, as one JSON object (--json) or one line."""
    if as_json:
        print(json.dumps(facts, default=str), flush=True)
        return
    rest = ", ".join(f"{k} {', '.join(v) if isinstance(v, list) else v}"
                     for k, v in facts.items() if k != "event")
    console.print(f"frugalflow {facts['event']}: {escape(rest)}", soft_wrap=True)


@app.command()
def worker(
    db: str = typer.Option(None, "--db", envvar="FRUGALFLOW_DATABASE_URL",
                           help="PostgreSQL URL shared by the service and all workers."),
    flows: str = typer.Option("flows", "--flows", help="Folder of flow modules."),
    concurrency: int = typer.Option(8, "--concurrency", help="Runs executed at once."),
    queue: str = typer.Option("frugalflow", "--queue",
                              help="The procrastinate queue to take runs from."),
    lease_ttl: float = typer.Option(30.0, "--lease-ttl", help="Seconds a dead worker holds its runs."),
    stall_timeout: float = typer.Option(30.0, "--stall-timeout",
                                        help="Seconds without heartbeat before a worker's jobs are requeued."),
    redis: str = typer.Option(None, "--redis", envvar="FRUGALFLOW_REDIS_URL",
                              help="Share circuit breakers and rate limits through Redis (redis://host:6379/0)."),
    catalog: str = CatalogOption, router: str = RouterOption, policy: str = PolicyOption,
    timeout: float = TimeoutOption,
    as_json: bool = typer.Option(False, "--json",
                                 help="Print a JSON startup line (worker id, queue, "
                                      "concurrency) instead of the readable one."),
    batch_gather: float = typer.Option(30.0, "--batch-gather", help=(
        "Seconds a parked request waits for others of its model before its batch is sent.")),
    batch_max_items: int = typer.Option(None, "--batch-max-items", min=1,
                                        help="At most this many requests per batch."),
) -> None:
    """Execute dispatched runs (PostgreSQL + procrastinate), and send and follow the parked
    requests of waiting runs; start one per core or machine."""
    from .scale.dispatch import ProcrastinateDispatcher, run_worker
    from .scale.redis import RedisBreakerRegistry, RedisRateLimiter
    from .runner import Runner

    try:
        if not db or not db.startswith(("postgresql", "postgres")):
            raise FrugalflowError("workers need a PostgreSQL database: --db postgresql://... "
                                  "(or FRUGALFLOW_DATABASE_URL)")
        _check_policy(db, policy)
        dispatcher = ProcrastinateDispatcher(db, queue=queue, stall_timeout=stall_timeout,
                                             heartbeat=max(stall_timeout / 6, 0.2))
        runner = Runner(db, flows=load_all_flows(flows), catalog=_catalog(catalog),
                        dispatcher=dispatcher, lease_ttl=lease_ttl, max_concurrency=concurrency,
                        breakers=RedisBreakerRegistry(redis) if redis else None,
                        limiter=RedisRateLimiter(redis) if redis else None, router=router,
                        policy=policy, fallback=_fallback(timeout))
    except FrugalflowError as e:
        _fail(e)

    async def main() -> None:
        try:
            await run_worker(runner, concurrency=concurrency, queues=[queue],
                             poll_batches=runner.batch_poller(gather=batch_gather,
                                                              max_items=batch_max_items))
        finally:
            await runner.close()

    _startup_line(as_json, {"event": "worker", "holder": runner.holder, "queue": queue,
                            "concurrency": concurrency, "database": repr(runner.store)})
    asyncio.run(main())


def _fail(error: BaseException, code: int = 1) -> NoReturn:
    """The error's message (markup escaped: "[[models]]" stays as written), exit `code`
    (2 for a database that does not exist, like a bad option value)."""
    if isinstance(error, StoreUnavailableError) and error.missing:
        code = 2
    lines = str(error).splitlines() or [type(error).__name__]
    console.print(f"[red]error:[/] {escape(lines[0])}", soft_wrap=True)
    for line in lines[1:]:
        console.print(f"  {escape(line)}", soft_wrap=True)
    raise typer.Exit(code=code)


from .catalog_cli import add_catalog_command  # noqa: E402 (given _catalog and _fail)
from .eval_cli import add_eval_command  # noqa: E402 (given the helpers defined above)

add_catalog_command(app, catalog=_catalog, fail=_fail)

add_eval_command(app, load_flow=load_flow, catalog=_catalog)
add_costs_command(app, fail=_fail)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
