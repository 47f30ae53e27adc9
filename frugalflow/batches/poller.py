"""The batch poller: sends parked requests in provider batches, collects their answers, and
wakes the runs that wait on them.

One `tick()` does everything once, in an order that is safe to repeat and to run in many
processes at once (each step is a conditional write on the ledger of parked requests, and
a batch is claimed by one poller at a time, its claim expiring if that poller dies):

1. open requests of cancelled runs are given up; batches nobody waits on are cancelled;
2. timers whose cheaper hour came become due;
3. queued batch requests are grouped per model (up to the provider's batch limits) once the
   oldest has waited `gather` seconds, written as a batch (`submitting`), then sent; a
   poller that dies between sending and recording is covered by the next one, which looks
   the batch up at the provider (`find`) before it would send it again;
4. sent batches are polled (each at most every `poll_every` seconds); a batch that ended has
   its answers, per-item errors and unanswered items written to its items (an answer that
   came for an item its run gave up is recorded as a paid, unused `late` attempt);
5. waiting runs with something to act on are resumed (here, or through the dispatcher).

`frugalflow worker` and the service run `run()` in the background; tests and notebooks call
`tick()` themselves.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypedDict

from langchain_core.messages import message_to_dict

from ..exceptions import ModelAPIError, UnansweredError, short_error
from ..statuses import BatchItemStatus, BatchStatus, ErrorClass, Outcome
from ..tiers import Tier
from ..usage import Attempt, Usage
from . import batch_client
from .wire import BatchRequest, ItemResult

if TYPE_CHECKING:
    from ..catalog import ModelSpec
    from ..persistence.tables import BatchItemRow, BatchRow
    from ..runner import Runner

__all__ = ["BatchPoller", "Tick"]

log = logging.getLogger("frugalflow")

_DEFAULT_MAX_ITEMS = 10_000
_DEFAULT_MAX_BYTES = 100 * 1024 * 1024


@dataclass
class Tick:
    """What one tick did."""

    submitted: list[str] = field(default_factory=list)
    """Batches sent (frugalflow's ids)."""
    found: list[str] = field(default_factory=list)
    """Batches a dead poller had sent, found at the provider instead of sent again."""
    ended: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    answered: int = 0
    errors: int = 0
    late: int = 0
    woken: list[str] = field(default_factory=list)


class PollerOptions(TypedDict, total=False):
    """BatchPoller's settings, for the callers that pass them on (`Runner.batch_poller`)."""

    gather: float
    poll_every: float
    every: float
    claim_for: float
    max_items: int | None


class BatchPoller:
    """Sends, follows and collects provider batches for one Runner's store."""

    def __init__(self, runner: Runner, *, gather: float = 30.0, poll_every: float = 30.0,
                 every: float = 5.0, claim_for: float = 300.0,
                 max_items: int | None = None) -> None:
        self.runner = runner
        self.gather = timedelta(seconds=gather)
        """How long the oldest queued request of a model waits for others to join its batch."""
        self.poll_every = timedelta(seconds=poll_every)
        self.every = every
        """Seconds between ticks in `run()`."""
        self.claim_for = timedelta(seconds=claim_for)
        self.send_within = claim_for / 2
        """Seconds a send (the `find` before it, the upload, the create) may take, from its
        claim: cut there (the batch stays `submitting`), so no other poller can take the
        batch, whose claim lapsed, while this one may still create it at the provider."""
        self.max_items = max_items
        """At most this many requests per batch (default: the provider's limit)."""
        self._task: asyncio.Task[None] | None = None
        self._stopping: asyncio.Event | None = None

    @property
    def clock(self) -> Callable[[], datetime]:
        return self.runner.clock

    # -- running ------------------------------------------------------------------------------

    async def run(self) -> None:
        """Tick every `every` seconds until `stop()` (a failed tick is logged, not fatal)."""
        if self._stopping is None or self._stopping.is_set():
            self._stopping = asyncio.Event()
        stopping = self._stopping
        while not stopping.is_set():
            try:
                await self.tick()
            except Exception:
                log.exception("frugalflow: batch poller tick failed; trying again")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.every)

    def start(self) -> asyncio.Task[None]:
        """Run `run()` in the background (once)."""
        if self._task is None or self._task.done():
            self._stopping = asyncio.Event()  # before the task starts: stop() may come first
            self._task = asyncio.create_task(self.run(), name="frugalflow:batch-poller")
        return self._task

    async def stop(self, timeout: float = 30.0) -> None:
        """Stop after the tick in progress (a tick cut short mid-write would leave its
        database driver working for a closed loop); cancelled after `timeout` seconds."""
        task, self._task = self._task, None
        if task is None:
            return
        if self._stopping is not None:
            self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def tick(self) -> Tick:
        """Do each step once (see the module's documentation)."""
        await self.runner.store.setup()
        done = Tick()
        parked, now = self.runner.parked, self.clock()
        for batch_id in await parked.abandon_ended_runs(now):
            await self._cancel(batch_id, done)
        await parked.due_timers(now)
        await self._submit_queued(now, done)
        for batch in await parked.claim_batches(self.runner.holder, now, self.claim_for,
                                                poll_every=self.poll_every):
            try:
                await self._follow(batch, done)
            except Exception as e:  # one batch's trouble (the provider away) spares the others
                log.warning("frugalflow: batch %s: %s: %s", batch.id, type(e).__name__,
                            _scrubbed(short_error(e)))
            finally:
                await parked.release_claim(batch.id, self.runner.holder)
        for batch_id in await parked.unwanted_batches():
            await self._cancel(batch_id, done)
        await self._wake(done)
        return done

    # -- sending --------------------------------------------------------------------------------

    def _spec(self, model: str) -> ModelSpec | None:
        try:
            return self.runner.catalog[model]
        except KeyError:
            return None

    def _limits(self, spec: ModelSpec) -> tuple[int, int]:
        from .. import tiers

        terms_of = getattr(tiers, "tier_terms", None)
        terms = terms_of(spec, Tier.BATCH) if terms_of is not None else None
        items = getattr(terms, "max_items", None) or _DEFAULT_MAX_ITEMS
        size = getattr(terms, "max_bytes", None) or _DEFAULT_MAX_BYTES
        if self.max_items is not None:
            items = min(items, self.max_items)
        return items, size

    async def _submit_queued(self, now: datetime, done: Tick) -> None:
        by_model: dict[str, list[BatchItemRow]] = defaultdict(list)
        for item in _waited_for(await self.runner.parked.queued(Tier.BATCH), now):
            by_model[item.model].append(item)
        for model, items in by_model.items():
            spec = self._spec(model)
            if spec is None or batch_client(spec) is None:
                await self._unsendable(items, f"{model} is not in this catalog, or has no "
                                              "batch API frugalflow speaks")
                continue
            max_items, max_bytes = self._limits(spec)
            oldest = min(i.created_at for i in items if i.created_at is not None)
            soonest = min((i.fallback_at for i in items if i.fallback_at is not None),
                          default=None)
            due = now - oldest >= self.gather or (
                soonest is not None and soonest - now <= self.gather)
            for chunk in _chunks(items, max_items, max_bytes):
                # Full batches go at once; the rest gathers until its oldest has waited.
                if due or len(chunk) >= max_items:
                    await self._send(spec, chunk, done)

    async def _send(self, spec: ModelSpec, items: Sequence[BatchItemRow], done: Tick) -> None:
        from ..persistence.tables import BatchRow

        batch = BatchRow(id=f"ffb{uuid.uuid4().hex}", provider=spec.provider, model=spec.key,
                         created_at=self.clock())
        deadline = asyncio.get_running_loop().time() + self.send_within  # from its claim
        taken = await self.runner.parked.open_batch(batch, [i.id for i in items],
                                                    self.runner.holder, self.claim_for,
                                                    self.clock())
        if taken:
            await self._submit(spec, batch.id, taken, done, deadline)

    async def _settle(self, spec: ModelSpec, batch: BatchRow, done: Tick) -> None:
        """A batch still `submitting` (its send failed, or its sender died): found at the
        provider (recorded as sent), else sent with only the requests still waited for,
        else (all given up) closed without being sent."""
        client = batch_client(spec)
        assert client is not None
        parked, now = self.runner.parked, self.clock()
        # Claimed afresh (it may have waited behind other batches of this tick): the send
        # below is cut before this claim lapses.
        if not await parked.renew_claim(batch.id, self.runner.holder, now, self.claim_for):
            return  # another poller holds it now
        deadline = asyncio.get_running_loop().time() + self.send_within
        try:
            async with asyncio.timeout_at(deadline):
                found = await client.find(spec, batch.id, since=batch.created_at,
                                          items=batch.items)
        except TimeoutError:
            await parked.update_batch(batch.id, claimed_until=now)
            raise ModelAPIError(f"looking batch {batch.id} up took over "
                                f"{self.send_within:g} s", provider=spec.provider) from None
        if found is not None:
            await self._sent(batch.id, found)
            done.found.append(batch.id)
            return
        # Not sent: the requests whose runs were cancelled, or that went synchronous (or
        # will, their deadline too close), are left out (sending them would pay them for
        # nothing, or twice).
        items = _waited_for(await parked.batch_items(batch.id), now)
        if not items:
            await parked.update_batch(batch.id, status=BatchStatus.CANCELLED, ended_at=now,
                                      claimed_until=None, error="nobody waits on it any more")
            done.cancelled.append(batch.id)
            return
        if len(items) != batch.items:  # `find` looks for a batch of this many next time
            await parked.update_batch(batch.id, items=len(items))
        await self._submit(spec, batch.id, items, done, deadline)

    async def _submit(self, spec: ModelSpec, batch_id: str, items: Sequence[BatchItemRow],
                      done: Tick, deadline: float) -> None:
        """Send a batch written as `submitting` (cut at `deadline`, the event loop's time);
        a refusal fails its items (the calls move on), any other error leaves it
        `submitting` for the next claim (found, or sent)."""
        client = batch_client(spec)
        assert client is not None
        parked = self.runner.parked
        if not items:  # nothing to send (written by an older frugalflow): close it
            await parked.update_batch(batch_id, status=BatchStatus.CANCELLED,
                                      ended_at=self.clock(), claimed_until=None)
            return
        requests = [BatchRequest(i.id, i.request or {}) for i in items]
        try:
            async with asyncio.timeout_at(deadline):
                provider_id = await client.submit(spec, requests, batch_id=batch_id)
        except TimeoutError:  # the provider may have it: found, or sent, with the next claim
            log.warning("frugalflow: sending batch %s took over %g s; looked up and retried "
                        "with the next claim", batch_id, self.send_within)
            await parked.update_batch(batch_id, claimed_until=self.clock())
            return
        except ModelAPIError as e:
            if e.error_class in (ErrorClass.INVALID_REQUEST, ErrorClass.AUTH,
                                 ErrorClass.CONTEXT_LENGTH):
                await parked.update_batch(batch_id, status=BatchStatus.FAILED,
                                          error=short_error(e), ended_at=self.clock())
                await self._unanswered(items, f"batch refused: {short_error(e)}",
                                       ErrorClass(e.error_class))
                return
            log.warning("frugalflow: sending batch %s failed (%s); retried with the next "
                        "claim", batch_id, short_error(e))
            await parked.update_batch(batch_id, claimed_until=self.clock())
            return
        await self._sent(batch_id, provider_id)
        done.submitted.append(batch_id)

    async def _sent(self, batch_id: str, provider_id: str) -> None:
        parked, now = self.runner.parked, self.clock()
        await parked.update_batch(batch_id, status=BatchStatus.SUBMITTED,
                                  provider_batch_id=provider_id, submitted_at=now,
                                  claimed_until=None)
        await parked.set_batch_items(batch_id, BatchItemStatus.SUBMITTED,
                                     [BatchItemStatus.QUEUED])

    async def _unsendable(self, items: Sequence[BatchItemRow], why: str) -> None:
        await self._unanswered(items, why, ErrorClass.UNANSWERED)

    async def _unanswered(self, items: Sequence[BatchItemRow], why: str,
                          error_class: ErrorClass) -> None:
        for item in items:
            await self.runner.parked.move(
                item.id, BatchItemStatus.EXPIRED,
                [BatchItemStatus.QUEUED, BatchItemStatus.SUBMITTED], error=why[:500],
                error_class=error_class, ended_at=self.clock())

    # -- following -----------------------------------------------------------------------------

    async def _follow(self, batch: BatchRow, done: Tick) -> None:
        spec = self._spec(batch.model)
        parked = self.runner.parked
        if spec is None or batch_client(spec) is None:
            return
        client = batch_client(spec)
        assert client is not None
        if batch.status == BatchStatus.SUBMITTING:
            await self._settle(spec, batch, done)
            return
        assert batch.provider_batch_id is not None
        progress = await client.progress(spec, batch.provider_batch_id)
        now = self.clock()
        if progress.status == BatchStatus.SUBMITTED:
            await parked.update_batch(batch.id, polled_at=now)
            return
        items = await parked.batch_items(batch.id)
        if progress.status == BatchStatus.FAILED:
            await self._unanswered(items, f"the provider failed the batch: "
                                          f"{progress.error or 'no reason given'}",
                                   ErrorClass.UNANSWERED)
        else:
            results = await client.results(spec, batch.provider_batch_id)
            await self._collect(spec, items, results, done)
        await parked.update_batch(batch.id, status=progress.status, polled_at=now,
                                  ended_at=now, error=progress.error)
        done.ended.append(batch.id)

    async def _collect(self, spec: ModelSpec, items: Sequence[BatchItemRow],
                       results: Sequence[ItemResult], done: Tick) -> None:
        parked, now = self.runner.parked, self.clock()
        by_id = {r.custom_id: r for r in results}
        for item in items:
            result = by_id.get(item.id)
            if result is None or (result.message is None and result.error is None):
                result = ItemResult(item.id, error=UnansweredError(
                    "the batch ended without an answer for it", provider=spec.provider,
                    model=spec.model))
            if result.message is not None:
                usage = result.usage or Usage.from_message(result.message) or Usage()
                cost = spec.cost(usage, tier=Tier.BATCH)
                answer = _message_json(result.message)
                moved = await parked.move(
                    item.id, BatchItemStatus.SUCCEEDED, [BatchItemStatus.SUBMITTED],
                    result=answer, input_tokens=usage.input_tokens,
                    output_tokens=usage.output_tokens, cost_usd=cost, ended_at=now)
                if moved:
                    done.answered += 1
                elif await parked.move(item.id, BatchItemStatus.ABANDONED,
                                       [BatchItemStatus.ABANDONED], cost_usd=cost,
                                       input_tokens=usage.input_tokens,
                                       output_tokens=usage.output_tokens):
                    await self._late(item, usage, cost)
                    done.late += 1
                continue
            err = result.error
            assert err is not None
            status = (BatchItemStatus.EXPIRED if isinstance(err, UnansweredError)
                      else BatchItemStatus.FAILED)
            if await parked.move(item.id, status, [BatchItemStatus.SUBMITTED],
                                 error=_scrubbed(short_error(err)),
                                 error_class=err.error_class, ended_at=now):
                done.errors += 1

    async def _late(self, item: BatchItemRow, usage: Usage, cost: float) -> None:
        """An answer its call no longer waited for: paid, so it is in the ledger."""
        attempt = Attempt(
            node=item.node, model=item.model, provider=item.provider, outcome=Outcome.LATE,
            # Try 0: not one of its call's tries (the ledger keeps one row per call, try
            # and model, and the synchronous call that replaced it may be try 1 of it).
            call_id=item.call_id, run_id=item.run_id, task_id=item.task_id, try_number=0,
            usage=usage,
            cost_usd=cost, call_key=None, tier=item.tier, batch_item_id=item.id,
            # Why its call stopped waiting: the item's own reason (its run ended, its deadline
            # came too close, its node asked something else), when it was given up before read.
            error=f"answered after its call had stopped waiting ({item.error or 'gave it up'})")
        await self.runner.ledger.record_attempt(attempt, flow=item.flow)

    async def _cancel(self, batch_id: str, done: Tick) -> None:
        parked = self.runner.parked
        batch = await parked.get_batch(batch_id)
        spec = self._spec(batch.model) if batch is not None else None
        client = batch_client(spec) if spec is not None else None
        if batch is None or spec is None or client is None:
            return
        if batch.status == BatchStatus.SUBMITTING:
            # Maybe sent (a send that failed may have reached the provider): found and
            # recorded, then cancelled below; else closed unsent.
            try:
                await self._settle(spec, batch, done)
            except ModelAPIError as e:  # cannot tell yet: the next tick asks again
                log.info("frugalflow: batch %s: %s", batch_id, short_error(e))
                return
            finally:
                await parked.release_claim(batch_id, self.runner.holder)
            batch = await parked.get_batch(batch_id)
            if batch is None:
                return
        if batch.status != BatchStatus.SUBMITTED or not batch.provider_batch_id:
            return
        try:
            await client.cancel(spec, batch.provider_batch_id)
        except ModelAPIError as e:
            log.warning("frugalflow: cancelling batch %s failed: %s", batch_id, short_error(e))
            return
        # Polled once more to collect what it answered before the cancel (paid: recorded).
        await parked.update_batch(batch_id, polled_at=None)
        done.cancelled.append(batch_id)

    # -- waking ----------------------------------------------------------------------------------

    async def _wake(self, done: Tick) -> None:
        from ..exceptions import LeaseError, RunStateError

        for run_id in await self.runner.parked.runs_to_wake(self.clock()):
            try:
                await self.runner.resume(run_id, wait=False)
            except (LeaseError, RunStateError) as e:  # another poller woke it first
                log.info("frugalflow: run %s not woken here: %s", run_id, short_error(e))
                continue
            done.woken.append(run_id)


def _waited_for(items: Sequence[BatchItemRow], now: datetime) -> list[BatchItemRow]:
    """The items still waiting to be sent: queued, and before their time to give up and go
    synchronous (their run, woken, gives them up: sent, they would be paid for nothing)."""
    return [i for i in items if i.status == BatchItemStatus.QUEUED
            and (i.fallback_at is None or i.fallback_at > now)]


def _chunks(items: Sequence[BatchItemRow], max_items: int,
            max_bytes: int) -> list[list[BatchItemRow]]:
    chunks: list[list[BatchItemRow]] = [[]]
    size = 0
    for item in items:
        n = len(json.dumps(item.request or {}, default=str))
        if chunks[-1] and (len(chunks[-1]) >= max_items or size + n > max_bytes):
            chunks.append([])
            size = 0
        chunks[-1].append(item)
        size += n
    return [c for c in chunks if c]


def _message_json(message: Any) -> dict[str, Any]:
    from ..persistence.scrub import scrub_exact

    plain: dict[str, Any] = json.loads(json.dumps(message_to_dict(message), default=str))
    return dict(scrub_exact(plain))


def _scrubbed(text: str) -> str:
    from ..persistence.scrub import scrub

    return str(scrub(text))[:500]
