"""The HTTP service on a real uvicorn bound to 127.0.0.1, driven by an HTTP client."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from durable_flows import chain_flow, review_flow
from served import served

from frugalflow import Catalog, UserError
from frugalflow.learning import examples_from
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.service import create_app


@contextlib.asynccontextmanager
async def serving(db: str, *, token: str | None = None, catalog: Catalog | None = None
                  ) -> AsyncIterator[httpx.AsyncClient]:
    runner = Runner(db, flows=[chain_flow(3), review_flow()],
                    catalog=catalog or Catalog.simulated(), breakers=BreakerRegistry())
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with served(create_app(runner, token=token)) as url, httpx.AsyncClient(
            base_url=url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'service.db'}"


def _slow(latency: float) -> Catalog:
    """The simulated catalog, each call taking `latency` s (a run still going when watched)."""
    return Catalog([s.model_copy(update={"model_kwargs": {"latency": latency}})
                    for s in Catalog.simulated()], name="slow")


async def test_start_watch_events_and_read_the_run(db: str) -> None:
    # Calls take time: an instant run could end before the stream subscribes (it would
    # show only its final status).
    async with serving(db, catalog=_slow(0.2)) as client:
        flows = (await client.get("/flows")).json()
        assert {f["name"] for f in flows} == {"chain", "review"}
        started = await client.post("/runs", json={"flow": "chain", "input": {"topic": "sse"},
                                                   "budget": 1.0})
        assert started.status_code == 202
        run_id = started.json()["run_id"]
        events = []
        async with client.stream("GET", f"/runs/{run_id}/events") as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if events[-1]["event"] == "run_finished":
                        break
        kinds = [e["event"] for e in events]
        assert kinds[0] == "status"
        assert kinds[-1] == "run_finished" and events[-1]["status"] == "succeeded"
        assert kinds.count("attempt") >= 3 or (await client.get(f"/runs/{run_id}")).json()["calls"]
        run = (await client.get(f"/runs/{run_id}")).json()
        assert run["status"] == "succeeded" and len(run["calls"]) == 3
        assert sum(run["cost_by_node"].values()) == pytest.approx(run["cost_usd"])
        assert [r["id"] for r in (await client.get("/runs")).json()] == [run_id]
        schema = (await client.get("/openapi.json")).json()
        assert "/runs/{run_id}/resume" in schema["paths"]
        catalog = (await client.get("/catalog")).json()
        assert all(m["available"] and m["provider_health"] == "closed" for m in catalog)


async def test_bad_requests_get_clear_4xx(db: str) -> None:
    async with serving(db) as client:
        r = await client.post("/runs", json={"flow": "nope", "input": {}})
        assert r.status_code == 404 and "flows: chain, review" in r.json()["detail"]["message"]
        r = await client.post("/runs", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        r = await client.post("/runs", json={"flow": "chain", "budget": -1})
        assert r.status_code == 422 and "budget" in r.text
        r = await client.post("/runs", json={"flow": "chain", "inputs": {}})
        assert r.status_code == 422 and "inputs" in r.text
        r = await client.post("/runs", content=b"x" * 2_000_000,
                              headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert (await client.get("/runs/missing")).status_code == 404
        done = (await client.post("/runs", json={"flow": "chain", "input": {"topic": "a"},
                                                 "wait": True})).json()
        assert done["status"] == "succeeded"
        r = await client.post(f"/runs/{done['run_id']}/resume", json={})
        assert r.status_code == 409 and "already succeeded" in r.json()["detail"]["message"]


async def test_token_is_required_when_set(db: str) -> None:
    async with serving(db, token="s3cret") as client:
        assert (await client.get("/flows")).status_code == 200
        bare = await client.get("/flows", headers={"Authorization": ""})
        assert bare.status_code == 401
        wrong = await client.get("/flows", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401
    with pytest.raises(UserError, match="without a bearer token"):
        create_app(Runner(db, catalog=Catalog.simulated()), host="0.0.0.0")


async def test_interrupted_run_resumes_after_a_server_restart(db: str) -> None:
    async with serving(db) as client:
        r = await client.post("/runs", json={"flow": "review", "input": {"text": "hi"},
                                             "wait": True})
        body = r.json()
        assert body["status"] == "interrupted" and body["interrupts"][0]["question"]
        run_id = body["run_id"]
    async with serving(db) as client:  # a new server process state, same database
        r = await client.post(f"/runs/{run_id}/resume", json={"value": "yes", "wait": True})
        assert r.status_code == 200 and r.json()["status"] == "succeeded"
        assert r.json()["state"]["verdict"] == "yes"


async def test_cancel_and_shutdown_leave_runs_resumable(db: str) -> None:
    slow = Catalog([s.model_copy(update={"model_kwargs": {"latency": 30}})
                    for s in Catalog.simulated()], name="slow")
    async with serving(db, catalog=slow) as client:
        a = (await client.post("/runs", json={"flow": "chain", "input": {"topic": "a"}})).json()
        b = (await client.post("/runs", json={"flow": "chain", "input": {"topic": "b"}})).json()
        r = await client.post(f"/runs/{a['run_id']}/cancel")
        assert r.json()["status"] == "cancelled"
    async with serving(db) as client:  # shutdown stopped b: paused, resumable
        assert (await client.get(f"/runs/{b['run_id']}")).json()["status"] == "paused"
        r = await client.post(f"/runs/{b['run_id']}/resume", json={"wait": True})
        assert r.json()["status"] == "succeeded"


async def test_the_embedded_service_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    monkeypatch.setenv("FRUGALFLOW_DATABASE_URL", f"sqlite:///{tmp_path / 'example.db'}")
    monkeypatch.setenv("FRUGALFLOW_TOKEN", "example-token")  # the router needs one
    path = Path(__file__).resolve().parents[1] / "examples" / "service" / "app.py"
    spec = importlib.util.spec_from_file_location("example_service_app", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    transport = httpx.ASGITransport(app=module.app)
    async with module.lifespan(module.app):
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            r = await client.post("/tickets", json={"text": "charged twice, order 9"})
            assert r.status_code == 200 and r.json()["status"] == "succeeded"
            assert (await client.get("/frugalflow/flows")).status_code == 401
            flows = (await client.get("/frugalflow/flows",
                                      headers={"Authorization": "Bearer example-token"})).json()
            assert "support_triage" in {f["name"] for f in flows}


async def test_feedback_on_a_runs_answer_is_recorded_for_learning(db: str) -> None:
    async with serving(db) as client:
        done = (await client.post("/runs", json={"flow": "chain", "input": {"topic": "f"},
                                                 "wait": True})).json()
        run_id = done["run_id"]
        r = await client.post(f"/runs/{run_id}/feedback", json={"good": False, "node": "n2"})
        assert r.status_code == 200 and r.json() == {"run_id": run_id, "answers": 1,
                                                     "good": False}
        calls = (await client.get(f"/runs/{run_id}")).json()["calls"]
        assert [(c["node"], c["feedback"]) for c in calls] == [
            ("n1", None), ("n2", False), ("n3", None)]
        r = await client.post(f"/runs/{run_id}/feedback", json={"good": True})
        assert r.status_code == 400 and "exactly one of node or call_id" in r.text
        r = await client.post(f"/runs/{run_id}/feedback", json={"good": True, "node": "n9"})
        assert r.status_code == 400 and "no answer from node 'n9'" in r.text
        r = await client.post("/runs/missing/feedback", json={"good": True, "node": "n1"})
        assert r.status_code == 404
    # The ledger's training examples now count n2's answer as a failure.
    runner = Runner(db, flows=[chain_flow(3)], catalog=Catalog.simulated())
    try:
        examples = examples_from(await runner.ledger.outcomes(flow="chain"))
    finally:
        await runner.close()
    assert [(e.node, e.success) for e in examples] == [("n1", True), ("n2", False), ("n3", True)]


async def test_a_run_started_over_http_may_have_a_default_deadline(db: str) -> None:
    """`deadline` in POST /runs: seconds or an ISO-8601 duration; a bad one is a 422 naming
    it, and nothing is written."""
    from datetime import datetime, timedelta

    async with serving(db) as client:
        for given in (21600, "PT6H"):
            r = await client.post("/runs", json={"flow": "chain", "input": {"topic": "d"},
                                                 "deadline": given, "wait": True})
            assert r.status_code == 200, r.text
            run = (await client.get(f"/runs/{r.json()['run_id']}")).json()
            due = datetime.fromisoformat(run["deadline_at"])
            assert due - datetime.fromisoformat(run["created_at"]) == timedelta(hours=6)
        plain = (await client.post("/runs", json={"flow": "chain", "input": {"topic": "p"},
                                                  "wait": True})).json()
        assert (await client.get(f"/runs/{plain['run_id']}")).json()["deadline_at"] is None
        for bad in (b"0", b"-1", b'"soon"', b'"6h"', b"true", b"NaN", b"1e400", b'"P2Y"'):
            r = await client.post("/runs", content=b'{"flow": "chain", "deadline": %s}' % bad,
                                  headers={"content-type": "application/json"})
            assert r.status_code == 422 and "deadline" in r.text, (bad, r.text)
        assert len((await client.get("/runs")).json()) == 3
        schema = (await client.get("/openapi.json")).json()
        assert "deadline" in schema["components"]["schemas"]["StartRun"]["properties"]
