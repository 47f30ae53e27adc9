"""Events that never miss: the persisted event log (ids, order, outages, secrets) and the
service's event stream (replay with Last-Event-ID / ?after=, heartbeats, the final status),
on SQLite and PostgreSQL, over a real uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any, TypedDict

import httpx
import pytest
from langchain_core.messages import HumanMessage
from served import served
from sqlalchemy import text
from sqlalchemy.engine import make_url
from tcp_proxy import TcpProxy

from frugalflow import END, START, Catalog, Flow, Needs, RoutedChatModel
from frugalflow.events import Event, EventBus
from frugalflow.persistence.event_log import EventLog
from frugalflow.persistence.store import Store
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.service import create_app

_GATES: dict[str, asyncio.Event] = {}
_AFTER_GATE: dict[str, Any] = {}  # topic -> called when its gate opens


class S(TypedDict, total=False):
    topic: str
    n1: str
    n2: str


def gated_flow() -> Flow[S]:
    """n1 (model) -> gate (waits for the test's `_GATES[run topic]`) -> n2 (model)."""
    flow: Flow[S] = Flow("gated", S)

    def model_node(name: str) -> Any:
        async def node(state: S, model: RoutedChatModel) -> dict[str, str]:
            answer = await model.ainvoke([HumanMessage(f"{name}: {state['topic']}")])
            return {name: str(answer.content)[:40]}

        return node

    async def gate(state: S) -> dict[str, str]:
        await _GATES[state["topic"]].wait()
        if hook := _AFTER_GATE.get(state["topic"]):
            hook()
        return {}

    flow.add_node("n1", model_node("n1"), needs=Needs(quality={"classification": 0.45}))
    flow.add_node("gate", gate)
    flow.add_node("n2", model_node("n2"), needs=Needs(quality={"classification": 0.45}))
    flow.add_edge(START, "n1")
    flow.add_edge("n1", "gate")
    flow.add_edge("gate", "n2")
    flow.add_edge("n2", END)
    return flow


def make_runner(url: str) -> Runner:
    return Runner(url, flows=[gated_flow()], catalog=Catalog.simulated(),
                  breakers=BreakerRegistry())


@contextlib.asynccontextmanager
async def serving(runner: Runner, heartbeat: float = 15.0) -> AsyncIterator[httpx.AsyncClient]:
    async with served(create_app(runner, heartbeat=heartbeat)) as url, httpx.AsyncClient(
            base_url=url, timeout=60) as client:
        yield client


class Frame(TypedDict, total=False):
    id: int
    event: str
    data: Event
    comment: str


def ends_frame(line: str, current: Frame) -> bool:
    """Add one SSE line's field to `current`; True when the (blank) line ends the frame."""
    if line.startswith("id: "):
        current["id"] = int(line[4:])
    elif line.startswith("event: "):
        current["event"] = line[7:]
    elif line.startswith("data: "):
        current["data"] = json.loads(line[6:])
    return line == "" and bool(current)


async def frames(client: httpx.AsyncClient, url: str, *, headers: dict[str, str] | None = None,
                 until: str | None = None, on_open: Callable[[], None] | None = None
                 ) -> list[Frame]:
    """The SSE frames of `url` until the server ends the stream (or a frame of kind
    `until`, or two keep-alives when until is "keep-alive", has arrived). `on_open` is
    called after the first frame (the stream is subscribed by then)."""
    got: list[Frame] = []
    current: Frame = {}
    async with client.stream("GET", url, headers=headers or {}) as stream:
        assert stream.status_code == 200, await stream.aread()
        async for line in stream.aiter_lines():
            if line.startswith(":"):
                got.append({"comment": line[1:].strip()})
            elif ends_frame(line, current):
                got.append(current)
                if on_open is not None and len(got) == 1:
                    on_open()
                if until is not None and current.get("event") == until:
                    return got
                current = {}
            if until == "keep-alive" and sum("comment" in f for f in got) >= 2:
                return got
    return got


def logged(fs: list[Frame]) -> list[Frame]:
    return [f for f in fs if "id" in f]


async def log_of(runner: Runner, run_id: str) -> list[Event]:
    assert runner.events.log is not None
    return await runner.events.log.read(run_id)


async def wait_for_event(queue: asyncio.Queue[Event], kind: str, node: str | None = None
                         ) -> Event:
    while True:
        e = await asyncio.wait_for(queue.get(), 60)
        if e["event"] == kind and (node is None or e.get("node") == node):
            return e


# -- the stream ------------------------------------------------------------------------


async def test_a_late_subscriber_gets_every_event_then_resumes_with_last_event_id(
        db_url: str) -> None:
    _GATES["late"] = asyncio.Event()
    runner = make_runner(db_url)
    async with serving(runner) as client, runner.events.queue() as bus:
        r = await client.post("/runs", json={"flow": "gated", "input": {"topic": "late"}})
        run_id = r.json()["run_id"]
        await wait_for_event(bus, "node_started", "gate")  # n1 is over: it all happened
        # Connected after POST /runs and after the first node: replayed, with ids, in order.
        first = await frames(client, f"/runs/{run_id}/events", until="node_started")
        first += await frames(client, f"/runs/{run_id}/events?after={first[-1]['id']}",
                              until="node_started") if first[-1]["data"]["node"] == "n1" else []
        assert first[0]["event"] == "status" and "id" not in first[0]
        seen = logged(first)
        kinds = [f["event"] for f in seen]
        assert kinds[:2] == ["run_started", "node_started"] and "attempt" in kinds
        assert kinds[-1] == "node_started" and seen[-1]["data"]["node"] == "gate"
        ids = [f["id"] for f in seen]
        assert ids == sorted(set(ids))
        assert all(f["data"]["id"] == f["id"] and f["data"]["run_id"] == run_id for f in seen)
        assert list(seen[0]["data"])[:4] == ["id", "run_id", "event", "at"]
        _GATES["late"].set()
        # Reconnect as a browser does: exactly the rest, then the run's final status.
        rest = await frames(client, f"/runs/{run_id}/events",
                            headers={"Last-Event-ID": str(ids[-1])})
        assert rest[-1]["event"] == "status" and rest[-1]["data"]["status"] == "succeeded"
        rest_ids = [f["id"] for f in logged(rest)]
        assert rest_ids and min(rest_ids) > ids[-1] and rest_ids == sorted(set(rest_ids))
        assert [f["event"] for f in logged(rest)][-1] == "run_finished"
        everything = await log_of(runner, run_id)
        # No gap, no duplicate: the two streams together are the log.
        assert [e["id"] for e in everything] == ids + rest_ids
        assert [f["data"] for f in seen + logged(rest)] == everything
        # ?after= gives the same rest.
        again = await frames(client, f"/runs/{run_id}/events?after={ids[-1]}")
        assert [f["id"] for f in logged(again)] == rest_ids
        attempts = [e for e in everything if e["event"] == "attempt"]
        assert {a["node"] for a in attempts} == {"n1", "n2"}


async def test_a_finished_run_replays_its_log_and_ends(db_url: str) -> None:
    runner = make_runner(db_url)
    _GATES["done"] = asyncio.Event()
    _GATES["done"].set()
    async with serving(runner) as client:
        r = await client.post("/runs", json={"flow": "gated", "input": {"topic": "done"},
                                             "wait": True})
        run_id = r.json()["run_id"]
        fs = await frames(client, f"/runs/{run_id}/events")  # returns: the server ended it
        assert fs[0]["data"] == {"id": None, "run_id": run_id, "event": "status",
                                 "status": "succeeded"}
        assert fs[-1]["event"] == "status" and fs[-1]["data"]["status"] == "succeeded"
        body = logged(fs)
        assert [f["event"] for f in body][:2] == ["run_started", "node_started"]
        assert body[-1]["event"] == "run_finished"
        assert [f["data"] for f in body] == await log_of(runner, run_id)
        # After the last id: nothing but the statuses.
        tail = await frames(client, f"/runs/{run_id}/events?after={body[-1]['id']}")
        assert [f.get("event") for f in tail] == ["status", "status"]


async def test_an_idle_stream_gets_heartbeats(tmp_path: Any) -> None:
    runner = make_runner(f"sqlite:///{tmp_path / 'hb.db'}")
    await runner.setup()
    await runner.ledger.create_run("idle", "gated", {"topic": "idle"})  # pending: no events
    async with serving(runner, heartbeat=0.05) as client:
        fs = await asyncio.wait_for(frames(client, "/runs/idle/events", until="keep-alive"), 60)
    assert [f.get("comment") for f in fs if "comment" in f] == ["keep-alive", "keep-alive"]
    assert fs[0]["data"]["status"] == "pending"


@pytest.mark.parametrize("query,header,what", [
    ("?after=abc", None, "after 'abc' is not an event id"),
    ("?after=-3", None, "after -3 is negative"),
    ("", "x1", "Last-Event-ID 'x1' is not an event id"),
])
async def test_a_bad_after_or_last_event_id_is_one_clear_422(
        tmp_path: Any, query: str, header: str | None, what: str) -> None:
    runner = make_runner(f"sqlite:///{tmp_path / 'bad.db'}")
    async with serving(runner) as client:
        r = await client.get(f"/runs/any/events{query}",
                             headers={"Last-Event-ID": header} if header else {})
    assert r.status_code == 422
    message = r.json()["detail"]["message"]
    assert message.startswith(what) and "\n" not in message


async def test_a_restarted_service_resumes_the_stream_with_last_event_id(
        db_url: str) -> None:
    _GATES["restart"] = asyncio.Event()
    first_runner = make_runner(db_url)
    async with serving(first_runner) as client, first_runner.events.queue() as bus:
        r = await client.post("/runs", json={"flow": "gated", "input": {"topic": "restart"}})
        run_id = r.json()["run_id"]
        await wait_for_event(bus, "node_started", "gate")
        before = logged(await frames(client, f"/runs/{run_id}/events", until="node_started"))
    # The service stopped (its run paused, resumable); a new one on the same database.
    _GATES["restart"].set()
    runner = make_runner(db_url)
    async with serving(runner) as client:
        await runner.resume(run_id, wait=True)
        rest = await frames(client, f"/runs/{run_id}/events",
                            headers={"Last-Event-ID": str(before[-1]["id"])})
        everything = await log_of(runner, run_id)
    ids = [f["id"] for f in before + logged(rest)]
    assert ids == [e["id"] for e in everything] and ids == sorted(set(ids))
    assert rest[-1]["data"]["status"] == "succeeded"
    assert [e["event"] for e in everything].count("run_started") == 2  # started, resumed


# -- the log -----------------------------------------------------------------------------


async def test_events_are_logged_in_order_and_scrubbed(db_url: str) -> None:
    store = Store(db_url)
    bus = EventBus(log=EventLog(store))
    secret = "sk-proj-" + "Q" * 40
    try:
        async with bus.queue("r") as queue:
            for i in range(300):  # more than one batch
                bus.publish("r", "tick", i=i)
            bus.publish("r", "attempt", error=f"401 from provider: key {secret}",
                        api_key=secret, input_tokens=3)
            got = [await asyncio.wait_for(queue.get(), 30) for _ in range(301)]
        assert [e.get("i") for e in got[:300]] == list(range(300))
        ids = [e["id"] for e in got]
        assert all(isinstance(i, int) for i in ids) and ids == sorted(set(ids))
        assert secret not in json.dumps(got[-1]) and got[-1]["input_tokens"] == 3
        async with store.read() as conn:
            raw = (await conn.execute(text("SELECT data FROM ff_events"))).all()
        assert len(raw) == 301 and all(secret not in str(r[0]) for r in raw)
        assert bus.log is not None and await bus.log.read("r", ids[149]) == got[150:]
    finally:
        assert bus.log is not None
        await bus.log.close()
        await store.close()


async def test_a_bus_without_a_log_delivers_at_once() -> None:
    bus = EventBus()
    async with bus.queue("r") as queue:
        bus.publish("r", "tick", n=1)
        event = queue.get_nowait()  # delivered within publish: nothing to wait for
    assert list(event) == ["id", "run_id", "event", "at", "n"]
    assert (event["id"], event["event"], event["n"]) == (None, "tick", 1)


@pytest.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    from pg import ADMIN_URL

    admin = make_url(ADMIN_URL)
    p = await TcpProxy(admin.host or "127.0.0.1", admin.port or 5432).start()
    yield p
    await p.close()


async def test_the_log_keeps_events_through_an_outage(fresh_pg_url: str,
                                                      proxy: TcpProxy) -> None:
    url = make_url(fresh_pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False)
    store = Store(url, retry_for=0.2)
    log = EventLog(store, backoff_max=0.2)
    bus = EventBus(log=log)
    try:
        async with bus.queue("r") as queue:
            bus.publish("r", "before")
            before = await asyncio.wait_for(queue.get(), 30)
            assert isinstance(before["id"], int)
            proxy.cut()  # the database is unreachable: nothing reaches it
            for i in range(3):
                bus.publish("r", "during", i=i)
            during = [await asyncio.wait_for(queue.get(), 30) for _ in range(3)]
            # Delivered live, marked as not logged yet.
            assert [(e["event"], e["i"], e["id"]) for e in during] == [
                ("during", 0, None), ("during", 1, None), ("during", 2, None)]
            assert log.unwritten == 3
            proxy.restore()
            assert await log.drain(30) and log.unwritten == 0  # the kept ones, written
            assert queue.empty()  # and not delivered twice
            bus.publish("r", "after")
            after = await asyncio.wait_for(queue.get(), 30)
            assert isinstance(after["id"], int)
        rows = await log.read("r")
        assert [(e["event"], e.get("i")) for e in rows] == [
            ("before", None), ("during", 0), ("during", 1), ("during", 2), ("after", None)]
        assert rows[0]["id"] == before["id"] and rows[-1]["id"] == after["id"]
        assert [e["id"] for e in rows] == sorted(e["id"] for e in rows)
        assert [{k: v for k, v in e.items() if k != "id"} for e in rows[1:4]] == [
            {k: v for k, v in e.items() if k != "id"} for e in during]
    finally:
        await log.close()
        await store.close()


async def test_a_run_through_an_outage_loses_no_event(fresh_pg_url: str,
                                                      proxy: TcpProxy) -> None:
    url = make_url(fresh_pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False)
    _GATES["outage"] = asyncio.Event()
    runner = make_runner(url)
    runner.store.retry_for = 0.2
    await runner.setup()
    live: list[Event] = []
    try:
        async with runner.events.queue() as bus:
            started = await runner.start("gated", {"topic": "outage"}, wait=False)
            await wait_for_event(bus, "node_started", "gate")
            # A node publishes while the database is away (the runner's own writes wait).
            _AFTER_GATE["outage"] = lambda: runner.events.publish(
                started.run_id, "note", text="during the outage")
            proxy.cut()
            _GATES["outage"].set()
            first = await wait_for_event(bus, "note")
            live.append(first)
            proxy.restore()
            result = await asyncio.wait_for(runner.wait(started.run_id), 60)
            assert runner.events.log is not None and await runner.events.log.drain(60)
            while not bus.empty():
                live.append(bus.get_nowait())
        assert result.status == "succeeded"
        assert first["id"] is None  # delivered live while the log could not take it
        logged_events = await log_of(runner, started.run_id)
        kinds = [e["event"] for e in logged_events]
        assert "run_finished" in kinds and kinds[0] == "run_started"
        # Every event delivered live is in the log (by content), once.
        keys = [json.dumps({k: v for k, v in e.items() if k != "id"}, sort_keys=True)
                for e in logged_events]
        assert len(keys) == len(set(keys))
        for e in live:
            assert json.dumps({k: v for k, v in e.items() if k != "id"}, sort_keys=True) in keys
    finally:
        await runner.close()


# -- across processes: the relay, the log, a shared SQLite file ------------------------------


async def test_an_event_too_big_for_notify_is_read_from_the_log(fresh_pg_url: str) -> None:
    """Two runners on one PostgreSQL database (as a service and a worker): the worker's
    event is over NOTIFY's 8000 bytes; the service's stream reads it whole from the log."""
    service = Runner(fresh_pg_url, flows=[gated_flow()], catalog=Catalog.simulated(),
                     breakers=BreakerRegistry(), share_events=True)
    worker = Runner(fresh_pg_url, flows=[gated_flow()], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry(), share_events=True)
    await worker.setup()
    await worker.ledger.create_run("big", "gated", {"topic": "big"}, status="running")
    big = "x" * 20_000
    try:
        async with serving(service) as client, service.events.queue("big") as relayed:
            got = await asyncio.wait_for(frames(
                client, "/runs/big/events", until="note",
                on_open=lambda: worker.events.publish("big", "note", text=big)), 60)
            truncated = await asyncio.wait_for(relayed.get(), 30)
        assert truncated.get("truncated") is True and "text" not in truncated
        assert got[-1]["data"]["text"] == big and got[-1]["id"] == truncated["id"]
    finally:
        await worker.close()


async def test_a_stream_sees_another_process_s_events_on_shared_sqlite(tmp_path: Any) -> None:
    """No relay on SQLite: the stream reads the log again every second."""
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    service, other = make_runner(url), make_runner(url)
    await other.setup()
    await other.ledger.create_run("shared", "gated", {"topic": "s"}, status="running")
    try:
        async with serving(service) as client:
            fs = await asyncio.wait_for(frames(
                client, "/runs/shared/events", until="note",
                on_open=lambda: other.events.publish("shared", "note", text="elsewhere")), 60)
        assert fs[-1]["data"]["text"] == "elsewhere" and isinstance(fs[-1]["id"], int)
    finally:
        await other.close()


async def test_a_stream_sends_an_unlogged_event_live_then_its_id(fresh_pg_url: str,
                                                                  proxy: TcpProxy) -> None:
    """The database goes away with a stream open: a new event is sent at once without an
    id; once the database is back and it is written, an id-only frame gives its id."""
    url = make_url(fresh_pg_url).set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False)
    runner = make_runner(url)
    runner.store.retry_for = 0.2
    await runner.setup()
    await runner.ledger.create_run("o", "gated", {"topic": "o"}, status="running")
    got: list[Frame] = []

    def away_then_publish() -> None:
        proxy.cut()
        runner.events.publish("o", "note", text="while away")

    async with serving(runner) as client:
        async with client.stream("GET", "/runs/o/events") as stream:
            current: Frame = {}
            async for line in stream.aiter_lines():
                if ends_frame(line, current):
                    got.append(current)
                    current = {}
                    if len(got) == 1:
                        away_then_publish()
                    elif got[-1].get("event") == "note":
                        proxy.restore()
                    elif "event" not in got[-1]:
                        break  # the id-only frame
    note, id_only = got[1], got[2]
    assert note["event"] == "note" and "id" not in note and note["data"]["id"] is None
    assert isinstance(id_only["id"], int) and "data" not in id_only
    assert runner.events.log is not None
    assert [e["id"] for e in await runner.events.log.read("o")] == [id_only["id"]]


def test_publish_outside_an_event_loop_still_delivers(tmp_path: Any) -> None:
    """A thread without a loop publishes: the event is delivered live (not logged), and
    publish does not raise."""
    runner = make_runner(f"sqlite:///{tmp_path / 'thread.db'}")
    got: list[Event] = []
    runner.events.deliver = got.append  # type: ignore[method-assign,assignment]
    runner.events.publish("r", "note", text="from a thread")
    assert [(e["event"], e["id"]) for e in got] == [("note", None)]
