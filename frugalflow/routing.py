"""Needs, matching, and the routed chat model.

A node declares `Needs`. `rank` filters the catalog by the hard needs (capabilities,
context window, providers, price and latency caps, quality minimums) and orders the rest
by the expected cost of *this* call. `RoutedChatModel` is a LangChain chat model that
tries those candidates in order, falling back between providers as `fallback` decides.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal, NamedTuple, TypeVar, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    SystemMessage,
    message_chunk_to_message,
)
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.runtime import get_runtime
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from .catalog import SKILLS, Catalog, ModelSpec
from .exceptions import (
    ValidationFailedError,
    AllModelsFailedError,
    BudgetExceededError,
    MalformedResponseError,
    ModelAPIError,
    NoCapableModelError,
    StoreError,
    UserError,
)
from .resilience import Action, Breakers, FallbackPolicy, default_breakers
from .statuses import Outcome
from .usage import Attempt
from .usage import RunUsage, Usage

__all__ = [
    "Candidate",
    "Judge",
    "Needs",
    "Ranking",
    "RoutedChatModel",
    "RunContext",
    "estimate_tokens",
    "explain",
    "rank",
]

# Call ids: a random per-process prefix and a counter (uuid4 costs a syscall per call).
_ID_PREFIX = uuid.uuid4().hex[:16]
_call_counter = itertools.count(1)

_INNER_CONFIG: RunnableConfig = {"callbacks": [], "tags": ["frugalflow:inner"]}

DEFAULT_ATTEMPT_WINDOW = 1000
"""Attempts kept by a RoutedChatModel's own context (used outside a run); totals count all."""


class Needs(BaseModel):
    """What a node requires of a model.

    Hard needs filter the catalog; the rest rank what is left. The context window needed
    is computed per call from the actual messages plus `max_output_tokens` (or
    `expected_output_tokens`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: bool = False
    structured_output: bool = False
    vision: bool = False
    reasoning: bool = False
    streaming: bool = False
    min_context: int | None = Field(default=None, gt=0)
    quality: dict[str, float] = Field(default_factory=dict)
    """Minimum score per skill, 0..1 (skills: classification, extraction, ...)."""
    providers: tuple[str, ...] | None = None
    """Only these providers (None: any)."""
    exclude_providers: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None
    """Only these `provider/model` keys (None: any)."""
    exclude_models: tuple[str, ...] = ()
    max_cost_per_call: float | None = Field(default=None, gt=0)
    """USD: candidates whose expected cost for the call exceeds this are rejected."""
    max_latency_ms: float | None = Field(default=None, gt=0)
    expected_output_tokens: int = Field(default=400, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    target: float | None = Field(default=None, ge=0, le=1)
    """With a router in the run: first the cheapest model predicted to succeed with at least
    this probability on *this* input."""
    price_weight: float | None = Field(default=None, ge=0)
    """With a router: order by predicted success minus this weight times the expected cost."""
    cascade: bool = False
    """With a router: try models in order of expected cost per success (cost / p), the order
    that minimises the expected spend until an answer passes the node's validator (outcomes
    taken as independent). For nodes whose validator escalates: quality is held by the
    validator, the router only saves the calls that would fail."""

    @model_validator(mode="after")
    def _one_routing_rule(self) -> Needs:
        if self.cascade and (self.target is not None or self.price_weight is not None):
            raise ValueError("cascade orders by cost per success; it cannot be combined with "
                             "target or price_weight (choose one routing rule)")
        return self

    @property
    def routed(self) -> bool:
        """Whether a run's router reorders the candidates for these needs."""
        return self.target is not None or self.price_weight is not None or self.cascade

    @field_validator("quality")
    @classmethod
    def _valid_quality(cls, value: dict[str, float]) -> dict[str, float]:
        for skill, score in value.items():
            if skill not in SKILLS:
                import difflib

                close = difflib.get_close_matches(skill, SKILLS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"unknown skill {skill!r}{hint}; skills are: {', '.join(SKILLS)}"
                )
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"quality[{skill!r}] must be between 0 and 1, got {score}")
        return value

    @field_validator("providers", "exclude_providers", "models", "exclude_models", mode="before")
    @classmethod
    def _tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return tuple(value) if value is not None else None

    def with_(self, **changes: Any) -> Needs:
        """A copy with `changes` applied and validated."""
        return Needs(**{**self.model_dump(), **changes})

    @property
    def output_budget(self) -> int:
        return self.max_output_tokens or self.expected_output_tokens

    @cached_property
    def cache_key(self) -> tuple[Any, ...]:
        """A hashable form of these needs (computed once)."""
        d = self.model_dump()
        d["quality"] = tuple(sorted(self.quality.items()))
        return tuple(sorted(d.items()))

    def describe(self) -> str:
        """The non-default needs, e.g. `tools, quality.writing>=0.8`."""
        return self._description

    @cached_property
    def _description(self) -> str:
        # LangChain asks for it on every call (identifying params): computed once.
        parts: list[str] = []
        for name in ("tools", "structured_output", "vision", "reasoning", "streaming"):
            if getattr(self, name):
                parts.append(name)
        parts += [f"quality.{k}>={v}" for k, v in sorted(self.quality.items())]
        for name in ("min_context", "providers", "exclude_providers", "models",
                     "exclude_models", "max_cost_per_call", "max_latency_ms", "target",
                     "price_weight", "cascade"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value}")
        return ", ".join(parts) or "no special needs"


# -- token estimation ----------------------------------------------------------------

_IMAGE_TOKENS = 800


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return len(content) // 4 + 1
    if isinstance(content, list):
        n = 0
        for block in content:
            if isinstance(block, str):
                n += len(block) // 4 + 1
            elif isinstance(block, dict):
                kind = block.get("type")
                if kind in ("image", "image_url"):
                    n += _IMAGE_TOKENS
                else:
                    n += len(str(block.get("text", ""))) // 4 + 1
        return n
    return len(str(content)) // 4 + 1


def estimate_tokens(messages: Sequence[BaseMessage], tools: Sequence[Any] = ()) -> int:
    """A tokenizer-free estimate of a prompt's input tokens (about 4 characters a token)."""
    n = 0
    for m in messages:
        n += 4 + _content_tokens(m.content)
        if isinstance(m, AIMessage) and m.tool_calls:
            n += len(json.dumps([c.get("args") for c in m.tool_calls], default=str)) // 4
    return n + tool_tokens(tools) if tools else n


def tool_tokens(tools: Sequence[Any]) -> int:
    """Estimated prompt tokens taken by tool definitions."""
    return sum(len(json.dumps(_tool_schema(t), default=str)) // 4 for t in tools)


def _tool_schema(tool: Any) -> dict[str, Any]:
    try:
        return convert_to_openai_tool(tool)
    except Exception:  # an odd tool only makes the estimate rougher
        return {"name": str(tool)}


def _has_images(messages: Sequence[BaseMessage]) -> bool:
    for m in messages:
        if isinstance(m.content, list):
            for block in m.content:
                if isinstance(block, dict) and block.get("type") in ("image", "image_url"):
                    return True
    return False


# -- ranking -------------------------------------------------------------------------


class Candidate(NamedTuple):
    """A capable model for a call; tuples sort in routing order (cost, quality, latency)."""

    expected_cost: float
    neg_quality: float
    latency_ms: float
    order: int
    spec: ModelSpec


@dataclass
class Ranking:
    """Capable models cheapest first, and every rejected model with its reasons."""

    rows: list[tuple[float, float, float, int, ModelSpec]]
    """(expected cost, -quality, latency, catalog order, spec), sorted: the routing order."""
    rejected: list[tuple[ModelSpec, list[str]]]
    input_tokens: int = 0

    @cached_property
    def candidates(self) -> list[Candidate]:
        return [Candidate._make(r) for r in self.rows]

    def closest(self, n: int = 3) -> list[tuple[ModelSpec, list[str]]]:
        """The rejected models that miss the fewest needs (the best hint for a fix)."""
        return sorted(self.rejected, key=lambda r: (len(r[1]), r[0].estimate_cost(1000, 400)))[:n]


def _static_reasons(catalog: Catalog, spec: ModelSpec, needs: Needs) -> list[str]:
    reasons: list[str] = []
    why = catalog.unavailable_reason(spec)
    if why:
        reasons.append(why)
    caps = spec.caps
    if needs.tools and not caps.tool_calling:
        reasons.append("no tool calling")
    if needs.structured_output and not caps.structured_output:
        reasons.append("no structured output")
    if needs.vision and not caps.vision:
        reasons.append("no image input")
    if needs.reasoning and not caps.reasoning:
        reasons.append("no reasoning mode")
    if needs.streaming and not caps.streaming:
        reasons.append("no streaming")
    if needs.min_context and spec.window < needs.min_context:
        reasons.append(f"context {spec.window} < min_context {needs.min_context}")
    for skill, minimum in needs.quality.items():
        score = spec.quality.get(skill)
        if score is None:
            reasons.append(f"no {skill} score")
        elif score < minimum:
            reasons.append(f"quality.{skill} {score:.2f} < {minimum}")
    if needs.providers is not None and spec.provider not in needs.providers:
        reasons.append(f"provider {spec.provider} not in allowed {list(needs.providers)}")
    if spec.provider in needs.exclude_providers:
        reasons.append(f"provider {spec.provider} excluded")
    if needs.models is not None and spec.key not in needs.models:
        reasons.append("not in the node's allowed models")
    if spec.key in needs.exclude_models:
        reasons.append("model excluded")
    if needs.max_latency_ms is not None and spec.latency_ms > needs.max_latency_ms:
        reasons.append(f"latency {spec.latency_ms:.0f} ms > {needs.max_latency_ms:.0f} ms")
    return reasons


@dataclass
class Prefilter:
    """The catalog split by the needs that do not depend on a call's messages."""

    eligible: list[ModelSpec]
    rejected: list[tuple[ModelSpec, list[str]]]
    # Per eligible model: (spec, $/input token, $/output token, window, vision, -quality, latency)
    rows: list[tuple[ModelSpec, float, float, int, bool, float, float]] = field(
        default_factory=list
    )


def prefilter(catalog: Catalog, needs: Needs) -> Prefilter:
    """Apply the static needs (capabilities, quality, providers, latency, availability)."""
    eligible: list[ModelSpec] = []
    rejected: list[tuple[ModelSpec, list[str]]] = []
    for spec in catalog:
        reasons = _static_reasons(catalog, spec, needs)
        if reasons:
            rejected.append((spec, reasons))
        else:
            eligible.append(spec)
    skills = list(needs.quality) or None
    rows = [
        (s, s.input_price_per_mtok / 1e6, s.output_price_per_mtok / 1e6, s.window,
         s.caps.vision, -s.mean_quality(skills), s.latency_ms)
        for s in eligible
    ]
    return Prefilter(eligible, rejected, rows)


def rank(
    catalog: Catalog,
    needs: Needs,
    messages: Sequence[BaseMessage] = (),
    *,
    tools: Sequence[Any] = (),
    budget_left: float | None = None,
    input_tokens: int | None = None,
    _static: Prefilter | None = None,
) -> Ranking:
    """Capable models for a call with `messages`, cheapest expected cost first.

    Ties are broken by quality (mean over the needed skills, else all), then latency.
    """
    static = _static if _static is not None else prefilter(catalog, needs)
    rejected = list(static.rejected)
    n_in = input_tokens if input_tokens is not None else estimate_tokens(messages, tools)
    n_out = needs.expected_output_tokens
    context_needed = n_in + needs.output_budget
    images = bool(messages) and not needs.vision and _has_images(messages)
    max_cost = needs.max_cost_per_call
    ranked: list[tuple[float, float, float, int, ModelSpec]] = []
    for i, (spec, p_in, p_out, window, vision, neg_quality, latency) in enumerate(static.rows):
        cost = n_in * p_in + n_out * p_out
        if (
            window < context_needed
            or (images and not vision)
            or (max_cost is not None and cost > max_cost)
            or (budget_left is not None and cost > budget_left)
        ):
            reasons: list[str] = []
            if window < context_needed:
                reasons.append(f"context {window} < {context_needed} tokens needed")
            if images and not vision:
                reasons.append("messages hold images; no image input")
            if max_cost is not None and cost > max_cost:
                reasons.append(f"expected ${cost:.6f} > max_cost_per_call ${max_cost}")
            if budget_left is not None and cost > budget_left:
                reasons.append(f"expected ${cost:.6f} > budget left ${budget_left:.6f}")
            rejected.append((spec, reasons))
            continue
        ranked.append((cost, neg_quality, latency, i, spec))
    ranked.sort()  # `order` makes keys unique: specs are never compared
    return Ranking(ranked, rejected, n_in)


def explain(
    catalog: Catalog,
    needs: Needs,
    messages: Sequence[BaseMessage] = (),
    *,
    input_tokens: int | None = None,
    budget_left: float | None = None,
) -> list[dict[str, Any]]:
    """Every catalog model, accepted (with its rank and expected cost) or rejected (why)."""
    ranking = rank(
        catalog, needs, messages, input_tokens=input_tokens, budget_left=budget_left
    )
    rows: list[dict[str, Any]] = []
    for i, c in enumerate(ranking.candidates, 1):
        rows.append(
            {"model": c.spec.key, "accepted": True, "rank": i,
             "expected_cost_usd": c.expected_cost, "reasons": []}
        )
    for spec, reasons in ranking.rejected:
        rows.append({"model": spec.key, "accepted": False, "rank": None,
                     "expected_cost_usd": None, "reasons": reasons})
    return rows


def no_capable_model_error(
    node: str | None, needs: Needs, ranking: Ranking, catalog: Catalog
) -> NoCapableModelError:
    where = f"node {node!r}" if node else "this call"
    closest = ranking.closest()
    lines = [
        f"{where}: no available model in catalog {catalog.name!r} meets its needs "
        f"({needs.describe()})."
    ]
    if closest:
        lines.append("Closest models:")
        lines += [f"  - {s.key}: {'; '.join(r)}" for s, r in closest]
    lines.append(
        "Fix: relax the need named above, configure a provider that has such a model "
        "(set its API key), or add a model to the catalog."
    )
    return NoCapableModelError(
        "\n".join(lines), node=node, rejected=[(s.key, r) for s, r in ranking.rejected]
    )


# -- the run's shared state for routed calls ------------------------------------------------


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


# -- the routed chat model -----------------------------------------------------------------


class Judge:
    """A validator that asks another model whether an answer is acceptable.

    ``model.with_validator(Judge("The reply answers the customer's question politely."))``:
    after each answer, a routed model with the judge's `needs` (never the model that wrote
    the answer) reads the criteria, the conversation's last message and the answer, and
    replies APPROVE or REJECT with a reason. A rejection escalates the answer to a more
    capable model like any validator failure (and is an outcome routers learn from); an
    unreadable verdict counts as a rejection. The judge's own calls are routed, priced and
    recorded under the node name `<node>:judge`. On the simulated catalog, judges check
    answers against the flows' oracles and err as often as their quality says.
    """

    MARK = "frugalflow_judge"
    """The key, in the judge prompt's `additional_kwargs`, that marks a judge request: no
    provider integration sends it, test doubles recognise a judge request by it (never by the
    prompt's wording) and read what is judged from it (see `judged`)."""

    def __init__(self, criteria: str, *, needs: Needs | None = None) -> None:
        if not criteria.strip():
            raise UserError("Judge needs criteria: what makes an answer acceptable")
        self.criteria = criteria.strip()
        self.needs = needs if needs is not None else Needs(quality={"reasoning": 0.8},
                                                           expected_output_tokens=60)

    def __repr__(self) -> str:
        return f"Judge({self.criteria[:40]!r})"

    def prompt(self, question: str, answer: str) -> list[BaseMessage]:
        return [
            SystemMessage(
                "You check another model's answer against criteria. Reply with APPROVE or "
                "REJECT as the first word, then one sentence of reasons.\n"
                f"Criteria: {self.criteria}"),
            HumanMessage(f"Input:\n{question}\n\nAnswer:\n{answer}",
                         additional_kwargs={self.MARK: {"input": question, "answer": answer}}),
        ]

    @classmethod
    def judged(cls, messages: Sequence[BaseMessage]) -> tuple[str, str] | None:
        """(input, answer) when `messages` are a judge request (they carry `MARK`), else None."""
        for m in messages:
            mark = m.additional_kwargs.get(cls.MARK)
            if isinstance(mark, dict):
                return str(mark.get("input", "")), str(mark.get("answer", ""))
        return None

    @staticmethod
    def verdict(text: str) -> bool | str:
        """True for APPROVE; the reason for REJECT or an unreadable reply."""
        words = text.strip().split(None, 1)
        first = words[0].strip("*:.,!").upper() if words else ""
        rest = words[1].strip() if len(words) > 1 else ""
        if first == "APPROVE":
            return True
        if first == "REJECT":
            return f"the judge rejected it: {rest or 'no reason given'}"
        return f"the judge's verdict was unreadable: {text.strip()[:120]!r}"

    async def check(self, routed: RoutedChatModel, spec: ModelSpec,
                    messages: Sequence[BaseMessage], subject: Any) -> bool | str:
        answer = (subject.model_dump_json() if isinstance(subject, BaseModel)
                  else json.dumps(subject, default=str) if isinstance(subject, dict)
                  else str(getattr(subject, "content", subject)))
        judge = RoutedChatModel(
            needs=self.needs.with_(exclude_models=(*self.needs.exclude_models, spec.key)),
            context=routed.context, node=f"{routed.node or 'model'}:judge",
        )
        reply = await judge.ainvoke(self.prompt(_prompt_text(messages), answer),
                                    config=_INNER_CONFIG)
        return self.verdict(str(reply.content))


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

        call_id = f"{_ID_PREFIX}{next(_call_counter):08x}"
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
            resting = await breakers.acooldown_reason(spec)
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
                if not await breakers.aacquire(spec):
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
                        async for chunk in _with_timeout_iter(
                            model.astream(messages, config=_INNER_CONFIG, stop=stop, **kwargs),
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
                                message = await _generate_once(model, messages, stop, kwargs)
                        else:
                            # The client was built with timeout=policy.timeout and raises.
                            message = await _generate_once(model, messages, stop, kwargs)
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
                    paid, estimated = _billed(message, n_in, partial=err.error_class in (
                        "incomplete", "connection", "timeout"))
                    attempt = Attempt(
                        node=self.node or "", model=spec.key, provider=spec.provider,
                        outcome=Outcome.ERROR, call_id=call_id, run_id=usage.run_id,
                        try_number=len(attempts) + 1, usage=paid, usage_estimated=estimated,
                        cost_usd=spec.cost(paid) if paid else 0.0,
                        latency_ms=(time.perf_counter() - t0) * 1000, error_class=err.error_class,
                        error=_short(err), fallback_from=previous, action=action.value,
                        started_at=started, task_id=task_id, route_reason=reasons.get(spec.key),
                        prompt=_prompt_text(messages) if ctx.usage.listeners else None,
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
                    await breakers.arecord(spec, None)
                    call_usage, estimated = _billed(message, n_in, partial=False)
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
                        prompt=_prompt_text(messages) if ctx.usage.listeners else None,
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
        probs = router.predict(_prompt_text(messages), keys, node=self.node,
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
            [messages_to_dict(list(messages)), [_tool_schema(t) for t in self.tools],
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
                    f"{spec.key} output fails schema {schema.__name__}: {_short(e)}",
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
            if isinstance(validator, Judge):
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
            reason = _short(e)
            verdict = False
        if verdict is False or isinstance(verdict, str):
            raise ValidationFailedError(
                f"{spec.key} output rejected by the validator: "
                f"{verdict if isinstance(verdict, str) else reason or 'returned False'}",
                provider=spec.provider, model=spec.model,
            )


async def _generate_once(
    model: Runnable[Any, Any], messages: list[BaseMessage], stop: list[str] | None,
    kwargs: dict[str, Any],
) -> AIMessage:
    """One generation from a candidate model.

    The routed model is the LangChain run that callbacks, tracing and streaming observe;
    the candidate is called through its generation hook (`_agenerate`, the method every
    chat model implements) rather than a second, nested `ainvoke` run. A model with a
    cache, a rate limiter or v1 output blocks goes through `ainvoke`, which applies them.
    """
    target, bound_kwargs = model, {}
    if isinstance(model, RunnableBinding) and isinstance(model.bound, BaseChatModel):
        target, bound_kwargs = model.bound, dict(model.kwargs)
    if (
        isinstance(target, BaseChatModel)
        and target.cache is None
        and target.rate_limiter is None
        and getattr(target, "output_version", None) != "v1"
    ):
        result = await target._agenerate(messages, stop=stop, **{**bound_kwargs, **kwargs})
        generation = result.generations[0]
        message = generation.message
        if not isinstance(message, AIMessage):  # pragma: no cover - defensive
            raise MalformedResponseError(f"{type(target).__name__} returned {type(message).__name__}")
        # As `ainvoke` does: the finish/stop reason (and more) that integrations keep in
        # generation_info or llm_output belongs to the message, where adapters check it.
        message.response_metadata = {**(result.llm_output or {}),
                                     **(generation.generation_info or {}),
                                     **message.response_metadata}
        return message
    return await model.ainvoke(messages, config=_INNER_CONFIG, stop=stop, **kwargs)  # type: ignore[no-any-return]


def _billed(message: AIMessage | None, n_in: int, *, partial: bool) -> tuple[Usage | None, bool]:
    """The tokens an answer is billed for, and whether they are estimated.

    The provider's count when it sent one; for an answer without usage (or with all
    zeros) the estimate: `n_in` input tokens and the answer's own size in output tokens.
    A `partial` answer (cut short) may carry only the counts sent before its end (Gemini's
    prompt count, Anthropic's message_start): its output is at least what arrived.
    """
    if message is None:
        return None, False
    reported = Usage.from_message(message)
    if reported is not None and reported.total_tokens > 0 and not partial:
        return reported, False
    out = max(estimate_tokens([message]) - 4, 1)
    if reported is None or reported.total_tokens == 0:
        return Usage(input_tokens=n_in, output_tokens=out, requests=1), True
    if reported.output_tokens >= out and reported.input_tokens > 0:
        return reported, False
    return Usage(input_tokens=reported.input_tokens or n_in,
                 output_tokens=max(reported.output_tokens, out),
                 cache_read_tokens=reported.cache_read_tokens,
                 cache_write_tokens=reported.cache_write_tokens, requests=1), True


def _prompt_text(messages: Sequence[BaseMessage], limit: int = 4000) -> str:
    """The text a router reads: the last human message (or the last message)."""
    from langchain_core.messages import HumanMessage

    for m in reversed(messages):
        if isinstance(m, HumanMessage):
            return str(m.content)[:limit]
    return str(messages[-1].content)[:limit] if messages else ""


def _short(error: BaseException, limit: int = 300) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:limit]


async def _with_timeout_iter(it: AsyncIterator[Any], timeout: float | None) -> AsyncIterator[Any]:
    """Iterate with a per-chunk timeout: a stream that stalls counts as a timeout."""
    ait = it.__aiter__()
    try:
        while True:
            try:
                if timeout is None:
                    item = await ait.__anext__()
                else:
                    item = await asyncio.wait_for(ait.__anext__(), timeout)
            except StopAsyncIteration:
                return
            yield item
    finally:
        aclose = getattr(ait, "aclose", None)
        if aclose is not None:
            await aclose()


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
