"""The run viewer's pages without a browser (httpx on the ASGI app): the token prompt and its
cookie, CSRF refusals, who sees which runs, filters, and stored values shown as text."""

from __future__ import annotations

import contextlib
import re
from urllib.parse import quote
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypedDict

import httpx
import pytest
from durable_flows import chain_flow, review_flow
from fastapi import FastAPI

from frugalflow import Catalog
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.service import Principal, create_app, create_router
from frugalflow.service.ui.graph import layout
from frugalflow.statuses import ErrorClass, Outcome
from frugalflow.testing.simulator import Simulator
from frugalflow.usage import Attempt

TOKEN = "ui-admin-token"
TOKENS = {TOKEN: Principal("root", "admin"), "ui-alice-token": Principal("alice", "user")}
FORM = {"content-type": "application/x-www-form-urlencoded"}
BASE = "http://viewer.test"


@contextlib.asynccontextmanager
async def viewer(tmp_path: Path, *, tokens: dict[str, Principal] | None = None,
                 app: FastAPI | None = None) -> AsyncIterator[tuple[httpx.AsyncClient, Runner]]:
    runner = Runner(f"sqlite:///{tmp_path / 'ui.db'}", flows=[chain_flow(2), review_flow()],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry())
    await runner.setup()  # ASGITransport runs no lifespan
    try:
        async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app or create_app(runner, tokens=tokens)),
                base_url=BASE) as client:
            yield client, runner
    finally:
        await runner.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def start(client: httpx.AsyncClient, token: str | None, **body: Any) -> str:
    body.setdefault("flow", "chain")
    body.setdefault("input", {"topic": "t"})
    r = await client.post("/runs", json={"wait": True, **body},
                          headers=bearer(token) if token else {})
    assert r.status_code == 200, r.text
    return str(r.json()["run_id"])


async def login(client: httpx.AsyncClient, token: str, next: str = "/ui/runs",
                prefix: str = "") -> httpx.Response:
    return await client.post(f"{prefix}/ui/login", content=f"token={token}&next={next}",
                             headers={**FORM, "Origin": BASE})


async def test_token_prompt_sets_a_strict_cookie_the_api_accepts(tmp_path: Path) -> None:
    async with viewer(tmp_path, tokens=TOKENS) as (client, _):
        run_id = await start(client, TOKEN)
        r = await client.get(f"/ui/runs/{run_id}?x=1")
        assert r.status_code == 303
        assert r.headers["location"] == f"/ui/login?next=/ui/runs/{run_id}%3Fx%3D1"
        wrong = await login(client, "nope")
        assert wrong.status_code == 200 and "not valid" in wrong.text
        assert "set-cookie" not in wrong.headers
        ok = await login(client, TOKEN, next=f"/ui/runs/{run_id}")
        assert ok.status_code == 303 and ok.headers["location"] == f"/ui/runs/{run_id}"
        cookie = ok.headers["set-cookie"].lower()
        for part in ("frugalflow_token=", "httponly", "samesite=strict", "path=/"):
            assert part in cookie
        assert "secure" not in cookie  # plain http here; https adds Secure
        page = await client.get(f"/ui/runs/{run_id}")
        assert page.status_code == 200 and "root (admin)" in page.text
        csp = page.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
        assert (await client.get("/runs")).status_code == 200  # the cookie, for EventSource
        # A request with a wrong Authorization header is not rescued by the cookie.
        assert (await client.get("/runs", headers=bearer("wrong"))).status_code == 401
        out = await client.post("/ui/logout", headers={"Origin": BASE})
        assert out.status_code == 303 and 'frugalflow_token=""' in out.headers["set-cookie"]
        client.cookies.clear()
        assert (await client.get("/runs")).status_code == 401


async def test_cookie_writes_need_the_csrf_header_and_the_same_origin(tmp_path: Path) -> None:
    async with viewer(tmp_path, tokens=TOKENS) as (client, _):
        run_id = await start(client, TOKEN, flow="review", input={"text": "hi"})
        await login(client, TOKEN)
        feedback = f"/runs/{run_id}/feedback"
        body = {"good": True, "node": "draft"}
        r = await client.post(feedback, json=body)
        assert r.status_code == 403 and "X-Frugalflow-CSRF" in r.json()["detail"]["message"]
        r = await client.post(feedback, json=body, headers={"X-Frugalflow-CSRF": "1",
                                                            "Origin": "https://evil.example"})
        assert r.status_code == 403
        r = await client.post(feedback, json=body, headers={"X-Frugalflow-CSRF": "1",
                                                            "Origin": BASE})
        assert r.status_code == 200 and r.json()["answers"] == 1
        # A bearer token needs neither (not a browser's ambient credential).
        client.cookies.clear()
        r = await client.post(feedback, json=body, headers=bearer(TOKEN))
        assert r.status_code == 200
        # The login form refuses other sites (login CSRF) and never redirects off the UI.
        r = await client.post("/ui/login", content=f"token={TOKEN}", headers={
            **FORM, "Origin": "https://evil.example"})
        assert r.status_code == 403
        for bad in ("//evil.example/x", "https://evil.example", "/ui/../runs", "/elsewhere"):
            r = await login(client, TOKEN, next=bad)
            assert r.headers["location"] == "/ui/runs", bad


async def test_a_user_sees_only_its_runs(tmp_path: Path) -> None:
    async with viewer(tmp_path, tokens=TOKENS) as (client, _):
        mine = await start(client, "ui-alice-token")
        theirs = await start(client, TOKEN)
        page = await client.get("/ui/runs", headers=bearer("ui-alice-token"))
        assert f'data-run="{mine}"' in page.text and f'data-run="{theirs}"' not in page.text
        r = await client.get(f"/ui/runs/{theirs}", headers=bearer("ui-alice-token"))
        assert r.status_code == 404
        r = await client.get(f"/ui/runs/{theirs}/live", headers=bearer("ui-alice-token"))
        assert r.status_code == 404
        everyone = await client.get("/ui/runs", headers=bearer(TOKEN))
        assert f'data-run="{mine}"' in everyone.text and f'data-run="{theirs}"' in everyone.text


def _row(html: str, run_id: str) -> list[str]:
    row = re.search(rf'<tr data-run="{run_id}">(.*?)</tr>', html, re.S)
    assert row is not None, f"run {run_id} is not listed"
    return [re.sub(r"<[^>]+>", "", c).strip() for c in re.findall(r"<td[^>]*>(.*?)</td>",
                                                                   row.group(1), re.S)]


async def test_runs_list_counts_calls_and_fallbacks_and_filters(
        tmp_path: Path, sim: Simulator) -> None:
    async with viewer(tmp_path) as (client, runner):
        sim.fail("sim-groq", "rate_limit", times=1)
        fell_back = await start(client, None)
        plain = await start(client, None, flow="review", input={"text": "x"})
        html = (await client.get("/ui/runs")).text
        cells = _row(html, fell_back)
        assert cells[1:3] == ["chain", "succeeded"]
        assert cells[6:8] == ["2", "1"]  # calls, fallbacks
        assert _row(html, plain)[1:3] == ["review", "interrupted"]
        stats = await runner.ledger.run_stats([fell_back, plain, "missing"])
        assert (stats[fell_back].calls, stats[fell_back].attempts,
                stats[fell_back].fallbacks) == (2, 3, 1)
        assert "missing" not in stats
        only = (await client.get("/ui/runs?flow=review")).text
        assert plain in only and fell_back not in only
        only = (await client.get("/ui/runs?status=succeeded")).text
        assert fell_back in only and plain not in only
        none = (await client.get("/ui/runs?since=2000-01-01&until=2000-01-02")).text
        assert "No runs match" in none
        today = (await client.get("/ui/runs?since=2000-01-01")).text
        assert fell_back in today and plain in today
        bad = await client.get("/ui/runs?since=yesterday&status=nope")
        assert bad.status_code == 200
        assert "from &#39;yesterday&#39; is not a date: use YYYY-MM-DD" in bad.text
        assert "status &#39;nope&#39; is unknown" in bad.text


async def test_hostile_stored_values_are_shown_as_text(tmp_path: Path) -> None:
    async with viewer(tmp_path) as (client, runner):
        run_id = await start(client, None, input={"topic": "<script>alert(1)</script>"})
        html = (await client.get(f"/ui/runs/{run_id}")).text
        assert "<script>alert" not in html and "&lt;script&gt;alert(1)&lt;/script&gt;" in html
        # Values written by other means (older versions, other tools) may be anything.
        deep: Any = "bottom"
        for _ in range(300):
            deep = [deep]
        await runner.ledger.create_run("hostile", "gone-flow", {"x": "</pre><img src=x>"})
        await runner.ledger.update_run("hostile", status="failed", output={
            "deep": deep, "long": "y" * 300_000, "surrogate": "a\ud800b",
            "<key>": "\x00\x1b[31m"}, error="<b>boom</b>", error_type="<i>E</i>")
        await runner.ledger.record_attempt(Attempt(
            node="<n>", model="<img src=m>", provider="p", outcome=Outcome.ERROR,
            run_id="hostile", call_id="c1", error="<script>steal()</script>",
            error_class=ErrorClass.UNKNOWN, action="next", route_reason="<u>why</u>"))
        await runner.ledger.flush_attempts("hostile")
        r = await client.get("/ui/runs/hostile")
        assert r.status_code == 200
        assert "<script>steal" not in r.text and "&lt;script&gt;steal()" in r.text
        assert "<img src=m>" not in r.text and "&lt;u&gt;why&lt;/u&gt;" in r.text
        assert "<img src=x>" not in r.text and "&lt;/pre&gt;&lt;img src=x&gt;" in r.text
        assert "&lt;b&gt;boom&lt;/b&gt;" in r.text and "<b>boom" not in r.text
        assert "nested deeper than 100 levels" in r.text or "cannot be" in r.text
        assert "does not know the flow gone-flow" in r.text
        assert (await client.get("/ui/runs")).status_code == 200


async def test_output_long_values_are_folded_and_cut(tmp_path: Path) -> None:
    async with viewer(tmp_path) as (client, runner):
        await runner.ledger.create_run("big", "chain", {"topic": "t"})
        await runner.ledger.update_run("big", status="succeeded",
                                       output={"text": "z" * 300_000})
        html = (await client.get("/ui/runs/big")).text
        assert "<details class=\"value\">" in html
        assert "cut at 200,000 of" in html


async def test_router_users_mount_the_viewer_at_their_prefix(tmp_path: Path) -> None:
    runner = Runner(f"sqlite:///{tmp_path / 'r.db'}", flows=[chain_flow(2)],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry())
    app = FastAPI()
    app.include_router(create_router(runner, token=TOKEN, ui=True), prefix="/ff")
    async with viewer(tmp_path, app=app) as (client, _):
        await runner.setup()
        r = await client.post("/ff/runs", json={"flow": "chain", "input": {"topic": "a"},
                                                "wait": True}, headers=bearer(TOKEN))
        run_id = r.json()["run_id"]
        assert (await client.get("/ff/ui/runs")).headers["location"].startswith(
            "/ff/ui/login?next=/ff/ui/runs")
        ok = await login(client, TOKEN, next=f"/ff/ui/runs/{run_id}", prefix="/ff")
        assert ok.headers["location"] == f"/ff/ui/runs/{run_id}"
        assert "path=/ff" in ok.headers["set-cookie"].lower()
        page = (await client.get(f"/ff/ui/runs/{run_id}")).text
        assert f'data-events-url="/ff/runs/{run_id}/events"' in page
        assert 'href="/ff/ui/static/ui.css"' in page
        assert (await client.get("/ff/ui/static/run.js")).status_code == 200
        # A second viewer, for another runner, at another prefix of the same app.
        other = Runner(f"sqlite:///{tmp_path / 'o.db'}", flows=[chain_flow(2)],
                       catalog=Catalog.simulated(), breakers=BreakerRegistry())
        app.include_router(create_router(other, token=TOKEN, ui=True), prefix="/other")
        await other.setup()
        page = (await client.get("/other/ui/runs", headers=bearer(TOKEN))).text
        assert 'href="/other/ui/static/ui.css"' in page and run_id not in page
        assert 'data-api="/other"' in page
        await other.close()
    await runner.close()
    plain = create_app(Runner(f"sqlite:///{tmp_path / 'p.db'}", catalog=Catalog.simulated()),
                       ui=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=plain),
                                 base_url=BASE) as client:
        assert (await client.get("/ui/runs")).status_code == 404


class _S(TypedDict, total=False):
    n: int


def test_graph_layout_puts_nodes_in_layers_and_loops_aside() -> None:
    from langgraph.graph import END, START, StateGraph

    g: StateGraph[_S, Any, _S, _S] = StateGraph(_S)
    for name in ("a", "b", "c"):
        g.add_node(name, lambda s: {"n": 1})
    g.add_edge(START, "a")
    g.add_edge("a", "b")
    g.add_conditional_edges("b", lambda s: "a", {"a": "a", "c": "c"})  # b loops back to a
    g.add_edge("c", END)
    d = layout(g.compile().get_graph())
    y = {b.id: b.y for b in d.boxes}
    assert y["__start__"] < y["a"] < y["b"] < y["c"] < y["__end__"]
    assert d.order == ["a", "b", "c"]
    assert any(line.conditional for line in d.lines)
    assert all(b.x + d.box_w <= d.width for b in d.boxes)


async def test_a_token_with_cookie_special_characters_survives_the_cookie(
        tmp_path: Path) -> None:
    odd = 'a;b,c"d\\e=f'  # printable ASCII, as tokens may be
    async with viewer(tmp_path, tokens={odd: Principal("odd", "admin")}) as (client, _):
        r = await client.post("/ui/login", content=f"token={quote(odd)}",
                              headers={**FORM, "Origin": BASE})
        assert r.status_code == 303, r.text
        assert (await client.get("/runs")).status_code == 200
        page = await client.get("/ui/runs")
        assert page.status_code == 200 and "odd (admin)" in page.text


async def test_run_stats_and_date_filters_on_both_databases(db_url: str, sim: Simulator) -> None:
    from datetime import datetime, timedelta, timezone

    runner = Runner(db_url, flows=[chain_flow(2)], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry())
    try:
        sim.fail("sim-groq", "rate_limit", times=1)
        fell_back = (await runner.start("chain", {"topic": "a"}, wait=True)).run_id
        plain = (await runner.start("chain", {"topic": "b"}, wait=True)).run_id
        stats = await runner.ledger.run_stats([fell_back, plain, fell_back])
        assert (stats[fell_back].calls, stats[fell_back].attempts, stats[fell_back].fallbacks,
                stats[fell_back].errors) == (2, 3, 1, 1)
        assert (stats[plain].calls, stats[plain].fallbacks) == (2, 0)
        now = datetime.now(timezone.utc)
        found = await runner.ledger.list_runs(created_since=now - timedelta(hours=1),
                                              created_before=now + timedelta(hours=1))
        assert {r.id for r in found} == {fell_back, plain}
        assert await runner.ledger.list_runs(created_before=now - timedelta(hours=1)) == []
    finally:
        await runner.close()
