"""The Costs and Catalog & health pages in headless Chromium (Playwright): they load without
console errors, chart the runs the test makes, and show a provider's breaker opening after an
outage, in this process and shared by a fleet through Redis. Screenshots in test-artifacts/."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from browser import Watched, open_browser
from durable_flows import chain_flow
from playwright.async_api import Browser, expect
from served import served

from frugalflow import Catalog
from frugalflow.exceptions import ProviderOverloadedError
from frugalflow.resilience import BreakerRegistry, BreakerState, Breakers
from frugalflow.runner import Runner
from frugalflow.scale.redis import RedisBreakerRegistry
from frugalflow.service import create_app
from frugalflow.testing.simulator import Simulator

pytestmark = pytest.mark.slow

TOKEN = "costs-browser-token"


@contextlib.asynccontextmanager
async def scene(tmp_path: Path, breakers: Breakers
                ) -> AsyncIterator[tuple[Browser, str, Runner, httpx.AsyncClient]]:
    runner = Runner(f"sqlite:///{tmp_path / 'ui.db'}", flows=[chain_flow(2)],
                    catalog=Catalog.simulated(), breakers=breakers)
    async with open_browser() as browser, served(create_app(runner, token=TOKEN)) as url, \
            httpx.AsyncClient(base_url=url, timeout=60,
                              headers={"Authorization": f"Bearer {TOKEN}"}) as api:
        yield browser, url, runner, api


async def run_chain(api: httpx.AsyncClient, topic: str) -> str:
    r = await api.post("/runs", json={"flow": "chain", "input": {"topic": topic},
                                      "wait": True})
    assert r.status_code == 200 and r.json()["status"] == "succeeded", r.text
    return str(r.json()["run_id"])


async def sign_in(page: Watched, url: str, where: str) -> None:
    """Through the token prompt: the pages are behind the same token as the API."""
    await page.page.goto(f"{url}{where}")
    await page.page.fill("input[name=token]", TOKEN)
    await page.page.click("button[type=submit]")
    await page.page.wait_for_url(f"{url}{where}")
    page.check()


async def test_costs_and_catalog_pages_show_the_runs_and_an_outage(
        tmp_path: Path, sim: Simulator, request: pytest.FixtureRequest) -> None:
    breakers = BreakerRegistry(threshold=2, cooldown=600)
    async with scene(tmp_path, breakers) as (browser, url, runner, api):
        runs = [await run_chain(api, f"costs {i}") for i in range(2)]
        attempts = [a for r in runs for a in (await runner.get(r)).attempts]
        spent = sum(a.cost_usd for a in attempts)
        page = await Watched.open(browser, request.node.name)
        p = page.page
        await sign_in(page, url, "/ui/costs")
        shown = await p.locator("#total-cost").get_attribute("data-value")
        assert shown is not None and float(shown) == pytest.approx(spent)
        for sid in ("by-day", "by-model", "by-node", "by-flow"):
            await expect(p.locator(f"#{sid} svg[role=img]")).to_have_count(1)
        # Only today has runs: one column of the week's bars is drawn, stacked by the models
        # that spent (six at most, the rest as "other").
        models = {a.model for a in attempts}
        paid = {a.model for a in attempts if a.cost_usd > 0}
        await expect(p.locator("#by-day svg g.ff-bar rect")).to_have_count(
            len(paid) if len(paid) <= 6 else 7)
        await expect(p.locator("#by-day svg g.ff-bar:has(rect)")).to_have_count(1)
        await expect(p.locator("#by-model svg g.ff-bar rect")).to_have_count(len(models))
        await expect(p.locator("#by-node svg g.ff-bar rect")).to_have_count(2)  # n1, n2
        for m in models:
            await expect(p.locator("#by-model svg")).to_contain_text(m[:25])
        await page.shot("costs")
        await p.select_option("select[name=days]", "30")
        await p.click("form.filters button[type=submit]")
        await expect(p.locator("select[name=days]")).to_have_value("30")
        await expect(p.locator("#by-day svg g.ff-bar")).to_have_count(30)
        page.check()
        await page.shot("costs-30-days")

        await page.visit(f"{url}/ui/catalog")
        provider = attempts[0].provider
        group = p.locator(f'tbody[data-provider="{provider}"]')
        await expect(group.locator("tr.provider [data-breaker]")).to_have_text("closed")
        await page.shot("catalog")

        # The provider that served the runs goes down: the next run falls back, its
        # breaker opens, and the page says so.
        sim.down(provider)
        await run_chain(api, "outage")
        assert await breakers.astate(provider) is BreakerState.OPEN
        await page.visit(f"{url}/ui/catalog")
        await expect(group.locator("tr.provider [data-breaker]")).to_have_text("open")
        await expect(group).to_contain_text("circuit open")
        await expect(p.locator("#shared-state")).to_have_attribute("data-shared", "local")
        await page.shot("catalog-outage")
        await page.close()


async def test_a_breaker_opened_by_another_worker_shows_through_redis(
        tmp_path: Path, redis_url: str, request: pytest.FixtureRequest) -> None:
    prefix = f"frugalflow:test-ui:{uuid.uuid4().hex}:"
    # Redis gets 5 s: on a loaded machine the default 0.5 s can pass, and the registry
    # would then rightly fall back to local state.
    ours = RedisBreakerRegistry(redis_url, prefix=prefix, threshold=2, cooldown=600, timeout=5)
    theirs = RedisBreakerRegistry(redis_url, prefix=prefix, threshold=2, cooldown=600,
                                  timeout=5)
    try:
        async with scene(tmp_path, ours) as (browser, url, runner, api):
            spec = next(iter(runner.catalog))
            page = await Watched.open(browser, request.node.name)
            p = page.page
            await sign_in(page, url, "/ui/catalog")
            shared = p.locator("#shared-state")
            await expect(shared).to_have_attribute("data-shared", "ok")
            group = p.locator(f'tbody[data-provider="{spec.provider}"]')
            await expect(group.locator("tr.provider [data-breaker]")).to_have_text("closed")

            # Another worker of the fleet sees the provider fail; this service never called it.
            for _ in range(2):
                await theirs.arecord(spec, ProviderOverloadedError("503 overloaded"))
            await page.visit(f"{url}/ui/catalog")
            await expect(group.locator("tr.provider [data-breaker]")).to_have_text("open")
            await expect(shared).to_contain_text("shared through Redis")
            await page.shot("catalog-redis")
            await page.close()
    finally:
        await theirs.areset()
        await theirs.aclose()
        await ours.aclose()
