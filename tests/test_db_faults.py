"""The database drops connections or goes away mid-run (issue 11, item 1).

PostgreSQL is reached through a TCP proxy (tests/tcp_proxy.py) that cuts every connection on
demand, at deterministic moments: from inside the flow's nodes, before a node's model call
(its attempt row hits the cut) or after it (its checkpoint write and node row hit it).
SQLite's fault is another connection holding the write lock past the busy timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import sqlite3
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypedDict

import asyncpg
import psycopg
import pytest
from langchain_core.messages import HumanMessage
from sqlalchemy import select, update
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError

from frugalflow import END, START, Catalog, Flow, Needs, RoutedChatModel
from frugalflow.exceptions import StoreUnavailableError
from frugalflow.persistence.errors import is_transient
from frugalflow.persistence.store import Store
from frugalflow.resilience import BreakerRegistry
from frugalflow.persistence.tables import CheckpointRow, LeaseRow, NodeRunRow, RunRow
from frugalflow.runner import Runner
from tcp_proxy import TcpProxy

DOCUMENTED = {"succeeded", "interrupted", "budget_exceeded", "failed", "cancelled", "paused"}
NODES = 5


class S(TypedDict, total=False):
    topic: str
    n1: str
    n2: str
    n3: str
    n4: str
    n5: str


Hook = Callable[[], Any]


def fault_flow(counts: Counter[str], hooks: dict[str, Hook]) -> Flow[S]:
    """NODES model nodes in a row; `hooks["n2:before"]` runs before node n2's model call,
    `hooks["n2:after"]` after it (before the node returns). `counts` counts executions."""
    flow: Flow[S] = Flow("faults", S)

    def make(i: int) -> Any:
        name = f"n{i}"

        async def node(state: S, model: RoutedChatModel) -> dict[str, str]:
            counts[name] += 1
            if (hook := hooks.get(f"{name}:before")) and inspect.isawaitable(r := hook()):
                await r
            previous = state.get(f"n{i - 1}", state["topic"])  # type: ignore[misc]
            answer = await model.ainvoke([HumanMessage(f"step {i}: {previous}")])
            if hook := hooks.get(f"{name}:after"):
                hook()
            return {name: str(answer.content)[:40]}

        return node

    for i in range(1, NODES + 1):
        flow.add_node(f"n{i}", make(i), needs=Needs(quality={"classification": 0.45}))
        flow.add_edge(START if i == 1 else f"n{i - 1}", f"n{i}")
    flow.add_edge(f"n{NODES}", END)
    return flow


def paid_calls(sim: Any) -> int:
    """Calls the simulated providers answered (keys are provider and provider/model)."""
    return sum(n for k, n in sim.calls.items() if "/" in k)


async def ledger_facts(runner: Runner, run_id: str) -> tuple[int, int, list[str]]:
    """(paid attempt rows, checkpoints, node row statuses) of a run."""
    record = await runner.get(run_id)
    paid = [a for a in record.attempts if a.outcome != "replayed"]
    async with runner.store.read() as conn:
        checkpoints = (await conn.execute(select(CheckpointRow.__table__.c.checkpoint_id).where(  # type: ignore[attr-defined]
            CheckpointRow.__table__.c.thread_id == run_id))).all()  # type: ignore[attr-defined]
    return len(paid), len(checkpoints), [n.status for n in record.nodes]


@pytest.fixture
async def proxy() -> Any:
    admin = make_url(_admin_port())
    p = await TcpProxy(admin.host or "127.0.0.1", admin.port or 5432).start()
    yield p
    await p.close()


def _admin_port() -> str:
    from pg import ADMIN_URL

    return ADMIN_URL


def via(proxy: TcpProxy, url: str) -> str:
    return make_url(url).set(host="127.0.0.1", port=proxy.port).render_as_string(
        hide_password=False)


def cut_for(proxy: TcpProxy, seconds: float) -> Hook:
    """A hook that cuts every connection now and restores them `seconds` later (once: a
    node executed again does not cut again)."""
    fired = []

    def hook() -> None:
        if fired:
            return
        fired.append(True)
        proxy.cut()
        asyncio.get_running_loop().call_later(seconds, proxy.restore)

    return hook


# -- error mapping ----------------------------------------------------------------------------


def test_driver_connection_errors_are_transient_and_statement_errors_are_not() -> None:
    transient = [
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.InterfaceError("connection is closed"),
        psycopg.OperationalError("server closed the connection unexpectedly"),
        sqlite3.OperationalError("database is locked"),
        InterfaceError("SELECT 1", {}, asyncpg.exceptions.InterfaceError("connection is closed")),
        OperationalError("BEGIN IMMEDIATE", {}, sqlite3.OperationalError("database is locked")),
        ConnectionResetError(104, "Connection reset by peer"),
    ]
    permanent = [
        sqlite3.OperationalError("no such table: ff_runs"),
        OperationalError("SELECT x", {}, sqlite3.OperationalError("no such column: x")),
        IntegrityError("INSERT", {}, Exception("duplicate key")),
        ValueError("bad"),
    ]
    assert [is_transient(e) for e in transient] == [True] * len(transient)
    assert [is_transient(e) for e in permanent] == [False] * len(permanent)


async def test_a_dropped_connection_inside_a_transaction_is_store_unavailable(
    pg_url: str, proxy: TcpProxy
) -> None:
    store = Store(via(proxy, pg_url), retry_for=0.0)
    await store.setup()
    with pytest.raises(StoreUnavailableError, match="cannot connect to database"):
        async with store.write() as conn:
            await conn.execute(select(RunRow.__table__.c.id).limit(1))  # type: ignore[attr-defined]
            proxy.cut()  # the connection dies between two statements of one transaction
            await conn.execute(select(RunRow.__table__.c.id).limit(1))  # type: ignore[attr-defined]
    proxy.restore()
    # The pool pre-pings: the dead connection is replaced, the next transaction works.
    async with store.write() as conn:
        await conn.execute(select(RunRow.__table__.c.id).limit(1))  # type: ignore[attr-defined]
    await store.close()


# -- a 50 ms cut, several times in one run ----------------------------------------------------


async def test_connections_cut_for_50ms_mid_run_change_nothing(
    pg_url: str, proxy: TcpProxy, sim: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "frugalflow")
    counts: Counter[str] = Counter()
    hooks = {"n1:before": cut_for(proxy, 0.05),   # n1's call, written down before it is sent
             "n2:after": cut_for(proxy, 0.05),    # n2's checkpoint write and node row
             "n4:before": cut_for(proxy, 0.05),
             "n5:after": cut_for(proxy, 0.05)}    # the run's last step and its end
    runner = Runner(via(proxy, pg_url), flows=[fault_flow(counts, hooks)],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry())
    try:
        result = await runner.start("faults", {"topic": "cuts"})
        assert result.status == "succeeded", result.error
        assert proxy.cuts == 4
        retried = {r.getMessage().split(" failed")[0] for r in caplog.records
                   if "retrying" in r.getMessage()}
        # The cuts hit the ledger rows of calls and checkpoint writes, which were retried.
        assert {"frugalflow: call written down before it is sent",
                "frugalflow: checkpoint write"} <= retried
        assert counts == {f"n{i}": 1 for i in range(1, NODES + 1)}  # each node exactly once
        assert result.state and all(result.state[f"n{i}"] for i in range(1, NODES + 1))
        paid, checkpoints, nodes = await ledger_facts(runner, result.run_id)
        assert paid == paid_calls(sim) == NODES  # every paid call in the ledger, once
        assert nodes == ["done"] * NODES
        # Same checkpoints as an undisturbed run of the same flow.
        hooks.clear()
        reference = await runner.start("faults", {"topic": "no cuts"})
        assert reference.status == "succeeded"
        assert (await ledger_facts(runner, reference.run_id))[1] == checkpoints
    finally:
        await runner.close()


# -- outages shorter and longer than the lease -------------------------------------------------


async def test_an_outage_within_the_lease_is_ridden_out(
    pg_url: str, proxy: TcpProxy, sim: Any
) -> None:
    counts: Counter[str] = Counter()
    runner = Runner(via(proxy, pg_url), flows=[fault_flow(counts, {"n3:before": cut_for(proxy, 0.4)})],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry(), lease_ttl=1.5)
    try:
        result = await runner.start("faults", {"topic": "short outage"})
        assert result.status == "succeeded", result.error
        assert counts == {f"n{i}": 1 for i in range(1, NODES + 1)}
        paid, _, nodes = await ledger_facts(runner, result.run_id)
        assert paid == paid_calls(sim) == NODES
        assert nodes == ["done"] * NODES
    finally:
        await runner.close()


@pytest.mark.slow
async def test_an_outage_longer_than_the_lease_pauses_then_resumes_the_run(
    pg_url: str, proxy: TcpProxy, sim: Any
) -> None:
    counts: Counter[str] = Counter()
    # Down from before n3's model call for 2.5 s; the lease (and so the retries) lasts 1 s.
    runner = Runner(via(proxy, pg_url), flows=[fault_flow(counts, {"n3:before": cut_for(proxy, 2.5)})],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry(), lease_ttl=1.0)
    try:
        result = await runner.start("faults", {"topic": "long outage"})
        # Released as paused with the reason; never `running` forever, never `lease_lost`.
        assert result.status == "paused", result
        assert result.error and "database was unreachable" in result.error
        final = await runner.wait(result.run_id)  # resumed automatically once it is back
        assert final.status == "succeeded", final.error
        assert final.state and all(final.state[f"n{i}"] for i in range(1, NODES + 1))
        paid, _, _ = await ledger_facts(runner, result.run_id)
        # n3's call could not be written down, so it was not sent: nothing is spent that
        # cannot be recorded. n3 ran again once the database was back and paid once.
        assert paid == paid_calls(sim) == NODES
        assert counts["n1"] == counts["n2"] == 1 and counts["n4"] == counts["n5"] == 1
        assert counts["n3"] == 2
        record = await runner.get(result.run_id)
        assert [a.outcome for a in record.attempts] == ["ok"] * NODES
        assert {n.node: n.status for n in record.nodes if n.status == "done"}.keys() == {
            f"n{i}" for i in range(1, NODES + 1)}
        assert record.run.status == "succeeded" and runner.ledger.unwritten() == 0
    finally:
        await runner.close()


@pytest.mark.slow
async def test_a_sqlite_write_lock_held_past_the_busy_timeout_pauses_then_resumes(
    tmp_path: Path, sim: Any
) -> None:
    path = tmp_path / "locked.db"
    holder: list[sqlite3.Connection] = []

    def lock() -> None:
        if holder:
            return  # once
        conn = sqlite3.connect(path, isolation_level=None, timeout=10)
        conn.execute("BEGIN IMMEDIATE")  # another process's writer, holding the lock
        holder.append(conn)

        def unlock() -> None:
            conn.execute("ROLLBACK")
            conn.close()

        asyncio.get_running_loop().call_later(2.5, unlock)

    counts: Counter[str] = Counter()
    store = Store(f"sqlite:///{path}", busy_timeout=0.2)
    runner = Runner(store, flows=[fault_flow(counts, {"n2:after": lock})],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry(), lease_ttl=1.0)
    try:
        result = await runner.start("faults", {"topic": "locked"})
        assert result.status == "paused", result
        assert result.error and "database was unreachable" in result.error
        final = await runner.wait(result.run_id)
        assert final.status == "succeeded", final.error
        paid, _, _ = await ledger_facts(runner, result.run_id)
        assert paid == paid_calls(sim) == NODES
        assert holder and counts["n1"] == 1 and counts["n3"] == counts["n5"] == 1
    finally:
        await runner.close()


# -- a slow executor keeps its runs; a takeover still fences it -------------------------------


async def _expire(store: Store, run_id: str) -> None:
    leases = LeaseRow.__table__  # type: ignore[attr-defined]
    from frugalflow.persistence.tables import utcnow

    async with store.write() as conn:
        await conn.execute(update(leases).where(leases.c.run_id == run_id).values(
            expires_at=utcnow()))


async def test_an_expired_lease_nobody_took_does_not_fail_the_run(db_url: str, sim: Any) -> None:
    counts: Counter[str] = Counter()
    current: dict[str, str] = {}
    hooks: dict[str, Hook] = {}
    runner = Runner(db_url, flows=[fault_flow(counts, hooks)], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry(), lease_ttl=60)
    expired: list[str] = []

    async def expire_now() -> None:
        # The executor stalled past its lease (no renewal since): set, not slept.
        await _expire(runner.store, current["run"])
        expired.append(current["run"])

    hooks["n2:before"] = expire_now
    hooks["n4:before"] = expire_now
    try:
        current["run"] = "slow-run"
        result = await runner.start("faults", {"topic": "slow"}, run_id="slow-run")
        assert expired == ["slow-run", "slow-run"]
        assert result.status == "succeeded", result.error
        assert counts == {f"n{i}": 1 for i in range(1, NODES + 1)}
        async with runner.store.read() as conn:
            lease = (await conn.execute(select(LeaseRow.__table__).where(  # type: ignore[attr-defined]
                LeaseRow.__table__.c.run_id == "slow-run"))).one()  # type: ignore[attr-defined]
        assert lease.epoch == 1 and lease.holder == runner.holder  # kept, not re-taken
    finally:
        await runner.close()


async def test_a_run_delivered_twice_to_its_executor_runs_once(db_url: str, sim: Any) -> None:
    """A queue delivers a run again to the worker already executing it (its heartbeat
    lapsed in a database outage): the second delivery must not execute it concurrently
    (the runner's own lease would let it in), so no node runs twice and nothing is paid
    twice."""
    counts: Counter[str] = Counter()
    hooks: dict[str, Hook] = {}
    runner = Runner(db_url, flows=[fault_flow(counts, hooks)], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry(), lease_ttl=60)
    second: list[Any] = []

    async def deliver_again() -> None:  # while n2 executes, the run arrives once more
        second.append(await runner.execute_dispatched("twice"))

    hooks["n2:before"] = deliver_again
    try:
        result = await runner.start("faults", {"topic": "twice"}, run_id="twice")
        assert result.status == "succeeded", result.error
        assert second == [None]  # declined: it executes here already
        assert counts == {f"n{i}": 1 for i in range(1, NODES + 1)}
        paid, _, statuses = await ledger_facts(runner, "twice")
        assert paid == paid_calls(sim) == NODES and statuses == ["done"] * NODES
    finally:
        await runner.close()


async def test_a_takeover_still_fences_the_slow_executor_off(db_url: str, sim: Any) -> None:
    counts: Counter[str] = Counter()
    hooks: dict[str, Hook] = {}
    runner = Runner(db_url, flows=[fault_flow(counts, hooks)], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry(), lease_ttl=60)
    taken: list[int] = []

    async def take_over() -> None:
        # What acquire_lease does for another executor once the lease expired, in one step.
        leases = LeaseRow.__table__  # type: ignore[attr-defined]
        async with runner.store.write() as conn:
            await conn.execute(update(leases).where(leases.c.run_id == "taken-run").values(
                holder="other-executor", epoch=leases.c.epoch + 1))
        taken.append(1)

    hooks["n2:before"] = take_over
    try:
        result = await runner.start("faults", {"topic": "taken"}, run_id="taken-run")
        assert taken == [1]
        assert result.status == "paused" and result.lost_lease, result
        assert result.status in DOCUMENTED
        assert counts["n3"] == 0  # nothing after the takeover ran here
        row = await runner.ledger.get_run("taken-run")
        assert row.status == "running"  # this executor wrote no end over the new holder's
        async with runner.store.read() as conn:
            nodes = (await conn.execute(select(NodeRunRow.__table__.c.node).where(  # type: ignore[attr-defined]
                NodeRunRow.__table__.c.run_id == "taken-run"))).scalars().all()  # type: ignore[attr-defined]
        assert "n3" not in nodes
    finally:
        await runner.close()


async def test_a_node_whose_checkpoint_writes_were_lost_is_not_left_done(tmp_path: Path) -> None:
    """LangGraph reports a task's result before its checkpoint write commits; if that write
    is lost with the database, the runner's recovery re-marks the node (it runs again)."""
    from frugalflow.persistence.ledger import Ledger
    from frugalflow.persistence.tables import CheckpointWriteRow

    store = Store(f"sqlite:///{tmp_path / 'n.db'}")
    ledger = Ledger(store)
    await ledger.create_run("r", "faults", {"topic": "x"})
    for task in ("saved", "lost"):
        await ledger.node_started(task, "r", task)
        await ledger.node_finished(task, status="done")
    writes = CheckpointWriteRow.__table__  # type: ignore[attr-defined]
    async with store.write() as conn:  # only the first task's writes reached the checkpoint
        await conn.execute(writes.insert().values(
            thread_id="r", checkpoint_ns="", checkpoint_id="c1", task_id="saved", idx=0,
            channel="n1", type="json", blob=b"1", task_path="", run_id="r"))
    assert await ledger.close_nodes("r") == 0  # `done` rows are trusted by default
    assert await ledger.close_nodes("r", recheck=True) == 1
    statuses = {n.id: n.status for n in (await ledger.run_record("r")).nodes}
    assert statuses == {"saved": "done", "lost": "abandoned"}
    await store.close()


async def test_the_event_relay_reconnects_after_its_connection_is_cut(
    pg_url: str, proxy: TcpProxy
) -> None:
    from frugalflow.events import EventBus
    from frugalflow.scale.relay import PostgresEventRelay

    sender_bus, receiver_bus = EventBus(), EventBus()
    sender = PostgresEventRelay(via(proxy, pg_url), sender_bus)
    receiver = PostgresEventRelay(via(proxy, pg_url), receiver_bus)  # both through the proxy
    await sender.start()
    await receiver.start()
    try:
        async with receiver_bus.queue("r1") as events:
            sender_bus.publish("r1", "before_cut")
            assert (await asyncio.wait_for(events.get(), 10))["event"] == "before_cut"
            connections = proxy.connections
            proxy.cut()  # both LISTEN/NOTIFY connections die
            proxy.restore()
            # Both relays connect again by themselves (polling: an external reconnect).
            deadline = asyncio.get_running_loop().time() + 10
            while proxy.connections < connections + 2:
                assert asyncio.get_running_loop().time() < deadline, "relays did not reconnect"
                await asyncio.sleep(0.02)
            # The receiver's LISTEN may lag its connection: publish until one arrives.
            got = None
            while got is None:
                assert asyncio.get_running_loop().time() < deadline, "no event after the cut"
                sender_bus.publish("r1", "after_cut")
                with contextlib.suppress(asyncio.TimeoutError):
                    got = await asyncio.wait_for(events.get(), 0.5)
            assert got["event"] == "after_cut"
    finally:
        await sender.close()
        await receiver.close()


async def test_a_worker_outlives_its_database(
    fresh_pg_url: str, proxy: TcpProxy, sim: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run_worker` waits for a database that is away when it starts (through the proxy), and
    restarts its job loop when procrastinate's loop ends on a database error (as it does when
    a query loses its connection: ConnectorException): an outage never leaves the fleet
    without workers."""
    from durable_flows import chain_flow
    from procrastinate.exceptions import ConnectorException

    from frugalflow.scale.dispatch import ProcrastinateDispatcher, run_worker

    def make(url: str) -> Runner:
        return Runner(url, flows=[chain_flow(2)], catalog=Catalog.simulated(),
                      breakers=BreakerRegistry(), lease_ttl=3.0,
                      dispatcher=ProcrastinateDispatcher(url, stall_timeout=3.0, heartbeat=0.5))

    submitter = make(fresh_pg_url)  # straight to the server
    await submitter.setup()
    await submitter.dispatcher.open()  # type: ignore[union-attr]
    worker = make(via(proxy, fresh_pg_url))
    app = worker.dispatcher.app  # type: ignore[union-attr]
    real_loop = app.run_worker_async
    loops: list[int] = []

    async def loop_that_dies_once(**kwargs: Any) -> None:
        loops.append(1)
        if len(loops) == 1:
            raise ConnectorException("Database error.")  # what a lost connection gives
        await real_loop(**kwargs)

    monkeypatch.setattr(app, "run_worker_async", loop_that_dies_once)
    retried = asyncio.Event()

    class Watch(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "worker could not set up the database" in record.getMessage():
                retried.set()

    watch = Watch(logging.WARNING)
    logging.getLogger("frugalflow").addHandler(watch)
    proxy.cut()  # the database is away when the worker starts
    task = asyncio.create_task(run_worker(worker, concurrency=2, stall_check=0.5))
    try:
        await asyncio.wait_for(retried.wait(), 30)
        assert not task.done() and not loops  # still waiting for its database
        proxy.restore()
        run = await submitter.start("chain", {"topic": "after the outage"}, wait=False)
        assert (await asyncio.wait_for(submitter.wait(run.run_id), 60)).status == "succeeded"
        assert len(loops) == 2 and not task.done()  # the job loop died once and came back
    finally:
        proxy.restore()  # a worker stops cleanly only with its database
        logging.getLogger("frugalflow").removeHandler(watch)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await worker.close()
        await submitter.close()


async def test_runs_left_without_a_job_or_executor_are_queued_again(fresh_pg_url: str) -> None:
    """A worker that paused a run (outage, shutdown) and died before queueing it again, or
    whose run stayed `running` after its job was settled, leaves an orphan: the workers'
    sweep queues it again, and leaves alone a run a live executor holds."""
    from durable_flows import chain_flow

    from frugalflow.persistence.leases import acquire_lease
    from frugalflow.scale.dispatch import ProcrastinateDispatcher

    runner = Runner(fresh_pg_url, flows=[chain_flow(2)], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry(), lease_ttl=30.0,
                    dispatcher=ProcrastinateDispatcher(fresh_pg_url))
    try:
        await runner.setup()
        await runner.dispatcher.open()  # type: ignore[union-attr]
        for run_id, status in (("paused-orphan", "paused"), ("dead-running", "running"),
                               ("live-running", "running")):
            await runner.ledger.create_run(run_id, "chain", {"topic": run_id}, status=status)
        await acquire_lease(runner.store, "live-running", "someone:1:alive", 30.0)
        lease = await acquire_lease(runner.store, "dead-running", "dead:2:gone", 30.0)
        await _expire(runner.store, lease.run_id)  # its executor died: the lease ran out
        sweep = runner.dispatcher.requeue_orphans  # type: ignore[union-attr]
        assert await sweep(runner, older_than=0.0) == 2
        status = runner.dispatcher.status  # type: ignore[union-attr]
        assert await status("paused-orphan") == "todo" and await status("dead-running") == "todo"
        assert await status("live-running") is None
        assert await sweep(runner, older_than=0.0) == 0  # queued once
    finally:
        await runner.close()
