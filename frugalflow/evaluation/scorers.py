"""Scorers: what decides whether a model's output for a case passes (the node's validator, a
reference answer, a judge, any callable, or a pydantic-evals evaluator)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .cases import EvalCase, Score, Scorer

if TYPE_CHECKING:
    from pydantic_evals.evaluators import Evaluator

    from ..attempts import Validator
    from ..judge import Judge

__all__ = [
    "CallableScorer",
    "EvaluatorScorer",
    "JudgeScorer",
    "ReferenceScorer",
    "ValidatorScorer",
    "output_value",
    "safe_score",
    "scorer_from_spec",
]

ScoreFn = Callable[[EvalCase, Any], "bool | float | Score | str | Awaitable[bool | float | Score | str]"]


def output_value(output: Any) -> Any:
    """What scorers compare: an AIMessage's structured output, tool calls or text; else itself."""
    raise NotImplementedError


class ValidatorScorer:
    """The node's own validator, as production runs it."""

    def __init__(self, validator: Validator, name: str = "validator") -> None:
        self.validator, self.name = validator, name

    async def score(self, case: EvalCase, output: Any) -> Score:
        raise NotImplementedError


class ReferenceScorer:
    """Compares the output with the case's expected answer."""

    def __init__(self, mode: Literal["exact", "normalized", "numeric"] = "exact",
                 tolerance: float = 1e-6, fields: Sequence[str] | None = None) -> None:
        self.mode, self.tolerance, self.fields = mode, tolerance, fields
        self.name = mode

    async def score(self, case: EvalCase, output: Any) -> Score:
        raise NotImplementedError


class JudgeScorer:
    """Asks a `Judge` (another model) whether the output meets its criteria."""

    def __init__(self, judge: Judge, name: str = "judge") -> None:
        self.judge, self.name = judge, name

    async def score(self, case: EvalCase, output: Any) -> Score:
        raise NotImplementedError


class CallableScorer:
    """Any function (sync or async) `(case, output) -> bool | float | Score | str`."""

    def __init__(self, fn: ScoreFn, name: str | None = None) -> None:
        self.fn = fn
        self.name = name or getattr(fn, "__name__", "callable")

    async def score(self, case: EvalCase, output: Any) -> Score:
        raise NotImplementedError


class EvaluatorScorer:
    """A pydantic-evals `Evaluator`, given a context built from the case and the output."""

    def __init__(self, evaluator: Evaluator[Any, Any, Any], threshold: float = 0.5) -> None:
        self.evaluator, self.threshold = evaluator, threshold
        self.name = type(evaluator).__name__

    async def score(self, case: EvalCase, output: Any) -> Score:
        raise NotImplementedError


def scorer_from_spec(spec: str, *, validator: Validator | None = None,
                     judge: Judge | None = None) -> Scorer:
    """The scorer a CLI spec names ("validator", "exact", "numeric:0.01", "module:fn", ...)."""
    raise NotImplementedError


async def safe_score(scorer: Scorer, case: EvalCase, output: Any) -> Score | str:
    """The scorer's Score, or a one-line, scrubbed reason when it raised."""
    raise NotImplementedError
