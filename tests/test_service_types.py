"""The typed API: every endpoint's response model in /openapi.json, real responses that
validate against those models (SQLite and PostgreSQL), and the costs summary."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone

import httpx
import pytest
from durable_flows import chain_flow, review_flow
from served import served

from frugalflow import Catalog
from frugalflow.costs import CostBucket, CostSummary, cost_summary
from frugalflow.persistence.ledger import Ledger
from frugalflow.persistence.store import Store
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.service import Principal, create_app
from frugalflow.statuses import Outcome
from frugalflow.usage import Attempt, Usage

NOW = datetime(2026, 6, 15, 12, 0, tzinfo=timezone.utc)


async def _known_spending(ledger: Ledger, now: datetime) -> None:
    """Two days, two models, two flows, two principals, a fallback, and a call outside a
    week's window: the figures the costs tests expect."""
    d1, d2 = now - timedelta(days=1), now
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
        ("flow_a", attempt("r1", "c2", "polish", "m1", d2.replace(hour=9), 0.01)),
        ("flow_b", attempt("r2", "c3", "draft", "m2", d2.replace(hour=11), 0.05)),
        ("flow_b", attempt("r2", "c4", "draft", "m2", now - timedelta(days=5), 1.0)),
    ]
    for flow, a in rows:
        await ledger.record_attempt(a, flow=flow)


def _by(buckets: list[CostBucket], *fields: str) -> dict[object, tuple[object, ...]]:
    return {(b.key, b.flow) if b.flow else b.key: tuple(getattr(b, f) for f in fields)
            for b in buckets}


async def test_cost_summary_aggregates_known_spending(db_url: str) -> None:
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
