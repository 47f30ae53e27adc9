"""What an evaluation is made of: cases, the scores a scorer gives, and the cells it fills.

A *case* is one input of a node (or of a whole flow), with the answer expected of it when
one is known. A *scorer* says whether a model's output for a case passes. A *cell* is one
case answered by one model (one repeat): the unit an evaluation pays for exactly once and
records as it arrives (`ff_eval_cells`), so a killed evaluation resumes where it stopped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

__all__ = ["Cell", "CellOutcome", "EvalCase", "Request", "Score", "Scorer"]


@dataclass(frozen=True, slots=True)
class Request:
    """A recorded production call, replayed as it was: messages (LangChain dicts), the tools
    and the response schema it was bound to (OpenAI tool/JSON-schema dicts)."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=list)
    schema: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class EvalCase:
    """One input to evaluate on.

    `inputs` is the node's (or flow's) input state; a case drawn from the ledger carries the
    recorded `request` instead, and as `expected` the answer production accepted.
    """

    id: str
    inputs: Mapping[str, Any] = field(default_factory=dict)
    expected: Any = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    request: Request | None = None


@dataclass(frozen=True, slots=True)
class Score:
    """A scorer's verdict on one output: passed or not, an optional graded value, why."""

    passed: bool
    value: float | None = None
    reason: str | None = None


@runtime_checkable
class Scorer(Protocol):
    """Decides whether `output` (a node's state update, a flow's final state, or a replayed
    call's answer) passes for `case`. Raising is recorded against that case, not fatal."""

    name: str

    async def score(self, case: EvalCase, output: Any) -> Score: ...


class CellOutcome(StrEnum):
    """What one cell came to (the stored value)."""

    PASS = "pass"
    FAIL = "fail"  # answered; the scorer rejected the answer
    ERROR = "error"  # no answer (no key, outage, budget), or the scorer raised: no score


@dataclass(frozen=True, slots=True)
class Cell:
    """One case answered by one model, one repeat: the evaluation's unit of cost and record."""

    case_id: str
    model: str
    repeat: int
    outcome: CellOutcome
    node: str | None = None
    score: float | None = None
    reason: str | None = None
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    output: Any = None

    @property
    def passed(self) -> bool:
        return self.outcome == CellOutcome.PASS

    @property
    def scored(self) -> bool:
        """Answered and scored (counts towards n of a pass rate; errors count apart)."""
        return self.outcome != CellOutcome.ERROR
