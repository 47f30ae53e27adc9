"""The `frugalflow` command line."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from .catalog import Catalog
from .exceptions import FrugalflowError
from .fallback import Attempt, BreakerRegistry, FallbackPolicy
from .flow import Flow

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="frugalflow: run each workflow step on the cheapest capable model.",
)
console = Console(width=None if sys.stdout.isatty() else 160)


@app.callback()
def _root() -> None:
    """frugalflow: run each workflow step on the cheapest capable model."""


def load_flow(name: str) -> Flow[Any]:
    """A flow named `flows/<name>.py` (its `flow`), or `path/to/file.py:attr`."""
    path_text, _, attr = name.partition(":")
    path = Path(path_text)
    if path.suffix != ".py":
        path = Path("flows") / f"{path_text}.py"
    attr = attr or "flow"
    if not path.exists():
        available = sorted(p.stem for p in Path("flows").glob("*.py") if p.stem != "__init__")
        raise FrugalflowError(
            f"no flow {name!r}: {path} does not exist"
            + (f" (flows here: {', '.join(available)})" if available else
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
    flow = getattr(module, attr, None)
    if not isinstance(flow, Flow):
        raise FrugalflowError(f"{path}:{attr} is not a frugalflow Flow")
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
) -> None:
    """Offline demo: support triage on simulated providers, one failing mid-run."""
    try:
        _demo(tickets, seed, as_json)
    except FrugalflowError as e:
        _fail(e)


def _demo(n_tickets: int, seed: int, as_json: bool) -> None:
    from .providers.simulated import simulator

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
        policy=FallbackPolicy(backoff_base=0.01, backoff_max=0.05),
        breakers=BreakerRegistry(),
    )

    attempts: list[Attempt] = []

    async def run_all() -> None:
        for ticket in _TICKETS[:n_tickets]:
            ctx = compiled.new_context(listeners=[attempts.append])
            await compiled.ainvoke({"ticket": ticket}, context=ctx)

    asyncio.run(run_all())

    ok = [a for a in attempts if a.outcome == "ok"]
    strongest = catalog.strongest()
    actual = sum(a.cost_usd for a in attempts)
    baseline = sum(strongest.cost(a.usage) for a in ok if a.usage is not None)
    if as_json:
        print(json.dumps({
            "calls": len(ok), "attempts": len(attempts),
            "cost_usd": actual, "strongest_model": strongest.key,
            "strongest_cost_usd": baseline,
            "saving": 1 - actual / baseline if baseline else None,
            "fallbacks": [a.__dict__ | {"usage": None} for a in attempts if a.outcome != "ok"],
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
            if t.outcome != "ok":
                counts[(t.model, t.error_class)] = counts.get((t.model, t.error_class), 0) + 1
        why = "; ".join(f"{m} {cls} x{n}" for (m, cls), n in counts.items())
        usage = final.usage
        table.add_row(
            str(ticket), final.node, final.model if final.outcome == "ok" else "FAILED",
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


def _fail(error: BaseException) -> None:
    lines = str(error).splitlines() or [type(error).__name__]
    console.print(f"[red]error:[/] {lines[0]}")
    for line in lines[1:]:
        console.print(f"  {line}")
    raise typer.Exit(code=1)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
