"""What "Nodes that can wait" promises beyond the failure paths of test_waiting_runs.py: a
batch answer is checked like a synchronous one (the node's validator), a waiting run holds
no lease and no executor, a streamed call never parks, and the service's own poller wakes
the runs started through its API. SQLite and PostgreSQL, the vendors' SDKs against the
provider emulator, a clock the test moves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypedDict

import httpx
import pytest
from langchain_core.messages import AIMessage, HumanMessage
from provider_clients import forget_provider_clients
from sqlalchemy import select
from test_waiting_runs import Clock, emu, time_  # noqa: F401 - emu and time_ are fixtures
from waiting_flows import MODELS, nightly

from frugalflow import END, START, Flow, Needs, RoutedChatModel, Runner, RunStatus
from frugalflow.persistence.leases import acquire_lease
from frugalflow.persistence.tables import LeaseHistoryRow
from frugalflow.service import create_app
from frugalflow.statuses import ErrorClass, Outcome
from frugalflow.testing.emulator import EMULATOR_KEY_ENV, ProviderEmulator, emulated_catalog

SIX_HOURS = timedelta(hours=6)


class Q(TypedDict, total=False):
    question: str
    answer: str


@pytest.fixture(autouse=True)
def _fresh_clients() -> Iterator[None]:
    """Provider clients are cached per process: none outlives its test's emulator."""
    forget_provider_clients()
    yield
    forget_provider_clients()


def one_call_flow(name: str, *, validator: Any = None, stream: bool = False) -> Flow[Q]:
    flow: Flow[Q] = Flow(name, Q)

    async def answer(state: Q, model: RoutedChatModel) -> Q:
        messages = [HumanMessage(state["question"])]
        if stream:
            text = "".join([str(c.content) async for c in model.astream(messages)])
        else:
            text = str((await model.ainvoke(messages)).content)
        return {"answer": text}

    flow.add_node("answer", answer, needs=Needs(deadline=SIX_HOURS), validator=validator)
    flow.add_edge(START, "answer")
    flow.add_edge("answer", END)
    return flow


async def test_a_batch_answer_the_validator_rejects_is_paid_and_escalates(
        db_url: str, emu: ProviderEmulator, time_: Clock) -> None:
    """The node's validator judges a batch answer as it judges a synchronous one: rejected,
    it is a paid failed attempt and the call goes to its next candidate."""
    judged: list[str] = []

    def validator(answer: AIMessage) -> bool | str:
        judged.append(str(answer.content))
        return "not good enough" if len(judged) == 1 else True

    catalog = emulated_catalog(emu, MODELS)
    runner = Runner(db_url, flows=[one_call_flow("judged", validator=validator)],
                    catalog=catalog, clock=time_)
    try:
        emu.batches.script("openai", delay=None)
        started = await runner.start("judged", {"question": "Tag: invoice 7"})
        assert started.status == RunStatus.WAITING, started.error
        poller = runner.batch_poller(gather=0, poll_every=0)
        await poller.tick()
        emu.batches.release()
        assert (await poller.tick()).answered == 1
        ended = await runner.wait(started.run_id)
        assert ended.status == RunStatus.SUCCEEDED, ended.error
        rejected, accepted = (await runner.get(started.run_id)).attempts
        assert (rejected.tier, rejected.outcome, rejected.error_class) == (
            "batch", Outcome.ERROR, ErrorClass.VALIDATION)
        assert rejected.cost_usd > 0  # the batch answer was paid for
        assert accepted.outcome == Outcome.OK and accepted.tier != "batch"
        assert len(judged) == 2
    finally:
        await runner.close()
        await catalog.aclose()


async def test_a_waiting_run_holds_no_lease_and_no_executor(
        db_url: str, emu: ProviderEmulator, time_: Clock) -> None:
    """Parked, the run is nobody's: its lease is released (another holder takes it at
    once) and no task of this process is executing it."""
    catalog = emulated_catalog(emu, MODELS)
    runner = Runner(db_url, flows=[nightly()], catalog=catalog, clock=time_, lease_ttl=600)
    try:
        emu.batches.script("openai", delay=None)
        started = await runner.start("nightly", {"docs": ["a", "b"]})
        assert started.status == RunStatus.WAITING, started.error
        assert started.run_id not in runner.executing
        async with runner.store.read() as c:
            history = (await c.execute(select(LeaseHistoryRow).where(
                LeaseHistoryRow.run_id == started.run_id))).all()  # type: ignore[arg-type]
        assert history and all(h.released_at is not None for h in history)
        lease = await acquire_lease(runner.store, started.run_id, "another-worker", 30.0)
        await lease.release()
    finally:
        await runner.close()
        await catalog.aclose()


async def test_a_streamed_call_never_parks(
        db_url: str, emu: ProviderEmulator, time_: Clock) -> None:
    """`astream` wants tokens now: even with a deadline it is answered synchronously at the
    standard price, and the run does not wait."""
    catalog = emulated_catalog(emu, MODELS)
    runner = Runner(db_url, flows=[one_call_flow("streamed", stream=True)], catalog=catalog,
                    clock=time_)
    try:
        result = await runner.start("streamed", {"question": "Tag: invoice 8"})
        assert result.status == RunStatus.SUCCEEDED, result.error
        assert result.state["answer"]
        [attempt] = (await runner.get(result.run_id)).attempts
        assert attempt.outcome == Outcome.OK and attempt.tier in (None, "standard")
        assert await runner.parked.all_items(result.run_id) == []
        assert emu.batches.batches == {}
    finally:
        await runner.close()
        await catalog.aclose()


async def test_the_services_poller_wakes_runs_started_through_its_api(
        db_url: str, emu: ProviderEmulator, time_: Clock) -> None:
    """`create_app(runner, poll_batches=runner.batch_poller(...))`: a run started with
    POST /runs parks, the app's own poller sends and collects its batch, the run ends."""
    catalog = emulated_catalog(emu, MODELS)
    runner = Runner(db_url, flows=[nightly()], catalog=catalog, clock=time_)
    sent = asyncio.Event()
    emu.batches.script("openai", delay=None)
    poller = runner.batch_poller(gather=0, poll_every=0, every=0.01)
    original = poller.tick

    async def tick() -> Any:
        report = await original()
        if report.submitted:
            sent.set()
        return report

    poller.tick = tick  # type: ignore[method-assign]
    app = create_app(runner, poll_batches=poller)
    try:
        async with app.router.lifespan_context(app), httpx.AsyncClient(
                transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as c:
            r = await c.post("/runs", json={"flow": "nightly", "wait": True,
                                            "input": {"docs": ["x", "y"]}})
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "waiting"
            await asyncio.wait_for(sent.wait(), 30)
            emu.batches.release()
            ended = await asyncio.wait_for(
                runner.wait(r.json()["run_id"], through_waiting=True), 30)
            assert ended.status == RunStatus.SUCCEEDED, ended.error
            assert (await c.get(f"/runs/{ended.run_id}")).json()["status"] == "succeeded"
    finally:
        await catalog.aclose()


# -- a worker killed between sending and collecting ---------------------------------------

WORKER = Path(__file__).resolve().parent / "waiting_worker.py"


async def _worker(db: str, emu: ProviderEmulator) -> asyncio.subprocess.Process:
    env = {**os.environ, EMULATOR_KEY_ENV: os.environ[EMULATOR_KEY_ENV]}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(WORKER), db, emu.url, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    assert proc.stdout is not None
    assert b"ready" in await asyncio.wait_for(proc.stdout.readline(), 60)
    return proc


async def _until(check: Any, what: str) -> None:
    """Wait for another process's doing (polled: it can signal nothing to this one)."""
    for _ in range(1200):
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
async def test_a_worker_killed_after_sending_is_followed_by_one_that_collects(
        fresh_pg_url: str, emu: ProviderEmulator) -> None:
    """`frugalflow worker` (run_worker with its poller) SIGKILLed once its batches are sent
    and recorded, before their answers come: the next worker collects them and wakes the
    run; nothing is sent or paid twice."""
    from frugalflow.scale.dispatch import ProcrastinateDispatcher

    emu.batches.clock = time.time
    emu.batches.script("openai", delay=None, times=None)
    catalog = emulated_catalog(emu, MODELS)
    service = Runner(fresh_pg_url, flows=[nightly()], catalog=catalog,
                     dispatcher=ProcrastinateDispatcher(fresh_pg_url))
    first = await _worker(fresh_pg_url, emu)
    second: asyncio.subprocess.Process | None = None
    try:
        run_id = (await service.start("nightly", {"docs": ["k1", "k2"]}, wait=False)).run_id

        async def sent_and_recorded() -> bool:
            batches = await service.parked.all_batches()
            return (sum(b.items for b in batches) == 2
                    and all(b.provider_batch_id for b in batches)
                    and (await service.get(run_id)).run.status == RunStatus.WAITING)

        await _until(sent_and_recorded, "the batches sent and recorded, the run waiting")
        sent = [b.id for b in emu.batches.listed("openai")]
        first.send_signal(signal.SIGKILL)
        await first.wait()
        second = await _worker(fresh_pg_url, emu)
        emu.batches.release()
        final = await asyncio.wait_for(service.wait(run_id), 120)
        assert final.status == RunStatus.SUCCEEDED, final.error
        record = await service.get(run_id)
        assert [a.tier for a in record.attempts if a.node == "enrich"] == ["batch", "batch"]
        assert [b.id for b in emu.batches.listed("openai")] == sent  # none sent again
        assert sorted(emu.batches.paid.values()) == [1, 1]
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 30)
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
        await service.close()
        await catalog.aclose()
