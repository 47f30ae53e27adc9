"""Scorers: what decides whether a model's output for a case passes (the node's validator, a
reference answer, a judge, any callable, or a pydantic-evals evaluator).

Every scorer follows `cases.Scorer`: a `name` and `async score(case, output) -> Score`. A
scorer that raises fails one cell, not the evaluation: `safe_score` turns the exception into
a one-line, scrubbed reason the executor records. pydantic-evals evaluators (EqualsExpected,
Contains, IsInstance, LLMJudge, your own `Evaluator` subclasses) run as they would in
`Dataset.evaluate`, on a context built from the case and the output.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import json
import math
import re
import string
import sys
import typing
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, messages_from_dict
from pydantic import BaseModel, ValidationError

from ..exceptions import short_error
from ..validation import rejection
from ..exceptions import UserError
from ..persistence.scrub import scrub
from .cases import EvalCase, Request, Score, Scorer

if TYPE_CHECKING:
    from pydantic_evals.evaluators import Evaluator

    from ..validation import Validator
    from ..catalog import Catalog, ModelSpec
    from ..judge import Judge
    from ..routed import RoutedChatModel, RunContext

__all__ = [
    "SPEC_FORMS",
    "CallableScorer",
    "EvaluatorScorer",
    "JudgeScorer",
    "ReferenceScorer",
    "ValidatorScorer",
    "output_value",
    "safe_score",
    "scorer_from_spec",
]

ScoreResult = bool | float | Score | str
"""What a scoring function returns: pass/fail, a value (passes at >= the threshold), a
Score, or a string: the reason it fails."""
ScoreFn = Callable[[EvalCase, Any], ScoreResult | Awaitable[ScoreResult]]
Mode = Literal["exact", "normalized", "numeric"]

SPEC_FORMS = ("validator", "exact", "normalized", "numeric", "numeric:<tolerance>",
              "fields:<a>,<b>", "judge", "judge:<criteria>", "module:callable",
              "path/to/file.py:callable")
"""What `scorer_from_spec` accepts."""

_MISSING = object()
_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_ENDS = string.punctuation + " \u00a0\u2018\u2019\u201c\u201d\u2026\u00bf\u00a1"


# -- what is compared ----------------------------------------------------------------------


def output_value(output: Any, request: Request | None = None) -> Any:
    """What scorers compare: an AIMessage's parsed structured output (the arguments of the
    response schema's tool call, when `request` has a schema), else its tool calls
    ([{"name", "args"}]), else its text; a pydantic model's fields; anything else (a
    node's state update, a flow's final state) as it is."""
    if isinstance(output, AIMessage):
        calls = output.tool_calls
        if request is not None and request.schema is not None and calls:
            title = request.schema.get("title")
            chosen = next((c for c in calls if c["name"] == title), calls[0])
            return chosen["args"]
        if calls:
            return [{"name": c["name"], "args": c["args"]} for c in calls]
        return output.text
    if isinstance(output, BaseModel):
        return output.model_dump()
    return output


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- the node's validator, and judges -------------------------------------------------------


class ValidatorScorer:
    """The node's own validator, called as production calls it (`validation.rejection`): a
    callable (True/None accept; False, a reason or raising reject), a pydantic model the
    answer must fit, or a `Judge`. A judge needs models: give `context` (a RunContext, whose
    spend and budget its calls count in) or a catalog; default: `Catalog.default()`."""

    def __init__(self, validator: Validator, *, name: str = "validator",
                 context: RunContext | Catalog | None = None,
                 schema: type[BaseModel] | None = None) -> None:
        self.validator, self.name = validator, name
        self._context = context
        self.schema = schema if schema is not None else _subject_model(validator)
        """The pydantic model a replayed structured output is parsed into before the
        validator sees it, as production parsed it: given, or the validator's annotation."""

    def context(self) -> RunContext:
        """The run context a judge's calls are made in (built once)."""
        from ..catalog import Catalog
        from ..routed import RunContext

        if not isinstance(self._context, RunContext):
            self._context = RunContext(catalog=self._context or Catalog.default())
        return self._context

    async def score(self, case: EvalCase, output: Any) -> Score:
        from ..validation import ModelJudge

        message = output if isinstance(output, AIMessage) else None
        parsed = (output_value(output, case.request) if message is None or (
            case.request is not None and case.request.schema is not None) else None)
        if isinstance(parsed, Mapping) and self.schema is not None:
            try:
                parsed = self.schema.model_validate(parsed)
            except ValidationError as e:  # production calls this a malformed answer
                return Score(passed=False, value=0.0, reason=f"the output fails schema "
                             f"{self.schema.__name__}: {short_error(e)}")
        routed: RoutedChatModel | None = None
        spec: ModelSpec | None = None
        if isinstance(self.validator, ModelJudge):
            routed, spec = _judging(self.context(), output)
        reason = await rejection(routed, self.validator, spec, message, parsed,
                                 _prompt(case))
        return Score(passed=reason is None, value=1.0 if reason is None else 0.0,
                     reason=reason)


def _subject_model(validator: Any) -> type[BaseModel] | None:
    """The pydantic model a validator function annotates its answer with, if any: a
    recorded structured output is JSON, which production had parsed into that model."""
    if isinstance(validator, type) or not callable(validator):
        return None
    try:
        first = next(iter(inspect.signature(validator).parameters.values()), None)
        hints = typing.get_type_hints(validator) if first is not None else {}
    except Exception:  # unresolvable annotations: the validator gets the JSON
        return None
    hint = hints.get(first.name) if first is not None else None
    return hint if isinstance(hint, type) and issubclass(hint, BaseModel) else None


class JudgeScorer(ValidatorScorer):
    """Asks a `Judge` (another routed model, never the one judged when it is known) whether
    the output meets its criteria; its calls are routed and priced like any other."""

    def __init__(self, judge: Judge, *, name: str = "judge",
                 context: RunContext | Catalog | None = None) -> None:
        # (a Judge is a ModelJudge by registration, which mypy does not see)
        super().__init__(cast("Validator", judge), name=name, context=context)
        self.judge = judge


def _judging(ctx: RunContext, output: Any) -> tuple[RoutedChatModel, ModelSpec]:
    """The routed model a judge is asked from, and the judged model (excluded from judging
    itself): the catalog's model that answered, when the output says which."""
    from ..catalog import ModelSpec
    from ..routed import RoutedChatModel

    meta = getattr(output, "response_metadata", None) or {}
    key = (meta.get("frugalflow") or {}).get("model") if isinstance(meta, Mapping) else None
    spec = ctx.catalog[key] if isinstance(key, str) and key in ctx.catalog else None
    if spec is None:
        spec = ModelSpec(provider="evaluated", model="answer")
    return RoutedChatModel(context=ctx, node="eval"), spec


def _prompt(case: EvalCase) -> list[BaseMessage]:
    """What a judge reads as the input: the recorded request's messages, or the inputs."""
    if case.request is not None:
        return list(messages_from_dict(case.request.messages))
    return [HumanMessage(json.dumps(dict(case.inputs), default=str, ensure_ascii=False))]


# -- a reference answer ----------------------------------------------------------------------


class ReferenceScorer:
    """Compares the output with the case's `expected` answer.

    `exact`: equal; `normalized`: equal after casefolding, trimming, collapsing whitespace and
    stripping punctuation at the ends; `numeric`: the first number in each, equal within
    `tolerance` (absolute or relative). A structured output (a mapping) is compared per
    field: the expected mapping's fields, or `fields`; the value is the share of fields
    that match, and it passes when all do. A case without `expected` raises (that cell is
    recorded as an error)."""

    def __init__(self, mode: Mode = "exact", tolerance: float = 1e-6,
                 fields: Sequence[str] | None = None) -> None:
        if mode not in ("exact", "normalized", "numeric"):
            raise UserError(f"reference mode {mode!r}: use exact, normalized or numeric")
        if not (tolerance >= 0 and math.isfinite(tolerance)):
            raise UserError(f"numeric tolerance must be a number >= 0, got {tolerance!r}")
        self.mode, self.tolerance = mode, tolerance
        self.fields = tuple(fields) if fields else None
        self.name = f"{mode}[{','.join(self.fields)}]" if self.fields else mode

    async def score(self, case: EvalCase, output: Any) -> Score:
        if case.expected is None:
            raise ValueError(f"case {case.id!r} has no expected answer, which the {self.name} "
                             "scorer compares with; add one, or choose another scorer")
        pairs = self._pairs(case.expected, output_value(output, case.request))
        first: str | None = None
        matched = 0
        for field, expected, actual in pairs:
            why = self._mismatch(expected, actual)
            if why is None:
                matched += 1
            elif first is None:
                first = f"field {field!r}: {why}" if field is not None else why
        return Score(passed=matched == len(pairs), value=matched / len(pairs), reason=first)

    def _pairs(self, expected: Any, actual: Any) -> list[tuple[str | None, Any, Any]]:
        """(field, expected, actual) to compare: per field for structured answers."""
        actual = actual.model_dump() if isinstance(actual, BaseModel) else actual
        if self.fields:
            if not isinstance(expected, Mapping) and len(self.fields) > 1:
                raise ValueError(f"the expected answer {_short(expected)} has no fields "
                                 f"{', '.join(self.fields)}; give it as an object")
            return [(f, _field(expected, f) if isinstance(expected, Mapping) else expected,
                     _field(actual, f)) for f in self.fields]
        if isinstance(expected, Mapping) and expected:
            return [(str(f), v, _field(actual, str(f))) for f, v in expected.items()]
        if isinstance(actual, Mapping) and len(actual) == 1 and not isinstance(expected,
                                                                              Mapping):
            ((field, value),) = actual.items()  # a one-field update holds the answer
            return [(str(field), expected, value)]
        return [(None, expected, actual)]

    def _mismatch(self, expected: Any, actual: Any) -> str | None:
        """Why `actual` does not match `expected`, or None when it does."""
        if expected is _MISSING:
            raise ValueError("the expected answer lacks a field the scorer compares")
        if actual is _MISSING:
            return "missing from the output"
        if self.mode == "numeric":
            want, got = _first_number(expected), _first_number(actual)
            if want is None:
                raise ValueError(f"the expected answer {_short(expected)} holds no number")
            if got is None:
                return f"no number in the output {_short(actual)}"
            if math.isclose(got, want, rel_tol=self.tolerance, abs_tol=self.tolerance):
                return None
            return f"expected {want:g} (within {self.tolerance:g}), got {got:g}"
        if self.mode == "normalized":
            if _normalized(expected) == _normalized(actual):
                return None
        elif expected == actual:
            return None
        return f"expected {_short(expected)}, got {_short(actual)}"


def _field(value: Any, path: str) -> Any:
    """`value[path]`, a dotted path into nested mappings (`_MISSING` when absent)."""
    for part in path.split("."):
        if isinstance(value, BaseModel):
            value = value.model_dump()
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _normalized(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _normalized(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_normalized(v) for v in value]
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return " ".join(text.casefold().split()).strip(_ENDS)


def _first_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)):
        return float(value)
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    for match in _NUMBER.finditer(text):
        token = match.group().replace(",", "")
        try:
            return float(token)
        except ValueError:  # "1,2,": commas that were not thousands separators
            continue
    return None


# -- any function ----------------------------------------------------------------------------


class CallableScorer:
    """Any function (sync or async) `(case, output) -> bool | float | Score | str`: True or
    False; a value, passing at >= `threshold`; a Score; or a string, the reason it fails."""

    def __init__(self, fn: ScoreFn, name: str | None = None, threshold: float = 0.5) -> None:
        self.fn, self.threshold = fn, threshold
        self.name = name or getattr(fn, "__name__", None) or type(fn).__name__

    async def score(self, case: EvalCase, output: Any) -> Score:
        result: object = self.fn(case, output)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, Score):
            return result
        if isinstance(result, bool):
            return Score(passed=result, value=float(result))
        if isinstance(result, (int, float)):
            return Score(passed=result >= self.threshold, value=float(result))
        if isinstance(result, str):
            return Score(passed=False, value=0.0, reason=result)
        raise TypeError(f"scorer {self.name} returned {_short(result)}; return True/False, a "
                        "number, a Score or a reason string")


# -- pydantic-evals evaluators ---------------------------------------------------------------


class EvaluatorScorer:
    """A pydantic-evals `Evaluator` run on an `EvaluatorContext` built from the case (name,
    inputs, metadata, expected output) and the output (`output_value`). Its result decides:
    a bool passes or fails; a number passes at >= `threshold`; an `EvaluationReason` carries
    its reason; a mapping of results passes when all pass. A label (a string) or no result
    at all (EqualsExpected without an expected output) is not a verdict: it raises."""

    def __init__(self, evaluator: Evaluator[Any, Any, Any], threshold: float = 0.5) -> None:
        self.evaluator, self.threshold = evaluator, threshold
        self.name = evaluator.get_default_evaluation_name()

    async def score(self, case: EvalCase, output: Any) -> Score:
        from pydantic_evals.evaluators import EvaluationReason, EvaluatorContext
        from pydantic_evals.otel import SpanTreeRecordingError

        meta = getattr(output, "response_metadata", None) or {}
        latency = (meta.get("frugalflow") or {}).get("latency_ms", 0.0) \
            if isinstance(meta, Mapping) else 0.0
        ctx: EvaluatorContext[Any, Any, Any] = EvaluatorContext(
            name=case.id, inputs=_inputs(case), metadata=dict(case.metadata) or None,
            expected_output=case.expected, output=output_value(output, case.request),
            duration=float(latency or 0.0) / 1000,
            _span_tree=SpanTreeRecordingError("frugalflow evaluations record no spans"),
            attributes={}, metrics={})
        raw = await self.evaluator.evaluate_async(ctx)
        results = raw if isinstance(raw, Mapping) else {self.name: raw}
        if not results:
            raise ValueError(f"evaluator {self.name} gave no result for case {case.id!r} "
                             "(EqualsExpected gives none without an expected output)")
        passed: list[bool] = []
        values: list[float] = []
        first: str | None = None
        for label, result in results.items():
            value, reason = ((result.value, result.reason)
                             if isinstance(result, EvaluationReason) else (result, None))
            if isinstance(value, str) or not isinstance(value, (bool, int, float)):
                raise ValueError(f"evaluator {self.name} returned the label {_short(value)} "
                                 f"for {label!r}, not a verdict; use an evaluator that "
                                 "returns a bool or a score")
            ok = bool(value) if isinstance(value, bool) else value >= self.threshold
            passed.append(ok)
            values.append(float(value))
            if not ok and first is None:
                first = f"{label}: {reason or _short(value)}"
        return Score(passed=all(passed), value=sum(values) / len(values), reason=first)


def _inputs(case: EvalCase) -> dict[str, Any]:
    """A case's inputs; a replayed call's are its recorded messages."""
    if not case.inputs and case.request is not None:
        return {"messages": case.request.messages}
    return dict(case.inputs)


# -- from the command line -------------------------------------------------------------------


def scorer_from_spec(spec: str, *, validator: Validator | None = None,
                     judge: Judge | None = None) -> Scorer:
    """The scorer a CLI option names: "validator" (the node's), "exact", "normalized",
    "numeric" or "numeric:0.01", "fields:a,b" (exact, per field), "judge" (the given one) or
    "judge:<criteria>", or "module:attr" / "path/file.py:attr": a function, a Scorer (or its
    class), or a pydantic-evals Evaluator (or its class). UserError for anything else."""
    text = spec.strip()
    kind, _, arg = text.partition(":")
    accepted = f"; accepted: {', '.join(SPEC_FORMS)}"
    if text == "validator":
        if validator is None:
            raise UserError("scorer 'validator': the node has no validator; give it one "
                            f"(add_node(..., validator=...)) or choose another scorer{accepted}")
        return ValidatorScorer(validator)
    if text in ("exact", "normalized", "numeric"):
        return ReferenceScorer(cast(Mode, text))
    if kind == "numeric":
        try:
            return ReferenceScorer("numeric", tolerance=float(arg))
        except (ValueError, UserError):
            raise UserError(f"scorer {spec!r}: the tolerance must be a number >= 0, e.g. "
                            "numeric:0.01") from None
    if kind == "fields":
        fields = [f.strip() for f in arg.split(",") if f.strip()]
        if not fields:
            raise UserError(f"scorer {spec!r} names no fields; e.g. fields:label,priority")
        return ReferenceScorer("exact", fields=fields)
    if text == "judge":
        if judge is None:
            raise UserError("scorer 'judge': no judge given; write judge:<criteria>, e.g. "
                            f"'judge:the reply answers the question'{accepted}")
        return JudgeScorer(judge)
    if kind == "judge" and arg.strip():
        from ..judge import Judge

        return JudgeScorer(Judge(arg))
    if arg and kind:
        return _imported_scorer(text, kind, arg)
    raise UserError(f"unknown scorer {spec!r}{accepted}")


def _imported_scorer(spec: str, where: str, attr: str) -> Scorer:
    target = _import(spec, where, attr)
    try:
        from pydantic_evals.evaluators import Evaluator
    except ImportError:  # pragma: no cover - pydantic-evals is a dependency of evaluations
        Evaluator = None  # type: ignore[assignment,misc]  # noqa: N806
    if isinstance(target, type):
        if (Evaluator is not None and issubclass(target, Evaluator)) or _is_scorer(target):
            try:
                target = target()
            except TypeError as e:
                raise UserError(f"scorer {spec!r}: {target.__name__}() needs arguments ({e}); "
                                "name an instance instead") from None
    if Evaluator is not None and isinstance(target, Evaluator):
        return EvaluatorScorer(target)
    if _is_scorer(target):
        return cast(Scorer, target)
    if callable(target):
        return CallableScorer(cast(ScoreFn, target), name=attr)
    raise UserError(f"scorer {spec!r} is a {type(target).__name__}: name a function "
                    "(case, output) -> bool | float | Score | str, a Scorer or a "
                    "pydantic-evals Evaluator")


def _is_scorer(obj: Any) -> bool:
    return inspect.iscoroutinefunction(getattr(obj, "score", None)) and hasattr(obj, "name")


def _import(spec: str, where: str, attr: str) -> Any:
    """`attr` (dotted) of the module named `where` (or of the file `where` ends in .py)."""
    if str(Path.cwd()) not in sys.path:  # as the CLI loads flows: modules next to the user
        sys.path.insert(0, str(Path.cwd()))
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.exists():
                raise UserError(f"scorer {spec!r}: {path} does not exist")
            loader = importlib.util.spec_from_file_location(f"_frugalflow_scorer_{path.stem}",
                                                            path)
            if loader is None or loader.loader is None:
                raise UserError(f"scorer {spec!r}: {path} cannot be imported")
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except ImportError as e:
        raise UserError(f"scorer {spec!r}: cannot import {where!r} ({e}); name a module on "
                        "the path or a .py file, then :callable") from None
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise UserError(f"scorer {spec!r}: {where} has no {attr!r}")
        target = getattr(target, part)
    return target


# -- scoring without stopping the evaluation -------------------------------------------------


async def safe_score(scorer: Scorer, case: EvalCase, output: Any) -> Score | str:
    """The scorer's Score (its reason scrubbed of secrets), or, when it raised or returned
    something else, a one-line reason (the exception's class and message, scrubbed): the
    executor records that cell as an error and goes on."""
    try:
        score = await scorer.score(case, output)
    except asyncio.CancelledError:
        raise
    except Exception as e:  # a scorer's bug is one cell's error, not the evaluation's
        message = str(e).strip().splitlines()[0] if str(e).strip() else ""
        text = f"{type(e).__name__}: {message}" if message else type(e).__name__
        return str(scrub(f"scorer {getattr(scorer, 'name', '?')}: {text}"))[:500]
    if not isinstance(score, Score):
        return f"scorer {getattr(scorer, 'name', '?')} returned {type(score).__name__}, not a Score"
    if score.reason:
        return Score(passed=score.passed, value=score.value, reason=str(scrub(score.reason)))
    return score
