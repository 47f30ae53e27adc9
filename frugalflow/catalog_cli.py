"""The `frugalflow catalog` command: models, prices, quality per skill, availability, breakers."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable
from typing import NoReturn, TypedDict

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .catalog import SKILLS, Catalog
from .cli_options import CatalogOption, JsonOption
from .exceptions import FrugalflowError
from .resilience import Breakers

__all__ = ["add_catalog_command"]

console = Console(width=None if sys.stdout.isatty() else 160)


class _Hooks:
    """How the CLI finds a catalog and reports an error (set by `add_catalog_command`)."""

    catalog: Callable[[str | None], Catalog]
    fail: Callable[[BaseException], NoReturn]


_hooks = _Hooks()


def add_catalog_command(app: typer.Typer, *, catalog: Callable[[str | None], Catalog],
                        fail: Callable[[BaseException], NoReturn]) -> None:
    """Register `catalog` on the CLI `app`, loading catalogs and failing as the CLI does."""
    _hooks.catalog, _hooks.fail = catalog, fail
    app.command("catalog")(catalog_cmd)


class _CatalogRow(TypedDict):
    """One model in `frugalflow catalog` (also its --json output)."""

    model: str
    input_per_mtok: float
    output_per_mtok: float
    context: int
    capabilities: list[str]
    quality: dict[str, float]
    available: bool
    why_not: str | None
    simulated: bool
    breaker: str
    shared_state: str


def catalog_cmd(
    catalog: str = CatalogOption, as_json: bool = JsonOption,
    redis: str = typer.Option(None, "--redis", envvar="FRUGALFLOW_REDIS_URL",
                              help="Show the fleet's breakers shared through Redis."),
) -> None:
    """Models, prices, capabilities, quality scores per skill, availability and
    circuit-breaker state (the fleet's, shared through Redis, with --redis)."""
    from .resilience import default_breakers
    from .scale.redis import RedisBreakerRegistry

    try:
        cat = _hooks.catalog(catalog)
    except FrugalflowError as e:
        _hooks.fail(e)
    try:
        breakers = RedisBreakerRegistry(redis) if redis else default_breakers
    except ValueError as e:  # not a redis:// URL
        _hooks.fail(e)
    states, shared = asyncio.run(_breaker_states(breakers, {s.provider for s in cat}))
    rows: list[_CatalogRow] = []
    for s in cat:
        rows.append({
            "model": s.key, "input_per_mtok": s.input_price_per_mtok,
            "output_per_mtok": s.output_price_per_mtok, "context": s.window,
            "capabilities": [c for c, v in s.caps.model_dump().items() if v],
            "quality": s.quality, "available": cat.is_available(s),
            "why_not": cat.unavailable_reason(s), "simulated": s.simulated,
            "breaker": states[s.provider], "shared_state": shared,
        })
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    _catalog_table(cat.name, rows, shared)


def _catalog_table(name: str, rows: list[_CatalogRow], shared: str) -> None:
    """The catalog as a table: a quality column per scored skill ("—": not scored)."""
    skills = [k for k in SKILLS if any(k in r["quality"] for r in rows)]
    table = Table(title=f"catalog {escape(name)}", caption=_legend(skills))
    table.add_column("model", overflow="fold", min_width=20)
    for col in ("$/M in", "$/M out", "context"):
        table.add_column(col, justify="right", no_wrap=True)
    table.add_column("caps", no_wrap=True)
    for k in skills:
        table.add_column(_short(k), justify="right", no_wrap=True)
    table.add_column("available", overflow="fold")
    table.add_column("breaker", overflow="fold")
    for r in rows:
        scores = [f"{r['quality'][k]:.2f}" if k in r["quality"] else "—" for k in skills]
        table.add_row(escape(r["model"]), f"{r['input_per_mtok']:.3f}",
                      f"{r['output_per_mtok']:.3f}", _tokens(r["context"]),
                      "".join(_CAPS.get(c, c) for c in r["capabilities"]), *scores,
                      "yes" if r["available"] else f"no: {escape(r['why_not'] or '')}",
                      r["breaker"])
    console.print(table)
    console.print("quality: scores 0..1 per skill (— not scored)")
    console.print(f"shared state: {escape(shared)}"
                  + ("" if shared != "local" else " (this process's breakers only: --redis URL "
                     "or FRUGALFLOW_REDIS_URL shows the fleet's)"))


_CAPS = {"tool_calling": "T", "structured_output": "J", "vision": "V", "streaming": "S",
         "reasoning": "R"}
"""One letter per capability in the table (the --json output spells them out)."""


def _legend(skills: list[str]) -> str:
    shortened = ", ".join(f"{_short(k)} {k}" for k in skills if _short(k) != k)
    return ("caps: T tool calling, J structured output, V vision, S streaming, R reasoning"
            + (f"; skills: {shortened}" if shortened else ""))


def _tokens(n: int) -> str:
    """A context window in short: 1.0M, 128k, 8192."""
    return f"{n / 1e6:.1f}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 10_000 else str(n)


def _short(skill: str) -> str:
    """A skill's column header: at most 7 characters, so that a score per skill fits."""
    return skill if len(skill) <= 7 else skill[:6] + "."


async def _breaker_states(breakers: Breakers,
                          providers: set[str]) -> tuple[dict[str, str], str]:
    """Each provider's breaker state, and whether they are shared ("local" when not)."""
    from .scale.redis import RedisBreakerRegistry

    if not isinstance(breakers, RedisBreakerRegistry):
        return {p: (await breakers.astate(p)).value for p in providers}, "local"
    try:
        shared = await breakers.acheck()
        return {p: (await breakers.astate(p)).value for p in providers}, shared
    finally:
        await breakers.aclose()
