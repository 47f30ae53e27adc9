"""Durable runs on real SQLite and PostgreSQL: ledger, budgets, interrupts, leases, errors."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from durable_flows import chain_flow, review_flow

from frugalflow import Catalog, UserError
from frugalflow.exceptions import (
    LeaseError,
    RunNotFoundError,
    RunStateError,
    SchemaVersionError,
    StoreUnavailableError,
)
from frugalflow.resilience import BreakerRegistry
from frugalflow.persistence import Store
from frugalflow.persistence.leases import acquire_lease
from frugalflow.runner import Runner, RunStatus


@pytest.fixture
async def runner(db_url: str) -> Any:
    r = Runner(db_url, flows=[chain_flow(3), review_flow()], catalog=Catalog.simulated(),
               breakers=BreakerRegistry())
    yield r
    await r.close()


async def test_run_succeeds_and_the_ledger_answers_cost_questions(runner: Runner) -> None:
    result = await runner.start("chain", {"topic": "ledger"}, budget=1.0)
    assert result.ok and result.state is not None and result.state["n3"]
    record = await runner.get(result.run_id)
    assert record.run.status == "succeeded" and record.run.flow == "chain"
    assert [n.node for n in record.nodes] == ["n1", "n2", "n3"]
    assert all(n.status == "done" for n in record.nodes)
    assert [a.node for a in record.attempts] == ["n1", "n2", "n3"]
    total = sum(a.cost_usd for a in record.attempts)
    assert record.run.cost_usd == pytest.approx(total) and total > 0
    assert sum(n.cost_usd for n in record.nodes) == pytest.approx(total)
    by_node = {c.key: c for c in await runner.ledger.costs("node", run_id=result.run_id)}
    assert set(by_node) == {"n1", "n2", "n3"} and all(c.calls == 1 for c in by_node.values())
    by_model = await runner.ledger.costs("model", run_id=result.run_id)
    assert sum(c.cost_usd for c in by_model) == pytest.approx(total)
    (day,) = await runner.ledger.costs("day", run_id=result.run_id)
    assert len(day.key) == 10 and day.cost_usd == pytest.approx(total)
    (flow,) = await runner.ledger.costs("flow")
    assert flow.key == "chain"
    assert [r.id for r in await runner.ledger.list_runs(flow="chain")] == [result.run_id]


async def test_wait_is_the_result_of_a_background_run(runner: Runner) -> None:
    started = await runner.start("chain", {"topic": "background"}, wait=False)
    assert started.status is RunStatus.RUNNING and started.run_id in runner.executing
    result = await runner.wait(started.run_id)
    assert result.status is RunStatus.SUCCEEDED and result.ok
    assert result.state is not None and result.state["n3"]
    # no longer executing here: its end, read from the ledger
    again = await runner.wait(started.run_id)
    assert again.status is RunStatus.SUCCEEDED and again.cost_usd == result.cost_usd > 0


async def test_budget_exceeded_is_persisted_and_resumable_with_more(runner: Runner) -> None:
    # A call reserves its input and the p90 of its output estimate (~$0.000087 on the
    # cheapest model, nothing measured yet) and costs ~$0.000007: one node fits, not two.
    result = await runner.start("chain", {"topic": "budget"}, budget=0.00009)
    assert result.status == "budget_exceeded"
    assert "Resume the run with a larger budget" in (result.error or "")
    before = await runner.get(result.run_id)
    done_nodes = {a.node for a in before.attempts if a.outcome == "ok"}
    assert done_nodes and len(done_nodes) < 3
    resumed = await runner.resume(result.run_id, budget=1.0)
    assert resumed.ok
    after = await runner.get(result.run_id)
    ok_nodes = [a.node for a in after.attempts if a.outcome == "ok"]
    assert sorted(ok_nodes) == ["n1", "n2", "n3"]  # no completed node ran again
    assert after.run.budget_usd == 1.0


async def test_interrupt_pauses_and_resumes_with_a_value(runner: Runner) -> None:
    result = await runner.start("review", {"text": "please refund me"})
    assert result.status == "interrupted"
    assert result.interrupts[0]["question"] == "approve this draft?"
    snapshot = await runner.state(result.run_id)
    assert snapshot.next == ("approve",)
    with pytest.raises(RunStateError):
        await runner.start("review", {"text": "x"}, run_id=result.run_id)  # id taken
    resumed = await runner.resume(result.run_id, "approved")
    assert resumed.ok and resumed.state and resumed.state["verdict"] == "approved"
    attempts = (await runner.get(result.run_id)).attempts
    assert len(attempts) == 1  # the draft was not paid twice


async def test_resume_errors_are_clear_and_write_nothing(runner: Runner) -> None:
    with pytest.raises(RunNotFoundError, match="no run 'nope'"):
        await runner.resume("nope")
    done = await runner.start("chain", {"topic": "x"})
    with pytest.raises(RunStateError, match="already succeeded"):
        await runner.resume(done.run_id)
    with pytest.raises(RunStateError, match="not waiting on an interrupt"):
        failed = await runner.start("chain", {"topic": "y"}, budget=0.00001)
        await runner.resume(failed.run_id, "a value")
    with pytest.raises(UserError, match="unknown flow 'chian'.*did you mean 'chain'"):
        await runner.start("chian", {})
    assert len(await runner.ledger.list_runs()) == 2


async def test_a_second_executor_is_refused_until_the_lease_expires(db_url: str) -> None:
    store = Store(db_url)
    await store.setup()
    lease = await acquire_lease(store, "run-1", "worker-a", ttl=60)
    with pytest.raises(LeaseError, match="being executed by worker-a"):
        await acquire_lease(store, "run-1", "worker-b", ttl=60)
    assert await lease.renew()
    short = await acquire_lease(store, "run-2", "worker-a", ttl=0.05)
    await asyncio.sleep(0.1)  # let the short lease expire (this waits on time, not on a task)
    taken = await acquire_lease(store, "run-2", "worker-b", ttl=60)
    assert taken.epoch == short.epoch + 1
    assert not await short.renew()  # the stale holder learns it lost the lease
    await store.close()


async def test_cancel_and_shutdown(db_url: str) -> None:
    slow = Catalog([s.model_copy(update={"model_kwargs": {"latency": 30}})
                    for s in Catalog.simulated()], name="slow")
    runner = Runner(db_url, flows=[chain_flow(3)], catalog=slow, breakers=BreakerRegistry())
    started = await runner.start("chain", {"topic": "c"}, wait=False)
    assert started.status == "running"
    while not (await runner.get(started.run_id)).nodes:
        await asyncio.sleep(0.01)
    cancelled = await runner.cancel(started.run_id)
    assert cancelled.status == "cancelled"
    with pytest.raises(RunStateError):
        await runner.resume(started.run_id)
    second = await runner.start("chain", {"topic": "d"}, wait=False)
    while not (await runner.get(second.run_id)).nodes:
        await asyncio.sleep(0.01)
    await runner.close()  # shutdown: the run stays resumable
    fresh = Runner(db_url, flows=[chain_flow(3)], catalog=Catalog.simulated(),
                   breakers=BreakerRegistry())
    assert (await fresh.ledger.get_run(second.run_id)).status == "paused"
    assert (await fresh.resume(second.run_id)).ok
    await fresh.close()


async def test_unreachable_database_is_a_clear_error() -> None:
    runner = Runner("postgresql://postgres:hunter2@127.0.0.1:9/test", flows=[chain_flow(1)],
                    catalog=Catalog.simulated())
    with pytest.raises(StoreUnavailableError) as info:
        await runner.start("chain", {"topic": "x"})
    assert "127.0.0.1:9" in str(info.value) and "hunter2" not in str(info.value)


async def test_a_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'new.db'}"
    store = Store(url)
    await store.setup()
    async with store.write() as conn:
        from frugalflow.persistence.tables import SchemaVersionRow

        await conn.execute(SchemaVersionRow.__table__.insert().values(v=99))  # type: ignore[attr-defined]
    await store.close()
    again = Store(url)
    with pytest.raises(SchemaVersionError, match="schema version 99"):
        await again.setup()
    assert await again.version() == 99
    await again.close()


async def test_a_version_1_database_is_migrated_in_place(db_url: str) -> None:
    from sqlalchemy import inspect, text

    from frugalflow.persistence.store import SCHEMA_VERSION

    store = Store(db_url)
    runner = Runner(store, flows=[chain_flow(2)], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry())
    kept = await runner.start("chain", {"topic": "v1"})
    # Make it a database written by release 1: no ff_attempts.category, schema version 1.
    async with store.write() as conn:
        await conn.execute(text("ALTER TABLE ff_attempts DROP COLUMN category"))
        await conn.execute(text("DELETE FROM ff_schema WHERE v > 1"))
    await runner.close()

    again = Store(db_url)
    upgraded = Runner(again, flows=[chain_flow(2)], catalog=Catalog.simulated(),
                      breakers=BreakerRegistry())
    try:
        assert (await upgraded.start("chain", {"topic": "v2"})).ok
        assert await again.version() == SCHEMA_VERSION >= 2
        async with again.read() as conn:
            columns = await conn.run_sync(
                lambda c: {col["name"] for col in inspect(c).get_columns("ff_attempts")})
        assert "category" in columns
        assert len((await upgraded.get(kept.run_id)).attempts) == 2  # nothing lost
    finally:
        await upgraded.close()


@pytest.mark.slow
async def test_two_hundred_concurrent_runs(db_url: str) -> None:
    runner = Runner(db_url, flows=[chain_flow(2)], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry(), max_concurrency=200)
    results = await asyncio.gather(
        *(runner.start("chain", {"topic": f"t{i}"}) for i in range(200))
    )
    assert [r.status for r in results].count("succeeded") == 200
    runs = await runner.ledger.list_runs(limit=500)
    assert len(runs) == 200 and {r.status for r in runs} == {"succeeded"}
    attempts = await runner.ledger.all_attempts()
    assert len(attempts) == 400
    for r in results:
        assert r.state and r.state["n2"]
    await runner.close()


async def test_a_stale_executor_cannot_write_a_single_row(db_url: str) -> None:
    from frugalflow.persistence.saver import SQLModelSaver
    from frugalflow.persistence.ledger import Ledger
    from frugalflow.persistence.leases import Fence, fenced

    store = Store(db_url)
    await store.setup()
    ledger = Ledger(store)
    await ledger.create_run("r1", "chain", {"topic": "x"})
    old = await acquire_lease(store, "r1", "worker-old", ttl=60)
    with fenced(Fence("r1", old.holder, old.epoch)):
        await ledger.update_run("r1", status="running")  # while the lease holds: fine
    # The old worker stalls past its lease: its expiry passes (set directly, no waiting).
    from frugalflow.persistence.tables import LeaseRow, utcnow

    async with store.write() as conn:
        await conn.execute(LeaseRow.__table__.update().values(expires_at=utcnow()))  # type: ignore[attr-defined]
    new = await acquire_lease(store, "r1", "worker-new", ttl=60)
    assert new.epoch == old.epoch + 1
    saver = SQLModelSaver(store)
    from langgraph.checkpoint.base import empty_checkpoint

    with fenced(Fence("r1", old.holder, old.epoch)):
        with pytest.raises(LeaseError, match="no longer holds the lease"):
            await ledger.update_run("r1", status="succeeded")
        with pytest.raises(LeaseError):
            await saver.aput({"configurable": {"thread_id": "r1", "checkpoint_ns": ""}},
                             empty_checkpoint(), {"source": "loop", "step": 1}, {})
    assert (await ledger.get_run("r1")).status == "running"  # nothing of the stale write
    assert await saver.aget_tuple({"configurable": {"thread_id": "r1"}}) is None
    with fenced(Fence("r1", new.holder, new.epoch)):
        await ledger.update_run("r1", status="succeeded")
    assert (await ledger.get_run("r1")).status == "succeeded"
    await store.close()


async def test_node_rows_a_dead_executor_left_running_are_settled(db_url: str) -> None:
    from frugalflow.usage import Attempt
    from frugalflow.persistence.ledger import Ledger
    from frugalflow.persistence.tables import CheckpointWriteRow
    from frugalflow.usage import Usage

    store = Store(db_url)
    ledger = Ledger(store)
    try:
        await ledger.create_run("r1", "chain", {})
        for task in ("t1", "t2", "t3"):
            await ledger.node_started(task, "r1", task.replace("t", "n"), "dead-worker")
        await ledger.record_attempt(Attempt(node="n1", model="m", provider="p", outcome="ok",
                                            run_id="r1", task_id="t1", cost_usd=0.25,
                                            usage=Usage(input_tokens=1, output_tokens=1)))
        await ledger.node_finished("t3", status="error", error="boom")
        # t1's writes reached the checkpoint before the executor died; t2's did not.
        async with store.write() as conn:
            await conn.execute(CheckpointWriteRow.__table__.insert().values(  # type: ignore[attr-defined]
                thread_id="r1", checkpoint_ns="", checkpoint_id="c1", task_id="t1", idx=0,
                channel="x", type="json", blob=b"1", run_id="r1"))
        assert await ledger.close_nodes("r1") == 2
        nodes = {n.id: n for n in (await ledger.run_record("r1")).nodes}
        assert {k: n.status for k, n in nodes.items()} == {
            "t1": "done", "t2": "abandoned", "t3": "error"}
        assert nodes["t1"].cost_usd == pytest.approx(0.25) and nodes["t1"].finished_at
        assert await ledger.close_nodes("r1") == 0  # settled rows are left alone
    finally:
        await store.close()
