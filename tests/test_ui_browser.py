"""The run viewer in headless Chromium (Playwright): pages load without console errors, a run
started through the API appears and its timeline fills in live, cancel and feedback work from
the page, and the token prompt's cookie opens the pages while the API still wants a token."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from browser import Watched, open_browser
from playwright.async_api import Browser, expect
from served import served
from durable_flows import review_flow
from ui_flows import Gate, gated_flow

from frugalflow import Catalog
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.service import create_app
from frugalflow.testing.simulator import Simulator

pytestmark = pytest.mark.slow

TOKEN = "browser-test-token"


@dataclass
class Scene:
    browser: Browser
    url: str
    runner: Runner
    api: httpx.AsyncClient
    gate: Gate


@contextlib.asynccontextmanager
async def scene(tmp_path: Path, *, token: str | None = None) -> AsyncIterator[Scene]:
    gate = Gate()
    runner = Runner(f"sqlite:///{tmp_path / 'ui.db'}", flows=[gated_flow(gate), review_flow()],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry())
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    # The browser closes first: no page keeps an event stream open while the server stops.
    async with served(create_app(runner, token=token)) as url, open_browser() as browser, \
            httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as api:
        try:
            yield Scene(browser, url, runner, api, gate)
        finally:
            gate.release()  # a run still holding ends (the server's shutdown pauses it)


async def _start_and_hold(s: Scene, topic: str) -> str:
    """A run started through the API, held at `hold` after `first` answered."""
    started = await s.api.post("/runs", json={"flow": "gated", "input": {"topic": topic}})
    assert started.status_code == 202, started.text
    await asyncio.wait_for(s.gate.reached.wait(), 30)
    return str(started.json()["run_id"])


async def test_a_run_appears_and_its_timeline_fills_in_live(
        tmp_path: Path, sim: Simulator, request: pytest.FixtureRequest) -> None:
    sim.fail("sim-groq", "rate_limit", times=1)  # `first` falls back to another model
    async with scene(tmp_path) as s:
        run_id = await _start_and_hold(s, "<b>live</b> & well")
        page = await Watched.open(s.browser, request.node.name)
        p = page.page

        await page.visit(f"{s.url}/ui/runs")
        row = p.locator(f'tr[data-run="{run_id}"]')
        await expect(row).to_contain_text("running")
        await expect(row.locator("td").nth(7)).to_have_text("1")  # one fallback
        await page.shot("runs")

        await page.visit(f"{s.url}/ui/runs/{run_id}")
        await expect(p.locator("#run-status")).to_contain_text("running")
        first = p.locator('.execution[data-node="first"]')
        await expect(first.locator("tr.try")).to_have_count(2)
        await expect(first.locator("tr.fell-back")).to_contain_text("fell back")
        await expect(first.locator("tr.why").first).to_contain_text("rate_limit")
        await expect(p.locator('.execution[data-node="second"]')).to_have_count(0)
        await expect(p.locator("pre.value").last).to_contain_text("<b>live</b> & well")
        await page.shot("running")

        # The rest must arrive through the event stream: the page is not reloaded.
        await p.evaluate("window.stillTheSamePage = true")
        s.gate.release()
        await expect(p.locator("#run-status")).to_contain_text("succeeded")
        second = p.locator('.execution[data-node="second"]')
        await expect(second.locator('tr.try[data-outcome="ok"]')).to_have_count(1)
        await expect(p.locator('g.box[data-node="second"]')).to_contain_text("done")
        assert await p.evaluate("window.stillTheSamePage") is True
        await page.shot("succeeded")

        for where in ("costs", "catalog", "runs?status=succeeded&flow=gated"):
            await page.visit(f"{s.url}/ui/{where}")
        await expect(p.locator(f'tr[data-run="{run_id}"]')).to_have_count(1)
        await page.close()


async def test_token_prompt_then_feedback_and_cancel_from_the_page(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    async with scene(tmp_path, token=TOKEN) as s:
        run_id = await _start_and_hold(s, "to cancel")
        page = await Watched.open(s.browser, request.node.name)
        p = page.page

        await page.visit(f"{s.url}/ui/runs/{run_id}")  # -> the token prompt, then back
        await expect(p.locator("h1")).to_contain_text("needs a token")
        await p.fill("input[name=token]", "not-the-token")
        await p.click("button[type=submit]")
        await expect(p.locator(".error")).to_contain_text("not valid")
        await page.shot("token-prompt")
        await p.fill("input[name=token]", TOKEN)
        await p.click("button[type=submit]")
        await expect(p.locator("h1")).to_contain_text(run_id)
        cookie = next(c for c in await p.context.cookies() if c["name"] == "frugalflow_token")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/"
        # The cookie opens the pages, not the API for other clients.
        async with httpx.AsyncClient(base_url=s.url) as bare:
            assert (await bare.get("/runs")).status_code == 401

        await p.click('button[data-action="feedback"][data-node="first"][data-good="true"]')
        await expect(p.locator("#action-message")).to_contain_text("Feedback recorded")
        record = await s.runner.ledger.run_record(run_id)
        assert [a.feedback for a in record.attempts if a.node == "first"] == [True]

        await p.click('button[data-action="cancel"]')
        await expect(p.locator("#run-status")).to_contain_text("cancelled")
        assert (await s.runner.ledger.get_run(run_id)).status == "cancelled"
        await expect(p.locator('button[data-action="cancel"]')).to_have_count(0)
        await page.shot("cancelled")

        await p.click("text=Log out")
        await expect(p.locator("h1")).to_contain_text("needs a token")
        assert not [c for c in await p.context.cookies() if c["name"] == "frugalflow_token"]
        await page.close()


async def test_an_interrupted_run_is_resumed_from_the_page(
        tmp_path: Path, request: pytest.FixtureRequest) -> None:
    async with scene(tmp_path) as s:
        r = await s.api.post("/runs", json={"flow": "review", "input": {"text": "hello"},
                                            "wait": True})
        run_id = r.json()["run_id"]
        page = await Watched.open(s.browser, request.node.name)
        p = page.page
        await page.visit(f"{s.url}/ui/runs/{run_id}")
        await expect(p.locator("#run-status")).to_contain_text("interrupted")
        await expect(p.locator("section", has_text="Waiting for an answer")).to_contain_text(
            "approve this draft?")
        await p.fill("form[data-action=resume] input[name=value]", "yes")
        await page.shot("interrupted")
        await p.click("form[data-action=resume] button[type=submit]")
        await expect(p.locator("#action-message")).to_contain_text("Resumed")
        await expect(p.locator("#run-status")).to_contain_text("succeeded")
        assert (await s.runner.ledger.get_run(run_id)).output["verdict"] == "yes"  # type: ignore[index]
        await page.close()


async def test_the_readme_screenshot_regenerates(tmp_path: Path) -> None:
    import importlib.util

    script = Path(__file__).resolve().parent.parent / "examples" / "screenshot.py"
    spec = importlib.util.spec_from_file_location("screenshot", script)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    png = await module.screenshot(tmp_path / "run-page.png")
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert int.from_bytes(data[16:20], "big") == 1200  # the IHDR width
