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


# -- a send that failed, or whose answer was lost --------------------------------------------

ROUTES = {"openai/gpt-4o-mini": "openai", "anthropic/claude-haiku-4-5": "anthropic"}


@pytest.fixture(params=list(ROUTES))
async def one_model(request: pytest.FixtureRequest, db_url: str, emu: ProviderEmulator,
                    time_: Clock) -> AsyncIterator[tuple[Runner, str]]:
    """A runner whose flow can use one model only (OpenAI's or Anthropic's), and its desk."""
    forget_provider_clients()
    catalog = emulated_catalog(emu, (request.param,))
    r = Runner(db_url, flows=[nightly()], catalog=catalog, clock=time_,
               deadline_margin=timedelta(minutes=20))
    yield r, ROUTES[request.param]
    await r.close()
    await catalog.aclose()
    forget_provider_clients()


def sent_items(emu: ProviderEmulator, route: str) -> list[str]:
    """frugalflow's item ids of every line the provider received, in every batch."""
    from frugalflow.batches.anthropic import item_id

    return [item_id(cid) for b in emu.batches.listed(route) for cid, _ in b.requests]


async def test_a_retried_send_carries_only_the_requests_still_waited_for(
        one_model: tuple[Runner, str], emu: ProviderEmulator, time_: Clock) -> None:
    runner, route = one_model
    emu.batches.script(route, delay=None, times=None)
    emu.batches.fault(route, "unavailable")  # the first create: a 503
    kept, dropped = await start(runner, ["kept"]), await start(runner, ["dropped"])
    p = poller(runner)
    assert (await p.tick()).submitted == []
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.SUBMITTING and row.items == 2
    assert emu.batches.listed(route) == []
    await runner.cancel(dropped)
    time_.advance(seconds=1)
    assert (await p.tick()).submitted == [row.id]
    [wanted] = await runner.parked.all_items(kept)
    assert sent_items(emu, route) == [wanted.id]  # not the cancelled run's request
    emu.batches.release()
    await p.tick()
    assert (await runner.wait(kept)).status == RunStatus.SUCCEEDED
    assert sorted(emu.batches.paid.values()) == [1]
    [gone] = await runner.parked.all_items(dropped)
    assert gone.status == BatchItemStatus.ABANDONED and gone.cost_usd == 0


@pytest.mark.parametrize("how", ["cancelled", "gone synchronous"])
async def test_a_batch_whose_requests_were_all_given_up_is_never_sent(
        one_model: tuple[Runner, str], emu: ProviderEmulator, time_: Clock, how: str) -> None:
    """Its first send failed (a 503); meanwhile its run was cancelled, or its deadline came
    too close and the call went synchronous: the batch is closed, never sent (for Anthropic
    the request would otherwise be paid twice: in the batch and synchronously)."""
    runner, route = one_model
    emu.batches.fault(route, "unavailable")
    run_id = await start(runner, ["given up"])
    p = poller(runner)
    await p.tick()
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.SUBMITTING
    if how == "cancelled":
        await runner.cancel(run_id)
        time_.advance(seconds=1)
    else:
        [item] = await runner.parked.all_items(run_id)
        assert item.fallback_at is not None
        time_.now = item.fallback_at + timedelta(seconds=1)
    tick = await p.tick()
    assert tick.submitted == [] and tick.cancelled == [row.id]
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.CANCELLED and row.provider_batch_id is None
    if how == "gone synchronous":
        assert tick.woken == [run_id]
        assert (await runner.wait(run_id)).status == RunStatus.SUCCEEDED
        [enrich] = [a for a in (await runner.get(run_id)).attempts if a.node == "enrich"]
        assert enrich.tier is None and enrich.outcome == Outcome.OK  # a standard call
    await p.tick()
    assert emu.batches.listed(route) == [] and not emu.batches.paid
    [item] = await runner.parked.all_items(run_id)
    assert item.status == BatchItemStatus.ABANDONED


async def test_a_batch_created_whose_answer_was_lost_is_found_not_sent_again(
        one_model: tuple[Runner, str], emu: ProviderEmulator, time_: Clock) -> None:
    """The provider created the batch, then the connection was reset: the poller records
    nothing, and its next claim finds the batch (Anthropic's once it ended) instead of
    sending it again."""
    runner, route = one_model
    emu.batches.script(route, delay=None, times=None)
    emu.batches.fault(route, "reset_after")
    run_id = await start(runner, ["lost", "answer"])
    p = poller(runner)
    assert (await p.tick()).submitted == []
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.SUBMITTING and len(emu.batches.listed(route)) == 1
    time_.advance(seconds=1)
    tick = await p.tick()  # OpenAI's is found by its metadata; Anthropic's cannot be told
    assert tick.submitted == [] and len(emu.batches.listed(route)) == 1  # while it runs
    found = list(tick.found)
    assert bool(found) == (route == "openai")
    emu.batches.release()
    for _ in range(3):
        time_.advance(seconds=1)
        tick = await p.tick()
        assert tick.submitted == []
        found += tick.found
        if tick.woken:
            break
    assert found == [row.id] and tick.woken == [run_id]
    assert (await runner.wait(run_id)).status == RunStatus.SUCCEEDED
    assert len(emu.batches.listed(route)) == 1 and sorted(emu.batches.paid.values()) == [1, 1]
    record = await runner.get(run_id)
    assert [a.tier for a in record.attempts if a.node == "enrich"] == ["batch"] * 2


async def test_a_send_is_cut_before_its_claim_lapses(
        runner: Runner, emu: ProviderEmulator, time_: Clock) -> None:
    """The provider hangs on the create: the poller gives up on it within half its claim
    (not the SDK's minute-long timeout), so no other poller takes the batch meanwhile."""
    emu.batches.script("openai", delay=None, times=None)
    emu.batches.fault("openai", "timeout_after", hang_seconds=60)
    run_id = await start(runner, ["hung"])
    p = runner.batch_poller(gather=0, poll_every=0, claim_for=1)
    tick = await asyncio.wait_for(p.tick(), 10)
    assert tick.submitted == []
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.SUBMITTING
    assert row.claimed_until is not None and row.claimed_until <= time_.now
    time_.advance(seconds=1)
    assert (await p.tick()).found == [row.id]  # created meanwhile: found, not sent again
    emu.batches.release()
    await p.tick()
    assert (await runner.wait(run_id)).status == RunStatus.SUCCEEDED
    assert len(emu.batches.listed("openai")) == 1


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
        for _ in range(200):  # until the dead poller's 2 s claim has lapsed
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


# -- races between a run and the poller, runs that end, prompts that change -----------------------


async def test_an_answer_collected_while_the_call_gives_its_item_up_is_taken(
        runner: Runner, emu: ProviderEmulator, time_: Clock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The node read its item still open past its fallback time; the poller stores the
    answer before the node's move to `abandoned`: the node takes that answer (paid) instead
    of calling synchronously."""
    from frugalflow.persistence.parked import ParkedLedger

    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["raced"])
    p = poller(runner)
    await p.tick()
    [item] = await runner.parked.all_items(run_id)
    assert item.fallback_at is not None
    time_.now = item.fallback_at + timedelta(seconds=1)
    real_move = ParkedLedger.move
    collected: list[int] = []

    async def collect_first(self: ParkedLedger, item_id: str, to: BatchItemStatus,
                            when: Any, **changes: Any) -> bool:
        if to == BatchItemStatus.ABANDONED and not collected:
            emu.batches.release()  # the provider answers, the poller collects: just now
            collected.append((await p.tick()).answered)
        return await real_move(self, item_id, to, when, **changes)

    monkeypatch.setattr(ParkedLedger, "move", collect_first)
    assert (await p.tick()).woken == [run_id]
    result = await runner.wait(run_id)
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert collected == [1]
    record = await runner.get(run_id)
    [enrich] = [a for a in record.attempts if a.node == "enrich"]
    assert (enrich.outcome, enrich.tier, enrich.batch_item_id) == (Outcome.OK, "batch", item.id)
    [item] = await runner.parked.all_items(run_id)
    assert item.status == BatchItemStatus.USED and enrich.cost_usd == item.cost_usd > 0
    [summary] = [a for a in record.attempts if a.node == "summarize"]
    assert generations(emu) == [summary.model.split("/", 1)[1]]  # no synchronous enrich
    assert sum(emu.batches.paid.values()) == 1
    assert record.run.cost_usd == pytest.approx(sum(a.cost_usd for a in record.attempts))


async def test_an_answer_collected_before_a_cancel_is_recorded_as_late_once(
        runner: Runner, emu: ProviderEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Collected, but the run not woken yet (a dispatcher's worker has not taken it), then
    cancelled: the answer is paid, so it is a `late` attempt of the run, once."""
    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["cancelled after its answer"])
    p = poller(runner)
    await p.tick()
    emu.batches.release()

    async def no_wake(self: BatchPoller, done: Any) -> None:
        return None

    with monkeypatch.context() as m:
        m.setattr(BatchPoller, "_wake", no_wake)
        assert (await p.tick()).answered == 1
    [item] = await runner.parked.all_items(run_id)
    assert item.status == BatchItemStatus.SUCCEEDED and item.cost_usd > 0
    assert (await runner.cancel(run_id)).status == RunStatus.CANCELLED
    for _ in range(2):  # the poller's pass over ended runs records nothing again
        tick = await p.tick()
        assert tick.woken == [] and tick.late == 0
        record = await runner.get(run_id)
        [late] = [a for a in record.attempts if a.outcome == Outcome.LATE]
        assert (late.cost_usd, late.tier, late.batch_item_id) == (item.cost_usd, "batch", item.id)
        assert record.run.cost_usd == pytest.approx(item.cost_usd)
    [item] = await runner.parked.all_items(run_id)
    assert item.status == BatchItemStatus.ABANDONED
    assert sum(emu.batches.paid.values()) == 1 and generations(emu) == []


async def test_a_failed_run_gives_its_open_items_up_and_records_its_unused_answers(
        runner: Runner, emu: ProviderEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two requests in two batches; the first answer wakes the run, whose node fails after
    recording it (before marking it used). Its run failed: the other request is given up
    (its batch cancelled, nothing paid for it), the recorded answer is not recorded again,
    and an answer that came for a failed run is a `late` attempt."""
    from frugalflow.persistence.parked import ParkedLedger

    emu.batches.script("openai", delay=None, times=None)
    run_id = await start(runner, ["first", "second"])
    p = runner.batch_poller(gather=0, poll_every=0, claim_for=60, max_items=1)
    await p.tick()
    first, second = emu.batches.listed("openai")
    emu.batches.release(first.id)
    real_move = ParkedLedger.move

    async def crash_on_use(self: ParkedLedger, item_id: str, to: BatchItemStatus,
                           when: Any, **changes: Any) -> bool:
        if to == BatchItemStatus.USED:
            raise RuntimeError("the node failed")
        return await real_move(self, item_id, to, when, **changes)

    with monkeypatch.context() as m:
        m.setattr(ParkedLedger, "move", crash_on_use)
        assert (await p.tick()).woken == [run_id]
        assert (await runner.wait(run_id)).status == RunStatus.FAILED
    items = {i.status: i for i in await runner.parked.all_items(run_id)}
    assert set(items) == {BatchItemStatus.SUCCEEDED, BatchItemStatus.SUBMITTED}
    tick = await p.tick()
    assert len(tick.cancelled) == 1 and tick.woken == []
    assert second.state == "cancelled" and sum(emu.batches.paid.values()) == 1
    after = {i.id: i.status for i in await runner.parked.all_items(run_id)}
    assert after == {items[BatchItemStatus.SUCCEEDED].id: BatchItemStatus.USED,
                     items[BatchItemStatus.SUBMITTED].id: BatchItemStatus.ABANDONED}
    record = await runner.get(run_id)
    assert [a.outcome for a in record.attempts] == [Outcome.OK]  # recorded once, not late
    assert record.run.cost_usd == pytest.approx(record.attempts[0].cost_usd)

    # An answer collected for a failed run (no wake: it failed) is recorded as late.
    run_id = await start(runner, ["third"])
    await p.tick()
    with monkeypatch.context() as m:
        m.setattr(BatchPoller, "_wake", lambda self, done: asyncio.sleep(0))
        emu.batches.release()
        assert (await p.tick()).answered == 1
    await runner.ledger.update_run(run_id, status=RunStatus.FAILED)
    await p.tick()
    [late] = [a for a in (await runner.get(run_id)).attempts]
    assert late.outcome == Outcome.LATE and late.cost_usd > 0


async def test_a_node_whose_prompt_changes_between_executions_waits_once_then_calls_now(
        runner: Runner, emu: ProviderEmulator, caplog: pytest.LogCaptureFixture) -> None:
    """Its prompt carries a counter (a timestamp would do the same): executed again, it asks
    something else, so its parked answer is not its answer. That answer is a `late` attempt
    (paid, unused), and the call goes synchronous instead of parking again: one batch
    payment and one synchronous one, and the run ends (it does not loop, paying each tick)."""
    import logging
    from typing import TypedDict

    from langchain_core.messages import HumanMessage

    from frugalflow import END, START, Flow, Needs, RoutedChatModel

    class State(TypedDict, total=False):
        out: str

    executions = [0]

    async def stamp(state: State, model: RoutedChatModel) -> State:
        executions[0] += 1
        answer = await model.ainvoke([HumanMessage(f"Tag this (execution {executions[0]})")])
        return {"out": str(answer.content)}

    flow: Flow[State] = Flow("drifting", State)
    flow.add_node("stamp", stamp, needs=Needs(deadline=timedelta(hours=6)))
    flow.add_edge(START, "stamp")
    flow.add_edge("stamp", END)
    runner.register(flow)
    emu.batches.script("openai", delay=0, times=None)  # each batch ends as it is sent
    started = await runner.start("drifting", {})
    assert started.status == RunStatus.WAITING
    p = poller(runner)
    with caplog.at_level(logging.WARNING, logger="frugalflow"):
        for _ in range(5):
            await p.tick()
            if (await runner.wait(started.run_id)).status != RunStatus.WAITING:
                break
    result = await runner.wait(started.run_id)
    assert result.status == RunStatus.SUCCEEDED, result.error
    items = await runner.parked.all_items(started.run_id)
    assert [i.status for i in items] == [BatchItemStatus.ABANDONED]
    assert sum(emu.batches.paid.values()) == 1 and len(generations(emu)) == 1
    record = await runner.get(started.run_id)
    late, ok = record.attempts
    assert (late.outcome, late.tier, late.cost_usd) == (Outcome.LATE, "batch", items[0].cost_usd)
    assert (ok.outcome, ok.tier) == (Outcome.OK, None) and late.cost_usd > 0
    assert record.run.cost_usd == pytest.approx(late.cost_usd + ok.cost_usd)
    [warning] = [r.getMessage() for r in caplog.records if "between executions" in r.getMessage()]
    assert "stamp" in warning and "non-deterministic" in warning


@pytest.mark.slow
async def test_a_backlog_over_postgres_parameter_limit_is_sent(
        fresh_pg_url: str, emu: ProviderEmulator, time_: Clock) -> None:
    """33,000 requests queued for one model (OpenAI takes 50,000 a batch): more item ids
    than PostgreSQL binds in one statement (32,767), so they are taken in chunks. The rows
    are written directly: the point is the poller's queries, not 33,000 runs."""
    from frugalflow.persistence.tables import BatchItemRow

    forget_provider_clients()
    catalog = emulated_catalog(emu, ("openai/gpt-4o-mini",))
    runner = Runner(fresh_pg_url, flows=[nightly()], catalog=catalog, clock=time_)
    emu.batches.script("openai", delay=None)
    n = 33_000
    try:
        await runner.store.setup()
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "Why?"}]}
        rows = [{"id": f"it{i:06d}", "run_id": f"run{i % 100}", "node": "enrich",
                 "call_key": f"k{i}", "model": "openai/gpt-4o-mini", "provider": "openai",
                 "tier": "batch", "status": "queued", "request": body,
                 "created_at": time_.now - timedelta(minutes=5)} for i in range(n)]
        async with runner.store.write() as conn:
            await conn.execute(BatchItemRow.__table__.insert(), rows)  # type: ignore[attr-defined]
        tick = await runner.batch_poller(gather=0, poll_every=0, claim_for=300).tick()
        assert len(tick.submitted) == 1
        [batch] = emu.batches.listed("openai")
        assert len(batch.requests) == n
        [row] = await runner.parked.all_batches()
        assert row.items == n and row.status == BatchStatus.SUBMITTED
        assert {i.status for i in await runner.parked.all_items()} == {BatchItemStatus.SUBMITTED}
    finally:
        await runner.close()
        await catalog.aclose()
        forget_provider_clients()
