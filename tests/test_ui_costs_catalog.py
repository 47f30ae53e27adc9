"""The run viewer's Costs and Catalog & health pages without a browser (httpx on the ASGI app):
totals and charts from runs the test makes, who sees whose costs, the window and flow filters,
every model with its prices and breaker, and a provider's breaker opening."""

from __future__ import annotations

import contextlib
import re
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from durable_flows import chain_flow, review_flow

from frugalflow import Catalog
from frugalflow.exceptions import ProviderOverloadedError
from frugalflow.resilience import BreakerRegistry, Breakers
from frugalflow.runner import Runner
from frugalflow.service import Principal, create_app
from frugalflow.usage import Attempt, Outcome

ADMIN, ALICE = "costs-admin-token", "costs-alice-token"
TOKENS = {ADMIN: Principal("root", "admin"), ALICE: Principal("alice", "user")}
SVG = re.compile(r"<svg .*?</svg>", re.S)


@contextlib.asynccontextmanager
async def viewer(db: str, *, catalog: Catalog | None = None,
                 breakers: Breakers | None = None,
                 tokens: dict[str, Principal] | None = TOKENS,
                 ) -> AsyncIterator[tuple[httpx.AsyncClient, Runner]]:
    runner = Runner(db, flows=[chain_flow(2), review_flow()],
                    catalog=catalog or Catalog.simulated(),
                    breakers=breakers or BreakerRegistry())
    await runner.setup()  # ASGITransport runs no lifespan
    try:
        async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(runner, tokens=tokens)),
                base_url="http://viewer.test") as client:
            yield client, runner
    finally:
        await runner.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def start(client: httpx.AsyncClient, token: str, flow: str = "chain") -> dict[str, Any]:
    body = {"topic": "costs"} if flow == "chain" else {"text": "a draft"}
    r = await client.post("/runs", json={"flow": flow, "input": body, "wait": True},
                          headers=bearer(token))
    assert r.status_code == 200, r.text
    return dict(r.json())


def section(html: str, sid: str) -> str:
    found = re.search(rf'<section[^>]*id="{sid}".*?</section>', html, re.S)
    assert found, f"no section {sid}"
    return found.group(0)


def chart(html: str, sid: str) -> ET.Element:
    svg = SVG.search(section(html, sid))
    assert svg, f"no chart in {sid}"
    return ET.fromstring(svg.group(0))


def bar_values(svg: ET.Element) -> list[float]:
    return [float(r.get("data-value", "0")) for r in svg.iter("{http://www.w3.org/2000/svg}rect")
            if r.get("data-value")]


def total_shown(html: str) -> float:
    found = re.search(r'id="total-cost" data-value="([^"]+)"', html)
    assert found
    return float(found.group(1))


async def test_costs_page_charts_the_runs_made(db_url: str) -> None:
    async with viewer(db_url) as (client, runner):
        runs = [await start(client, ADMIN) for _ in range(2)] + [await start(client, ADMIN,
                                                                              "review")]
        spent = sum(r["cost_usd"] for r in runs)
        assert spent > 0
        page = await client.get("/ui/costs", headers=bearer(ADMIN))
        assert page.status_code == 200
        html = page.text
        assert total_shown(html) == pytest.approx(spent)
        assert sum(bar_values(chart(html, "by-day"))) == pytest.approx(spent)
        assert sum(bar_values(chart(html, "by-flow"))) == pytest.approx(spent)
        assert sum(bar_values(chart(html, "by-node"))) == pytest.approx(spent)
        models = {a.model for r in runs for a in (await runner.get(r["run_id"])).attempts}
        by_model = section(html, "by-model")
        assert all(m in by_model for m in models)
        for node in ("chain · n1", "chain · n2", "review · draft"):
            assert node in section(html, "by-node")
        assert 'selected>last 7 days' in html
        # The flow filter: only the review run's cost.
        review = await client.get("/ui/costs?days=30&flow=review", headers=bearer(ADMIN))
        assert total_shown(review.text) == pytest.approx(runs[2]["cost_usd"])
        assert "chain" not in section(review.text, "by-node")
        assert 'selected>last 30 days' in review.text


async def test_a_user_sees_only_its_own_runs_costs(tmp_path: Path) -> None:
    async with viewer(f"sqlite:///{tmp_path / 'c.db'}") as (client, _):
        mine = await start(client, ALICE)
        theirs = [await start(client, ADMIN, "review"), await start(client, ADMIN)]
        alice = (await client.get("/ui/costs", headers=bearer(ALICE))).text
        assert total_shown(alice) == pytest.approx(mine["cost_usd"])
        assert "review" not in section(alice, "by-flow")
        assert "only the runs alice started" in alice
        root = (await client.get("/ui/costs", headers=bearer(ADMIN))).text
        assert total_shown(root) == pytest.approx(
            mine["cost_usd"] + sum(r["cost_usd"] for r in theirs))
        anonymous = await client.get("/ui/costs")
        assert anonymous.status_code == 303 and "/ui/login" in anonymous.headers["location"]


async def test_bad_window_is_one_line_and_empty_window_says_so(tmp_path: Path) -> None:
    async with viewer(f"sqlite:///{tmp_path / 'c.db'}") as (client, _):
        page = await client.get("/ui/costs?days=5", headers=bearer(ADMIN))
        assert page.status_code == 200
        assert "days &#39;5&#39; is not offered: use one of 1, 7, 30, 90" in page.text
        assert "Nothing spent in this window" in section(page.text, "by-day")
        assert total_shown(page.text) == 0


async def test_hostile_names_in_the_ledger_are_shown_as_text(tmp_path: Path) -> None:
    hostile = '<script>alert("x")</script>'
    async with viewer(f"sqlite:///{tmp_path / 'c.db'}") as (client, runner):
        await runner.ledger.record_attempt(
            Attempt(node=hostile, model=f"sim:{hostile}", provider="sim", outcome=Outcome.OK,
                    call_id="c1", cost_usd=0.000097), flow=hostile)
        await runner.ledger.flush_attempts()
        html = (await client.get("/ui/costs?days=1", headers=bearer(ADMIN))).text
        assert "<script>alert" not in html
        assert "&lt;script&gt;" in section(html, "by-flow")
        assert "$0.000097" in html
        for sid in ("by-day", "by-model", "by-node", "by-flow"):
            chart(html, sid)  # well-formed XML


async def test_catalog_page_lists_models_prices_and_health(tmp_path: Path) -> None:
    cat = Catalog.simulated()
    unscored = next(iter(cat))
    cat = cat.override(unscored.key, quality={})
    async with viewer(f"sqlite:///{tmp_path / 'c.db'}", catalog=cat) as (client, runner):
        page = await client.get("/ui/catalog", headers=bearer(ALICE))
        assert page.status_code == 200
        html = page.text
        for spec in cat:
            row = re.search(rf'<tr data-model="{re.escape(spec.key)}">.*?</tr>', html, re.S)
            assert row, spec.key
            assert f"{spec.input_price_per_mtok:.3f}" in row.group(0)
            assert f"{spec.output_price_per_mtok:.3f}" in row.group(0)
            assert 'data-breaker="closed"' in row.group(0)
        row = re.search(rf'<tr data-model="{re.escape(unscored.key)}">.*?</tr>', html, re.S)
        assert row and "—" in row.group(0)
        for provider in cat.providers:
            assert f'<tbody data-provider="{provider}">' in html
        health = section(html, "health")
        assert "sqlite: reachable" in health
        assert re.search(r"Schema version</dt><dd>\d+</dd>", health)
        assert 'data-shared="local"' in health


async def test_an_open_breaker_shows_on_the_catalog_page(tmp_path: Path) -> None:
    breakers = BreakerRegistry(threshold=2, cooldown=600)
    async with viewer(f"sqlite:///{tmp_path / 'c.db'}", breakers=breakers) as (client, runner):
        spec = next(iter(runner.catalog))
        for _ in range(2):
            await breakers.arecord(spec, ProviderOverloadedError("503 overloaded"))
        html = (await client.get("/ui/catalog", headers=bearer(ADMIN))).text
        group = re.search(rf'<tbody data-provider="{re.escape(spec.provider)}">.*?</tbody>',
                          html, re.S)
        assert group
        head = group.group(0).split("</tr>")[0]
        assert 'data-breaker="open"' in head
        assert "circuit open" in group.group(0)
        others = [p for p in runner.catalog.providers if p != spec.provider]
        other = re.search(rf'<tbody data-provider="{re.escape(others[0])}">.*?</tr>', html,
                          re.S)
        assert other and 'data-breaker="closed"' in other.group(0)


async def test_a_model_without_its_key_says_which_variable(tmp_path: Path) -> None:
    from frugalflow.catalog import ModelSpec

    real = ModelSpec(provider="openai", model="gpt-4o-mini")
    cat = Catalog([*Catalog.simulated(), real], name="mixed")
    async with viewer(f"sqlite:///{tmp_path / 'c.db'}", catalog=cat) as (client, _):
        html = (await client.get("/ui/catalog", headers=bearer(ADMIN))).text
        row = re.search(r'<tr data-model="openai/gpt-4o-mini">.*?</tr>', html, re.S)
        assert row
        assert "provider not configured: set OPENAI_API_KEY" in row.group(0)
        group = re.search(r'<tbody data-provider="openai">.*?</tr>', html, re.S)
        assert group and re.search(r"<code>OPENAI_API_KEY</code>\s*<span class=\"warn\">not set",
                                   group.group(0))


async def test_pages_at_a_router_prefix_link_within_it(tmp_path: Path) -> None:
    from fastapi import FastAPI

    from frugalflow.service import create_router

    runner = Runner(f"sqlite:///{tmp_path / 'c.db'}", flows=[chain_flow(2)],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry())
    app = FastAPI()
    app.include_router(create_router(runner, tokens=TOKENS, ui=True), prefix="/ff")
    await runner.setup()
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://viewer.test") as client:
            for page in ("costs", "catalog"):
                r = await client.get(f"/ff/ui/{page}", headers=bearer(ADMIN))
                assert r.status_code == 200
                assert 'href="/ff/ui/costs"' in r.text and 'href="/ff/ui/catalog"' in r.text
            costs = (await client.get("/ff/ui/costs", headers=bearer(ADMIN))).text
            assert 'action="/ff/ui/costs"' in costs
    finally:
        await runner.close()


async def test_health_says_when_redis_is_unreachable(tmp_path: Path) -> None:
    import socket

    from frugalflow.scale.redis import RedisBreakerRegistry

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    breakers = RedisBreakerRegistry(f"redis://127.0.0.1:{port}/0", prefix="ff-ui-test:")
    async with viewer(f"sqlite:///{tmp_path / 'c.db'}",
                      breakers=breakers) as (client, runner):
        html = (await client.get("/ui/catalog", headers=bearer(ADMIN))).text
        health = section(html, "health")
        assert 'data-shared="unavailable"' in health and "Redis unreachable" in health
        assert html.count('data-breaker="closed"') >= len(list(runner.catalog))
    await breakers.aclose()
