"""The typed API: every endpoint's response model in /openapi.json, real responses that
validate against those models (SQLite and PostgreSQL), and the costs summary."""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import TypeAdapter
from sqlalchemy import text
from sqlalchemy.engine import make_url
from durable_flows import chain_flow, review_flow
from served import served

from frugalflow import Catalog
from frugalflow.costs import CostBucket, CostSummary, cost_summary
from frugalflow.persistence.ledger import Ledger
from frugalflow.persistence.store import Store
from frugalflow.resilience import Action, BreakerRegistry, BreakerState
from frugalflow.runner import Runner
from frugalflow.service import (
    AttemptEvent,
    CatalogEntry,
    ErrorBody,
    FeedbackResult,
    FlowDescription,
    HealthDetails,
    HealthPublic,
    NodeFinishedEvent,
    NodeStartedEvent,
    NotShown,
    ParkedRequest,
    Principal,
    RunActionResult,
    RunDetail,
    RunEvent,
    RunFinishedEvent,
    RunStartedEvent,
    RunSummary,
    StatusEvent,
    Unreadable,
    create_app,
)
from frugalflow.statuses import NodeStatus, Outcome, RunStatus
from frugalflow.usage import Attempt, Usage

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)


async def _known_spending(ledger: Ledger, now: datetime) -> None:
    """Two days, two models, two flows, two principals, a fallback, and a call outside a
    week's window: the figures the costs tests expect."""
    d1 = now - timedelta(days=1)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)

    def today(seconds_ago: int) -> datetime:
        # Today, before now (a fixed hour would be in the future early in the day).
        return max(now - timedelta(seconds=seconds_ago), midnight)

    await ledger.create_run("r1", "flow_a", {}, principal="alice")
    await ledger.create_run("r2", "flow_b", {}, principal="bob")

    def attempt(run: str, call: str, node: str, model: str, at: datetime, cost: float, *,
                outcome: Outcome = Outcome.OK, fallback_from: str | None = None,
                try_number: int = 1) -> Attempt:
        return Attempt(node=node, model=model, provider="sim", outcome=outcome, call_id=call,
                       run_id=run, try_number=try_number, cost_usd=cost,
                       fallback_from=fallback_from, started_at=at.timestamp(),
                       usage=Usage(input_tokens=100, output_tokens=10)
                       if outcome == Outcome.OK else None)

    rows = [
        ("flow_a", attempt("r1", "c1", "draft", "m1", d1.replace(hour=10), 0.0,
                           outcome=Outcome.ERROR)),
        ("flow_a", attempt("r1", "c1", "draft", "m2", d1.replace(hour=10, second=1), 0.02,
                           fallback_from="m1", try_number=2)),
        ("flow_a", attempt("r1", "c2", "polish", "m1", today(3), 0.01)),
        ("flow_b", attempt("r2", "c3", "draft", "m2", today(1), 0.05)),
        ("flow_b", attempt("r2", "c4", "draft", "m2", now - timedelta(days=5), 1.0)),
    ]
    for flow, a in rows:
        await ledger.record_attempt(a, flow=flow)


def _by(buckets: list[CostBucket], *fields: str) -> dict[object, tuple[object, ...]]:
    return {(b.key, b.flow) if b.flow else b.key: tuple(getattr(b, f) for f in fields)
            for b in buckets}


async def _far_time_zone(db_url: str) -> None:
    """PostgreSQL sessions of this test's database in UTC+14: a day bucketed by the
    session's zone instead of UTC would move the 10:00 UTC calls to the next day."""
    if db_url.startswith("sqlite"):
        return
    store = Store(db_url)
    try:
        async with store.write() as conn:
            await conn.execute(text(f'ALTER DATABASE "{make_url(db_url).database}" '
                                    "SET timezone TO 'Pacific/Kiritimati'"))
    finally:
        await store.close()


async def test_cost_summary_aggregates_known_spending(db_url: str) -> None:
    await _far_time_zone(db_url)
    store = Store(db_url)
    try:
        ledger = Ledger(store)
        await _known_spending(ledger, NOW)
        s = await cost_summary(store, days=2, now=NOW)
        assert s.since == datetime(2026, 6, 14, tzinfo=timezone.utc) and s.days == 2
        t = s.total
        assert t.cost_usd == pytest.approx(0.08)
        assert (t.calls, t.attempts, t.fallbacks, t.errors) == (3, 4, 1, 1)
        assert (t.input_tokens, t.output_tokens) == (300, 30)
        fields = ("cost_usd", "calls", "attempts", "fallbacks", "errors")
        assert _by(s.by_day, *fields) == {"2026-06-14": (pytest.approx(0.02), 1, 2, 1, 1),
                                          "2026-06-15": (pytest.approx(0.06), 2, 2, 0, 0)}
        # each day's spending by model (the run viewer stacks its daily bars with it)
        assert {d.key: d.models for d in s.by_day} == {
            "2026-06-14": {"m1": 0.0, "m2": pytest.approx(0.02)},
            "2026-06-15": {"m1": pytest.approx(0.01), "m2": pytest.approx(0.05)}}
        assert [b.key for b in s.by_model] == ["m2", "m1"]  # dearest first
        assert _by(s.by_model, *fields) == {"m2": (pytest.approx(0.07), 2, 2, 1, 0),
                                            "m1": (pytest.approx(0.01), 2, 2, 0, 1)}
        assert _by(s.by_node, "cost_usd") == {("draft", "flow_b"): (pytest.approx(0.05),),
                                              ("draft", "flow_a"): (pytest.approx(0.02),),
                                              ("polish", "flow_a"): (pytest.approx(0.01),)}
        assert _by(s.by_flow, "cost_usd", "calls") == {"flow_b": (pytest.approx(0.05), 1),
                                                       "flow_a": (pytest.approx(0.03), 2)}
        # A week: every day is there (zeros included), and the older call counts.
        week = await cost_summary(ledger, days=7, now=NOW)
        assert [d.key for d in week.by_day][0] == "2026-06-09" and len(week.by_day) == 7
        assert week.total.cost_usd == pytest.approx(1.08)
        assert [d.cost_usd for d in week.by_day if d.key == "2026-06-10"] == [
            pytest.approx(1.0)]
        # One flow, one principal.
        only_a = await cost_summary(store, days=2, flow="flow_a", now=NOW)
        assert only_a.total.cost_usd == pytest.approx(0.03) and only_a.flow == "flow_a"
        assert [b.key for b in only_a.by_flow] == ["flow_a"]
        bob = await cost_summary(store, days=7, principal="bob", now=NOW)
        assert bob.total.cost_usd == pytest.approx(1.05) and bob.total.fallbacks == 0
        nobody = await cost_summary(store, days=7, principal="carol", now=NOW)
        assert nobody.total.attempts == 0 and nobody.by_model == []
        assert sum(d.cost_usd for d in nobody.by_day) == 0 and len(nobody.by_day) == 7
        for bad in (0, -1, 367, 10**9, True, 2.5):
            with pytest.raises(ValueError, match="from 1 to 366"):
                await cost_summary(store, days=bad)  # type: ignore[arg-type]
    finally:
        await store.close()


TOKENS = {"tok-root": Principal("root", "admin"), "tok-alice": Principal("alice", "user"),
          "tok-carol": Principal("carol", "user")}


@contextlib.asynccontextmanager
async def serving(db: str, *, catalog: Catalog | None = None
                  ) -> AsyncIterator[tuple[Runner, str]]:
    runner = Runner(db, flows=[chain_flow(3), review_flow()],
                    catalog=catalog or Catalog.simulated(), breakers=BreakerRegistry())
    async with served(create_app(runner, tokens=TOKENS)) as url:
        yield runner, url


def _client(url: str, token: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {token}"},
                             timeout=30)


async def test_costs_endpoint_respects_principals_and_refuses_bad_days(db_url: str) -> None:
    async with serving(db_url) as (runner, url):
        await _known_spending(runner.ledger, datetime.now(timezone.utc))
        async with _client(url, "tok-root") as root, _client(url, "tok-alice") as alice, \
                _client(url, "tok-carol") as carol:
            everything = CostSummary.model_validate((await root.get("/costs")).json())
            assert everything.total.cost_usd == pytest.approx(1.08)
            assert len(everything.by_day) == 30
            r = await root.get("/costs", params={"days": 2, "flow": "flow_b"})
            assert CostSummary.model_validate(r.json()).total.cost_usd == pytest.approx(0.05)
            mine = CostSummary.model_validate((await alice.get("/costs")).json())
            assert mine.total.cost_usd == pytest.approx(0.03)
            assert [b.key for b in mine.by_flow] == ["flow_a"]
            none = CostSummary.model_validate((await carol.get("/costs")).json())
            assert none.total.attempts == 0
            for bad in ("0", "-3", "367", "99999999999999999999", "abc", "1.5", ""):
                r = await root.get("/costs", params={"days": bad})
                assert r.status_code == 422, (bad, r.text)
                message = r.json()["detail"]["message"]
                assert "\n" not in message and "days" in message and "1 to 366" in message
        async with httpx.AsyncClient(base_url=url, timeout=30) as anonymous:
            assert (await anonymous.get("/costs")).status_code == 401


# -- the schema ------------------------------------------------------------------------------


def _resolve(schema: dict[str, Any], components: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = components[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _typed(schema: dict[str, Any], components: dict[str, Any]) -> bool:
    """A schema that says what is returned: a model (an object with properties), a list of
    typed items, or a choice of typed schemas; not {} nor a bare object / dict."""
    if "$ref" in schema:
        return _typed(_resolve(schema, components), components)
    for choice in ("anyOf", "oneOf"):
        if choice in schema:
            return all(_typed(s, components) for s in schema[choice])
    if schema.get("type") == "array":
        return _typed(schema.get("items", {}), components)
    return schema.get("type") == "object" and bool(schema.get("properties"))


def test_every_route_declares_typed_responses(tmp_path: Path) -> None:
    runner = Runner(f"sqlite:///{tmp_path / 'schema.db'}", flows=[chain_flow(2)],
                    catalog=Catalog.simulated())
    schema = create_app(runner, tokens=TOKENS).openapi()
    components = schema["components"]["schemas"]
    assert "HTTPValidationError" not in components  # every 422 is the service's own shape
    seen = set()
    for path, operations in schema["paths"].items():
        for method, op in operations.items():
            seen.add(f"{method.upper()} {path}")
            ok = [c for c in op["responses"] if c.startswith("2")]
            assert ok, (method, path)
            for code in ok:
                content = op["responses"][code]["content"]
                media = "text/event-stream" if path.endswith("/events") else "application/json"
                assert list(content) == [media], (method, path, code)
                assert _typed(content[media]["schema"], components), (method, path, code)
            for code, response in op["responses"].items():
                if code[0] in "45":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorBody"}, (method, path, code)
            if path != "/health":
                assert "401" in op["responses"], (method, path)
    assert seen >= {"GET /flows", "POST /runs", "GET /runs", "GET /runs/{run_id}",
                    "POST /runs/{run_id}/resume", "POST /runs/{run_id}/cancel",
                    "POST /runs/{run_id}/feedback", "GET /runs/{run_id}/events",
                    "GET /catalog", "GET /health", "GET /costs", "GET /runs/{run_id}/parked"}
    events = schema["paths"]["/runs/{run_id}/events"]["get"]["responses"]["200"]["content"]
    kinds = events["text/event-stream"]["schema"]["discriminator"]["mapping"]
    assert set(kinds) == {"run_started", "node_started", "attempt", "node_finished",
                          "run_finished", "status"}
    attempt = components["AttemptEvent"]["properties"]
    assert {"id", "run_id", "event", "at", "fallback_from", "outcome"} <= set(attempt)
    run = components["RunDetail"]["properties"]
    assert _resolve(run["status"], components)["enum"] == [s.value for s in RunStatus]
    assert "NotShown" in json.dumps(run["input"])  # the placeholder is documented
    assert "ErrorBody" in components and "CostSummary" in components


# -- real responses against their models -------------------------------------------------------


def check(model: Any, response: httpx.Response, status: int = 200) -> Any:
    """What a typed client does: the answer, validated against the endpoint's model."""
    assert response.status_code == status, response.text
    return TypeAdapter(model).validate_python(response.json())


async def _events(client: httpx.AsyncClient, run_id: str) -> list[RunEvent]:
    events: list[RunEvent] = []
    adapter: TypeAdapter[RunEvent] = TypeAdapter(RunEvent)
    async with client.stream("GET", f"/runs/{run_id}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        async for line in stream.aiter_lines():
            if line.startswith("data: "):
                events.append(adapter.validate_json(line[6:]))
    return events


@pytest.mark.slow
async def test_real_responses_validate_against_their_models(db_url: str, sim: Any) -> None:
    first = "sim-groq/llama-3.1-8b-instant"  # the chain's first choice: it fails, twice
    async with serving(db_url) as (runner, url), \
            _client(url, "tok-root") as client, httpx.AsyncClient(base_url=url) as anon:
        assert check(HealthPublic, await anon.get("/health")).ok
        details = check(HealthDetails, await client.get("/health"))
        assert details.database.reachable and details.flows == ["chain", "review"]
        check(HealthDetails | HealthPublic, await client.get("/health"))
        flows = check(list[FlowDescription], await client.get("/flows"))
        assert [n.name for n in flows[0].nodes] == ["n1", "n2", "n3"]
        catalog = check(list[CatalogEntry], await client.get("/catalog"))
        assert all(c.provider_health is BreakerState.CLOSED for c in catalog)

        sim.fail(first, "overloaded", times=2)
        started = check(RunActionResult, await client.post(
            "/runs", json={"flow": "chain", "input": {"topic": "t"}, "budget": 1.0}), 202)
        assert started.status is RunStatus.RUNNING
        events = await _events(client, started.run_id)
        # The stream replays from the event log: every kind is there, each a typed model.
        assert isinstance(events[0], StatusEvent) and isinstance(events[-1], StatusEvent)
        assert events[-1].status is RunStatus.SUCCEEDED
        logged = events[1:-1]
        assert all(e.id is not None and e.at is not None for e in logged)
        assert [e.id for e in logged] == sorted(e.id for e in logged if e.id is not None)
        kinds = {type(e) for e in logged}
        assert kinds == {RunStartedEvent, NodeStartedEvent, AttemptEvent, NodeFinishedEvent,
                         RunFinishedEvent}
        attempts = [e for e in logged if isinstance(e, AttemptEvent)]
        assert [(a.model, a.outcome, a.action) for a in attempts[:2]] == [
            (first, Outcome.ERROR, Action.RETRY), (first, Outcome.ERROR, Action.NEXT)]
        assert attempts[2].fallback_from == first and attempts[2].outcome is Outcome.OK
        assert all(e.status is NodeStatus.DONE for e in logged
                   if isinstance(e, NodeFinishedEvent))

        run = check(RunDetail, await client.get(f"/runs/{started.run_id}"))
        assert run.status is RunStatus.SUCCEEDED and len(run.nodes) == 3
        assert all(n.status is NodeStatus.DONE for n in run.nodes)
        outcomes = [(c.model, c.outcome, c.action, c.fallback_from) for c in run.calls]
        assert (first, Outcome.ERROR, Action.NEXT, None) in outcomes
        assert any(c.fallback_from == first and c.outcome is Outcome.OK for c in run.calls)
        assert all(c.tier is None and c.batch_item_id is None for c in run.calls)
        assert check(list[ParkedRequest], await client.get(
            f"/runs/{started.run_id}/parked")) == []
        assert run.cost_by_node and sum(run.cost_by_model.values()) == pytest.approx(
            run.cost_usd)
        assert isinstance(run.input, dict) and run.input == {"topic": "t"}
        listed = check(list[RunSummary], await client.get("/runs"))
        assert [r.id for r in listed] == [started.run_id]

        review = check(RunActionResult, await client.post(
            "/runs", json={"flow": "review", "input": {"text": "hi"}, "wait": True}))
        assert review.status is RunStatus.INTERRUPTED and review.interrupts
        resumed = check(RunActionResult, await client.post(
            f"/runs/{review.run_id}/resume", json={"value": "yes", "wait": True}))
        assert resumed.status is RunStatus.SUCCEEDED and isinstance(resumed.state, dict)
        feedback = check(FeedbackResult, await client.post(
            f"/runs/{started.run_id}/feedback", json={"good": True, "node": "n1"}))
        assert feedback.answers >= 1
        waiting = check(RunActionResult, await client.post(
            "/runs", json={"flow": "review", "input": {"text": "x"}, "wait": True}))
        cancelled = check(RunActionResult, await client.post(f"/runs/{waiting.run_id}/cancel"))
        assert cancelled.status is RunStatus.CANCELLED
        ended = await _events(client, waiting.run_id)
        assert isinstance(ended[-1], StatusEvent) and ended[-1].status is RunStatus.CANCELLED

        costs = check(CostSummary, await client.get("/costs", params={"days": 1}))
        assert costs.total.fallbacks == 1 and costs.total.errors == 2
        assert costs.total.cost_usd == pytest.approx(sum(
            r.cost_usd or 0 for r in check(list[RunSummary], await client.get("/runs"))))
        assert {b.key for b in costs.by_flow} == {"chain", "review"}

        # Errors: one shape, one line.
        for r, status in [
            (await anon.get("/runs"), 401),
            (await client.get("/runs/nope"), 404),
            (await client.post(f"/runs/{started.run_id}/resume", json={}), 409),
            (await client.post("/runs", json={"flow": "chain", "budget": "lots"}), 422),
            (await client.post("/runs", json={"flow": "chain", "inputs": {}}), 422),
            (await client.post("/runs", content=b"{not json",
                               headers={"content-type": "application/json"}), 422),
            (await client.post("/runs", content=b"x" * 2_000_000,
                               headers={"content-type": "application/json"}), 413),
        ]:
            error = check(ErrorBody, r, status)
            assert error.detail.message and "\n" not in error.detail.message
        assert "inputs" in check(ErrorBody, await client.post(
            "/runs", json={"flow": "chain", "inputs": {}}), 422).detail.message
        bad_status = check(ErrorBody, await client.get("/runs", params={"status": "done"}), 422)
        assert bad_status.detail.message.startswith("status: Input should be 'pending'")
        assert check(ErrorBody, await client.get("/runs", params={"limit": "x"}),
                     422).detail.message.startswith("limit: ")
        assert [r.id for r in check(list[RunSummary], await client.get(
            "/runs", params={"status": "cancelled"}))] == [waiting.run_id]


async def test_hostile_stored_runs_still_match_their_models(tmp_path: Path) -> None:
    from test_service_hostile import insert_raw_run, nested

    async with serving(f"sqlite:///{tmp_path / 'h.db'}") as (runner, url), \
            _client(url, "tok-root") as client:
        await runner.ledger.create_run("deep-300", "chain", nested(300))
        await insert_raw_run(runner, "deep-5000", '{"a":' * 5000 + "1" + "}" * 5000,
                             interrupts='[' * 5000 + "]" * 5000)
        await insert_raw_run(runner, "odd", '{"t": "x\\ud800y"}', budget_usd=math.nan,
                             cost_usd=math.inf)
        runs = {r.id: r for r in check(list[RunSummary], await client.get("/runs"))}
        assert isinstance(runs["deep-300"].input, NotShown)
        assert isinstance(runs["deep-5000"].input, Unreadable)
        assert runs["odd"].cost_usd is None and runs["odd"].budget_usd is None
        for run_id in runs:
            check(RunDetail, await client.get(f"/runs/{run_id}"))
