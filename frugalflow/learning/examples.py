"""What routers learn from: `Example`, one outcome, and which logged calls count as a success."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from ..exceptions import ErrorClass, UserError
from ..statuses import Outcome

__all__ = ["Example", "LoggedCall", "examples_from", "success_of", "tags_for"]


@dataclass(frozen=True, slots=True)
class Example:
    """One logged outcome: `model` was given `text` (at `node`) and succeeded or not."""

    node: str | None
    text: str
    model: str
    success: bool
    category: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise UserError(f"Example.weight must be a finite number >= 0, got {self.weight!r}")


def tags_for(node: str | None, category: str | None) -> str | None:
    """The featurizers' category string for an input: `node:<n>|cat:<c>` (parts optional)."""
    parts = []
    if node:
        parts.append(f"node:{node}")
    if category:
        parts.append(f"cat:{category}")
    return "|".join(parts) or None


class LoggedCall(Protocol):
    """One model call as the ledger keeps it (`Ledger.outcomes` gives these)."""

    @property
    def node(self) -> str | None: ...
    @property
    def text(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def category(self) -> str | None: ...
    @property
    def outcome(self) -> Outcome: ...
    @property
    def error_class(self) -> ErrorClass | None: ...
    @property
    def feedback(self) -> bool | None: ...


# Failures that judge the answer itself: the node's validator rejected it, or it was not
# parseable or failed its schema. Other failures (rate limits, timeouts, outages, context
# length...) say nothing about what the model can do with this input.
_ANSWER_FAILURES = frozenset({ErrorClass.VALIDATION, ErrorClass.MALFORMED})


def success_of(call: LoggedCall) -> bool | None:
    """Whether `call` shows its model succeeding on its input; None: it shows nothing.

    An answer is a success unless explicit feedback says it was bad; a rejected or
    malformed answer is a failure; every other call (transport failures, calls still
    pending, replays) is left out.
    """
    if call.outcome == Outcome.OK:
        return call.feedback is not False
    if call.error_class in _ANSWER_FAILURES:
        return False
    return None


def examples_from(calls: Iterable[LoggedCall]) -> list[Example]:
    """The training examples among logged calls (see `success_of`), in their order."""
    out = []
    for call in calls:
        success = success_of(call)
        if success is not None:
            out.append(Example(node=call.node, text=call.text, model=call.model,
                               success=success, category=call.category))
    return out
