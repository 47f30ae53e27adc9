"""Token usage, one model call's record (`Attempt`), and a run's running total against its budget."""

from __future__ import annotations

import inspect
import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .statuses import ErrorClass, Outcome

if TYPE_CHECKING:
    from langchain_core.messages import AIMessage


__all__ = ["Attempt", "RunUsage", "Usage"]

log = logging.getLogger("frugalflow")


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one or more model calls. Add two to get their total."""

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    requests: int = 0
    reasoning_tokens: int = 0
    """Hidden reasoning (thinking) tokens, billed as output and counted in `output_tokens`."""

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cache_read_tokens + other.cache_read_tokens,
            self.cache_write_tokens + other.cache_write_tokens,
            self.requests + other.requests,
            self.reasoning_tokens + other.reasoning_tokens,
        )

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def from_message(cls, message: AIMessage) -> Usage | None:
        """The provider-reported usage on a LangChain message, or None when it reports none."""
        meta = getattr(message, "usage_metadata", None)
        if not meta:
            return None
        details = meta.get("input_token_details") or {}
        out_details = meta.get("output_token_details") or {}
        return cls(
            input_tokens=int(meta.get("input_tokens") or 0),
            output_tokens=int(meta.get("output_tokens") or 0),
            cache_read_tokens=int(details.get("cache_read") or 0),
            cache_write_tokens=int(details.get("cache_creation") or 0),
            requests=1,
            reasoning_tokens=int(out_details.get("reasoning") or 0),
        )


Listener = Callable[["Attempt"], Any]
"""Called with each attempt as it ends; may be a coroutine function (then awaited)."""



@dataclass
class Attempt:
    """One try of one model for one call: the event the ledger and the demo consume."""

    node: str
    model: str
    provider: str
    outcome: Outcome
    call_id: str = ""
    run_id: str | None = None
    task_id: str | None = None  # the LangGraph task (node execution) that made the call
    try_number: int = 1
    usage: Usage | None = None
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    error_class: ErrorClass | None = None
    error: str | None = None
    fallback_from: str | None = None
    action: str | None = None  # what followed a failure: retry, next, raise
    started_at: float = field(default_factory=time.time)
    call_key: str | None = None  # identifies the call for replay after a crash
    route_reason: str | None = None  # why the router put this model where it did
    prompt: str | None = None  # the input text routers learn from (persisted runs only)
    category: str | None = None  # the input's category, another feature routers learn from
    usage_estimated: bool = False  # the provider reported no (or partial) usage: tokens estimated
    response: Any = field(default=None, repr=False)  # the answer (an AIMessage), if ok
    # The request of an ok call, as JSON (messages, tools, response schema), so evaluations
    # can replay production traffic; persisted runs only (the ledger writes it).
    request: dict[str, Any] | None = field(default=None, repr=False)
    tier: str | None = None  # the service tier it was made and priced on (None: standard)
    batch_item_id: str | None = None  # a batch-tier answer's parked request (ff_batch_items)

    def describe(self) -> str:
        if self.outcome == Outcome.OK:
            return f"{self.model}: ok in {self.latency_ms:.0f} ms, ${self.cost_usd:.6f}"
        if self.outcome == Outcome.REPLAYED:
            return f"{self.model}: replayed from the ledger (not paid again)"
        return f"{self.model} ({self.provider}): {self.error_class}: {self.error}"

@dataclass
class RunUsage:
    """The attempts, spend and budget of one run, shared by every node of the run.

    Routed models record each attempt here; `budget_usd` (None: unlimited) is checked
    before every call. Listeners (the ledger, the demo's printer, the service's event
    stream) are called with each attempt as it ends.

    `usage`, `cost_by` and `recorded` count every attempt recorded here; `attempts` keeps
    them all, or only the latest `max_attempts` (the default context of a RoutedChatModel
    used outside a run keeps 1,000: a long-lived process stays flat).
    """

    budget_usd: float | None = None
    run_id: str | None = None
    spent_usd: float = 0.0
    attempts: list[Attempt] = field(default_factory=list)
    listeners: list[Listener] = field(default_factory=list)
    max_attempts: int | None = None
    """Keep only this many latest attempts in `attempts` (None: all of them)."""
    recorded: int = field(default=0, init=False)
    """Attempts recorded, including those no longer in the window."""
    _total: Usage = field(default_factory=Usage, init=False, repr=False)
    _costs: dict[str, dict[str, float]] = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts is not None and self.max_attempts < 0:
            raise ValueError(f"max_attempts must be >= 0 or None, got {self.max_attempts}")
        for a in list(self.attempts):  # given at construction: count them too
            self._aggregate(a)

    @property
    def remaining_usd(self) -> float | None:
        if self.budget_usd is None:
            return None
        return max(self.budget_usd - self.spent_usd, 0.0)

    def record(self, attempt: Attempt) -> None:
        """Record an attempt; coroutine listeners are not awaited here (use `arecord`)."""
        for pending in self._notify(attempt):
            pending.close()
            log.error("frugalflow: async listener %r called from record(); use arecord()",
                      pending)

    async def arecord(self, attempt: Attempt) -> None:
        """Record an attempt and await coroutine listeners (the ledger writes here)."""
        for pending in self._notify(attempt):
            try:
                await pending
            except Exception:  # a broken listener must not fail the model call it observes
                log.exception("frugalflow: attempt listener failed")

    def _notify(self, attempt: Attempt) -> list[Any]:
        """Add the attempt; call the listeners; return the coroutines they gave back."""
        self.attempts.append(attempt)
        if self.max_attempts is not None and len(self.attempts) > self.max_attempts:
            del self.attempts[: len(self.attempts) - self.max_attempts]
        self._aggregate(attempt)
        self.spent_usd += attempt.cost_usd
        pending = []
        for listener in self.listeners:
            try:
                result = listener(attempt)
            except Exception:  # a broken listener must not fail the model call it observes
                log.exception("frugalflow: attempt listener %r failed", listener)
                continue
            if inspect.isawaitable(result):
                pending.append(result)
        return pending

    def _aggregate(self, attempt: Attempt) -> None:
        self.recorded += 1
        if attempt.usage is not None:
            self._total = self._total + attempt.usage
        costs = self._costs
        for key in _GROUPS:
            group = costs.get(key)
            if group is None:  # not setdefault: that builds a defaultdict on every call
                group = costs[key] = defaultdict(float)
            group[getattr(attempt, key)] += attempt.cost_usd

    @property
    def usage(self) -> Usage:
        """Tokens of every attempt recorded here."""
        return self._total

    def cost_by(self, key: str) -> dict[str, float]:
        """Spend of every attempt recorded here, grouped by "node", "model" or "provider"."""
        if key in _GROUPS:
            return dict(self._costs.get(key, {}))
        out: dict[str, float] = defaultdict(float)  # another attribute: the window only
        for a in self.attempts:
            out[getattr(a, key)] += a.cost_usd
        return dict(out)


_GROUPS = ("node", "model", "provider")
