"""Nodes that can wait, on each provider's batch API: OpenAI's Batch API, Anthropic's Message
Batches and Gemini's batch mode each have their own ids, per-item errors, expiry, refusal,
cancellation and lookup after a crash (`find`), and every path of tests/test_waiting_runs.py
that depends on them runs here once per provider.

The same real parts (the runner on SQLite and PostgreSQL, the poller, the vendors' SDKs and
LangChain integrations against the provider emulator's scripted batch desk, a clock the
test moves); the catalog holds one provider's model, so its batch is the cheapest candidate
and the same model's standard call the next one, or two providers' models when the next
candidate is the other provider's batch.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from langchain_core.messages import HumanMessage
from provider_clients import forget_provider_clients
from test_waiting_runs import (  # noqa: F401 - emu and time_ are fixtures
    Clock,
    _child,
    _kill,
    emu,
    generations,
    poller,
    start,
    time_,
)
from waiting_flows import nightly

from frugalflow import Catalog, Needs, Runner, RunStatus, Tier
from frugalflow.batches import close_batch_clients
from frugalflow.batches.poller import BatchPoller, Tick
from frugalflow.ranking import rank
from frugalflow.statuses import BatchItemStatus, BatchStatus, Outcome
from frugalflow.testing.emulator import ProviderEmulator, emulated_catalog
from frugalflow.tiers import TierOverride
from frugalflow.usage import Attempt, Usage


@dataclass(frozen=True)
class Offer:
    """A provider whose batch API a test goes through."""

    model: str
    """The catalog key of its model (one the built-in tiers give a batch price)."""
    desk: str
    """Its wire format on the emulator's batch desk (`emu.batches.script(desk, ...)`)."""
    item_error: tuple[str, str]
    """An error one of its batch lines may carry (the desk's kind), and its error class: a
    different one per provider, each read from that provider's own error shape."""

    @property
    def name(self) -> str:
        """The model's name at the provider (what the emulator's batch records)."""
        return self.model.split("/", 1)[1]


OFFERS = {
    # a 500 in the line's response
    "openai": Offer("openai/gpt-4o-mini", "openai", ("server_error", "overloaded")),
    # an `errored` line, error.type overloaded_error
    "anthropic": Offer("anthropic/claude-haiku-4-5", "anthropic", ("overloaded", "overloaded")),
    # a google.rpc.Status, RESOURCE_EXHAUSTED (8)
    "google": Offer("google/gemini-2.5-flash-lite", "gemini", ("rate_limit", "rate_limit")),
}


@pytest.fixture(params=list(OFFERS))
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def offer(provider: str) -> Offer:
    return OFFERS[provider]


@asynccontextmanager
async def runner_on(db_url: str, catalog: Catalog, time_: Clock) -> AsyncIterator[Runner]:
    """A runner of the nightly flow over `catalog` (closed with it afterwards)."""
    forget_provider_clients()
    r = Runner(db_url, flows=[nightly()], catalog=catalog, clock=time_,
               deadline_margin=timedelta(minutes=20))
    try:
        yield r
    finally:
        await r.close()
        await catalog.aclose()
        forget_provider_clients()


@pytest.fixture
async def runner(db_url: str, emu: ProviderEmulator, time_: Clock,
                 offer: Offer) -> AsyncIterator[Runner]:
    """The nightly flow with one model: its batch first, then its standard call."""
    async with runner_on(db_url, emulated_catalog(emu, (offer.model,)), time_) as r:
        yield r


def candidates(catalog: Catalog) -> list[tuple[str, str]]:
    """(model, tier) of an enrich call, cheapest first, as ranking orders them."""
    ranking = rank(catalog, Needs(deadline=timedelta(hours=6)),
                   [HumanMessage("Tag this document: a document")],
                   deadline_s=timedelta(hours=6).total_seconds(), now=Clock()())
    return [(c.spec.key, c.tier.value) for c in ranking.candidates]


async def enrich_attempts(runner: Runner, run_id: str) -> list[Attempt]:
    return [a for a in (await runner.get(run_id)).attempts if a.node == "enrich"]


def batch_cost(runner: Runner, a: Attempt) -> float:
    usage = Usage(input_tokens=a.input_tokens, output_tokens=a.output_tokens, requests=1)
    return float(runner.catalog[a.model].cost(usage, tier=Tier.BATCH))


def standard_cost(runner: Runner, a: Attempt) -> float:
    usage = Usage(input_tokens=a.input_tokens, output_tokens=a.output_tokens, requests=1)
    return float(runner.catalog[a.model].cost(usage))


# -- answered from the provider's batch ----------------------------------------------------


async def test_the_catalog_ranks_each_providers_batch_first(
        emu: ProviderEmulator, offer: Offer) -> None:
    """What the tests below stand on: the model's batch, then its standard call."""
    catalog = emulated_catalog(emu, (offer.model,))
    try:
        assert candidates(catalog) == [(offer.model, "batch"), (offer.model, "standard")]
    finally:
        await catalog.aclose()


@pytest.mark.parametrize("provider", ["anthropic", "google"])
async def test_a_call_is_answered_from_the_providers_batch_at_its_batch_price(
        runner: Runner, emu: ProviderEmulator, offer: Offer) -> None:
    emu.batches.script(offer.desk, delay=None, times=None)
    run_id = await start(runner, ["alpha", "beta", "gamma"])
    assert generations(emu) == []  # nothing was called synchronously
    p = poller(runner)
    tick = await p.tick()
    assert len(tick.submitted) == 1 and tick.woken == []
    [batch] = emu.batches.listed(offer.desk)
    assert len(batch.requests) == 3 and batch.model == offer.name
    tick = await p.tick()  # in progress at the provider: nothing ends, nobody wakes
    assert tick.ended == [] and tick.woken == [] and tick.answered == 0

    emu.batches.release()
    tick = await p.tick()
    assert tick.answered == 3 and tick.woken == [run_id]
    result = await runner.wait(run_id)
    assert result.status == RunStatus.SUCCEEDED, result.error
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.ENDED and row.provider_batch_id is not None
    assert row.provider_batch_id.endswith(batch.id)  # Gemini names it `batches/{id}`

    enrich = await enrich_attempts(runner, run_id)
    assert [(a.outcome, a.tier, a.model) for a in enrich] == [
        (Outcome.OK, "batch", offer.model)] * 3
    for a in enrich:
        assert a.input_tokens > 0 and a.output_tokens > 0
        assert a.cost_usd == pytest.approx(batch_cost(runner, a))
        assert a.cost_usd < standard_cost(runner, a) * 0.75  # about half the standard price
        assert a.batch_item_id is not None
    items = await runner.parked.all_items(run_id)
    assert {i.status for i in items} == {BatchItemStatus.USED}
    assert generations(emu) == [offer.name]  # only the summary, which may not wait
    record = await runner.get(run_id)
    assert record.run.cost_usd == pytest.approx(sum(a.cost_usd for a in record.attempts))
    assert sum(emu.batches.paid.values()) == 3 and max(emu.batches.paid.values()) == 1


# -- what the batch did not answer goes on --------------------------------------------------


async def test_a_failed_item_goes_to_the_next_candidate(
        runner: Runner, emu: ProviderEmulator, offer: Offer) -> None:
    kind, error_class = offer.item_error
    emu.batches.script(offer.desk, delay=None, fail_items={2}, item_error=kind)
    run_id = await start(runner, ["ok one", "fails", "ok two"])
    p = poller(runner)
    await p.tick()
    emu.batches.release()
    tick = await p.tick()
    assert tick.answered == 2 and tick.errors == 1 and tick.woken == [run_id]
    result = await runner.wait(run_id)
    assert result.status == RunStatus.SUCCEEDED, result.error

    enrich = await enrich_attempts(runner, run_id)
    [failed] = [a for a in enrich if a.outcome == Outcome.ERROR]
    assert (failed.tier, failed.error_class, failed.model) == ("batch", error_class, offer.model)
    assert failed.cost_usd == 0  # an errored line is not billed
    answered = [a for a in enrich if a.outcome == Outcome.OK]
    assert sorted(a.tier or "standard" for a in answered) == ["batch", "batch", "standard"]
    [retried] = [a for a in answered if a.call_key == failed.call_key]
    # The next candidate: the same model's standard call.
    assert (retried.tier, retried.model, retried.fallback_from) == (None, offer.model, offer.model)
    items = await runner.parked.all_items(run_id)
    [bad] = [i for i in items if i.error is not None]
    assert bad.error_class == error_class
    assert sorted(emu.batches.paid.values()) == [1, 1]


async def test_an_expired_batch_sends_its_unanswered_items_on(
        runner: Runner, emu: ProviderEmulator, offer: Offer) -> None:
    emu.batches.script(offer.desk, delay=None, expire=True, answered=1)
    run_id = await start(runner, ["first", "second", "third"])
    p = poller(runner)
    await p.tick()
    emu.batches.release()
    tick = await p.tick()
    assert tick.answered == 1 and tick.errors == 2 and tick.woken == [run_id]
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.EXPIRED
    result = await runner.wait(run_id)
    assert result.status == RunStatus.SUCCEEDED, result.error

    enrich = await enrich_attempts(runner, run_id)
    unanswered = [a for a in enrich if a.outcome == Outcome.ERROR]
    assert [(a.error_class, a.tier, a.cost_usd) for a in unanswered] == [
        ("unanswered", "batch", 0)] * 2
    answered = [a for a in enrich if a.outcome == Outcome.OK]
    assert sorted(a.tier or "standard" for a in answered) == ["batch", "standard", "standard"]
    for a in unanswered:
        [then] = [b for b in answered if b.call_key == a.call_key]
        assert (then.tier, then.model, then.fallback_from) == (None, offer.model, offer.model)
    assert list(emu.batches.paid.values()) == [1]


async def test_a_failed_batch_sends_its_items_on(
        runner: Runner, emu: ProviderEmulator, offer: Offer) -> None:
    """OpenAI and Gemini fail the batch after taking it; Anthropic validates a batch as it
    is created, so its refusal is a 400 to the sending poller."""
    emu.batches.script(offer.desk, fail=True)
    run_id = await start(runner, ["refused", "too"])
    tick = await poller(runner).tick()  # sent (or refused), its items unanswered: it wakes
    assert tick.woken == [run_id] and tick.answered == 0
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.FAILED and row.error
    result = await runner.wait(run_id)
    assert result.status == RunStatus.SUCCEEDED, result.error

    refused_at_creation = offer.desk == "anthropic"
    said, error_class = (("batch refused", "invalid_request") if refused_at_creation
                         else ("the provider failed the batch", "unanswered"))
    assert len(emu.batches.listed(offer.desk)) == (0 if refused_at_creation else 1)
    items = await runner.parked.all_items(run_id)
    assert [i.status for i in items] == [BatchItemStatus.USED] * 2
    assert all(said in (i.error or "") for i in items), [i.error for i in items]
    enrich = await enrich_attempts(runner, run_id)
    failed = [a for a in enrich if a.outcome == Outcome.ERROR]
    ok = [a for a in enrich if a.outcome == Outcome.OK]
    assert [(a.tier, a.error_class, a.cost_usd) for a in failed] == [
        ("batch", error_class, 0)] * 2
    assert [(a.tier, a.model, a.fallback_from) for a in ok] == [
        (None, offer.model, offer.model)] * 2
    assert not emu.batches.paid


# -- cancelling --------------------------------------------------------------------------


async def test_cancelling_a_waiting_run_cancels_its_batch_at_the_provider(
        runner: Runner, emu: ProviderEmulator, offer: Offer) -> None:
    emu.batches.script(offer.desk, delay=None, times=None)
    run_id = await start(runner, ["never mind", "either"])
    p = poller(runner)
    await p.tick()
    result = await runner.cancel(run_id)
    assert result.status == RunStatus.CANCELLED
    tick = await p.tick()
    [row] = await runner.parked.all_batches()
    # Cancelled at the provider, then polled once more: it ended cancelled, nothing came.
    assert tick.cancelled == [row.id] and tick.ended == [row.id] and tick.woken == []
    assert tick.late == 0 and tick.answered == 0 and tick.errors == 0
    assert row.status == BatchStatus.CANCELLED
    [batch] = emu.batches.listed(offer.desk)
    assert batch.state == "cancelled" and batch.cancel_requested and not emu.batches.paid
    assert [i.status for i in await runner.parked.all_items(run_id)] == [
        BatchItemStatus.ABANDONED] * 2
    assert (await runner.get(run_id)).run.status == RunStatus.CANCELLED
    assert await p.tick() == Tick()  # nothing left to do


# -- a poller dead between sending and recording ---------------------------------------------


class Killed(BaseException):
    """The process died here (nothing after it runs)."""


async def test_a_poller_dead_between_sending_and_recording_never_sends_twice(
        runner: Runner, emu: ProviderEmulator, time_: Clock, offer: Offer,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The next poller finds the batch at the provider: by its metadata (OpenAI), its
    display name (Gemini), or the tag in its lines' custom ids, which Anthropic shows only
    once the batch ended: until then the items wait, neither sent again nor given up."""
    emu.batches.script(offer.desk, delay=None, times=None)
    run_id = await start(runner, ["once", "only"])

    async def die(self: BatchPoller, batch_id: str, provider_id: str) -> None:
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(BatchPoller, "_sent", die)
        with pytest.raises(Killed):
            await poller(runner).tick()
    await close_batch_clients()  # the dead process's clients, and what they knew, are gone
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.SUBMITTING and len(emu.batches.listed(offer.desk)) == 1
    assert (await poller(runner).tick()).found == []  # its claim still holds
    time_.advance(seconds=61)  # the dead poller's claim lapses
    tick = await poller(runner).tick()
    if offer.desk == "anthropic":  # in progress: it cannot tell this batch from another
        for _ in range(2):
            assert tick.found == [] and tick.submitted == [] and tick.woken == []
            [row] = await runner.parked.all_batches()
            assert row.status == BatchStatus.SUBMITTING
            assert [i.status for i in await runner.parked.all_items(run_id)] == [
                BatchItemStatus.QUEUED] * 2
            tick = await poller(runner).tick()
        emu.batches.release()  # it ended: its lines are readable
        tick = await poller(runner).tick()
    assert tick.found == [row.id] and tick.submitted == []
    assert len(emu.batches.listed(offer.desk)) == 1  # found, not sent again
    [row] = await runner.parked.all_batches()
    assert row.status == BatchStatus.SUBMITTED
    assert row.provider_batch_id is not None
    assert row.provider_batch_id.endswith(emu.batches.listed(offer.desk)[0].id)
    emu.batches.release()
    tick = await poller(runner).tick()
    assert tick.answered == 2 and tick.woken == [run_id]
    assert (await runner.wait(run_id)).status == RunStatus.SUCCEEDED
    assert sorted(emu.batches.paid.values()) == [1, 1]
    assert [a.tier for a in await enrich_attempts(runner, run_id)] == ["batch"] * 2


class RealClock(Clock):
    """The real time (a child process's), `ahead` of it when the test says so."""

    def __init__(self) -> None:
        super().__init__()
        self.ahead = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(timezone.utc) + self.ahead


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["anthropic", "google"])  # OpenAI's: test_waiting_runs
async def test_a_poller_process_killed_before_recording_loses_and_repeats_nothing(
        db_url: str, emu: ProviderEmulator, offer: Offer) -> None:
    """As in-process above, with a real process SIGKILLed between sending and recording:
    nothing of what it sent or learnt survives but the rows and the provider's batch
    (Gemini's answers are matched by their metadata keys, Anthropic's by their custom ids).
    A poller killed after recording is `after-sending` in test_waiting_runs: polling a
    batch another process sent is the in-process test's last step here, its clients gone."""
    emu.batches.clock = time.time  # the child's clock is the real one
    emu.batches.script(offer.desk, delay=None, times=None)

    clock = RealClock()
    catalog = emulated_catalog(emu, (offer.model,))
    async with runner_on(db_url, catalog, clock) as runner:
        result = await runner.start("nightly", {"docs": ["k1", "k2", "k3"]})
        assert result.status == RunStatus.WAITING
        await _kill(await _child(db_url, emu, "before-recording", (offer.model,)))
        clock.ahead = timedelta(minutes=1)  # the dead poller's claim (0.05 s) has lapsed
        assert len(emu.batches.listed(offer.desk)) == 1  # it reached the provider
        [row] = await runner.parked.all_batches()
        assert row.status == BatchStatus.SUBMITTING
        p = runner.batch_poller(gather=0, poll_every=0, claim_for=60)
        tick = await p.tick()
        assert tick.submitted == [] and tick.answered == 0
        if offer.desk == "anthropic":
            assert tick.found == []  # in progress: cannot tell yet, so the items wait
            emu.batches.release()
            tick = await p.tick()
        assert tick.found == [row.id]
        emu.batches.release()
        tick = await p.tick()
        assert tick.answered == 3 and tick.woken == [result.run_id] and tick.submitted == []
        final = await runner.wait(result.run_id)
        assert final.status == RunStatus.SUCCEEDED, final.error
        assert len(emu.batches.listed(offer.desk)) == 1
        assert sorted(emu.batches.paid.values()) == [1, 1, 1]
        assert [a.tier for a in await enrich_attempts(runner, result.run_id)] == ["batch"] * 3


# -- the next candidate: another provider's batch ---------------------------------------------


def with_batch_discount(catalog: Catalog, discounts: dict[str, float]) -> Catalog:
    """`catalog` with these entries' batch price set to a share of their standard price, as
    an entry's `tiers = { batch = { discount = ... } }` does."""
    specs = [spec.model_copy(update={"tiers": {"batch": TierOverride(discount=share)}})
             if (share := discounts.get(spec.key)) is not None else spec for spec in catalog]
    return Catalog(specs, name=catalog.name)


# (first, then, batch discounts): the first's batch is the cheapest candidate, the other's
# batch the next one (cheaper than the first's standard call).
NEXT_BATCH = [
    ("google", "openai", {}),  # as priced: Gemini 2.5 Flash-Lite's batch, then GPT-4o mini's
    ("openai", "anthropic", {"anthropic/claude-haiku-4-5": 0.07}),
    ("anthropic", "google", {"anthropic/claude-haiku-4-5": 0.01}),
]


@pytest.mark.parametrize(("first", "then", "discounts"), NEXT_BATCH,
                         ids=[f"{a}-then-{b}" for a, b, _ in NEXT_BATCH])
async def test_a_failed_item_waits_again_for_another_providers_batch(
        db_url: str, emu: ProviderEmulator, time_: Clock, first: str, then: str,
        discounts: dict[str, float]) -> None:
    a, b = OFFERS[first], OFFERS[then]
    catalog = with_batch_discount(emulated_catalog(emu, (a.model, b.model)), discounts)
    assert candidates(catalog)[:2] == [(a.model, "batch"), (b.model, "batch")]
    kind, error_class = a.item_error
    emu.batches.script(a.desk, delay=None, fail_items={2}, item_error=kind)
    emu.batches.script(b.desk, delay=None)
    async with runner_on(db_url, catalog, time_) as runner:
        run_id = await start(runner, ["ok one", "fails", "ok two"])
        p = poller(runner)
        await p.tick()
        emu.batches.release()
        tick = await p.tick()
        assert tick.answered == 2 and tick.errors == 1 and tick.woken == [run_id]
        result = await runner.wait(run_id)  # the failed call parked again, on `then`'s batch
        assert result.status == RunStatus.WAITING, result.error
        assert emu.batches.listed(b.desk) == []
        tick = await p.tick()
        assert len(tick.submitted) == 1 and tick.woken == []
        [again] = emu.batches.listed(b.desk)
        assert len(again.requests) == 1 and again.model == b.name
        emu.batches.release()
        tick = await p.tick()
        assert tick.answered == 1 and tick.woken == [run_id]
        result = await runner.wait(run_id)
        assert result.status == RunStatus.SUCCEEDED, result.error

        enrich = await enrich_attempts(runner, run_id)
        [failed] = [x for x in enrich if x.outcome == Outcome.ERROR]
        assert (failed.model, failed.tier, failed.error_class) == (a.model, "batch", error_class)
        [retried] = [x for x in enrich if x.call_key == failed.call_key and x is not failed]
        assert (retried.outcome, retried.model, retried.tier, retried.fallback_from) == (
            Outcome.OK, b.model, "batch", a.model)
        assert retried.cost_usd == pytest.approx(batch_cost(runner, retried))
        assert sorted((x.model, x.tier) for x in enrich if x.outcome == Outcome.OK) == sorted(
            [(a.model, "batch")] * 2 + [(b.model, "batch")])
        items = await runner.parked.all_items(run_id)
        assert sorted((i.model, i.status) for i in items) == sorted(
            [(a.model, BatchItemStatus.USED)] * 3 + [(b.model, BatchItemStatus.USED)])
        assert len(generations(emu)) == 1  # nothing synchronous but the summary
        assert sum(emu.batches.paid.values()) == 3 and max(emu.batches.paid.values()) == 1
