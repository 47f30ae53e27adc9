"""Waiting runs and service tiers over the wire and in the run viewer: the typed API (a run's
parked requests, tiers and late answers on its calls and events, the `waiting` filter,
cancelling a waiting run), the run page (badge, what it waits for, parked requests, tier
tags, late attempts), the Costs page and `cost_summary` by tier on SQLite and PostgreSQL."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from durable_flows import chain_flow
from pydantic import TypeAdapter

from frugalflow import Catalog
from frugalflow.costs import CostSummary, cost_summary
from frugalflow.events import attempt_event
from frugalflow.persistence.ledger import Ledger
from frugalflow.persistence.store import Store
from frugalflow.persistence.tables import BatchItemRow, BatchRow, RunRow
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.service import (
    AttemptEvent,
    ParkedRequest,
    Principal,
    RunActionResult,
    RunDetail,
    RunEvent,
    RunSummary,
    create_app,
)
from frugalflow.statuses import BatchItemStatus, BatchStatus, NodeStatus, Outcome, RunStatus
from frugalflow.tiers import Tier
from frugalflow.usage import Attempt, Usage

TOKENS = {"w-root": Principal("root", "admin"), "w-alice": Principal("alice", "user"),
          "w-carol": Principal("carol", "user")}
BASE = "http://viewer.test"
MODEL = "sim-groq/llama-3.1-8b-instant"  # in the simulated catalog: it has standard prices
SECRET_PROMPT = "the parked prompt's private text"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextlib.asynccontextmanager
async def viewer(tmp_path: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Runner]]:
    runner = Runner(f"sqlite:///{tmp_path / 'w.db'}", flows=[chain_flow(2)],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry())
    await runner.setup()  # ASGITransport runs no lifespan (nor its batch poller)
    try:
        async with httpx.AsyncClient(
                transport=httpx.ASGITransport(app=create_app(runner, tokens=TOKENS)),
                base_url=BASE) as client:
            yield client, runner
    finally:
        await runner.close()


class Seeded:
    """What `seed_waiting` wrote, for the assertions."""

    def __init__(self, now: datetime) -> None:
        self.run_id = "waiting-run"
        self.deadline = now + timedelta(hours=6)
        self.fallback = now + timedelta(hours=5, minutes=50)
        self.wake = now + timedelta(hours=2)


def _item(run_id: str, item_id: str, node: str, tier: Tier, now: datetime,
          **fields: object) -> BatchItemRow:
    return BatchItemRow.model_validate({
        "id": item_id, "run_id": run_id, "flow": "chain", "node": node,
        "task_id": f"task-{node}", "call_key": f"key-{item_id}", "call_id": f"call-{item_id}",
        "model": MODEL, "provider": "sim-groq", "tier": str(tier),
        "request": {"messages": [{"role": "user", "content": SECRET_PROMPT}]},
        "expected_cost_usd": 0.0004, **fields})


async def seed_waiting(runner: Runner, now: datetime) -> Seeded:
    """A run of `alice` parked at n2: n1 was answered from a batch (used, at the batch
    price) and a second answer of that batch came late (paid, unused); n2 waits for one
    batch answer and a timer waits for a cheaper hour."""
    s = Seeded(now)
    ledger, parked = runner.ledger, runner.parked
    await ledger.create_run(s.run_id, "chain", {"topic": "t"}, principal="alice",
                            deadline_at=s.deadline)
    for node, status in (("n1", NodeStatus.DONE), ("n2", NodeStatus.WAITING)):
        await ledger.node_started(f"task-{node}", s.run_id, node)
        await ledger.node_finished(f"task-{node}", status=status, run_id=s.run_id)
    # n1: its item sent in batch b1, answered and used
    await parked.park(_item(s.run_id, "item-used", "n1", Tier.BATCH, now,
                            deadline_at=s.deadline, fallback_at=s.fallback,
                            created_at=now - timedelta(minutes=30)))
    await parked.open_batch(BatchRow(id="b1", provider="sim-groq", model=MODEL),
                            ["item-used"], "test", timedelta(minutes=5), now)
    await parked.update_batch("b1", status=BatchStatus.ENDED)
    assert await parked.move("item-used", BatchItemStatus.USED, [BatchItemStatus.QUEUED],
                             cost_usd=0.0002, input_tokens=1000, output_tokens=100,
                             ended_at=now - timedelta(minutes=10))
    # n2: a batch item and a timer, both still out
    await parked.park(_item(s.run_id, "item-open", "n2", Tier.BATCH, now,
                            deadline_at=s.deadline, fallback_at=s.fallback,
                            created_at=now - timedelta(minutes=5)))
    await parked.park(_item(s.run_id, "item-timer", "n2", Tier.OFF_PEAK, now,
                            deadline_at=s.deadline, wake_at=s.wake,
                            created_at=now - timedelta(minutes=4)))
    started = (now - timedelta(minutes=20)).timestamp()
    for a in (
        Attempt(node="n1", model=MODEL, provider="sim-groq", outcome=Outcome.OK,
                call_id="call-item-used", task_id="task-n1", run_id=s.run_id, cost_usd=0.0002,
                started_at=started, tier=Tier.BATCH, batch_item_id="item-used",
                usage=Usage(input_tokens=1000, output_tokens=100)),
        Attempt(node="n1", model=MODEL, provider="sim-groq", outcome=Outcome.LATE,
                call_id="call-late", task_id="task-n1", run_id=s.run_id, cost_usd=0.0003,
                started_at=started + 1, tier=Tier.BATCH, batch_item_id="item-late",
                error="answered after its call had gone synchronous (deadline too close)",
                usage=Usage(input_tokens=1500, output_tokens=100)),
    ):
        await ledger.record_attempt(a, flow="chain")
    await ledger.flush_attempts(s.run_id)
    await ledger.update_run(s.run_id, status=RunStatus.WAITING, cost_usd=0.0005)
    return s


async def test_waiting_run_over_the_typed_api(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    async with viewer(tmp_path) as (client, runner):
        s = await seed_waiting(runner, now)
        done = await client.post("/runs", json={"flow": "chain", "input": {"topic": "x"},
                                                "wait": True}, headers=bearer("w-root"))
        assert done.status_code == 200, done.text

        r = await client.get(f"/runs/{s.run_id}", headers=bearer("w-alice"))
        run = TypeAdapter(RunDetail).validate_python(r.json())
        assert run.status is RunStatus.WAITING and run.deadline_at == s.deadline
        assert {n.node: n.status for n in run.nodes} == {"n1": NodeStatus.DONE,
                                                         "n2": NodeStatus.WAITING}
        calls = {c.call_id: c for c in run.calls}
        assert calls["call-item-used"].tier is Tier.BATCH
        assert calls["call-item-used"].batch_item_id == "item-used"
        assert calls["call-late"].outcome is Outcome.LATE
        assert calls["call-late"].cost_usd == pytest.approx(0.0003)  # paid, though unused

        r = await client.get(f"/runs/{s.run_id}/parked", headers=bearer("w-alice"))
        assert r.status_code == 200, r.text
        items = TypeAdapter(list[ParkedRequest]).validate_python(r.json())
        by_id = {i.id: i for i in items}
        assert list(by_id) == ["item-used", "item-open", "item-timer"]  # oldest first
        assert (by_id["item-used"].status, by_id["item-used"].batch_id,
                by_id["item-used"].batch_status) == (BatchItemStatus.USED, "b1",
                                                     BatchStatus.ENDED)
        assert by_id["item-used"].cost_usd == pytest.approx(0.0002)
        assert by_id["item-open"].status is BatchItemStatus.QUEUED
        assert by_id["item-open"].batch_id is None and by_id["item-open"].fallback_at == s.fallback
        assert by_id["item-timer"].tier is Tier.OFF_PEAK and by_id["item-timer"].wake_at == s.wake
        assert all(i.deadline_at == s.deadline and i.node in ("n1", "n2") for i in items)
        # the request and answer bodies hold user data: not shown
        assert SECRET_PROMPT not in r.text
        assert not {"request", "result"} & set(r.json()[0])

        # Principal-scoped like every run route: another user's run is missing.
        assert (await client.get(f"/runs/{s.run_id}/parked",
                                 headers=bearer("w-carol"))).status_code == 404
        assert (await client.get("/runs/nope/parked",
                                 headers=bearer("w-root"))).status_code == 404
        assert (await client.get(f"/runs/{s.run_id}/parked")).status_code == 401

        r = await client.get("/runs", params={"status": "waiting"}, headers=bearer("w-root"))
        listed = TypeAdapter(list[RunSummary]).validate_python(r.json())
        assert [x.id for x in listed] == [s.run_id] and listed[0].status is RunStatus.WAITING
        everyone = await client.get("/runs", headers=bearer("w-root"))
        assert len(everyone.json()) == 2

        # Cancelling a waiting run gives up its open items (the used one stays used).
        r = await client.post(f"/runs/{s.run_id}/cancel", headers=bearer("w-alice"))
        assert TypeAdapter(RunActionResult).validate_python(r.json()).status is (
            RunStatus.CANCELLED)
        after = TypeAdapter(list[ParkedRequest]).validate_python((await client.get(
            f"/runs/{s.run_id}/parked", headers=bearer("w-alice"))).json())
        assert {i.id: i.status for i in after} == {
            "item-used": BatchItemStatus.USED, "item-open": BatchItemStatus.ABANDONED,
            "item-timer": BatchItemStatus.ABANDONED}
        assert all(i.ended_at is not None for i in after)

        schema = create_app(runner, tokens=TOKENS).openapi()
        ok = schema["paths"]["/runs/{run_id}/parked"]["get"]["responses"]["200"]
        assert ok["content"]["application/json"]["schema"]["items"] == {
            "$ref": "#/components/schemas/ParkedRequest"}


def test_attempt_events_carry_the_tier_and_accept_late_answers() -> None:
    adapter: TypeAdapter[RunEvent] = TypeAdapter(RunEvent)
    envelope = {"id": 7, "run_id": "r", "event": "attempt", "at": "2026-12-01T03:00:00+00:00"}
    late = Attempt(node="n", model=MODEL, provider="sim-groq", outcome=Outcome.LATE,
                   call_id="c", run_id="r", cost_usd=0.001, tier=Tier.BATCH,
                   batch_item_id="item-1", usage=Usage(input_tokens=10, output_tokens=2))
    fields = attempt_event(late)
    assert (fields["tier"], fields["batch_item_id"]) == ("batch", "item-1")
    event = adapter.validate_python({**envelope, **fields})
    assert isinstance(event, AttemptEvent)
    assert (event.outcome, event.tier, event.batch_item_id) == (Outcome.LATE, Tier.BATCH,
                                                                "item-1")
    standard = attempt_event(Attempt(node="n", model=MODEL, provider="sim-groq",
                                     outcome=Outcome.OK, call_id="c2"))
    event = adapter.validate_python({**envelope, **standard})
    assert isinstance(event, AttemptEvent) and event.tier is None
    # Events logged before tiers existed (no tier fields) still validate.
    old = {k: v for k, v in standard.items() if k not in ("tier", "batch_item_id")}
    assert isinstance(adapter.validate_python({**envelope, **old}), AttemptEvent)
    for kind in ("run_finished", "status"):
        waiting = adapter.validate_python({**envelope, "event": kind, "status": "waiting",
                                           "error": None})
        assert getattr(waiting, "status") is RunStatus.WAITING
    finished = adapter.validate_python({**envelope, "event": "node_finished", "node": "n",
                                        "task_id": "t", "status": "waiting"})
    assert getattr(finished, "status") is NodeStatus.WAITING


def _strict_page(html: str) -> None:
    """What the CSP relies on: no inline script or style anywhere in the page."""
    assert not re.search(r"<script(?![^>]*\ssrc=)", html), "an inline script"
    assert " style=" not in html and "<style" not in html


async def test_waiting_run_page_shows_what_it_waits_for(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    async with viewer(tmp_path) as (client, runner):
        s = await seed_waiting(runner, now)
        page = await client.get(f"/ui/runs/{s.run_id}", headers=bearer("w-root"))
        assert page.status_code == 200
        assert "script-src 'self'" in page.headers["content-security-policy"]
        html = page.text
        _strict_page(html)
        assert 'data-status="waiting"' in html
        status = re.search(r'<dd id="run-status">(.*?)</dd>', html, re.S)
        assert status is not None and 'class="badge s-waiting">waiting<' in status.group(1)
        said = re.search(r'<p class="waiting-for" id="waiting-for">(.*?)<span', html, re.S)
        assert said is not None
        sentence = said.group(1)
        assert sentence.startswith("Waiting for 1 batch answer until ")
        assert " and a cheaper hour until " in sentence
        for t in (s.fallback, s.wake, s.deadline):
            assert f"{t.astimezone(timezone.utc):%H:%M} UTC" in sentence
        assert "; deadline " in sentence
        # the parked requests, each with its tier and status
        rows = re.findall(r'<tr class="item( open)?" data-item="([^"]+)" data-status="([^"]+)">'
                          r'(.*?)</tr>', html, re.S)
        assert [(r[1], r[2], bool(r[0])) for r in rows] == [
            ("item-used", "used", False), ("item-open", "queued", True),
            ("item-timer", "queued", True)]
        cells = {r[1]: r[3] for r in rows}
        assert 'class="tier t-batch"' in cells["item-used"] and "batch ended" in cells["item-used"]
        assert 'class="tier t-off-peak"' in cells["item-timer"]
        assert SECRET_PROMPT not in html
        # the timeline: the batch answer tagged, with its standard price beside; the late
        # answer marked paid and unused
        tries = dict(re.findall(r'<tr class="try o-(\w+)[^"]*"[^>]*data-tier="(\w+)"', html))
        assert tries == {"ok": "batch", "late": "batch"}
        late = re.search(r'<tr class="try o-late.*?</tr>', html, re.S)
        assert late is not None and "paid, unused" in late.group(0)
        assert 'class="badge s-late">late<' in late.group(0)
        why = html[late.end():].split("</tr>", 1)[0]  # its note row: late, not an error
        assert '<span class="late-note">late:</span> answered after' in why
        assert "error-class" not in why
        ok = re.search(r'<tr class="try o-ok.*?</tr>', html, re.S)
        assert ok is not None and re.search(r'class="tier t-batch"[^>]*>batch<', ok.group(0))
        standard = Catalog.simulated()[MODEL].estimate_cost(1000, 100)
        shown = re.search(r'class="muted standard-cost"[^>]*>standard \$([0-9.]+)<', ok.group(0))
        assert shown is not None and float(shown.group(1)) == pytest.approx(standard, rel=0.01)
        # the node that waits, in the graph and the nodes table
        assert re.search(r'<g class="box n-waiting" data-node="n2">', html)
        assert re.search(r'<tr data-node="n2">\s*<td>n2</td>\s*<td><span class="badge '
                         r's-waiting">waiting</span>', html)
        n1 = re.search(r'<tr data-node="n1">(.*?)</tr>', html, re.S)
        assert n1 is not None and 'class="tier t-batch"' in n1.group(1)  # served on batch
        assert re.search(r'<g class="box n-done" data-node="n1">.*?· batch</text>', html, re.S)
        # the live fragment the page's script re-fetches says the same
        live = (await client.get(f"/ui/runs/{s.run_id}/live", headers=bearer("w-root"))).text
        assert 'id="waiting-for"' in live and 'data-item="item-timer"' in live

        # Once it is over, its requests stay listed (no "waiting for" sentence).
        await runner.cancel(s.run_id)
        html = (await client.get(f"/ui/runs/{s.run_id}", headers=bearer("w-root"))).text
        assert 'id="waiting-for"' not in html and "<h2>Parked requests</h2>" in html
        assert html.count('data-status="abandoned"') == 2


async def test_runs_list_filters_waiting_and_costs_page_by_tier(tmp_path: Path) -> None:
    now = datetime.now(timezone.utc)
    async with viewer(tmp_path) as (client, runner):
        s = await seed_waiting(runner, now)
        done = await client.post("/runs", json={"flow": "chain", "input": {"topic": "x"},
                                                "wait": True}, headers=bearer("w-root"))
        other = done.json()["run_id"]
        runs = (await client.get("/ui/runs", headers=bearer("w-root"))).text
        assert '<option value="waiting">waiting</option>' in runs
        row = re.search(rf'<tr data-run="{s.run_id}">(.*?)</tr>', runs, re.S)
        assert row is not None and 'class="badge s-waiting"' in row.group(1)
        only = (await client.get("/ui/runs?status=waiting", headers=bearer("w-root"))).text
        assert f'data-run="{s.run_id}"' in only and f'data-run="{other}"' not in only
        assert '<option value="waiting" selected>' in only
        # a user sees only its own waiting runs
        carol = (await client.get("/ui/runs?status=waiting", headers=bearer("w-carol"))).text
        assert s.run_id not in carol and "No runs match" in carol

        costs = (await client.get("/ui/costs?days=1", headers=bearer("w-root"))).text
        _strict_page(costs)
        section = re.search(r'<section id="by-tier".*?</section>', costs, re.S)
        assert section is not None and 'id="chart-tier"' in section.group(0)
        tiers = re.findall(r'<tr data-tier="(\w+)">', section.group(0))
        assert sorted(tiers) == ["batch", "standard"]
        api = CostSummary.model_validate((await client.get(
            "/costs", params={"days": 1}, headers=bearer("w-root"))).json())
        batch = next(b for b in api.by_tier if b.key == "batch")
        assert batch.cost_usd == pytest.approx(0.0005) and batch.attempts == 2
        assert sum(b.cost_usd for b in api.by_tier) == pytest.approx(api.total.cost_usd)


async def test_cost_summary_by_tier_on_both_databases(db_url: str) -> None:
    now = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)
    store = Store(db_url)
    try:
        ledger = Ledger(store)
        await ledger.create_run("r1", "f", {}, principal="alice")
        at = (now - timedelta(hours=2)).timestamp()

        def attempt(call: str, cost: float, tier: Tier | None, *,
                    outcome: Outcome = Outcome.OK, try_number: int = 1) -> Attempt:
            return Attempt(node="n", model="m", provider="p", outcome=outcome, call_id=call,
                           run_id="r1", cost_usd=cost, started_at=at, tier=tier,
                           try_number=try_number,
                           usage=Usage(input_tokens=100, output_tokens=10))

        for a in (attempt("c1", 0.10, None),  # standard, as a standard call is recorded
                  attempt("c2", 0.20, Tier.STANDARD),  # standard, named
                  attempt("c3", 0.05, Tier.BATCH), attempt("c4", 0.05, Tier.BATCH),
                  attempt("c4", 0.05, Tier.BATCH, outcome=Outcome.LATE, try_number=2),
                  attempt("c5", 0.03, Tier.FLEX), attempt("c6", 0.01, Tier.OFF_PEAK)):
            await ledger.record_attempt(a, flow="f")
        await ledger.flush_attempts("r1")
        s = await cost_summary(store, days=1, now=now)
        got = {b.key: (round(b.cost_usd, 6), b.calls, b.attempts) for b in s.by_tier}
        assert got == {"standard": (0.30, 2, 2), "batch": (0.15, 2, 3), "flex": (0.03, 1, 1),
                       "off_peak": (0.01, 1, 1)}
        assert [b.key for b in s.by_tier] == ["standard", "batch", "flex", "off_peak"]
        assert sum(b.cost_usd for b in s.by_tier) == pytest.approx(s.total.cost_usd)
        nobody = await cost_summary(store, days=1, principal="carol", now=now)
        assert nobody.by_tier == []
    finally:
        await store.close()


@pytest.mark.slow
async def test_a_waiting_run_in_the_browser(tmp_path: Path,
                                            request: pytest.FixtureRequest) -> None:
    """Headless Chromium: the waiting run's page renders without console errors, opens no
    event stream, and cancelling it from the page gives up its parked requests."""
    from browser import Watched, open_browser
    from playwright.async_api import expect
    from served import served

    runner = Runner(f"sqlite:///{tmp_path / 'b.db'}", flows=[chain_flow(2)],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry())
    # No poller: the seeded items stay as they are (a simulated model has no batch API).
    async with served(create_app(runner, poll_batches=False)) as url, \
            open_browser() as browser:
        s = await seed_waiting(runner, datetime.now(timezone.utc))
        page = await Watched.open(browser, request.node.name)
        p = page.page
        streams: list[str] = []
        p.on("request", lambda r: streams.append(r.url) if r.resource_type == "eventsource"
             else None)
        await page.visit(f"{url}/ui/runs/{s.run_id}")
        await expect(p.locator("#run-status .badge")).to_have_text("waiting")
        await expect(p.locator("#waiting-for")).to_contain_text(
            "Waiting for 1 batch answer until")
        await expect(p.locator("table.parked-items tr.item")).to_have_count(3)
        await expect(p.locator("tr.try.o-late")).to_contain_text("paid, unused")
        await expect(p.locator("tr.try.o-ok .tier")).to_have_text("batch")
        assert streams == []  # a waiting run is looked at now and then, not streamed
        await page.shot("waiting")

        await p.click('button[data-action="cancel"]')
        await expect(p.locator("#run-status")).to_contain_text("cancelled")
        await expect(p.locator('tr.item[data-status="abandoned"]')).to_have_count(2)
        await expect(p.locator("#waiting-for")).to_have_count(0)
        await page.shot("cancelled")

        await page.visit(f"{url}/ui/costs?days=1")
        await expect(p.locator('#by-tier tr[data-tier="batch"]')).to_have_count(1)
        await page.visit(f"{url}/ui/runs?status=cancelled")
        await expect(p.locator(f'tr[data-run="{s.run_id}"]')).to_have_count(1)
        await page.close()


def test_what_a_waiting_run_waits_for_in_one_sentence() -> None:
    from frugalflow.service.ui.views import Parked, waiting_of

    now = datetime(2026, 12, 1, 3, 0, tzinfo=timezone.utc)
    row = RunRow(id="r", flow="f", status=RunStatus.WAITING, input={},
                 deadline_at=now + timedelta(days=1, hours=2))

    def item(item_id: str, tier: Tier, status: BatchItemStatus, **fields: object) -> Parked:
        return Parked(_item("r", item_id, "n", tier, now, status=str(status), **fields))

    two = waiting_of(row, [
        item("a", Tier.BATCH, BatchItemStatus.SUBMITTED, fallback_at=now + timedelta(hours=3)),
        item("b", Tier.BATCH, BatchItemStatus.QUEUED, fallback_at=now + timedelta(hours=2),
             deadline_at=now + timedelta(hours=2, minutes=10)),
        item("c", Tier.BATCH, BatchItemStatus.USED)])
    # the earliest fallback and the earliest open item's deadline (before the run's own)
    assert two.sentence(now) == "Waiting for 2 batch answers until 05:00 UTC; deadline 05:10 UTC."
    hour = waiting_of(row, [item("t", Tier.OFF_PEAK, BatchItemStatus.QUEUED,
                                 wake_at=now + timedelta(hours=22))])
    # no item deadline: the run's; another day: with its date
    assert hour.sentence(now) == ("Waiting for a cheaper hour until 2026-12-02 01:00 UTC; "
                                  "deadline 2026-12-02 05:00 UTC.")
    ready = waiting_of(row, [item("s", Tier.BATCH, BatchItemStatus.SUCCEEDED)])
    assert ready.sentence(now).startswith("Its answers are in: the batch poller resumes it")
    assert waiting_of(row.model_copy(update={"deadline_at": None}), []).sentence(now) == (
        "Waiting for the batch poller.")
