"""Parking a routed call: its request written down, its run stopped until the answer comes.

A call routed to the batch tier writes its request as a batch item and raises a LangGraph
interrupt of frugalflow's own (`waiting_interrupt`): the node stops, the run's other
branches go on to the end of the step, and the run ends `waiting`, holding no worker and
no lease. The poller sends the item in a batch and, when its answer is in (or its hour
came, or its deadline came too close), resumes the run. The node executes again from its
start: completed calls replay from the ledger, and this call finds its item
(`take_parked`): an answer (recorded as the call's attempt at the batch price, as if it had
been synchronous), an error (the next candidate is tried), or still nothing (it parks
again, or, past the item's fallback time, gives it up for a synchronous call).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, messages_from_dict
from langgraph.errors import GraphInterrupt
from langgraph.types import Interrupt

from ..exceptions import UnansweredError
from ..statuses import BatchItemStatus, ErrorClass, Outcome
from ..tiers import Tier
from ..usage import Attempt, Usage
from .. import exceptions as errors

if TYPE_CHECKING:
    from ..attempts import CallAttempts
    from ..needs import Needs
    from ..persistence.parked import ParkedLedger
    from ..persistence.tables import BatchItemRow
    from ..ranking import Candidate

__all__ = ["WAITING", "Parking", "is_waiting", "park", "take_parked", "utcnow"]

log = logging.getLogger("frugalflow")

WAITING = "frugalflow_waiting"
"""The key that marks an interrupt as a parked call's (not a human's question)."""


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def is_waiting(value: object) -> bool:
    """Whether an interrupt's value is a parked call's."""
    return isinstance(value, dict) and WAITING in value


def waiting_interrupt(item: BatchItemRow) -> GraphInterrupt:
    """The interrupt that parks the node of `item` (its id is the item's, so a run's
    interrupts name what they wait for)."""
    until = item.wake_at or item.fallback_at
    value = {WAITING: item.id, "node": item.node, "model": item.model, "tier": item.tier,
             "until": until.isoformat() if until is not None else None}
    return GraphInterrupt((Interrupt(value=value, id=f"ff-wait-{item.id}"),))


@dataclass
class Parking:
    """What a durable run's routed calls need to park: the ledger of parked items, the run's
    start and default deadline, the clock, and how long before a deadline a call stops
    waiting for its batch and is made synchronously."""

    ledger: ParkedLedger
    flow: str | None
    started_at: datetime
    run_deadline: datetime | None = None
    clock: Callable[[], datetime] = utcnow
    fallback_margin: timedelta = timedelta(minutes=10)
    """Time kept for the synchronous call (with its retries and fallbacks) after a batch
    is given up: an item is given up at its deadline less this."""
    parked: list[str] = field(default_factory=list)
    """Item ids this execution parked on (for tests and events)."""
    positions: dict[str | None, int] = field(default_factory=dict)
    """Per node execution (task): how many of its calls that may wait began so far."""

    def position(self, task_id: str | None) -> int:
        """The place of a call that may wait among its node execution's (1, 2, ...)."""
        n = self.positions[task_id] = self.positions.get(task_id, 0) + 1
        return n

    def deadline(self, needs: Needs) -> datetime | None:
        """When the answer of a call with `needs` is due (None: no deadline)."""
        if needs.deadline is not None:
            return self.started_at + needs.deadline
        return self.run_deadline

    def seconds_left(self, needs: Needs) -> float | None:
        deadline = self.deadline(needs)
        if deadline is None:
            return None
        return (deadline - self.clock()).total_seconds()


async def take_parked(call: CallAttempts, parking: Parking) -> AIMessage | None:
    """What this call's parked items say, before it plans: the answer that came (recorded,
    returned), else the tiers that failed (excluded from the plan), else park again on an
    item still waiting; None when nothing is parked for it (or all of it is over)."""
    key = call.ensure_call_key()
    if key is None:
        return None
    # Counted as the call begins (before any await): the place is the same in every
    # execution of a node whose calls are the same (as LangGraph counts interrupts).
    call.position = parking.position(call.task_id)
    if call.ctx.replay is not None:
        replayed = await call.replayed()  # recorded already (a node executed again)
        if replayed is not None:
            await _used(parking, key, call)
            return replayed
    items = await parking.ledger.items_for(call.usage.run_id or "", key)
    for item in items:
        if item.tier == Tier.BATCH and item.status == BatchItemStatus.USED:
            # An earlier execution recorded its failure (an accepted answer replays above):
            # whatever answers now is a fallback from its model, whichever item comes first.
            call.previous = item.model
    now = parking.clock()
    waiting: BatchItemRow | None = None
    for item in items:
        answer, wait = await _take(call, parking, item, now)
        if answer is not None:
            return answer
        waiting = wait or waiting
    if waiting is not None:
        parking.parked.append(waiting.id)
        raise waiting_interrupt(waiting)
    return None


async def _take(call: CallAttempts, parking: Parking, item: BatchItemRow,
                now: datetime) -> tuple[AIMessage | None, BatchItemRow | None]:
    """What one parked item of this call says: (its answer, None) when it brings one the
    call takes, (None, the item) when the call is to wait for it, else (None, None) (what
    it ruled out is excluded from the call's plan)."""
    status = BatchItemStatus(item.status)
    if status is BatchItemStatus.SUCCEEDED:
        answer = await _answered(call, parking, item)
        if answer is not None:
            return answer, None
        call.exclude(item.model, Tier(item.tier))  # paid, but not acceptable
    if status in (BatchItemStatus.FAILED, BatchItemStatus.EXPIRED):
        if await parking.ledger.move(item.id, BatchItemStatus.USED, [status]):
            await _failed(call, item)
        call.exclude(item.model, Tier(item.tier))
    elif status is BatchItemStatus.DUE:
        # Its hour came: the synchronous call goes now, on its model.
        await parking.ledger.move(item.id, BatchItemStatus.USED, [status])
        call.due = item
    elif status in (BatchItemStatus.QUEUED, BatchItemStatus.SUBMITTED):
        if item.fallback_at is None or now < item.fallback_at:
            return None, item
        # Too close to the deadline to wait longer: give it up (the poller cancels its
        # batch when nobody waits on it) and call synchronously now.
        if not await parking.ledger.move(item.id, BatchItemStatus.ABANDONED,
                                         [BatchItemStatus.QUEUED, BatchItemStatus.SUBMITTED],
                                         ended_at=now, error="deadline too close"):
            # The poller settled it between our read and this move (its answer, or its
            # error, came in): that is what this call takes (an answer is paid already).
            again = await _reread(parking, item)
            if again is not None and again.status not in (BatchItemStatus.QUEUED,
                                                          BatchItemStatus.SUBMITTED):
                return await _take(call, parking, again, now)
        call.exclude(item.model, Tier(item.tier))
        call.exclude_tier(Tier.BATCH)
    else:  # used or abandoned earlier
        if item.tier == Tier.BATCH and status is BatchItemStatus.ABANDONED:
            call.exclude_tier(Tier.BATCH)
        call.exclude(item.model, Tier(item.tier))
    return None, None


async def _reread(parking: Parking, item: BatchItemRow) -> BatchItemRow | None:
    for again in await parking.ledger.items_for(item.run_id, item.call_key):
        if again.id == item.id:
            return again
    return None


async def _used(parking: Parking, key: str, call: CallAttempts) -> None:
    """A replayed call's answered item is used (so it wakes its run no more)."""
    for item in await parking.ledger.items_for(call.usage.run_id or "", key):
        if item.status == BatchItemStatus.SUCCEEDED:
            await parking.ledger.move(item.id, BatchItemStatus.USED, [BatchItemStatus.SUCCEEDED])


async def park(call: CallAttempts, parking: Parking, c: Candidate) -> None:
    """Write `c`'s request down for its tier and park the node (raises the interrupt);
    returns only when `c` cannot be parked (its provider has no batch API we speak)."""
    spec, ctx, routed = c.spec, call.ctx, call.routed
    key = call.ensure_call_key()
    if key is None:  # not a durable run: nothing could wake it
        call.skipped.append(f"{spec.key} ({c.tier}): only durable runs can wait")
        return
    if c.tier in call.excluded_tiers:  # (its prompt changed: see _asks_something_else)
        call.skipped.append(f"{spec.key} ({c.tier}): this call cannot wait")
        return
    deadline = parking.deadline(routed.needs)
    now = parking.clock()
    fallback_at = deadline - parking.fallback_margin if deadline is not None else None
    request: dict[str, Any] | None = None
    wake_at: datetime | None = None
    if c.tier is Tier.BATCH:
        from . import batch_client

        client = batch_client(spec)
        if client is None:
            call.skipped.append(f"{spec.key} (batch): no batch API for its provider")
            return
        model = routed._bound(spec, ctx)
        request = client.request_body(model, call.messages, call.stop, call.kwargs)
    else:
        from ..tiers import next_off_peak

        window = next_off_peak(spec, now)
        if window is None:
            call.skipped.append(f"{spec.key} (off_peak): no cheaper hour ahead")
            return
        wake_at = window[0]
    from ..persistence.scrub import scrub_exact

    item = _new_item(call, c, key, request=scrub_exact(request) if request else None,
                     deadline_at=deadline, fallback_at=fallback_at, wake_at=wake_at,
                     created_at=now)
    if await _asks_something_else(call, parking, item):
        call.skipped.append(f"{spec.key} ({c.tier}): its prompt changed between executions")
        return
    await parking.ledger.park(item)
    parking.parked.append(item.id)
    raise waiting_interrupt(item)


async def _asks_something_else(call: CallAttempts, parking: Parking, item: BatchItemRow) -> bool:
    """Whether earlier executions of this node parked items at this call's place under
    another key: its prompt changed between executions (a timestamp, a counter in it).
    Parking again would wait for a new answer each time the old one wakes the run, paying
    every time; so the old items are given up (an answer among them recorded as paid,
    unused: `late`) and the call is made now, without waiting: one batch payment at most,
    then one synchronous."""
    late = await parking.ledger.give_up_call(item, parking.clock())
    if late < 0:
        return False
    call.usage.spent_usd += late  # recorded in the ledger beside this execution's calls
    call.exclude_tier(Tier.BATCH)
    call.exclude_tier(Tier.OFF_PEAK)
    log.warning("frugalflow: node %r asked something else when executed again (its prompt "
                "changed between executions: a non-deterministic prompt), so it cannot wait "
                "for a batch; calling it synchronously", call.node)
    return True


def _new_item(call: CallAttempts, c: Candidate, key: str, **fields: Any) -> BatchItemRow:
    from ..persistence.tables import BatchItemRow

    return BatchItemRow(
        id=f"ff{uuid.uuid4().hex}", run_id=call.usage.run_id or "", flow=call.parking_flow(),
        node=call.node, task_id=call.task_id, call_key=key, call_id=call.call_id,
        call_position=call.position,
        model=c.spec.key, provider=c.spec.provider, tier=str(c.tier),
        status=BatchItemStatus.QUEUED, expected_cost_usd=c.expected_cost, **fields)


async def _answered(call: CallAttempts, parking: Parking,
                    item: BatchItemRow) -> AIMessage | None:
    """The batch's answer to this call, checked as a synchronous answer would be (end
    markers and refusals, the output schema, the node's validator) and recorded as its
    attempt at the batch price; None when it was not acceptable (recorded as a failed,
    paid attempt: the call goes on to its next candidate)."""
    (message,) = messages_from_dict([item.result or {}])
    assert isinstance(message, AIMessage)
    cost = item.cost_usd
    failure = await _check(call, item, message)
    if failure is not None:
        usage = Usage(input_tokens=item.input_tokens, output_tokens=item.output_tokens,
                      requests=1)
        await call.record(_attempt(call, item, Outcome.ERROR, usage=usage, cost=cost,
                                   error_class=failure.error_class, error=str(failure)[:300]))
        call.failures.append(failure)
        call.previous = item.model
        await parking.ledger.move(item.id, BatchItemStatus.USED, [BatchItemStatus.SUCCEEDED])
        return None
    message.response_metadata = {
        **message.response_metadata,
        "frugalflow": {"model": item.model, "cost_usd": cost, "tier": item.tier,
                       "attempts": len(call.attempts) + 1, "call_id": call.call_id}}
    usage = Usage(input_tokens=item.input_tokens, output_tokens=item.output_tokens, requests=1)
    attempt = _attempt(call, item, Outcome.OK, usage=usage, cost=cost, response=message)
    await call.record(attempt)
    # Recorded first: a crash before the move replays the recorded answer (by call key).
    await parking.ledger.move(item.id, BatchItemStatus.USED, [BatchItemStatus.SUCCEEDED])
    return message


async def _check(call: CallAttempts, item: BatchItemRow,
                 message: AIMessage) -> errors.ModelAPIError | None:
    from ..validation import parse_output, validate

    routed = call.routed
    try:
        spec = call.ctx.catalog[item.model]
    except KeyError:
        return None  # a model gone from the catalog: its answer stands unchecked
    try:
        spec.adapter.check(message, spec)
        schema = routed.response_schema
        parsed = parse_output(schema, spec, message) if schema is not None else None
        if routed.validator is not None:
            await validate(routed, routed.validator, spec, message, parsed, call.messages)
    except errors.ModelAPIError as e:
        return e
    return None


async def _failed(call: CallAttempts, item: BatchItemRow) -> None:
    attempt = _attempt(call, item, Outcome.ERROR,
                       error_class=ErrorClass(item.error_class or ErrorClass.UNANSWERED),
                       error=item.error or "the batch ended before answering it")
    await call.record(attempt)
    call.failures.append(_error_of(item))
    call.previous = item.model


def _error_of(item: BatchItemRow) -> errors.ModelAPIError:
    kinds: dict[str, type[errors.ModelAPIError]] = {
        cls.error_class.value: cls for cls in (
            errors.RateLimitError, errors.ProviderOverloadedError, errors.ModelTimeoutError,
            errors.ProviderConnectionError, errors.IncompleteResponseError,
            errors.AuthenticationError, errors.ContextLengthError, errors.ContentFilterError,
            errors.MalformedResponseError, errors.InvalidRequestError, UnansweredError)}
    cls = kinds.get(item.error_class or "", errors.ModelAPIError)
    provider, _, model = item.model.partition("/")
    return cls(item.error or "the batch ended before answering it", provider=provider,
               model=model)


def _attempt(call: CallAttempts, item: BatchItemRow, outcome: Outcome, *,
             usage: Usage | None = None, cost: float = 0.0,
             error_class: ErrorClass | None = None, error: str | None = None,
             response: AIMessage | None = None) -> Attempt:
    created = item.created_at.timestamp() if item.created_at is not None else time.time()
    ended = item.ended_at.timestamp() if item.ended_at is not None else time.time()
    from ..generation import recorded_request
    from ..needs import prompt_text

    return Attempt(
        node=call.node, model=item.model, provider=item.provider, outcome=outcome,
        call_id=call.call_id, run_id=call.usage.run_id, task_id=call.task_id,
        try_number=len(call.attempts) + 1, usage=usage, cost_usd=cost,
        latency_ms=max(ended - created, 0.0) * 1000, error_class=error_class,
        error=error,
        fallback_from=call.previous, started_at=created, call_key=item.call_key,
        route_reason=f"{item.tier} tier: parked until its answer came",
        prompt=prompt_text(call.messages), category=call.routed.category,
        response=response,
        request=recorded_request(call.routed, call.messages) if response is not None else None,
        tier=item.tier, batch_item_id=item.id)
