"""The routed chat model, and the state the routed calls of one run share.

`RoutedChatModel` is a LangChain chat model that tries the capable candidates of each call
in order (see `ranking`), falling back between providers as the run's `FallbackPolicy`
decides. `RunContext` holds what the calls of one run share: catalog, policy, breakers,
spend and budget, rate limiter, router and the durable run's ledger hooks.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, message_chunk_to_message
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langgraph.runtime import get_runtime
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr

from .attempts import (
    INNER_CONFIG,
    ModelJudge,
    billed,
    generate_once,
    iter_with_timeout,
    new_call_id,
    short_error,
)
from .catalog import Catalog, ModelSpec
from .exceptions import (
    AllModelsFailedError,
    BudgetExceededError,
    MalformedResponseError,
    ModelAPIError,
    StoreError,
    UserError,
    ValidationFailedError,
)
from .fallback import Action, BreakerRegistry, FallbackPolicy, default_breakers
from .needs import Needs, estimate_tokens, prompt_text, tool_schema, tool_tokens
from .ranking import Candidate, Prefilter, no_capable_model_error, prefilter, rank
from .statuses import Outcome
from .usage import Attempt, RunUsage, Usage

__all__ = ["DEFAULT_ATTEMPT_WINDOW", "RoutedChatModel", "RunContext"]

DEFAULT_ATTEMPT_WINDOW = 1000
"""Attempts kept by a RoutedChatModel's own context (used outside a run); totals count all."""


@dataclass(repr=False)
class RunContext:
    """What routed calls of one run share: catalog, policy, breakers, spend and budget.

    LangGraph passes it to every node as the runtime context; it is never checkpointed,
    so the runner supplies it again when a run resumes.
    """

    catalog: Catalog
    policy: FallbackPolicy = field(default_factory=FallbackPolicy)
    breakers: BreakerRegistry = field(default_factory=lambda: default_breakers)
    usage: RunUsage = field(default_factory=RunUsage)
    sleep: Any = None  # an awaitable sleep(seconds); tests pass a fake clock's
    limiter: Any = None
    """A `RateLimiter` keeping calls under the catalog's rpm/tpm (`RedisRateLimiter` for a
    fleet); None: limits are not enforced here."""
    router: Any = None
    """A `frugalflow.learning.Router` predicting per-input success; used by nodes whose needs
    set `target`, `price_weight` or `cascade`."""
    intent: Callable[[Attempt], Awaitable[None]] | None = None
    """Durable runs: `await intent(pending_attempt)` writes a call down before it is sent, so
    a call whose answer never reached the ledger (the process died) is still accounted for.
    It must not raise (but for cancellation)."""
    replay: Any = None
    """When resuming: `await replay(node, call_key) -> AIMessage | None`, the answer a
    completed call with this key already got (the runner looks it up in the ledger), so a
    node re-executed after a crash does not pay again for calls it had finished."""
    _occurrences: dict[tuple[str | None, str], int] = field(default_factory=dict, repr=False)
    _static: dict[int, tuple[Needs, Prefilter]] = field(default_factory=dict, repr=False)

    def __repr__(self) -> str:
        return f"RunContext(catalog={self.catalog.name!r}, run_id={self.usage.run_id!r})"

    def call_key(self, task_id: str | None, node: str | None, digest: str) -> str:
        """`digest#n`: the n-th identical call of this node execution."""
        k = (task_id, digest)
        n = self._occurrences.get(k, 0) + 1
        self._occurrences[k] = n
        return f"{node}:{digest}#{n}"

    def static(self, needs: Needs) -> Prefilter:
        # Per run, by identity (a node's needs object is shared by all its calls); the
        # catalog-level cache behind it also watches the providers' keys.
        hit = self._static.get(id(needs))
        if hit is None or hit[0] is not needs:
            hit = self._static[id(needs)] = (needs, self.catalog.prefiltered(needs, prefilter))
        return hit[1]

    def model(self, spec: ModelSpec) -> BaseChatModel:
        """The built chat model for `spec` (built once per catalog, timeout and key)."""
        return self.catalog.built(spec, timeout=self.policy.timeout)

    async def pause(self, seconds: float) -> None:
        if seconds > 0:
            await (self.sleep or asyncio.sleep)(seconds)


class RoutedChatModel(BaseChatModel):
    """A chat model that routes each call to the cheapest capable catalog model.

    Use it wherever LangChain or LangGraph takes a chat model. `bind_tools` adds the
    tool-calling need and `with_structured_output` the structured-output need; output that
    fails its schema counts as a malformed response and moves to the next candidate.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    needs: Needs = Field(default_factory=Needs)
    node: str | None = None
    context: Any = Field(exclude=True)
    """The RunContext: catalog, policy, breakers and spend shared by the run."""
    tools: list[Any] = Field(default_factory=list, exclude=True)
    tool_choice: Any = None
    response_schema: Any = Field(default=None, exclude=True)
    category: str | None = None
    """What kind of input this is (a customer tier, a document type, ...): learned routers
    use it as a feature and the ledger records it. Set with `with_category`."""
    validator: Any = Field(default=None, exclude=True)
    """Checks each answer: a callable (sync or async) returning True/None to accept, False
    or a reason string (or raising) to reject, a pydantic model the answer must fit, or a
    `Judge` (another model decides).
    A rejected answer escalates to a more capable model."""
    _last_model: str | None = PrivateAttr(default=None)
    _variants: dict[Any, Any] = PrivateAttr(default_factory=dict)
    _tool_tokens: int | None = PrivateAttr(default=None)
    _with_tools: dict[str, tuple[Any, Any]] = PrivateAttr(default_factory=dict)

    def __init__(
        self,
        catalog: Catalog | None = None,
        *,
        needs: Needs | None = None,
        context: RunContext | None = None,
        **kwargs: Any,
    ) -> None:
        if context is None and catalog is not None:
            # Outside a run: totals of every call, but only a window of recent attempts.
            context = RunContext(catalog=catalog,
                                 usage=RunUsage(max_attempts=DEFAULT_ATTEMPT_WINDOW))
        super().__init__(needs=needs or Needs(), context=context, **kwargs)

    def run_context(self) -> RunContext:
        """This model's run context: its own, else the one of the LangGraph run it is in."""
        return self._context_and_task()[0]

    def _context_and_task(self) -> tuple[RunContext, str | None]:
        try:
            runtime = get_runtime()
        except RuntimeError:
            runtime = None
        task_id = runtime.execution_info.task_id if runtime and runtime.execution_info else None
        if self.context is not None:
            return self.context, task_id
        ctx = runtime.context if runtime is not None else None
        if not isinstance(ctx, RunContext):
            raise UserError(
                f"routed model of node {self.node!r} has no run context: give it a catalog "
                "(RoutedChatModel(catalog)) or run it inside a frugalflow flow"
            )
        return ctx, task_id

    @property
    def _llm_type(self) -> str:
        return "frugalflow-routed"

    def __repr_args__(self) -> Any:
        # The default repr walks the run context (catalog, attempts): keep it small, since
        # LangChain computes it for every run's serialized form.
        return [("node", self.node), ("needs", self.needs.describe())]

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"node": self.node, "needs": self.needs.describe()}

    @property
    def last_model(self) -> str | None:
        """The `provider/model` that answered this instance's latest call."""
        return self._last_model

    # -- binding ---------------------------------------------------------------------

    def _copy(self, **update: Any) -> RoutedChatModel:
        return RoutedChatModel(
            needs=update.pop("needs", self.needs),
            context=self.context,
            node=update.pop("node", self.node),
            tools=update.pop("tools", self.tools),
            tool_choice=update.pop("tool_choice", self.tool_choice),
            response_schema=update.pop("response_schema", self.response_schema),
            validator=update.pop("validator", self.validator),
            category=update.pop("category", self.category),
            **update,
        )

    def with_validator(self, validator: Any) -> RoutedChatModel:
        """A copy whose answers must pass `validator` (see the field's documentation)."""
        return self._copy(validator=validator)

    def with_category(self, category: str | None) -> RoutedChatModel:
        """A copy whose calls carry `category` (see the field)."""
        return self._copy(category=category)

    def with_needs(self, **changes: Any) -> RoutedChatModel:
        """A routed model for the same run with some needs changed."""
        return self._copy(needs=self.needs.with_(**changes))

    def bind_tools(
        self,
        tools: Sequence[Any],
        *,
        tool_choice: Any = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        # Nodes bind the same tools on every call: reuse the bound copy.
        key = ("tools", tuple(id(t) for t in tools), repr(tool_choice))
        hit = self._variants.get(key)
        if hit is None:
            hit = self._variants[key] = self._copy(
                tools=list(tools), tool_choice=tool_choice, needs=self.needs.with_(tools=True)
            )
        return hit

    def with_structured_output(
        self,
        schema: dict[str, Any] | type,
        *,
        include_raw: bool = False,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, Any]:
        key = ("schema", id(schema), include_raw)
        hit = self._variants.get(key)
        if hit is None:
            routed = self._copy(
                response_schema=schema, needs=self.needs.with_(structured_output=True)
            )
            # The base class binds `schema` as a forced tool and parses the tool call.
            hit = self._variants[key] = BaseChatModel.with_structured_output(
                routed, schema, include_raw=include_raw
            )
        return hit

    # -- calls -----------------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return _run_sync(self._agenerate(messages, stop=stop, **kwargs))

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        # A streaming consumer (LangGraph's `messages` mode, astream_events) gets each
        # attempt's tokens live; the result is the successful attempt's message alone.
        live = bool(run_manager is not None and run_manager.handlers
                    and BaseChatModel._should_stream(self, async_api=True,
                                                     run_manager=run_manager, **kwargs))
        message: AIMessage | None = None
        async for kind, value in self._attempts(
            messages, stop, kwargs, stream=live, forward=run_manager if live else None
        ):
            if kind == "message":
                message = value
        assert message is not None
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _should_stream(self, *, async_api: bool, run_manager: Any = None, **kwargs: Any) -> bool:
        # invoke/ainvoke always go through _agenerate, which streams by itself when a
        # consumer listens: LangChain's own stream-then-aggregate would glue a broken
        # attempt's tokens to the next attempt's answer. astream() asks with stream=True.
        return bool(kwargs.get("stream"))


    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        result = self._generate(messages, stop=stop, **kwargs)
        msg = result.generations[0].message
        yield ChatGenerationChunk(message=AIMessageChunk(**msg.model_dump(exclude={"type"})))

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        async for kind, value in self._attempts(messages, stop, kwargs, stream=True):
            if kind == "chunk":
                chunk = ChatGenerationChunk(message=value)
                if run_manager is not None:
                    await run_manager.on_llm_new_token(value.text, chunk=chunk)
                yield chunk

    async def _attempts(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        kwargs: dict[str, Any],
        *,
        stream: bool,
        forward: AsyncCallbackManagerForLLMRun | None = None,
    ) -> AsyncIterator[tuple[Literal["message", "chunk"], Any]]:
        """Try candidates in order; yield the answer (or its chunks) of the first that works.

        With `forward`, chunks go to its callbacks (each attempt under its own message id)
        and a broken stream restarts on the next candidate; without it, chunks are yielded
        and a stream that breaks after yielding raises (the consumer holds a partial answer).
        """
        ctx, task_id = self._context_and_task()
        usage = ctx.usage
        call_key = None
        if ctx.replay is not None:
            call_key = ctx.call_key(task_id, self.node, self._digest(messages, kwargs))
            replayed = await ctx.replay(self.node, call_key)
            if replayed is not None:
                await usage.arecord(Attempt(
                    node=self.node or "", model=str(replayed.response_metadata.get(
                        "frugalflow", {}).get("model", "replay")),
                    provider="replay", outcome=Outcome.REPLAYED, run_id=usage.run_id,
                    task_id=task_id, call_key=call_key,
                ))
                yield "message", replayed
                return
        remaining = usage.remaining_usd
        static = ctx.static(self.needs)
        n_in = estimate_tokens(messages)
        if self.tools:
            if self._tool_tokens is None:
                self._tool_tokens = tool_tokens(self.tools)
            n_in += self._tool_tokens
        ranking = rank(ctx.catalog, self.needs, messages, _static=static, input_tokens=n_in)
        if not ranking.rows:
            raise no_capable_model_error(self.node, self.needs, ranking, ctx.catalog)
        reasons: dict[str, str] = {}
        if ctx.router is not None and self.needs.routed:
            ranking.rows, reasons = self._route(ctx.router, messages, ranking.rows)
        if remaining is not None and ranking.rows[0][0] > remaining:
            raise self._budget_error(ranking.candidates[0])

        call_id = new_call_id()
        failures: list[ModelAPIError] = []
        attempts: list[Attempt] = []
        skipped: list[str] = []
        min_window = 0
        banned_providers: set[str] = set()
        previous: str | None = None
        over_budget: Candidate | None = None
        min_quality = -1.0
        skills = list(self.needs.quality) or None
        policy = ctx.policy
        breakers = ctx.breakers
        local_breakers = type(breakers) is BreakerRegistry

        too_long: ModelSpec | None = None  # the model that last said the prompt is too long
        for row in ranking.rows:
            expected_cost, spec = row[0], row[4]
            if spec.provider in banned_providers:
                continue
            if spec.window <= min_window:
                if too_long is not None:
                    skipped.append(f"{spec.key}: context window {spec.window} not larger "
                                   f"than {too_long.key}'s")
                continue
            if min_quality >= 0 and spec.mean_quality(skills) <= min_quality:
                continue
            left = usage.remaining_usd
            if left is not None and expected_cost > left:
                skipped.append(f"{spec.key}: over the remaining budget")
                over_budget = over_budget or Candidate._make(row)
                continue
            # A 429's Retry-After rests the model for every run (and the fleet, via Redis).
            resting = (breakers.cooldown_reason(spec) if local_breakers
                       else await breakers.acooldown_reason(spec))
            if resting is not None:
                skipped.append(f"{spec.key}: {resting}")
                continue
            reservation = None
            if ctx.limiter is not None:
                reservation = await ctx.limiter.aacquire(
                    spec, n_in + self.needs.expected_output_tokens)
                if not reservation:
                    skipped.append(f"{spec.key}: over its rate limit (last 60 s)")
                    continue
            tries = 0
            while True:
                # A shared (Redis) registry needs awaiting; the in-process one answers at once.
                if not (breakers.acquire(spec) if local_breakers
                        else await breakers.aacquire(spec)):
                    why = await breakers.ablocked_reason(spec)
                    skipped.append(f"{spec.key}: {why or 'circuit open'}")
                    break
                started = time.time()
                t0 = time.perf_counter()
                verdict = False
                emitted = False
                message: AIMessage | None = None
                gathered: AIMessageChunk | None = None
                try:
                    if ctx.intent is not None:
                        # Durable runs write the call down before it is sent: if the process
                        # dies before the answer is recorded, the ledger still shows a call
                        # that may have been paid (settled later at its estimated cost).
                        await ctx.intent(Attempt(
                            node=self.node or "", model=spec.key, provider=spec.provider,
                            outcome=Outcome.PENDING, call_id=call_id, run_id=usage.run_id,
                            try_number=len(attempts) + 1, task_id=task_id,
                            usage=Usage(input_tokens=n_in, requests=1,
                                        output_tokens=self.needs.expected_output_tokens),
                            cost_usd=expected_cost, usage_estimated=True, started_at=started,
                            fallback_from=previous, category=self.category,
                        ))
                    model = self._bound(spec, ctx)
                    if stream:
                        attempt_id = f"lc_run--{call_id}-{len(attempts) + 1}"
                        async for chunk in iter_with_timeout(
                            model.astream(messages, config=INNER_CONFIG, stop=stop, **kwargs),
                            policy.timeout,
                        ):
                            if not isinstance(chunk, AIMessageChunk):
                                continue
                            chunk.id = attempt_id
                            gathered = chunk if gathered is None else gathered + chunk
                            if forward is not None:
                                await forward.on_llm_new_token(
                                    chunk.text, chunk=ChatGenerationChunk(message=chunk)
                                )
                            else:
                                emitted = True
                                yield "chunk", chunk
                        if gathered is None:
                            raise MalformedResponseError(
                                f"{spec.key} streamed no content", provider=spec.provider,
                                model=spec.model,
                            )
                        message = cast(AIMessage, message_chunk_to_message(gathered))
                    else:
                        if spec.adapter.timeout_param is None and policy.timeout is not None:
                            # The client has no timeout of its own: enforce the policy's.
                            async with asyncio.timeout(policy.timeout):
                                message = await generate_once(model, messages, stop, kwargs)
                        else:
                            # The client was built with timeout=policy.timeout and raises.
                            message = await generate_once(model, messages, stop, kwargs)
                    spec.adapter.check(message, spec)
                    parsed = self._check_output(spec, message)
                    if self.validator is not None:
                        await self._validate(spec, message, parsed, messages)
                except asyncio.CancelledError:
                    raise
                except (UserError, StoreError):
                    raise  # the caller's mistake, or the run's database: not the model's fault
                except Exception as e:  # translated below; nothing is swallowed silently
                    err = spec.adapter.translate(e, spec)
                    if err is not e and err.__cause__ is None:
                        err.__cause__ = e
                    verdict = True
                    await breakers.arecord(spec, err)
                    action, delay = policy.decide(err, tries)
                    if action is Action.RETRY and await breakers.ablocked_reason(spec):
                        # This failure opened the circuit: the next try goes to another
                        # model, and the ledger must say so.
                        action, delay = Action.NEXT, 0.0
                    if emitted:
                        # Tokens already reached the consumer: retrying would glue two answers.
                        action, delay = Action.RAISE, 0.0
                    # An answer that failed its schema or validator, or that was cut short,
                    # was still paid for: its tokens, as reported or else estimated.
                    if message is None and gathered is not None:
                        message = cast(AIMessage, message_chunk_to_message(gathered))
                    paid, estimated = billed(message, n_in, partial=err.error_class in (
                        "incomplete", "connection", "timeout"))
                    attempt = Attempt(
                        node=self.node or "", model=spec.key, provider=spec.provider,
                        outcome=Outcome.ERROR, call_id=call_id, run_id=usage.run_id,
                        try_number=len(attempts) + 1, usage=paid, usage_estimated=estimated,
                        cost_usd=spec.cost(paid) if paid else 0.0,
                        latency_ms=(time.perf_counter() - t0) * 1000, error_class=err.error_class,
                        error=short_error(err), fallback_from=previous, action=action.value,
                        started_at=started, task_id=task_id, route_reason=reasons.get(spec.key),
                        prompt=prompt_text(messages) if ctx.usage.listeners else None,
                        category=self.category,
                    )
                    attempts.append(attempt)
                    await usage.arecord(attempt)
                    failures.append(err)
                    if action is Action.RAISE:
                        raise err from e
                    if action is Action.RETRY:
                        tries += 1
                        await ctx.pause(delay)
                        continue
                    if err.error_class == "validation":
                        # Escalate: only models more capable than the one that failed.
                        min_quality = max(min_quality, spec.mean_quality(skills))
                    elif err.error_class == "context_length":
                        min_window = max(min_window, spec.window)
                        too_long = spec
                    elif err.error_class == "content_filter":
                        banned_providers.add(spec.provider)
                    break
                else:
                    verdict = True
                    if local_breakers:
                        breakers.record(spec, None)
                    else:
                        await breakers.arecord(spec, None)
                    call_usage, estimated = billed(message, n_in, partial=False)
                    if reservation is not None and call_usage is not None:
                        # The rate window counted an estimate: put in what was used.
                        await ctx.limiter.acorrect(reservation, call_usage.total_tokens)
                    cost = spec.cost(call_usage) if call_usage else 0.0
                    message.response_metadata = {
                        **message.response_metadata,
                        "frugalflow": {"model": spec.key, "cost_usd": cost,
                                       "attempts": len(attempts) + 1, "call_id": call_id},
                    }
                    attempt = Attempt(
                        node=self.node or "", model=spec.key, provider=spec.provider,
                        outcome=Outcome.OK, call_id=call_id, run_id=usage.run_id,
                        try_number=len(attempts) + 1, usage=call_usage, cost_usd=cost,
                        usage_estimated=estimated,
                        latency_ms=(time.perf_counter() - t0) * 1000,
                        fallback_from=previous, started_at=started, task_id=task_id,
                        call_key=call_key or self._key_for_ledger(ctx, task_id, messages, kwargs),
                        response=message, route_reason=reasons.get(spec.key),
                        prompt=prompt_text(messages) if ctx.usage.listeners else None,
                        category=self.category,
                    )
                    attempts.append(attempt)
                    await usage.arecord(attempt)
                    self._last_model = spec.key
                    if not stream or forward is not None:
                        yield "message", message
                    return
                finally:
                    if not verdict:
                        await asyncio.shield(breakers.arelease(spec))
            previous = spec.key

        n = len(attempts)
        detail = f"; skipped: {'; '.join(skipped)}" if skipped else ""
        headline = (f"node {self.node!r}: all {len(ranking.rows)} capable models failed "
                    f"({n} attempts){detail}")
        if too_long is not None and failures and failures[-1].error_class == "context_length" \
                and not any(r[4].window > too_long.window for r in ranking.rows):
            headline = (
                f"node {self.node!r}: the prompt is too long for {too_long.key} (context "
                f"window {too_long.window} tokens) and no capable model has a larger window; "
                f"shorten the input or add a model with a larger context window "
                f"({n} attempts){detail}")
        group = AllModelsFailedError(
            headline,
            failures or [ModelAPIError("no candidate could be tried" + detail)],
            node=self.node,
            attempts=attempts,
        )
        if over_budget is not None:
            raise self._budget_error(over_budget) from group
        raise group

    def _budget_error(self, cheapest: Candidate) -> BudgetExceededError:
        usage = self.run_context().usage
        return BudgetExceededError(
            f"node {self.node!r}: the run's budget cannot pay for the next call: "
            f"${usage.spent_usd:.6f} of ${usage.budget_usd} spent, "
            f"${usage.remaining_usd or 0.0:.6f} left; the cheapest capable call "
            f"({cheapest.spec.key}) needs about ${cheapest.expected_cost:.6f}. "
            "Resume the run with a larger budget.",
            node=self.node, budget_usd=usage.budget_usd or 0.0,
            spent_usd=usage.spent_usd, needed_usd=cheapest.expected_cost,
        )

    def _bound(self, spec: ModelSpec, ctx: RunContext) -> Runnable[Any, Any]:
        model = ctx.model(spec)
        if not self.tools:
            return model
        # Binding converts every tool's schema: once per built model, not once per call.
        hit = self._with_tools.get(spec.key)
        if hit is not None and hit[0] is model:
            return hit[1]  # type: ignore[no-any-return]
        kwargs: dict[str, Any] = {}
        if self.tool_choice is not None:
            kwargs["tool_choice"] = self.tool_choice
        bound = model.bind_tools(self.tools, **kwargs)
        self._with_tools[spec.key] = (model, bound)
        return bound

    def _route(
        self, router: Any, messages: Sequence[BaseMessage],
        rows: list[tuple[float, float, float, int, ModelSpec]],
    ) -> tuple[list[tuple[float, float, float, int, ModelSpec]], dict[str, str]]:
        """Reorder the capable models by the router's per-input predictions."""
        from .learning import choose

        keys = [r[4].key for r in rows]
        probs = router.predict(prompt_text(messages), keys, node=self.node,
                               category=self.category)
        costs = {r[4].key: r[0] for r in rows}
        order = choose(probs, costs, target=self.needs.target,
                       price_weight=self.needs.price_weight, cascade=self.needs.cascade)
        by_key = {r[4].key: r for r in rows}
        reasons = {m: f"{why}; p={probs[m]:.2f}, ${costs[m]:.6f}" for m, why in order}
        return [by_key[m] for m, _ in order], reasons

    def _digest(self, messages: Sequence[BaseMessage], kwargs: dict[str, Any]) -> str:
        """A stable digest of what this call asks: messages, tools, schema, needs."""
        import hashlib

        from langchain_core.messages import messages_to_dict

        payload = json.dumps(
            [messages_to_dict(list(messages)), [tool_schema(t) for t in self.tools],
             repr(self.tool_choice), getattr(self.response_schema, "__name__",
                                             repr(self.response_schema)),
             self.needs.cache_key, sorted(kwargs)],
            sort_keys=True, default=str,
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def _key_for_ledger(self, ctx: RunContext, task_id: str | None,
                        messages: Sequence[BaseMessage], kwargs: dict[str, Any]) -> str | None:
        # Keys are recorded only for runs the runner persists (their replay needs them).
        if not ctx.usage.listeners or task_id is None:
            return None
        return ctx.call_key(task_id, self.node, self._digest(messages, kwargs))

    def _check_output(self, spec: ModelSpec, message: AIMessage) -> Any:
        """The structured output parsed from `message` (None without a schema)."""
        schema = self.response_schema
        if schema is None:
            return None
        calls = message.tool_calls
        if not calls:
            raise MalformedResponseError(
                f"{spec.key} returned no structured output (no tool call)",
                provider=spec.provider, model=spec.model,
            )
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            try:
                return schema.model_validate(calls[0]["args"])
            except Exception as e:  # pydantic.ValidationError or a bad type
                raise MalformedResponseError(
                    f"{spec.key} output fails schema {schema.__name__}: {short_error(e)}",
                    provider=spec.provider, model=spec.model,
                ) from e
        return calls[0]["args"]

    async def _validate(self, spec: ModelSpec, message: AIMessage, parsed: Any,
                        messages: Sequence[BaseMessage]) -> None:
        """Run the node's validator; a failure escalates to a more capable model."""
        validator = self.validator
        subject = parsed if parsed is not None else message
        reason: str | None = None
        verdict: object  # False, or a str (the reason), rejects the answer
        try:
            if isinstance(validator, ModelJudge):
                verdict = await validator.check(self, spec, messages, subject)
            elif isinstance(validator, type) and issubclass(validator, BaseModel):
                if parsed is None:
                    validator.model_validate_json(str(message.content))
                else:
                    validator.model_validate(
                        parsed.model_dump() if isinstance(parsed, BaseModel) else parsed)
                verdict = True
            else:
                verdict = validator(subject)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
        except (UserError, asyncio.CancelledError):
            raise
        except Exception as e:  # the validator's own words are the reason
            reason = short_error(e)
            verdict = False
        if verdict is False or isinstance(verdict, str):
            raise ValidationFailedError(
                f"{spec.key} output rejected by the validator: "
                f"{verdict if isinstance(verdict, str) else reason or 'returned False'}",
                provider=spec.provider, model=spec.model,
            )


_T = TypeVar("_T")


def _run_sync(coro: Coroutine[Any, Any, _T]) -> _T:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside a running loop (sync API in async code): run on a helper thread.
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()