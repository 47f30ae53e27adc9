"""Scorers: the node's validator, reference answers, judges, any callable and pydantic-evals
evaluators; and a scorer that raises fails one cell with a clean, scrubbed reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, messages_to_dict
from pydantic import BaseModel
from pydantic_evals.evaluators import (
    Contains,
    EqualsExpected,
    EvaluationReason,
    Evaluator,
    EvaluatorContext,
    IsInstance,
)

from frugalflow import Catalog, Judge, UserError
from frugalflow.evaluation.cases import EvalCase, Request, Score, Scorer
from frugalflow.evaluation.scorers import (
    CallableScorer,
    EvaluatorScorer,
    JudgeScorer,
    ReferenceScorer,
    ValidatorScorer,
    output_value,
    safe_score,
    scorer_from_spec,
)

SCHEMA = {"title": "Label", "type": "object", "properties": {"label": {"type": "string"}}}


def case(expected: Any = None, **kw: Any) -> EvalCase:
    return EvalCase("c1", kw.pop("inputs", {"ticket": "t"}), expected, **kw)


def tool_message(*calls: tuple[str, dict[str, Any]], content: str = "") -> AIMessage:
    return AIMessage(content=content, tool_calls=[
        {"name": n, "args": a, "id": f"id{i}", "type": "tool_call"}
        for i, (n, a) in enumerate(calls)])


# -- what is compared -----------------------------------------------------------------------


def test_output_value_reads_messages_models_and_states() -> None:
    msg = tool_message(("other", {"x": 1}), ("Label", {"label": "billing"}))
    assert output_value(msg, Request(messages=[], schema=SCHEMA)) == {"label": "billing"}
    assert output_value(msg) == [{"name": "other", "args": {"x": 1}},
                                 {"name": "Label", "args": {"label": "billing"}}]
    assert output_value(AIMessage(content=[{"type": "text", "text": "hello"}])) == "hello"

    class Out(BaseModel):
        label: str

    assert output_value(Out(label="x")) == {"label": "x"}
    state = {"label": "x", "n": 2}
    assert output_value(state) is state


# -- reference answers ----------------------------------------------------------------------


async def test_exact_normalized_and_numeric_comparisons() -> None:
    exact, norm, num = ReferenceScorer("exact"), ReferenceScorer("normalized"), \
        ReferenceScorer("numeric", tolerance=0.01)
    assert (await exact.score(case("Billing"), AIMessage(content="Billing"))).passed
    failed = await exact.score(case("Billing"), AIMessage(content="billing."))
    assert not failed.passed and failed.value == 0.0
    assert failed.reason == "expected 'Billing', got 'billing.'"
    assert (await norm.score(case("  Billing "), AIMessage(content="billing.\n"))).passed
    assert (await norm.score(case("the  New   York"), "The new york!")).passed
    assert not (await norm.score(case("new york"), "newyork")).passed
    assert (await num.score(case("42"), "The answer is 42.004, I think")).passed
    assert (await num.score(case(1000), "about 1,015")).passed is False
    assert (await ReferenceScorer("numeric", tolerance=0.01).score(
        case(1000), "about 1,009")).passed  # 0.9% off: within 1% relative
    missing = await num.score(case(3), "three")
    assert not missing.passed and missing.reason == "no number in the output 'three'"


async def test_structured_outputs_are_compared_per_field() -> None:
    scorer = ReferenceScorer("exact")
    expected = {"label": "billing", "priority": 2, "urgent": True}
    half = await scorer.score(case(expected), {"label": "billing", "priority": 3,
                                               "urgent": False, "extra": 1})
    assert not half.passed and half.value == pytest.approx(1 / 3)
    assert half.reason == "field 'priority': expected 2, got 3"
    assert (await scorer.score(case(expected), dict(expected, extra="ignored"))).passed
    gone = await scorer.score(case({"label": "x"}), {"other": 1})
    assert gone.reason == "field 'label': missing from the output"
    # chosen fields only, read from a replayed call's structured output
    only = ReferenceScorer("normalized", fields=["label"])
    request = Request(messages=[], schema=SCHEMA)
    answer = tool_message(("Label", {"label": "Billing!", "priority": 9}))
    assert (await only.score(case({"label": "billing", "priority": 1}, request=request),
                             answer)).passed
    assert (await only.score(case("billing"), {"label": "BILLING"})).passed
    # a scalar expected answer against a node's one-field update
    assert (await scorer.score(case("billing"), {"label": "billing"})).passed
    nested = ReferenceScorer("exact", fields=["a.b"])
    assert (await nested.score(case({"a": {"b": 1}}), {"a": {"b": 1, "c": 2}})).passed


async def test_a_case_without_expected_answer_is_an_error_not_a_failure() -> None:
    result = await safe_score(ReferenceScorer("exact"), case(None), "x")
    assert result == ("scorer exact: ValueError: case 'c1' has no expected answer, which the "
                      "exact scorer compares with; add one, or choose another scorer")


def test_reference_scorer_refuses_bad_settings() -> None:
    with pytest.raises(UserError, match="use exact, normalized or numeric"):
        ReferenceScorer("fuzzy")  # type: ignore[arg-type]
    with pytest.raises(UserError, match="tolerance must be a number >= 0"):
        ReferenceScorer("numeric", tolerance=float("nan"))


# -- the node's validator -------------------------------------------------------------------


async def test_validator_scorer_calls_validators_as_production_does() -> None:
    def short(answer: Any) -> bool | str:
        return True if len(str(answer.content)) < 10 else "too long"

    async def has_label(parsed: Any) -> None:
        if "label" not in parsed:
            raise ValueError("no label field")

    class Label(BaseModel):
        label: str

    assert (await ValidatorScorer(short).score(case(), AIMessage(content="ok"))).passed
    long = await ValidatorScorer(short).score(case(), AIMessage(content="x" * 20))
    assert long == Score(passed=False, value=0.0, reason="too long")
    # a node's state update is what the validator checks when there is no message
    raised = await ValidatorScorer(has_label).score(case(), {"other": 1})
    assert not raised.passed and raised.reason == "no label field"
    request = Request(messages=[], schema=SCHEMA)
    model = ValidatorScorer(Label)
    assert (await model.score(case(request=request),
                              tool_message(("Label", {"label": "a"})))).passed
    bad = await model.score(case(request=request), tool_message(("Label", {"lbl": "a"})))
    assert bad == Score(False, 0.0, "1 validation error for Label")  # production's words
    assert (await model.score(case(), AIMessage(content='{"label": "x"}'))).passed


async def test_a_judge_scores_with_a_routed_model_of_the_catalog() -> None:
    invoice = ("Invoice INV-2041\nFrom: Acme GmbH\nCurrency: EUR\nSubtotal: 100.00\n"
               "Tax: 19.00\nTotal: 119.00")
    right = {"invoice_number": "INV-2041", "vendor": "Acme GmbH", "currency": "EUR",
             "subtotal": 100.0, "tax": 19.0, "total": 119.0}
    request = Request(messages=messages_to_dict([HumanMessage(invoice)]))
    scorer = JudgeScorer(Judge("the fields match the invoice"), context=Catalog.simulated())
    # (simulated judges err as often as their quality says; for this seed both are sound)
    ok = await scorer.score(case(request=request), right)
    wrong = await scorer.score(case(request=request), dict(right, total=120.0))
    assert ok.passed and not wrong.passed, (ok, wrong)
    assert wrong.reason is not None and wrong.reason.startswith("the judge rejected it")
    # the judge's calls were routed, priced and recorded in the scorer's run context
    attempts = scorer.context().usage.attempts
    assert len(attempts) == 2 and all(a.node == "eval:judge" for a in attempts)
    assert scorer.context().usage.spent_usd > 0
    # an answer that says which model wrote it is never judged by that model
    judge_model = attempts[0].model
    mine = AIMessage(content=json.dumps(right),
                     response_metadata={"frugalflow": {"model": judge_model}})
    await scorer.score(case(request=request), mine)
    assert scorer.context().usage.attempts[-1].model != judge_model


# -- any callable ---------------------------------------------------------------------------


async def test_callable_scorers_take_every_kind_of_result() -> None:
    async def graded(c: EvalCase, output: Any) -> float:
        return 0.7 if output == "ok" else 0.2

    assert (await CallableScorer(lambda c, o: o == "ok").score(case(), "ok")).passed
    assert (await CallableScorer(graded).score(case(), "ok")) == Score(True, 0.7)
    assert (await CallableScorer(graded, threshold=0.8).score(case(), "ok")).passed is False
    assert (await CallableScorer(lambda c, o: "wrong tone").score(case(), "x")) == \
        Score(False, 0.0, "wrong tone")
    given = Score(True, 0.9, "fine")
    assert (await CallableScorer(lambda c, o: given).score(case(), "x")) is given
    assert CallableScorer(graded).name == "graded"
    result = await safe_score(CallableScorer(lambda c, o: None, name="forgot"), case(), "x")
    assert result == ("scorer forgot: TypeError: scorer forgot returned None; return "
                      "True/False, a number, a Score or a reason string")


# -- pydantic-evals evaluators --------------------------------------------------------------


@dataclass
class FieldChecks(Evaluator[Any, Any, Any]):
    """A user's evaluator returning several named results."""

    def evaluate(self, ctx: EvaluatorContext[Any, Any, Any]) -> dict[str, Any]:
        return {"has_label": "label" in ctx.output,
                "confidence": EvaluationReason(value=ctx.output.get("confidence", 0.0),
                                               reason="low confidence"),
                "case_named": ctx.name == "c1" and ctx.inputs == {"ticket": "t"}}


async def test_pydantic_evals_evaluators_score_cases() -> None:
    equals = EvaluatorScorer(EqualsExpected())
    assert equals.name == "EqualsExpected"
    assert (await equals.score(case({"label": "a"}), {"label": "a"})).passed
    assert not (await equals.score(case({"label": "a"}), {"label": "b"})).passed
    contains = EvaluatorScorer(Contains(value="refund"))
    assert (await contains.score(case(), AIMessage(content="we will refund you"))).passed
    assert (await EvaluatorScorer(IsInstance(type_name="dict")).score(case(), {"a": 1})).passed
    checks = EvaluatorScorer(FieldChecks(), threshold=0.8)
    good = await checks.score(case(), {"label": "x", "confidence": 0.9})
    assert good.passed and good.value == pytest.approx((1 + 0.9 + 1) / 3)
    low = await checks.score(case(), {"label": "x", "confidence": 0.5})
    assert not low.passed and low.reason == "confidence: low confidence"


async def test_an_evaluator_without_a_verdict_is_an_error() -> None:
    none = await safe_score(EvaluatorScorer(EqualsExpected()), case(None), "x")
    assert isinstance(none, str) and "gave no result for case 'c1'" in none

    @dataclass
    class Labeller(Evaluator[Any, Any, Any]):
        def evaluate(self, ctx: EvaluatorContext[Any, Any, Any]) -> str:
            return "positive"

    label = await safe_score(EvaluatorScorer(Labeller()), case(), "x")
    assert isinstance(label, str) and "returned the label 'positive'" in label


# -- from the command line ------------------------------------------------------------------


def test_scorer_specs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def validator(answer: Any) -> bool:
        return True

    assert isinstance(scorer_from_spec("validator", validator=validator), ValidatorScorer)
    numeric = scorer_from_spec("numeric:0.05")
    assert isinstance(numeric, ReferenceScorer) and numeric.tolerance == 0.05
    assert scorer_from_spec("normalized").name == "normalized"
    fields = scorer_from_spec("fields:label, priority")
    assert isinstance(fields, ReferenceScorer) and fields.fields == ("label", "priority")
    judge = Judge("polite")
    assert isinstance(scorer_from_spec("judge", judge=judge), JudgeScorer)
    made = scorer_from_spec("judge:the answer is polite")
    assert isinstance(made, JudgeScorer) and made.judge.criteria == "the answer is polite"
    evaluator = scorer_from_spec("pydantic_evals.evaluators:EqualsExpected")  # a class
    assert isinstance(evaluator, EvaluatorScorer)
    (tmp_path / "my_scores.py").write_text(
        "from frugalflow.evaluation.cases import Score\n"
        "def short(case, output):\n    return len(str(output)) < 5\n"
        "class Mine:\n    name = 'mine'\n"
        "    async def score(self, case, output):\n        return Score(True)\n")
    monkeypatch.chdir(tmp_path)
    fn = scorer_from_spec("my_scores:short")
    assert isinstance(fn, CallableScorer) and fn.name == "short"
    mine = scorer_from_spec(f"{tmp_path / 'my_scores.py'}:Mine")
    assert isinstance(mine, Scorer) and mine.name == "mine"


@pytest.mark.parametrize(("spec", "expected"), [
    ("validator", r"the node has no validator"),
    ("judge", r"no judge given; write judge:<criteria>"),
    ("numeric:abc", r"the tolerance must be a number >= 0"),
    ("fields:", r"names no fields"),
    ("fuzzy", r"unknown scorer 'fuzzy'; accepted: validator, exact, normalized, numeric, "
              r"numeric:<tolerance>, fields:<a>,<b>, judge"),
    ("no_such_module_xyz:f", r"cannot import 'no_such_module_xyz'"),
    ("json:nothing_here", r"json has no 'nothing_here'"),
    ("json:__name__", r"is a str: name a function"),
    ("missing.py:f", r"missing\.py does not exist"),
])
def test_a_bad_scorer_spec_is_one_clear_error(spec: str, expected: str) -> None:
    with pytest.raises(UserError, match=expected):
        scorer_from_spec(spec)


# -- a scorer that raises -------------------------------------------------------------------


async def test_a_raising_scorer_gives_a_one_line_scrubbed_reason() -> None:
    class Broken:
        name = "broken"

        async def score(self, case: EvalCase, output: Any) -> Score:
            raise RuntimeError("upstream refused key sk-proj-abcdefghijklmnop1234567890\n"
                               "Traceback: lots of lines")

    result = await safe_score(Broken(), case(), "x")
    assert result == "scorer broken: RuntimeError: upstream refused key [redacted]"
    leaky = CallableScorer(lambda c, o: Score(False, 0.0, "Bearer abcdefghijklmnopqrstuvwxyz"))
    scored = await safe_score(leaky, case(), "x")
    assert isinstance(scored, Score) and scored.reason == "Bearer [redacted]"
    assert json.dumps(result)  # storable as is
