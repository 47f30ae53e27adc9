"""The routed chat model, and the state the routed calls of one run share.

`RoutedChatModel` is a LangChain chat model that tries the capable candidates of each call
in order (see `ranking`), falling back between providers as the run's `FallbackPolicy`
decides. `RunContext` holds what the calls of one run share: catalog, policy, breakers,
spend and budget, rate limiter, router and the durable run's ledger hooks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import (
    AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LangSmithParams, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableConfig
from langgraph.runtime import get_runtime
from pydantic import ConfigDict, Field, PrivateAttr, SkipValidation

from .attempts import CallAttempts
from .validation import Validator
from .catalog import Catalog, ModelSpec
from .exceptions import UserError
from .limits import Limiter
from .resilience import Breakers, FallbackPolicy, default_breakers
from .needs import Needs, tool_schema, tool_tokens
from .ranking import Prefilter, Priced, QualityJudge, prefilter, priced
from .tracing.callbacks import PARENT_KWARG, attempt_runs, routed_ls_params, stream_parent
from .usage import Attempt, RunUsage

if TYPE_CHECKING:
    from .batches.parking import Parking
    from .learning import Router
    from .measured import Measurements
    from .verbosity import Verbosity

__all__ = ["DEFAULT_ATTEMPT_WINDOW", "RoutedChatModel", "RunContext"]

DEFAULT_ATTEMPT_WINDOW = 1000
"""Attempts kept by a RoutedChatModel's own context (used outside a run); totals count all."""


class Replay(Protocol):
    """When resuming: the answer a completed call with this key already got, or None."""

    def __call__(self, node: str | None, call_key: str) -> Awaitable[AIMessage | None]: ...


Sleep = Callable[[float], Awaitable[object]]
"""An awaitable sleep(seconds)."""

Intent = Callable[[Attempt], Awaitable[None]]
"""Writes a call down before it is sent."""


@dataclass(repr=False)
class RunContext:
    """What routed calls of one run share: catalog, policy, breakers, spend and budget.

    LangGraph passes it to every node as the runtime context; it is never checkpointed,
    so the runner supplies it again when a run resumes.
    """

    catalog: Catalog
    policy: FallbackPolicy = field(default_factory=FallbackPolicy)
    breakers: Breakers = field(default_factory=lambda: default_breakers)
    usage: RunUsage = field(default_factory=RunUsage)
    sleep: Sleep | None = None  # tests pass a fake clock's
    limiter: Limiter | None = None
    """A `RateLimiter` keeping calls under the catalog's rpm/tpm (`RedisRateLimiter` for a
    fleet); None: limits are not enforced here."""
    router: Router | None = None
    """A `frugalflow.learning.Router` predicting per-input success; used by nodes whose needs
    set `target`, `price_weight` or `cascade`."""
    intent: Intent | None = None
    """Durable runs: `await intent(pending_attempt)` writes a call down before it is sent, so
    a call whose answer never reached the ledger (the process died) is still accounted for.
    It must not raise (but for cancellation)."""
    replay: Replay | None = None
    """When resuming: `await replay(node, call_key) -> AIMessage | None`, the answer a
    completed call with this key already got (the runner looks it up in the ledger), so a
    node re-executed after a crash does not pay again for calls it had finished."""
    measured: Measurements | None = None
    """What was measured of the flow's nodes (`frugalflow.measured`): quality needs are
    judged on measured pass rates where they exist, and a stored policy's choice goes first."""
    explore: float | Mapping[str, float] = 0.0
    """The share of calls (one share, or per node) of nodes with a validator that may try a
    cheaper, unproven model first (Thompson sampling on `measured`)."""
    verbosity: Verbosity | None = None
    """Output-token estimates per node x model (the runner reads them from the ledger at each
    run's start, see `frugalflow.verbosity`); None: the per-model prior."""
    parking: Parking | None = None
    """Durable runs: where a call on a tier that answers later (batch, a cheaper hour)
    writes its request down before its run parks (`frugalflow.batches.parking`); None: no
    call parks (deadlines then only choose among synchronous tiers)."""
    held_usd: float = 0.0
    """Budget held by the run's calls in flight (each its most possible cost), so that
    parallel calls together stay within the budget (see `frugalflow.allowance`)."""
    draws: int = field(default=0, repr=False)
    """Calls outside a durable run that drew a random choice (it seeds the next draw)."""
    _occurrences: dict[tuple[str | None, str], int] = field(default_factory=dict, repr=False)
    _static: dict[int, tuple[Needs, Prefilter]] = field(default_factory=dict, repr=False)
    _judged: dict[tuple[int, str, bool], tuple[Needs, Prefilter]] = field(
        default_factory=dict, repr=False)
    _priced: dict[tuple[str | None, int], tuple[Needs, Prefilter, Priced]] = field(
        default_factory=dict, repr=False)
    _holds: dict[asyncio.Task[Any] | None, float] = field(default_factory=dict, repr=False)
    _released: asyncio.Event | None = field(default=None, repr=False)

    def __repr__(self) -> str:
        return f"RunContext(catalog={self.catalog.name!r}, run_id={self.usage.run_id!r})"

    def call_key(self, task_id: str | None, node: str | None, digest: str) -> str:
        """`digest#n`: the n-th identical call of this node execution."""
        k = (task_id, digest)
        n = self._occurrences.get(k, 0) + 1
        self._occurrences[k] = n
        return f"{node}:{digest}#{n}"

    def static(self, needs: Needs, node: str | None = None) -> Prefilter:
        measured = self.measured
        if measured is not None and measured.covers(node):
            return self._measured_static(needs, node or "", measured, explorable=False)
        # Per run, by identity (a node's needs object is shared by all its calls); the
        # catalog-level cache behind it also watches the providers' keys.
        hit = self._static.get(id(needs))
        if hit is None or hit[0] is not needs:
            hit = self._static[id(needs)] = (needs, self.catalog.prefiltered(needs, prefilter))
        return hit[1]

    def explorable(self, needs: Needs, node: str | None, threshold: float) -> Prefilter:
        """The models a call of `node` may explore: every hard need met but quality, not
        admitted (by measurement or prior), and unproven (`Measurements.unproven`)."""
        measured = self.measured
        assert measured is not None
        admitted = {s.key for s in self.static(needs, node).eligible}

        def judge(spec: ModelSpec) -> list[str]:
            if spec.key in admitted:
                return ["admitted already"]
            return [] if measured.unproven(node, spec.key, threshold) else ["proven"]

        return self._measured_static(needs, node or "", measured, explorable=True, judge=judge)

    def _measured_static(self, needs: Needs, node: str, measured: Measurements, *,
                         explorable: bool, judge: QualityJudge | None = None) -> Prefilter:
        # Per run (measurements are a snapshot taken at the run's start), per node.
        key = (id(needs), node, explorable)
        hit = self._judged.get(key)
        if hit is None or hit[0] is not needs:
            judged = prefilter(self.catalog, needs, judge or measured.judge(node, needs))
            hit = self._judged[key] = (needs, judged)
        return hit[1]

    def priced(self, node: str | None, needs: Needs, static: Prefilter) -> Priced:
        """The node's output estimates and prices per model of `static` (once per run)."""
        hit = self._priced.get((node, id(needs)))
        if hit is None or hit[0] is not needs or hit[1] is not static:
            hit = self._priced[(node, id(needs))] = (
                needs, static, priced(static, needs, node, self.verbosity))
        return hit[2]

    # -- budget held by calls in flight (see frugalflow.allowance) --------------------------

    def hold(self, usd: float) -> None:
        """A call of the current task holds `usd` of the budget until it is recorded."""
        task = asyncio.current_task()
        self._holds[task] = self._holds.get(task, 0.0) + usd
        self.held_usd += usd

    def unhold(self, usd: float) -> None:
        task = asyncio.current_task()
        rest = self._holds.get(task, 0.0) - usd
        if rest > 1e-12:
            self._holds[task] = rest
        else:
            self._holds.pop(task, None)
        # (exactly 0 once nothing is held: no float residue left to hold)
        self.held_usd = max(self.held_usd - usd, 0.0) if self._holds else 0.0
        released, self._released = self._released, None
        if released is not None:
            released.set()

    def others_hold(self) -> bool:
        """Whether calls of other tasks hold budget (a wait for them ends)."""
        task = asyncio.current_task()
        return any(t is not task for t in self._holds)

    async def hold_released(self) -> None:
        """Until a call in flight frees what it held."""
        if self._released is None:
            self._released = asyncio.Event()
        await self._released.wait()

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
    # Not validated by pydantic: a callable, a model class or a judge is kept as given.
    validator: SkipValidation[Validator | None] = Field(default=None, exclude=True)
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

    def with_validator(self, validator: Validator) -> RoutedChatModel:
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
        attempts = CallAttempts(self, messages, stop, kwargs, runs=attempt_runs(run_manager))
        return _run_sync(self._answer(attempts))

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
        attempts = CallAttempts(self, messages, stop, kwargs,
                                forward=run_manager if live else None,
                                runs=attempt_runs(run_manager))
        return await self._answer(attempts)

    async def _answer(self, attempts: CallAttempts) -> ChatResult:
        """The call's result: the first acceptable answer of its candidates."""
        message = await attempts.run()
        # The answering model's own generation holds this message already (made and checked
        # once: no second validation); a replayed or streamed answer gets a new one.
        generation = attempts.generation
        if generation is None or generation.message is not message:
            generation = ChatGeneration(message=message)
        # One valid generation: nothing for ChatResult's validation to check.
        return ChatResult.model_construct(generations=[generation])

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        # The routed call's run is frugalflow's; each attempt's child run names the provider
        # and model (see frugalflow.tracing.callbacks).
        return routed_ls_params(self.node, stop)

    def _get_invocation_params(self, stop: list[str] | None = None,
                               **kwargs: Any) -> dict[str, Any]:
        kwargs.pop(PARENT_KWARG, None)  # astream's handle for `_astream`, not a parameter
        return super()._get_invocation_params(stop=stop, **kwargs)

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

    async def astream(
        self,
        input: LanguageModelInput,
        config: RunnableConfig | None = None,
        *,
        stop: list[str] | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[AIMessageChunk]:
        # LangChain gives `_astream` no run manager: when handlers listen, the routed run's
        # id is chosen here and its attempts' parent handed down as a keyword.
        parent = await stream_parent(config, self.callbacks, self.verbose)
        if parent is not None:
            config, kwargs[PARENT_KWARG] = parent
        async for chunk in super().astream(input, config, stop=stop, **kwargs):
            yield chunk

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        runs = kwargs.pop(PARENT_KWARG, None) or attempt_runs(run_manager)
        async for chunk in CallAttempts(self, messages, stop, kwargs, runs=runs).stream():
            generation = ChatGenerationChunk(message=chunk)
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=generation)
            yield generation

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

    def _tools_tokens(self) -> int:
        """Estimated prompt tokens of the bound tools (computed once)."""
        if not self.tools:
            return 0
        if self._tool_tokens is None:
            self._tool_tokens = tool_tokens(self.tools)
        return self._tool_tokens

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