"""The candidate loop of one routed call: each capable model in turn until one answers.

`CallAttempts` holds one call's state (its candidates, attempts, failures, and what the
failures taught: a larger window, a more capable model, another provider) and does one
concern per method: replay, plan (rank, routing rule, budget), admit (budget, Retry-After
rest, rate limit), acquire (circuit breakers), answer (generate or stream under the
timeout, then check and validate), succeeded / failed (bill, record, retry or escalate),
give_up. Every `Attempt` of the call is made by one factory, `_attempt`.

A node with a deadline is ranked over service tiers too: a candidate on a tier that answers
later (batch, a cheaper hour) parks the run instead of being called (see
`frugalflow.batches.parking`); a flex candidate is called with its service tier; each try
is priced on its tier.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, NoReturn, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    message_chunk_to_message,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk

from .exceptions import (
    AllModelsFailedError,
    BudgetExceededError,
    ContentFilterError,
    ContextLengthError,
    IncompleteResponseError,
    MalformedResponseError,
    ModelAPIError,
    ModelTimeoutError,
    ProviderConnectionError,
    StoreError,
    UserError,
    ValidationFailedError,
    short_error,
)
from .generation import INNER_CONFIG, billed, generate_once, iter_with_timeout, recorded_request
from .validation import parse_output, validate
from .allowance import Allowance, allowance, budget_error, with_max_output
from .resilience import Action
from .needs import estimate_tokens, prompt_text
from .ranking import Candidate, Priced, Ranking, no_capable_model_error, priced, rank
from .statuses import Outcome
from .tiers import Tier
from .usage import Attempt, RunUsage, Usage
from .verbosity import TokenEstimate, Verbosity

if TYPE_CHECKING:
    from .batches.parking import Parking
    from .catalog import ModelSpec
    from .limits import RateReservation
    from .persistence.tables import BatchItemRow
    from .policies import Choice
    from .routed import RoutedChatModel, RunContext
    from .tracing.callbacks import AttemptRun, AttemptRuns

__all__ = [
    "INNER_CONFIG",
    "CallAttempts",
    "billed",
    "generate_once",
    "iter_with_timeout",
    "recorded_request",
]


# Call ids (one per routed call, shared by its attempts): a random per-process prefix and a
# counter (uuid4 costs a syscall per call).
_ID_PREFIX = uuid.uuid4().hex[:16]
_call_counter = itertools.count(1)

# Errors that are not the model's: the caller's mistake, the run's database, or its budget.
_NOT_THE_MODELS = (UserError, StoreError, BudgetExceededError)
# Failures that may have cut an answer short: it is billed at least for what arrived.
_CUT_SHORT = (IncompleteResponseError, ProviderConnectionError, ModelTimeoutError)

class _Skip(Enum):
    SKIP = 0  # `admit`: this candidate is not tried


@dataclass(slots=True)
class _Try:
    """One try of one candidate: when it started, what it got so far, whether it ended."""

    candidate: Candidate
    spec: ModelSpec
    reservation: RateReservation | None
    started: float
    t0: float
    message: AIMessage | None = None
    generation: ChatGeneration | None = None  # the candidate's own, holding `message`
    gathered: AIMessageChunk | None = None
    emitted: bool = False  # chunks reached the consumer: no retry can follow
    verdict: bool = False  # the breakers heard how it ended (else its slot is released)
    allowed: Allowance | None = None  # under a budget: its max output and what it holds
    traced: AttemptRun | None = None  # its child run, while open (callbacks listening)

    def take(self, chunk: AIMessageChunk, attempt_id: str) -> None:
        chunk.id = attempt_id
        self.gathered = chunk if self.gathered is None else self.gathered + chunk

    def streamed(self) -> AIMessage:
        if self.gathered is None:
            spec = self.spec
            raise MalformedResponseError(f"{spec.key} streamed no content",
                                         provider=spec.provider, model=spec.model)
        self.message = cast(AIMessage, message_chunk_to_message(self.gathered))
        return self.message


class CallAttempts:
    """One routed call: its candidates in order until one gives an acceptable answer.

    `run()` returns the answer (a streaming listener, `forward`, gets each attempt's
    chunks under its own message id; a broken stream restarts on the next candidate);
    `stream()` yields the chunks to a consumer, and a stream that breaks after yielding
    raises (the consumer holds a partial answer). Both drive the same steps.
    """

    def __init__(self, routed: RoutedChatModel, messages: list[BaseMessage],
                 stop: list[str] | None, kwargs: dict[str, Any],
                 forward: AsyncCallbackManagerForLLMRun | None = None,
                 runs: AttemptRuns | None = None) -> None:
        self.routed = routed
        self.ctx: RunContext
        self.ctx, self.task_id = routed._context_and_task()
        self.usage: RunUsage = self.ctx.usage
        self.node = routed.node or ""
        self.messages, self.stop, self.kwargs, self.forward = messages, stop, kwargs, forward
        self.runs = runs  # each try a child run of the routed call's (None: nobody listens)
        self.attempts: list[Attempt] = []
        self.failures: list[ModelAPIError] = []
        self.skipped: list[str] = []
        self.banned_providers: set[str] = set()

    # The rest of a call's state, as class-level defaults (most calls never change them).
    call_id = ""
    call_key: str | None = None
    n_in = 0
    ranking: Ranking | None = None
    priced: Priced | None = None
    generation: ChatGeneration | None = None  # the answering candidate's, when it made one
    reasons: dict[str, str] = {}  # why the router put a model where it did; replaced
    previous: str | None = None  # the model tried before this one
    # What failures taught: only larger windows, more capable models, other providers.
    min_window = 0
    min_quality = -1.0
    too_long: ModelSpec | None = None  # the model that last said the prompt is too long
    over_budget: Candidate | None = None
    refused: Allowance | None = None  # the allowance that refused `over_budget`
    explored: Candidate | None = None  # the unproven model this call explores first
    # Parked requests (see frugalflow.batches.parking): what they ruled out, and a timer
    # whose hour came (its model is called synchronously now, at the cheaper hour's price).
    excluded: frozenset[tuple[str, Tier]] = frozenset()
    excluded_tiers: frozenset[Tier] = frozenset()
    due: BatchItemRow | None = None
    position: int | None = None  # its place among its node execution's calls that may wait

    # -- the drivers -------------------------------------------------------------------

    async def run(self) -> AIMessage:
        parking = self.waits()
        if parking is not None and parking.deadline(self.routed.needs) is not None:
            from .batches.parking import take_parked

            # Its parked requests first (an answer that came, or one to wait for again);
            # an answer recorded already is replayed from there.
            landed = await take_parked(self, parking)
            if landed is not None:
                return landed
        elif self.ctx.replay is not None:
            replayed = await self.replayed()
            if replayed is not None:
                return replayed
        for candidate in self.plan():
            if candidate.tier.parks and not self.is_due(candidate):
                from .batches.parking import park

                assert parking is not None  # plan() keeps parking tiers for durable runs only
                await park(self, parking, candidate)  # raises the interrupt that parks it
                continue
            reservation = await self.admit(candidate)
            if reservation is _Skip.SKIP:
                continue
            tries = 0
            while await self.acquire(candidate.spec):
                t = self.start(candidate, reservation)
                try:
                    message = await self.answer(t)
                except _NOT_THE_MODELS:
                    raise
                except Exception as e:  # translated in `failed`; nothing is swallowed silently
                    if await self.failed(t, e, tries):
                        tries += 1
                        continue
                    break
                else:
                    return await self.succeeded(t, message)
                finally:
                    if not t.verdict:
                        await self.release(t)
            self.previous = candidate.spec.key
        self.give_up()

    async def stream(self) -> AsyncIterator[AIMessageChunk]:
        # As before the split: a replayed answer is not streamed (the consumer gets none).
        if self.ctx.replay is not None and await self.replayed() is not None:
            return
        for candidate in self.plan():
            if candidate.tier.parks:  # a consumer streaming tokens wants them now
                continue
            reservation = await self.admit(candidate)
            if reservation is _Skip.SKIP:
                continue
            tries = 0
            while await self.acquire(candidate.spec):
                t = self.start(candidate, reservation)
                try:
                    await self.intend(t)
                    if self.runs is not None:
                        await self.runs.start(self, t)
                    attempt_id = self.attempt_id()
                    async for chunk in iter_with_timeout(self.open_stream(t),
                                                         self.ctx.policy.timeout):
                        if isinstance(chunk, AIMessageChunk):
                            t.take(chunk, attempt_id)
                            t.emitted = True
                            yield chunk
                    message = t.streamed()
                    validating = self.check(t, message)
                    if validating is not None:
                        await validating
                except _NOT_THE_MODELS:
                    raise
                except Exception as e:  # translated in `failed`; nothing is swallowed silently
                    if await self.failed(t, e, tries):
                        tries += 1
                        continue
                    break
                else:
                    await self.succeeded(t, message)
                    return
                finally:
                    if not t.verdict:
                        await self.release(t)
            self.previous = candidate.spec.key
        self.give_up()

    # -- before the first try ------------------------------------------------------------

    async def replayed(self) -> AIMessage | None:
        """When resuming: the answer this call already got before a crash (not paid again)."""
        ctx, routed = self.ctx, self.routed
        assert ctx.replay is not None
        if self.call_key is None:
            self.call_key = ctx.call_key(self.task_id, routed.node,
                                         routed._digest(self.messages, self.kwargs))
        replayed = await ctx.replay(routed.node, self.call_key)
        if replayed is not None:
            model = replayed.response_metadata.get("frugalflow", {}).get("model", "replay")
            attempt = self._attempt(Outcome.REPLAYED, model=str(model), provider="replay",
                                    call_key=self.call_key)
            await self.usage.arecord(attempt)
            if self.runs is not None:
                await self.runs.replayed(self, attempt, replayed)
        return replayed

    def plan(self) -> Iterable[Candidate]:
        """The capable models in the order to try them (rank, then the run's router)."""
        routed, ctx, needs = self.routed, self.ctx, self.routed.needs
        remaining = self.usage.remaining_usd
        self.n_in = estimate_tokens(self.messages)
        if routed.tools:
            self.n_in += routed._tools_tokens()
        static = ctx.static(needs, routed.node)
        self.priced = ctx.priced(routed.node, needs, static)
        parking = self.waits()
        left = parking.seconds_left(needs) if parking is not None else None
        if left is None:
            ranking = rank(ctx.catalog, needs, self.messages, prefiltered=static,
                           input_tokens=self.n_in, prices=self.priced)
        else:
            assert parking is not None
            ranking = rank(ctx.catalog, needs, self.messages, prefiltered=static,
                           input_tokens=self.n_in, prices=self.priced,
                           deadline_s=max(left, 0.0), now=parking.clock())
            ranking.rows = self.tiers_left(ranking.rows)
        if not len(ranking):
            raise no_capable_model_error(routed.node, needs, ranking, ctx.catalog)
        if ctx.router is not None and needs.routed:
            ranking.rows = self.route(ranking.rows)
        if remaining is not None and ranking.first().expected_cost > remaining:
            raise budget_error(routed.node, self.usage, ranking.first())
        self.ranking = ranking
        if not self.call_id:
            self.call_id = f"{_ID_PREFIX}{next(_call_counter):08x}"
        if ctx.measured is not None:
            self.prefer(ranking, remaining)
        return ranking  # its candidates are made as the loop reaches them

    def waits(self) -> Parking | None:
        """The run's parking if this call may wait for a deadline (its own, or the run's
        default): not outside a durable run, nor for a node that answers now
        (`Needs(deadline=timedelta(0))`)."""
        parking = self.ctx.parking
        return None if parking is None or self.routed.needs.answers_now else parking

    def tiers_left(self, rows: list[Candidate]) -> list[Candidate]:
        """`rows` without the tiers this call's parked items ruled out; a model whose
        cheaper hour came (it waited for it) first, on that tier."""
        excluded, tiers, due = self.excluded, self.excluded_tiers, self.due
        if not excluded and not tiers and due is None:
            return rows
        rows = [c for c in rows if c.tier not in tiers and (c.spec.key, c.tier) not in excluded]
        if due is not None:
            now = [c for c in rows if c.spec.key == due.model and not c.tier.parks]
            if now:
                first = now[0]._replace(tier=Tier.OFF_PEAK)
                rows = [first, *(c for c in rows if c is not now[0])]
        return rows

    def exclude(self, model: str, tier: Tier) -> None:
        self.excluded = self.excluded | {(model, tier)}

    def exclude_tier(self, tier: Tier) -> None:
        self.excluded_tiers = self.excluded_tiers | {tier}

    def is_due(self, c: Candidate) -> bool:
        """Whether `c` is a cheaper hour that came for this call (called now, not parked)."""
        due = self.due
        return due is not None and c.tier is Tier.OFF_PEAK and due.model == c.spec.key

    def ensure_call_key(self) -> str | None:
        """This call's key in a durable run (None outside one); its call id too."""
        if self.call_key is None and self.usage.listeners:
            self.call_key = self.routed._key_for_ledger(self.ctx, self.task_id, self.messages,
                                                        self.kwargs)
        if not self.call_id:
            self.call_id = f"{_ID_PREFIX}{next(_call_counter):08x}"
        return self.call_key

    def parking_flow(self) -> str | None:
        parking = self.ctx.parking
        return parking.flow if parking is not None else None

    def price(self, t: _Try, paid: Usage) -> float:
        """What `paid` costs on the try's tier at the run's clock (a price that varies with
        the hour is the hour's as the runner sees it, like ranking's; outside a runner: now)."""
        parking = self.ctx.parking
        return t.spec.cost(paid, tier=t.candidate.tier,
                           at=parking.clock() if parking is not None else None)

    def route(self, rows: list[Candidate]) -> list[Candidate]:
        """Reorder the capable models by the router's per-input predictions."""
        from .learning import LearnedRouter, choose

        routed, needs, router = self.routed, self.routed.needs, self.ctx.router
        assert router is not None
        # A router calibrated on its hull runs this node at a drawn operating point.
        mix = (router.mix_for(routed.node)
               if isinstance(router, LearnedRouter) and not needs.cascade else None)
        probs = router.predict(prompt_text(self.messages), [c.spec.key for c in rows],
                               node=routed.node, category=routed.category)
        costs = {c.spec.key: c.expected_cost for c in rows}
        order = choose(probs, costs, target=needs.target, price_weight=needs.price_weight,
                       cascade=needs.cascade, mix=mix)
        by_key = {c.spec.key: c for c in rows}
        self.reasons = {m: f"{why}; p={probs[m]:.2f}, ${costs[m]:.6f}" for m, why in order}
        return [by_key[m] for m, _ in order]

    def prefer(self, ranking: Ranking, remaining: float | None) -> None:
        """A stored policy's choice first (`policy <name> v<k>`); then, on a share of a
        validated node's calls, a cheaper unproven model before it (`exploration`)."""
        measured = self.ctx.measured
        assert measured is not None
        rows: list[Candidate] | None = None
        choice = measured.choice(self.routed.node)
        if choice is not None:
            rows = self.chosen(ranking.rows, choice, measured.label or "policy (given)")
        explored = self.exploration(rows[0] if rows else ranking.first(), remaining)
        if explored is not None:
            rows = [explored, *(rows if rows is not None else ranking.rows)]
        if rows is not None:
            ranking.rows = rows

    def seed(self, salt: str) -> str:
        """What seeds this call's random choices: the run and the call's key, so a resumed
        call chooses as before (outside a durable run: the call's place in its context)."""
        if self.call_key is None and self.usage.listeners:
            self.call_key = self.routed._key_for_ledger(self.ctx, self.task_id, self.messages,
                                                        self.kwargs)
        if self.call_key is None:
            self.ctx.draws += 1
            return f"{salt}:{self.usage.run_id}:#{self.ctx.draws}"
        return f"{salt}:{self.usage.run_id}:{self.call_key}"

    def chosen(self, rows: list[Candidate], choice: Choice, label: str) -> list[Candidate] | None:
        """`rows` with the policy's model first (a mix: drawn by its shares), or None when
        that model cannot take this call (the ranking's order stands)."""
        model, reason = choice.models[0], label
        if len(choice.models) == 2:
            first, second = choice.models
            if random.Random(self.seed("mix")).random() >= choice.shares[0]:
                model = second
            reason = (f"{label}: mix {choice.shares[0]:.0%} {first} / "
                      f"{choice.shares[1]:.0%} {second}")
        at = next((i for i, c in enumerate(rows) if c.spec.key == model), None)
        if at is None:
            return None
        self.reasons = {**self.reasons, model: reason}
        return [rows[at], *rows[:at], *rows[at + 1:]]

    def exploration(self, first: Candidate, remaining: float | None) -> Candidate | None:
        """On up to `explore` of a validated node's calls: the cheapest unproven model
        cheaper than `first` whose Thompson draw meets the node's target, when it and
        `first` after it both fit in the remaining budget."""
        from .measured import explore_share, threshold_of

        ctx, routed = self.ctx, self.routed
        share = explore_share(ctx.explore, routed.node)
        threshold = threshold_of(routed.needs)
        if share <= 0 or routed.validator is None or threshold is None or ctx.measured is None:
            return None
        rng = random.Random(self.seed("explore"))
        if rng.random() >= share:
            return None
        # Under a budget, room after the planned call's reserve (see `allowance`).
        room = remaining - self.allow(first).needed_usd if remaining is not None else None
        explorable = ctx.explorable(routed.needs, routed.node, threshold)
        options = rank(ctx.catalog, routed.needs, self.messages, input_tokens=self.n_in,
                       prefiltered=explorable,
                       prices=priced(explorable, routed.needs, routed.node, ctx.verbosity))
        pool = {c.spec.key: c for c in options if c.expected_cost < first.expected_cost
                and (room is None or self.allow(c).needed_usd <= room)}
        pick = ctx.measured.thompson(routed.node, [(k, c.expected_cost) for k, c in pool.items()],
                                     threshold, rng)
        if pick is None:
            return None
        model, draw = pick
        rate = ctx.measured.rate(routed.node, model)
        self.reasons = {**self.reasons, model: (
            f"exploration: draw {draw:.2f} >= {threshold:g}; "
            f"{rate.describe() if rate is not None else 'prior only'}")}
        self.explored = pool[model]
        return self.explored

    async def admit(self, c: Candidate) -> RateReservation | None | _Skip:
        """Whether to try `c` (else why not, in `skipped`); its rate-limit reservation."""
        spec = c.spec
        if spec.provider in self.banned_providers:
            return _Skip.SKIP
        if self.min_window and spec.window <= self.min_window:
            if self.too_long is not None:
                self.skipped.append(f"{spec.key}: context window {spec.window} not larger "
                                    f"than {self.too_long.key}'s")
            return _Skip.SKIP
        if self.min_quality >= 0 and -c.neg_quality <= self.min_quality:
            return _Skip.SKIP
        if self.usage.budget_usd is not None:
            allowed = await self.admitted(c)
            if allowed.refusal is not None:
                self.skipped.append(f"{spec.key}: {allowed.refusal}")
                if self.over_budget is None:
                    self.over_budget, self.refused = c, allowed
                return _Skip.SKIP
        # A 429's Retry-After rests the model for every run (and the fleet, via Redis).
        resting = await self.ctx.breakers.acooldown_reason(spec)
        if resting is not None:
            self.skipped.append(f"{spec.key}: {resting}")
            return _Skip.SKIP
        limiter = self.ctx.limiter
        if limiter is None:
            return None
        tokens = self.n_in + round(self.estimate(c).p50)
        reservation = await limiter.aacquire(spec, tokens)
        if not reservation:
            self.skipped.append(f"{spec.key}: over its rate limit (last 60 s)")
            return _Skip.SKIP
        return reservation

    async def acquire(self, spec: ModelSpec) -> bool:
        """A call slot from the circuit breakers (else why not, in `skipped`)."""
        breakers = self.ctx.breakers
        if await breakers.aacquire(spec):
            return True
        why = await breakers.ablocked_reason(spec)
        self.skipped.append(f"{spec.key}: {why or 'circuit open'}")
        return False

    # -- one try ---------------------------------------------------------------------------

    def start(self, c: Candidate, reservation: RateReservation | None) -> _Try:
        return _Try(c, c.spec, reservation, time.time(), time.perf_counter())

    # -- the budget's share of a call (see frugalflow.allowance) -------------------------------

    def estimate(self, c: Candidate) -> TokenEstimate:
        """`c`'s output estimate on this node (see `frugalflow.verbosity`)."""
        hit = self.priced.by_key.get(c.spec.key) if self.priced is not None else None
        if hit is None:  # a candidate from another ranking (exploration)
            verbosity = self.ctx.verbosity if self.ctx.verbosity is not None else Verbosity()
            hit = verbosity.estimate(self.routed.node, self.routed.needs, c.spec)
        return hit

    def allow(self, c: Candidate) -> Allowance:
        """`c`'s allowance from the budget left, less what calls in flight hold."""
        left = max((self.usage.remaining_usd or 0.0) - self.ctx.held_usd, 0.0)
        return allowance(c.spec, self.routed.needs, self.n_in, self.estimate(c), left)

    async def admitted(self, c: Candidate) -> Allowance:
        """`c`'s allowance; while parallel calls of the run hold what it lacks, it waits for
        them to be recorded (a call never waits on its own task's: a judge inside a call)."""
        while True:
            allowed = self.allow(c)
            if allowed.refusal is None or not self.ctx.others_hold():
                return allowed
            await self.ctx.hold_released()

    async def take_allowance(self, t: _Try) -> None:
        """Under a budget, before the try is sent: its max output, and hold its most cost
        (sized from the budget left now; raises the budget error when it cannot be paid)."""
        if self.usage.budget_usd is None or t.allowed is not None:
            return
        allowed = await self.admitted(t.candidate)
        if allowed.refusal is not None:
            raise budget_error(self.routed.node, self.usage, t.candidate,
                               needed=allowed.needed_usd, why=allowed.refusal)
        t.allowed = allowed
        self.ctx.hold(allowed.hold_usd)  # no await since it was sized

    def settle_hold(self, t: _Try, message: AIMessage) -> None:
        """The answer is in: hold only what it costs (a judge validating it may need the
        rest) until it is recorded."""
        allowed = t.allowed
        if allowed is None or not allowed.hold_usd:
            return
        paid, _ = billed(message, self.n_in, partial=False)
        cost = t.spec.cost(paid) if paid is not None else 0.0
        if cost < allowed.hold_usd:
            self.ctx.unhold(allowed.hold_usd - cost)
            t.allowed = Allowance(allowed.max_output, cost, allowed.refusal, allowed.needed_usd)

    def unhold(self, t: _Try) -> None:
        """The try's cost is recorded (or it ended unpaid): free what it held."""
        if t.allowed is not None and t.allowed.hold_usd:
            self.ctx.unhold(t.allowed.hold_usd)
            t.allowed = Allowance(t.allowed.max_output, 0.0, t.allowed.refusal,
                                  t.allowed.needed_usd)

    def call_kwargs(self, t: _Try) -> dict[str, Any]:
        """The call's keywords, with the max output its allowance gives (if any) and the
        service tier a flex try asks for."""
        kwargs = self.kwargs if t.allowed is None else with_max_output(self.kwargs, t.spec,
                                                                        t.allowed)
        if t.candidate.tier is Tier.FLEX:
            kwargs = {**kwargs, "service_tier": "flex"}
        return kwargs

    def attempt_id(self) -> str:
        """The message id of this try's chunks (each attempt streams under its own)."""
        return f"lc_run--{self.call_id}-{len(self.attempts) + 1}"

    async def intend(self, t: _Try) -> None:
        # Durable runs write the call down before it is sent: if the process dies before
        # the answer is recorded, the ledger still shows a call that may have been paid
        # (settled later at its estimated cost).
        await self.take_allowance(t)
        if self.ctx.intent is not None:
            expected_out = round(self.estimate(t.candidate).p50)
            await self.ctx.intent(self._attempt(
                Outcome.PENDING, t, cost=t.candidate.expected_cost, estimated=True,
                usage=Usage(input_tokens=self.n_in, requests=1, output_tokens=expected_out)))

    def open_stream(self, t: _Try) -> AsyncIterator[Any]:
        model = self.routed._bound(t.spec, self.ctx)
        return model.astream(self.messages, config=INNER_CONFIG, stop=self.stop,
                             **self.call_kwargs(t))

    async def answer(self, t: _Try) -> AIMessage:
        """The candidate's checked answer (streamed to `forward` when it listens)."""
        await self.take_allowance(t)
        if self.ctx.intent is not None:
            await self.intend(t)
        if self.runs is not None:
            await self.runs.start(self, t)
        if self.forward is not None:
            attempt_id = self.attempt_id()
            async for chunk in iter_with_timeout(self.open_stream(t), self.ctx.policy.timeout):
                if isinstance(chunk, AIMessageChunk):
                    t.take(chunk, attempt_id)
                    await self.forward.on_llm_new_token(
                        chunk.text, chunk=ChatGenerationChunk(message=chunk))
            message = t.streamed()
        else:
            spec, timeout = t.spec, self.ctx.policy.timeout
            model = self.routed._bound(spec, self.ctx)
            kwargs = self.call_kwargs(t)
            if spec.adapter.timeout_param is None and timeout is not None:
                # The client has no timeout of its own: enforce the policy's.
                async with asyncio.timeout(timeout):
                    message, generation = await generate_once(model, self.messages, self.stop,
                                                              kwargs)
            else:
                # The client was built with timeout=policy.timeout and raises.
                message, generation = await generate_once(model, self.messages, self.stop,
                                                          kwargs)
            t.message, t.generation = message, generation
        validating = self.check(t, message)
        if validating is not None:
            await validating
        return message

    def check(self, t: _Try, message: AIMessage) -> Awaitable[None] | None:
        """The adapter's end markers and the output schema; the node's validator is left
        to await (None without one)."""
        spec, routed = t.spec, self.routed
        if t.allowed is not None:
            self.settle_hold(t, message)
        spec.adapter.check(message, spec)
        schema = routed.response_schema
        parsed = parse_output(schema, spec, message) if schema is not None else None
        if routed.validator is None:
            return None
        return validate(routed, routed.validator, spec, message, parsed, self.messages)

    async def release(self, t: _Try) -> None:
        """The try ended without a verdict (cancelled): free its breakers' slot."""
        self.unhold(t)
        if t.traced is not None and self.runs is not None:
            await asyncio.shield(self.runs.dropped(t, sys.exc_info()[1]))
        await asyncio.shield(self.ctx.breakers.arelease(t.spec))

    # -- after a try -------------------------------------------------------------------------

    async def succeeded(self, t: _Try, message: AIMessage) -> AIMessage:
        spec, ctx = t.spec, self.ctx
        t.verdict = True
        await ctx.breakers.arecord(spec, None)
        paid, estimated = billed(message, self.n_in, partial=False)
        if t.reservation is not None and paid is not None and ctx.limiter is not None:
            # The rate window counted an estimate: put in what was used.
            await ctx.limiter.acorrect(t.reservation, paid.total_tokens)
        cost = self.price(t, paid) if paid else 0.0
        message.response_metadata = {
            **message.response_metadata,
            "frugalflow": {"model": spec.key, "cost_usd": cost,
                           "attempts": len(self.attempts) + 1, "call_id": self.call_id},
        }
        call_key = self.call_key
        if call_key is None and self.usage.listeners:  # only persisted runs replay
            call_key = self.routed._key_for_ledger(ctx, self.task_id, self.messages,
                                                   self.kwargs)
        # Only persisted runs keep the request (the ledger writes it for replay by `eval`).
        request = recorded_request(self.routed, self.messages) if self.usage.listeners else None
        self.unhold(t)  # no await until the record adds the cost: never counted twice or none
        attempt = self._attempt(Outcome.OK, t, usage=paid, estimated=estimated, cost=cost,
                                call_key=call_key, response=message, request=request)
        await self.record(attempt)
        if self.runs is not None:
            await self.runs.end(t, attempt, message)
        self.routed._last_model = spec.key
        self.generation = t.generation
        return message

    async def failed(self, t: _Try, e: Exception, tries: int) -> bool:
        """Record the failure; True to retry the same model (after the policy's delay),
        False to move on (to a candidate the failure did not rule out). Raises when the
        policy says the caller's request is at fault, or chunks already reached it."""
        spec, ctx = t.spec, self.ctx
        err = spec.adapter.translate(e, spec)
        if err is not e and err.__cause__ is None:
            err.__cause__ = e
        t.verdict = True
        await ctx.breakers.arecord(spec, err)
        action, delay = ctx.policy.decide(err, tries)
        if action is Action.RETRY and await ctx.breakers.ablocked_reason(spec):
            # This failure opened the circuit: the next try goes to another model, and the
            # ledger must say so.
            action, delay = Action.NEXT, 0.0
        if t.emitted:
            # Tokens already reached the consumer: retrying would glue two answers.
            action, delay = Action.RAISE, 0.0
        # An answer that failed its schema or validator, or that was cut short, was still
        # paid for: its tokens, as reported or else estimated.
        message = t.message
        if message is None and t.gathered is not None:
            message = cast(AIMessage, message_chunk_to_message(t.gathered))
        paid, estimated = billed(message, self.n_in, partial=isinstance(err, _CUT_SHORT))
        self.unhold(t)
        attempt = self._attempt(Outcome.ERROR, t, usage=paid, estimated=estimated,
                                cost=self.price(t, paid) if paid else 0.0, error=err,
                                action=action)
        await self.record(attempt)
        if self.runs is not None:
            await self.runs.end(t, attempt, message, err)
        self.failures.append(err)
        if action is Action.RAISE:
            raise err from e
        if action is Action.RETRY:
            await ctx.pause(delay)
            return True
        self.escalate(t.candidate, err)
        return False

    def escalate(self, c: Candidate, err: ModelAPIError) -> None:
        """What the next candidate must do better than `c`, given how `c` failed."""
        if isinstance(err, ValidationFailedError):
            if c is not self.explored:  # an unproven model's miss says nothing of the plan
                self.min_quality = max(self.min_quality, -c.neg_quality)  # a more capable model
        elif isinstance(err, ContextLengthError):
            self.min_window = max(self.min_window, c.spec.window)
            self.too_long = c.spec
        elif isinstance(err, ContentFilterError):
            self.banned_providers.add(c.spec.provider)

    def give_up(self) -> NoReturn:
        """Every candidate failed or was skipped: say which, and what to do about it."""
        n, node = len(self.attempts), self.routed.node
        detail = f"; skipped: {'; '.join(self.skipped)}" if self.skipped else ""
        rows = self.ranking.rows if self.ranking is not None else []
        headline = (f"node {node!r}: all {len(rows)} capable models failed "
                    f"({n} attempts){detail}")
        too_long = self.too_long
        if too_long is not None and self.failures \
                and isinstance(self.failures[-1], ContextLengthError) \
                and not any(c.spec.window > too_long.window for c in rows):
            headline = (
                f"node {node!r}: the prompt is too long for {too_long.key} (context "
                f"window {too_long.window} tokens) and no capable model has a larger window; "
                f"shorten the input or add a model with a larger context window "
                f"({n} attempts){detail}")
        group = AllModelsFailedError(
            headline,
            self.failures or [ModelAPIError("no candidate could be tried" + detail)],
            node=node,
            attempts=self.attempts,
        )
        if self.over_budget is not None:
            refused = self.refused
            raise budget_error(node, self.usage, self.over_budget,
                               needed=refused.needed_usd if refused else None,
                               why=refused.refusal if refused else None) from group
        raise group

    # -- the record ----------------------------------------------------------------------------

    def _attempt(self, outcome: Outcome, t: _Try | None = None, *,
                 usage: Usage | None = None, cost: float = 0.0, estimated: bool = False,
                 error: ModelAPIError | None = None, action: Action | None = None,
                 call_key: str | None = None, response: AIMessage | None = None,
                 request: dict[str, Any] | None = None,
                 model: str = "", provider: str = "") -> Attempt:
        """Every Attempt of this call is made here: a try's (pending, ok or error), or
        without `t` the replay's (`model`, `provider` and `call_key` name it)."""
        if t is None:
            return Attempt(node=self.node, model=model, provider=provider, outcome=outcome,
                           run_id=self.usage.run_id, task_id=self.task_id, call_key=call_key)
        spec = t.spec
        ended = outcome is not Outcome.PENDING
        return Attempt(
            node=self.node, model=spec.key, provider=spec.provider, outcome=outcome,
            call_id=self.call_id, run_id=self.usage.run_id, task_id=self.task_id,
            try_number=len(self.attempts) + 1, usage=usage, cost_usd=cost,
            latency_ms=(time.perf_counter() - t.t0) * 1000 if ended else 0.0,
            error_class=error.error_class if error is not None else None,
            error=short_error(error) if error is not None else None,
            fallback_from=self.previous, action=action.value if action is not None else None,
            started_at=t.started, call_key=call_key,
            route_reason=self.reasons.get(spec.key) if ended else None,
            prompt=prompt_text(self.messages) if ended and self.usage.listeners else None,
            category=self.routed.category, usage_estimated=estimated, response=response,
            request=request, tier=None if t.candidate.tier is Tier.STANDARD else t.candidate.tier)

    async def record(self, attempt: Attempt) -> None:
        self.attempts.append(attempt)
        await self.usage.arecord(attempt)
