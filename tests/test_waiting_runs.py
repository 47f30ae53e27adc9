"""Nodes that can wait: a run parks on a provider batch, the poller sends, collects and wakes,
and every failure on the way (a failed item, an expired batch, a deadline come too close, a
cancelled run, a poller dead between sending and recording) ends in one answer, paid once.

Real parts throughout: the runner on SQLite and PostgreSQL, the vendors' SDKs and the
LangChain integrations talking HTTP to the provider emulator, whose batch desk is scripted
(batches wait for `release()`: no sleeps). Time is a clock the test moves (the runner's,
the poller's and the emulator's desk's).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from provider_clients import forget_provider_clients
from waiting_flows import MODELS, nightly

from frugalflow import Runner, RunStatus, Tier
from frugalflow.batches import close_batch_clients
from frugalflow.batches.poller import BatchPoller
from frugalflow.statuses import BatchItemStatus, BatchStatus, Outcome
from frugalflow.testing.emulator import EMULATOR_KEY_ENV, ProviderEmulator, emulated_catalog

SECRET = "sk-waiting-runs-secret-0123456789"
CHILD = Path(__file__).resolve().parent / "batch_poller_child.py"


class Clock:
    """The test's time: the runner's and poller's `datetime`, the desk's seconds."""

    def __init__(self) -> None:
        # 20:00 UTC: no provider's cheaper hour is near (DeepSeek's start 00:30 / 16:30).
        self.now = datetime(2026, 11, 30, 20, 0, tzinfo=timezone.utc)

    def __call__(self) -> datetime:
        return self.now

    def seconds(self) -> float:
        return self.now.timestamp()

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@pytest.fixture
def time_() -> Clock:
    return Clock()


@pytest.fixture
async def emu(time_: Clock, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ProviderEmulator]:
    monkeypatch.setenv(EMULATOR_KEY_ENV, SECRET)
    async with ProviderEmulator(seed=3) as emu:
        emu.batches.clock = time_.seconds
        yield emu
    await close_batch_clients()


@pytest.fixture
async def runner(db_url: str, emu: ProviderEmulator, time_: Clock) -> AsyncIterator[Runner]:
    forget_provider_clients()
    catalog = emulated_catalog(emu, MODELS)
    r = Runner(db_url, flows=[nightly(), nightly(approval=True, name="nightly_ask")],
               catalog=catalog, clock=time_, deadline_margin=timedelta(minutes=20))
    yield r
    await r.close()
    await catalog.aclose()
    forget_provider_clients()


def poller(runner: Runner) -> BatchPoller:
    return runner.batch_poller(gather=0, poll_every=0, claim_for=60)


def generations(emu: ProviderEmulator) -> list[str]:
    """The synchronous generation requests the emulator served (model names)."""
    return [r.model for r in emu.requests]


async def start(runner: Runner, docs: list[str]) -> str:
    result = await runner.start("nightly", {"docs": docs})
    assert result.status == RunStatus.WAITING, result.error
    return result.run_id


# -- the happy path ------------------------------------------------------------------------


async def test_a_node_that_can_wait_is_answered_from_a_batch_at_the_batch_price(
        runner: Runner, emu: ProviderEmulator) -> None:
    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["alpha", "beta", "gamma"])
    assert generations(emu) == []  # nothing was called synchronously
    items = await runner.parked.all_items(run_id)
    assert [(i.status, i.tier) for i in items] == [(BatchItemStatus.QUEUED, "batch")] * 3

    p = poller(runner)
    tick = await p.tick()
    assert len(tick.submitted) == 1 and tick.woken == []
    [batch] = emu.batches.listed("openai")
    assert len(batch.requests) == 3
    assert (await runner.get(run_id)).run.status == RunStatus.WAITING

    emu.batches.release()
    tick = await p.tick()
    assert tick.answered == 3 and tick.woken == [run_id]
    result = await runner.wait(run_id)
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert result.state is not None and result.state["summary"]

    record = await runner.get(run_id)
    enrich = [a for a in record.attempts if a.node == "enrich"]
    assert [(a.outcome, a.tier) for a in enrich] == [(Outcome.OK, "batch")] * 3
    spec = runner.catalog[enrich[0].model]
    from frugalflow.usage import Usage

    for a in enrich:
        usage = Usage(input_tokens=a.input_tokens, output_tokens=a.output_tokens, requests=1)
        assert a.cost_usd == pytest.approx(spec.cost(usage, tier=Tier.BATCH))
        assert a.cost_usd < spec.cost(usage) * 0.75  # about half the standard price
        assert a.batch_item_id is not None
    [summary] = [a for a in record.attempts if a.node == "summarize"]
    assert summary.tier is None  # a node without a deadline is called as before
    assert generations(emu) == [summary.model.split("/", 1)[1]]
    assert record.run.cost_usd == pytest.approx(sum(a.cost_usd for a in record.attempts))
    assert sum(emu.batches.paid.values()) == 3 and max(emu.batches.paid.values()) == 1


async def test_requests_of_many_runs_for_one_model_share_one_batch(
        runner: Runner, emu: ProviderEmulator) -> None:
    emu.batches.script("openai", delay=None, times=None)
    runs = [await start(runner, [f"doc {i}"]) for i in range(4)]
    tick = await poller(runner).tick()
    assert len(tick.submitted) == 1
    [batch] = emu.batches.listed("openai")
    assert len(batch.requests) == 4
    emu.batches.release()
    tick = await poller(runner).tick()
    assert sorted(tick.woken) == sorted(runs)
    for run_id in runs:
        assert (await runner.wait(run_id)).status == RunStatus.SUCCEEDED


async def test_the_batch_waits_for_its_gathering_window_and_its_size(
        runner: Runner, emu: ProviderEmulator, time_: Clock) -> None:
    emu.batches.script("openai", delay=None, times=None)
    await start(runner, ["one", "two", "three"])
    p = runner.batch_poller(gather=600, poll_every=0, max_items=2)
    assert len((await p.tick()).submitted) == 1  # a full batch (2) goes at once
    assert (await p.tick()).submitted == []  # the third waits: 0 of 600 s gathered
    time_.advance(seconds=601)
    assert len((await p.tick()).submitted) == 1
    assert sorted(len(b.requests) for b in emu.batches.listed("openai")) == [1, 2]


async def test_a_node_without_a_deadline_never_waits(runner: Runner, emu: ProviderEmulator) -> None:
    runner.register(nightly(deadline=None))
    result = await runner.start("nightly", {"docs": ["x", "y"]})
    assert result.status == RunStatus.SUCCEEDED
    assert await runner.parked.all_items(result.run_id) == []
    assert all(a.tier is None for a in (await runner.get(result.run_id)).attempts)


# -- failures --------------------------------------------------------------------------------


async def test_a_failed_item_goes_to_the_next_candidate(runner: Runner, emu: ProviderEmulator) -> None:
    emu.batches.script("openai", delay=None, fail_items={2}, item_error="server_error")
    emu.batches.script("anthropic", delay=None, times=None)
    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["ok one", "fails", "ok two"])
    p = poller(runner)
    await p.tick()
    emu.batches.release()
    tick = await p.tick()
    assert tick.answered == 2 and tick.errors == 1 and tick.woken == [run_id]
    result = await runner.wait(run_id)
    if result.status == RunStatus.WAITING:  # the failed one parked again on the next batch
        await p.tick()
        emu.batches.release()
        await p.tick()
        result = await runner.wait(run_id)
    assert result.status == RunStatus.SUCCEEDED, result.error
    record = await runner.get(run_id)
    failed = [a for a in record.attempts if a.outcome == Outcome.ERROR]
    assert len(failed) == 1 and failed[0].tier == "batch"
    answered = [a for a in record.attempts if a.node == "enrich" and a.outcome == Outcome.OK]
    assert len(answered) == 3
    retried = [a for a in answered if a.call_key == failed[0].call_key]
    assert retried and retried[0].fallback_from == failed[0].model


async def test_an_expired_batch_sends_its_unanswered_items_on(
        runner: Runner, emu: ProviderEmulator) -> None:
    emu.batches.script("openai", delay=None, expire=True, answered=1)
    emu.batches.script("anthropic", delay=None, times=None)
    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["first", "second", "third"])
    p = poller(runner)
    await p.tick()
    emu.batches.release()
    tick = await p.tick()
    assert tick.answered == 1 and tick.errors == 2
    for _ in range(3):
        result = await runner.wait(run_id)
        if result.status != RunStatus.WAITING:
            break
        await p.tick()
        emu.batches.release()
        await p.tick()
    assert result.status == RunStatus.SUCCEEDED, result.error
    record = await runner.get(run_id)
    unanswered = [a for a in record.attempts if a.error_class == "unanswered"]
    assert len(unanswered) == 2 and all(a.cost_usd == 0 for a in unanswered)
    assert max(emu.batches.paid.values()) == 1


async def test_near_its_deadline_a_call_stops_waiting_and_goes_synchronous(
        runner: Runner, emu: ProviderEmulator, time_: Clock) -> None:
    emu.batches.script("openai", delay=None, times=None)  # never ends by itself
    run_id = await start(runner, ["slow"])
    p = poller(runner)
    await p.tick()
    [item] = await runner.parked.all_items(run_id)
    assert item.fallback_at is not None and item.deadline_at is not None
    time_.now = item.fallback_at + timedelta(seconds=1)
    tick = await p.tick()
    assert tick.woken == [run_id]
    result = await runner.wait(run_id)
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert time_.now < item.deadline_at  # answered before its deadline
    record = await runner.get(run_id)
    [enrich] = [a for a in record.attempts if a.node == "enrich"]
    assert enrich.tier is None and enrich.outcome == Outcome.OK  # a standard call
    [item] = await runner.parked.all_items(run_id)
    assert item.status == BatchItemStatus.ABANDONED
    tick = await p.tick()  # nobody waits on the batch any more: cancelled at the provider
    assert tick.cancelled
    [batch] = emu.batches.listed("openai")
    assert batch.state == "cancelled" and not emu.batches.paid


async def test_an_answer_that_comes_after_the_call_moved_on_is_recorded_as_paid(
        runner: Runner, emu: ProviderEmulator, time_: Clock) -> None:
    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["late"])
    p = poller(runner)
    await p.tick()
    [item] = await runner.parked.all_items(run_id)
    assert item.fallback_at is not None
    time_.now = item.fallback_at + timedelta(seconds=1)
    await p.tick()  # wakes the run: it gives the item up and calls synchronously
    assert (await runner.wait(run_id)).status == RunStatus.SUCCEEDED
    emu.batches.release()  # the provider answered before the cancel reached it
    tick = await p.tick()
    assert tick.late == 1
    record = await runner.get(run_id)
    [late] = [a for a in record.attempts if a.outcome == Outcome.LATE]
    assert late.cost_usd > 0 and late.tier == "batch"
    assert record.run.cost_usd == pytest.approx(sum(a.cost_usd for a in record.attempts))


async def test_cancelling_a_waiting_run_cancels_its_batch(
        runner: Runner, emu: ProviderEmulator) -> None:
    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["never mind"])
    p = poller(runner)
    await p.tick()
    result = await runner.cancel(run_id)
    assert result.status == RunStatus.CANCELLED
    tick = await p.tick()
    assert tick.cancelled and tick.woken == []
    [batch] = emu.batches.listed("openai")
    assert batch.state == "cancelled" and not emu.batches.paid
    [item] = await runner.parked.all_items(run_id)
    assert item.status == BatchItemStatus.ABANDONED


async def test_a_poller_dead_between_sending_and_recording_never_sends_twice(
        runner: Runner, emu: ProviderEmulator, time_: Clock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["once", "only"])

    class Killed(BaseException):
        """The process died here (nothing after it runs)."""

    async def die(self: BatchPoller, batch_id: str, provider_id: str) -> None:
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(BatchPoller, "_sent", die)
        with pytest.raises(Killed):
            await poller(runner).tick()
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.SUBMITTING and len(emu.batches.listed("openai")) == 1
    assert (await poller(runner).tick()).found == []  # its claim still holds
    time_.advance(seconds=61)  # the dead poller's claim lapses
    tick = await poller(runner).tick()
    assert tick.found == [row.id] and tick.submitted == []
    assert len(emu.batches.listed("openai")) == 1  # found, not sent again
    emu.batches.release()
    await poller(runner).tick()
    assert (await runner.wait(run_id)).status == RunStatus.SUCCEEDED
    assert sorted(emu.batches.paid.values()) == [1, 1]


async def test_a_run_resumed_after_its_answer_was_recorded_pays_nothing_again(
        runner: Runner, emu: ProviderEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The node died after recording the batch answer, before marking its item used: the
    next execution replays the recorded answer (by its call key)."""
    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["recorded"])
    p = poller(runner)
    await p.tick()
    emu.batches.release()
    from frugalflow.persistence.parked import ParkedLedger

    real_move = ParkedLedger.move

    async def crash_on_use(self: ParkedLedger, item_id: str, to: BatchItemStatus,
                           when: Any, **changes: Any) -> bool:
        if to == BatchItemStatus.USED:
            raise RuntimeError("the process died")
        return await real_move(self, item_id, to, when, **changes)

    with monkeypatch.context() as m:
        m.setattr(ParkedLedger, "move", crash_on_use)
        await p.tick()
        result = await runner.wait(run_id)
    assert result.status == RunStatus.FAILED
    result = await runner.resume(run_id)
    assert result.status == RunStatus.SUCCEEDED, result.error
    record = await runner.get(run_id)
    enrich = [a for a in record.attempts if a.node == "enrich"]
    assert [a.outcome for a in enrich] == [Outcome.OK, Outcome.REPLAYED]
    assert record.run.cost_usd == pytest.approx(sum(a.cost_usd for a in record.attempts))


async def test_a_humans_question_beside_waiting_calls(runner: Runner, emu: ProviderEmulator) -> None:
    emu.batches.script("openai", delay=None, times=None)
    result = await runner.start("nightly_ask", {"docs": ["d1", "d2"]})
    assert result.status == RunStatus.INTERRUPTED
    assert result.interrupts == [{"question": "send tonight's summary?"}]
    p = poller(runner)
    await p.tick()
    result = await runner.resume(result.run_id, "yes")  # answers the human only
    assert result.status == RunStatus.WAITING
    emu.batches.release()
    assert (await p.tick()).woken == [result.run_id]
    final = await runner.wait(result.run_id)
    assert final.status == RunStatus.SUCCEEDED, final.error
    assert final.state is not None and final.state["approved"] == "yes"


async def test_no_key_in_parked_requests_batches_or_errors(
        runner: Runner, emu: ProviderEmulator) -> None:
    emu.batches.script("openai", delay=None, fail_items={1}, item_error="auth")
    run_id = await start(runner, ["secret-free"])
    p = poller(runner)
    await p.tick()
    emu.batches.release()
    await p.tick()
    dumped = repr(await runner.parked.all_items()) + repr(await runner.parked.all_batches())
    dumped += repr(await runner.get(run_id))
    assert SECRET not in dumped


# -- a poller process killed (SIGKILL) ---------------------------------------------------------


async def _child(db_url: str, emu: ProviderEmulator, mode: str,
                 models: Sequence[str] = MODELS) -> asyncio.subprocess.Process:
    """A poller process, its catalog `models`, that prints `sent` and waits to be killed
    (see its module)."""
    env = {**os.environ, EMULATOR_KEY_ENV: SECRET}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD), db_url, emu.url, mode, *models, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    line = await asyncio.wait_for(proc.stdout.readline(), 60)
    if line.strip() != b"sent":
        _, err = await proc.communicate()
        raise AssertionError(f"the poller process did not send: {line!r} {err.decode()[-2000:]}")
    return proc


async def _kill(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["after-sending", "before-recording"])
async def test_a_poller_process_killed_after_sending_loses_and_repeats_nothing(
        db_url: str, emu: ProviderEmulator, mode: str) -> None:
    forget_provider_clients()
    catalog = emulated_catalog(emu, MODELS)
    # Real time here: the child's clock and ours must agree.
    runner = Runner(db_url, flows=[nightly()], catalog=catalog,
                    deadline_margin=timedelta(minutes=20))
    emu.batches.clock = time.time
    emu.batches.script("openai", delay=None, times=None)
    try:
        result = await runner.start("nightly", {"docs": ["k1", "k2", "k3"]})
        assert result.status == RunStatus.WAITING
        await _kill(await _child(db_url, emu, mode))
        assert len(emu.batches.listed("openai")) == 1  # it reached the provider
        p = runner.batch_poller(gather=0, poll_every=0, claim_for=60)
        found: list[str] = []
        for _ in range(200):  # until the dead poller's 0.05 s claim has lapsed
            tick = await p.tick()
            found += tick.found
            assert tick.submitted == []  # never sent again
            if mode == "after-sending" or found:
                break
            await asyncio.sleep(0.05)
        assert (mode == "before-recording") == bool(found)
        emu.batches.release()
        tick = await p.tick()
        assert tick.answered == 3 and tick.woken == [result.run_id]
        final = await runner.wait(result.run_id)
        assert final.status == RunStatus.SUCCEEDED, final.error
        assert len(emu.batches.listed("openai")) == 1
        assert sorted(emu.batches.paid.values()) == [1, 1, 1]
        record = await runner.get(result.run_id)
        assert [a.tier for a in record.attempts if a.node == "enrich"] == ["batch"] * 3
    finally:
        await runner.close()
        await catalog.aclose()
        forget_provider_clients()


async def test_wait_through_waiting_while_a_poller_runs(runner: Runner, emu: ProviderEmulator) -> None:
    emu.batches.script("openai", delay=0, times=None)  # each batch ends as it is sent
    p = runner.batch_poller(gather=0, poll_every=0, every=0.01)
    p.start()
    try:
        started = await runner.start("nightly", {"docs": ["x", "y"]}, wait=False)
        final = await asyncio.wait_for(runner.wait(started.run_id, through_waiting=True), 60)
    finally:
        await p.stop()
    assert final.status == RunStatus.SUCCEEDED, final.error
    tiers = [a.tier for a in (await runner.get(started.run_id)).attempts if a.node == "enrich"]
    assert tiers == ["batch", "batch"]


async def test_a_failed_batch_sends_its_items_on(runner: Runner, emu: ProviderEmulator) -> None:
    emu.batches.script("openai", fail=True)  # the provider refuses the whole batch
    emu.batches.script("anthropic", delay=None, times=None)
    run_id = await start(runner, ["refused"])
    p = poller(runner)
    tick = await p.tick()  # sent, found failed, its item unanswered: the run wakes
    assert tick.woken == [run_id]
    # Its next candidate: the same model's standard call (cheaper than another's batch).
    assert (await runner.wait(run_id)).status == RunStatus.SUCCEEDED
    [item] = await runner.parked.all_items(run_id)
    assert item.status == BatchItemStatus.USED and "failed the batch" in (item.error or "")
    [failed, ok] = [a for a in (await runner.get(run_id)).attempts if a.node == "enrich"]
    assert (failed.outcome, failed.error_class, failed.cost_usd) == (Outcome.ERROR, "unanswered", 0)
    assert (ok.outcome, ok.tier, ok.model) == (Outcome.OK, None, failed.model)
    assert ok.fallback_from == failed.model


# -- the synchronous tiers ----------------------------------------------------------------------


async def test_flex_when_a_batch_cannot_answer_in_time(
        db_url: str, emu: ProviderEmulator, time_: Clock) -> None:
    forget_provider_clients()
    catalog = emulated_catalog(emu, ("openai/gpt-5-mini",))
    runner = Runner(db_url, flows=[nightly(timedelta(minutes=30))], catalog=catalog,
                    clock=time_)
    try:
        result = await runner.start("nightly", {"docs": ["urgent"]})
        assert result.status == RunStatus.SUCCEEDED, result.error  # flex answers at once
        record = await runner.get(result.run_id)
        [enrich] = [a for a in record.attempts if a.node == "enrich"]
        assert enrich.tier == "flex"
        [body] = [r.body for r in emu.requests if "Tag this" in str(r.body)]
        assert body["service_tier"] == "flex"
        spec = catalog["openai/gpt-5-mini"]
        from frugalflow.usage import Usage

        usage = Usage(input_tokens=enrich.input_tokens, output_tokens=enrich.output_tokens,
                      requests=1)
        assert enrich.cost_usd == pytest.approx(spec.cost(usage, tier=Tier.FLEX))
        assert enrich.cost_usd < spec.cost(usage)
        assert await runner.parked.all_items(result.run_id) == []
    finally:
        await runner.close()
        await catalog.aclose()
        forget_provider_clients()


async def test_a_cheaper_hour_before_the_deadline_is_waited_for(
        db_url: str, emu: ProviderEmulator, time_: Clock) -> None:
    forget_provider_clients()
    catalog = emulated_catalog(emu, ("deepseek/deepseek-chat",))
    time_.now = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc)  # peak; cheaper from 16:30
    runner = Runner(db_url, flows=[nightly(timedelta(hours=8))], catalog=catalog, clock=time_)
    try:
        run_id = await start(runner, ["tonight"])
        [timer] = await runner.parked.all_items(run_id)
        assert timer.tier == "off_peak" and timer.wake_at is not None
        assert timer.wake_at == datetime(2026, 11, 30, 16, 30, tzinfo=timezone.utc)
        assert emu.requests == []  # nothing sent: it waits for the hour
        p = poller(runner)
        assert (await p.tick()).woken == []
        time_.now = datetime(2026, 11, 30, 16, 31, tzinfo=timezone.utc)
        assert (await p.tick()).woken == [run_id]
        assert (await runner.wait(run_id)).status == RunStatus.SUCCEEDED
        [enrich] = [a for a in (await runner.get(run_id)).attempts if a.node == "enrich"]
        assert enrich.tier == "off_peak"
        spec = catalog["deepseek/deepseek-chat"]
        from frugalflow.usage import Usage

        usage = Usage(input_tokens=enrich.input_tokens, output_tokens=enrich.output_tokens,
                      requests=1)
        peak = spec.cost(usage, at=datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc))
        assert enrich.cost_usd == pytest.approx(peak / 2)
    finally:
        await runner.close()
        await catalog.aclose()
        forget_provider_clients()


# -- with workers ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_workers_park_send_collect_and_wake(fresh_pg_url: str, emu: ProviderEmulator) -> None:
    """The service starts a run; a worker executes it until it parks, its poller sends the
    batch, collects it once the provider answered, and wakes the run for a worker."""
    from frugalflow.scale.dispatch import ProcrastinateDispatcher

    emu.batches.clock = time.time
    emu.batches.script("openai", delay=None, times=None)
    forget_provider_clients()
    catalog = emulated_catalog(emu, MODELS)
    service = Runner(fresh_pg_url, flows=[nightly()], catalog=catalog,
                     dispatcher=ProcrastinateDispatcher(fresh_pg_url))
    env = {**os.environ, EMULATOR_KEY_ENV: SECRET}
    worker = await asyncio.create_subprocess_exec(
        sys.executable, str(CHILD.parent / "waiting_worker.py"), fresh_pg_url, emu.url, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert worker.stdout is not None
        assert b"ready" in await asyncio.wait_for(worker.stdout.readline(), 60)
        started = await service.start("nightly", {"docs": ["w1", "w2"]}, wait=False)
        for _ in range(600):  # until the worker's poller has sent the batch
            if emu.batches.listed("openai"):
                break
            await asyncio.sleep(0.05)
        for _ in range(600):  # the run ends its step (parks) while its batch may be sent
            status = (await service.get(started.run_id)).run.status
            if status != RunStatus.RUNNING:
                break
            await asyncio.sleep(0.05)
        assert status == RunStatus.WAITING
        for _ in range(600):  # (gather=0: each request may go in its own batch)
            if sum(len(b.requests) for b in emu.batches.listed("openai")) == 2:
                break
            await asyncio.sleep(0.05)
        emu.batches.release()
        final = await asyncio.wait_for(service.wait(started.run_id), 120)  # through waiting
        assert final.status == RunStatus.SUCCEEDED, final.error
        record = await service.get(started.run_id)
        assert [a.tier for a in record.attempts if a.node == "enrich"] == ["batch", "batch"]
        assert sorted(emu.batches.paid.values()) == [1, 1]
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(worker.wait(), 30)
        except TimeoutError:
            worker.kill()
            await worker.wait()
        await service.close()
        await catalog.aclose()
        forget_provider_clients()


@pytest.mark.parametrize("model", ["openai/gpt-4o-mini", "anthropic/claude-haiku-4-5",
                                   "google/gemini-2.5-flash"])
async def test_a_batch_answer_the_content_filter_stopped_is_paid_and_moves_on(
        db_url: str, emu: ProviderEmulator, time_: Clock, model: str) -> None:
    """A 200 that carries a refusal, on each wire format: checked like a synchronous answer
    (paid, not accepted), then the next candidate answers."""
    forget_provider_clients()
    catalog = emulated_catalog(emu, (model,))
    route = {"openai": "openai", "anthropic": "anthropic", "google": "gemini"}[
        model.split("/")[0]]
    emu.batches.script(route, delay=None, filtered_items={1})
    runner = Runner(db_url, flows=[nightly()], catalog=catalog, clock=time_)
    try:
        run_id = await start(runner, ["sensitive"])
        p = poller(runner)
        await p.tick()
        emu.batches.release()
        assert (await p.tick()).answered == 1
        assert (await runner.wait(run_id)).status == RunStatus.SUCCEEDED
        [refused, ok] = [a for a in (await runner.get(run_id)).attempts if a.node == "enrich"]
        assert (refused.outcome, refused.error_class, refused.tier) == (
            Outcome.ERROR, "content_filter", "batch")
        assert refused.cost_usd > 0  # a refusal is paid
        assert (ok.outcome, ok.tier) == (Outcome.OK, None)  # then the standard call
    finally:
        await runner.close()
        await catalog.aclose()
        forget_provider_clients()


async def test_two_pollers_taking_the_same_requests_write_one_batch(
        runner: Runner, emu: ProviderEmulator, time_: Clock) -> None:
    """Both read the same queued requests; the one whose write comes second takes none of
    them and writes no batch (an empty one would be sent, or found, forever)."""
    from frugalflow.persistence.tables import BatchRow

    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["raced", "twice"])
    ids = [i.id for i in await runner.parked.all_items(run_id)]
    first = await runner.parked.open_batch(BatchRow(id="one", provider="openai", model="m"),
                                           ids, "poller-1", timedelta(minutes=5), time_.now)
    second = await runner.parked.open_batch(BatchRow(id="two", provider="openai", model="m"),
                                            ids, "poller-2", timedelta(minutes=5), time_.now)
    assert sorted(i.id for i in first) == sorted(ids) and second == []
    assert [(b.id, b.items) for b in await runner.parked.all_batches()] == [("one", 2)]
