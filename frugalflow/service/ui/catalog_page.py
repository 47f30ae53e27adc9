"""The run viewer's Catalog & health page: every model by provider (prices, context window,
capabilities, quality per skill, availability), the breakers' states (the fleet's when they
are shared through Redis), and the service's health (database, schema, executing runs)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from fastapi import APIRouter, Depends, Request
from starlette.responses import HTMLResponse

from ...catalog import SKILLS, ModelSpec
from ...exceptions import StoreError
from ...runner import Runner
from .context import UI, Viewer

__all__ = ["CatalogView", "Health", "ModelLine", "ProviderGroup", "add_catalog_page",
           "catalog_view"]

UNSCORED = "—"
_NOT_CONFIGURED = "provider not configured"  # Catalog.unavailable_reason's words for "no key"
DB_TIMEOUT = 5.0  # seconds the schema version may take before the database counts as down


@dataclass(frozen=True)
class ModelLine:
    """One model as the page shows it."""

    key: str
    model: str
    input_per_mtok: float
    output_per_mtok: float
    context: int
    capabilities: list[str]
    quality: list[str]
    """A score per skill column, "—" where the model is not scored."""
    available: bool
    why_not: str | None
    simulated: bool
    breaker: str
    blocked: str | None
    """Why calls to it are held back now (its breaker or its provider's, a Retry-After)."""


@dataclass(frozen=True)
class ProviderGroup:
    """A provider: its breaker (shared by its models) and its models."""

    name: str
    breaker: str
    key_env: str | None
    """The environment variable its API key comes from (never its value)."""
    key_set: bool
    models: list[ModelLine]


@dataclass(frozen=True)
class Health:
    """What GET /health tells an authenticated caller."""

    version: str
    dialect: str
    reachable: bool
    schema_version: int | None
    executing: int
    flows: list[str]
    shared_state: str
    """"ok" (breakers and limits shared through Redis), "unavailable" (Redis is down: this
    process uses its own state until it is back) or "local" (nothing is shared)."""


@dataclass(frozen=True)
class CatalogView:
    name: str
    skills: list[str]
    providers: list[ProviderGroup]
    health: Health


async def _state(runner: Runner, key: str) -> str:
    return (await runner.breakers.astate(key)).value


async def _blocked(runner: Runner, spec: ModelSpec) -> str | None:
    return (await runner.breakers.ablocked_reason(spec)
            or await runner.breakers.acooldown_reason(spec))


async def health(runner: Runner) -> Health:
    """The service's health, as /health details it (database, schema, runs, shared state)."""
    from ... import __version__
    from ...scale.redis import acheck_shared_state

    try:
        schema: int | None = await asyncio.wait_for(runner.store.version(), DB_TIMEOUT)
    except (StoreError, asyncio.TimeoutError):
        schema = None
    shared = await acheck_shared_state(runner.breakers, runner.limiter)
    return Health(version=__version__, dialect=runner.store.dialect,
                  reachable=schema is not None, schema_version=schema,
                  executing=len(runner.executing), flows=sorted(runner.flows),
                  shared_state=shared)


async def catalog_view(runner: Runner) -> CatalogView:
    """The catalog with each breaker's state read now (from Redis when shared: checked
    first, so a fleet's open breaker shows even if this process saw no failure)."""
    cat = runner.catalog
    state_of_health = await health(runner)  # also re-checks Redis before states are read
    specs = list(cat)
    providers = sorted({s.provider for s in specs})
    # One round trip each with Redis: ask them all at once.
    p_states, m_states, blocked = await asyncio.gather(
        asyncio.gather(*(_state(runner, p) for p in providers)),
        asyncio.gather(*(_state(runner, s.key) for s in specs)),
        asyncio.gather(*(_blocked(runner, s) for s in specs)))
    skills = [k for k in SKILLS if any(k in s.quality for s in specs)]
    lines: dict[str, list[ModelLine]] = {p: [] for p in providers}
    for spec, state, why in zip(specs, m_states, blocked):
        lines[spec.provider].append(ModelLine(
            key=spec.key, model=spec.model, input_per_mtok=spec.input_price_per_mtok,
            output_per_mtok=spec.output_price_per_mtok, context=spec.window,
            capabilities=[c for c, v in spec.caps.model_dump().items() if v],
            quality=[f"{spec.quality[k]:.2f}" if k in spec.quality else UNSCORED
                     for k in skills],
            available=cat.is_available(spec), why_not=cat.unavailable_reason(spec),
            simulated=spec.simulated, breaker=state, blocked=why))
    groups = []
    for name, p_state in zip(providers, p_states):
        first = next(s for s in specs if s.provider == name)
        env = None if first.simulated else (first.api_key_env or first.adapter.key_env(first))
        groups.append(ProviderGroup(name=name, breaker=p_state, key_env=env,
                                    key_set=env is not None and not any(
                                        _NOT_CONFIGURED in (m.why_not or "")
                                        for m in lines[name]),
                                    models=lines[name]))
    return CatalogView(name=cat.name, skills=skills, providers=groups, health=state_of_health)


CAPS = {"tool_calling": "T", "structured_output": "J", "vision": "V", "streaming": "S",
        "reasoning": "R"}
"""One letter per capability, as `frugalflow catalog` shows them (the full name on hover)."""


def short_skill(skill: str) -> str:
    """A skill's column header: at most 7 characters, so that a score per skill fits."""
    return skill if len(skill) <= 7 else skill[:6] + "."


def context_window(n: int) -> str:
    """A context window in short: 1.0M, 128k, 8192."""
    return f"{n / 1e6:.1f}M" if n >= 1_000_000 else f"{n // 1000}k" if n >= 10_000 else str(n)


def add_catalog_page(router: APIRouter, ui: UI) -> None:
    """/ui/catalog: models, prices, breakers and health."""
    ui.env.filters.setdefault("window", context_window)
    ui.env.filters.setdefault("short_skill", short_skill)

    @router.get("/ui/catalog", name="frugalflow_ui_catalog", include_in_schema=False)
    async def catalog_page(request: Request,
                           viewer: Viewer = Depends(ui.viewer)) -> HTMLResponse:
        return await ui.page(request, "catalog.html", viewer=viewer, nav="catalog",
                             v=await catalog_view(ui.runner), caps=CAPS)
