from __future__ import annotations

import pytest
from langchain_core.messages import HumanMessage
from pydantic import ValidationError

from frugalflow import Catalog, ModelSpec, Needs
from frugalflow.needs import estimate_tokens, unscored_reason
from frugalflow.ranking import explain, rank


def _cat(*specs: ModelSpec) -> Catalog:
    return Catalog(specs, name="t")


def _m(provider: str, model: str, inp: float, out: float, **kw: object) -> ModelSpec:
    kw.setdefault("capabilities", {"tool_calling": True, "structured_output": True})
    return ModelSpec(provider=provider, model=model, simulated=True, input_price=inp,
                     output_price=out, **kw)  # type: ignore[arg-type]


def test_ranked_by_expected_cost_of_this_call() -> None:
    # "a" is cheaper on input, "b" on output: the answer depends on the call's shape.
    cat = _cat(_m("sim-a", "in-cheap", 0.1, 10.0), _m("sim-b", "out-cheap", 5.0, 0.5))
    long_prompt = [HumanMessage("x" * 40_000)]  # ~10k input tokens
    r = rank(cat, Needs(expected_output_tokens=10), long_prompt)
    assert [c.spec.model for c in r.candidates] == ["in-cheap", "out-cheap"]
    r = rank(cat, Needs(expected_output_tokens=5_000), [HumanMessage("hi")])
    assert [c.spec.model for c in r.candidates] == ["out-cheap", "in-cheap"]
    c = r.candidates[0]
    assert c.expected_cost == pytest.approx((r.input_tokens * 5.0 + 5_000 * 0.5) / 1e6)


def test_ties_broken_by_quality_then_latency() -> None:
    cat = _cat(
        _m("sim-a", "weak", 1, 1, quality={"writing": 0.5}, latency_ms=10),
        _m("sim-b", "strong-slow", 1, 1, quality={"writing": 0.9}, latency_ms=900),
        _m("sim-c", "strong-fast", 1, 1, quality={"writing": 0.9}, latency_ms=100),
    )
    r = rank(cat, Needs(quality={"writing": 0.1}), [HumanMessage("hi")])
    assert [c.spec.model for c in r.candidates] == ["strong-fast", "strong-slow", "weak"]


def test_context_window_need_comes_from_the_messages() -> None:
    cat = _cat(_m("sim-a", "small", 0.1, 0.1, context_window=4_000),
               _m("sim-b", "large", 1, 1, context_window=200_000))
    short = rank(cat, Needs(), [HumanMessage("hello")])
    assert [c.spec.model for c in short.candidates] == ["small", "large"]
    long = rank(cat, Needs(max_output_tokens=1000), [HumanMessage("word " * 4_000)])
    assert [c.spec.model for c in long.candidates] == ["large"]
    (spec, reasons), = long.rejected
    assert spec.model == "small" and "context 4000 <" in reasons[0]


def test_hard_needs_filter_with_reasons() -> None:
    cat = _cat(
        _m("sim-a", "plain", 0.1, 0.1, capabilities={"tool_calling": False}),
        _m("sim-b", "tools", 1, 1, capabilities={"tool_calling": True, "vision": True}),
    )
    r = rank(cat, Needs(tools=True, vision=True), [HumanMessage("hi")])
    assert [c.spec.model for c in r.candidates] == ["tools"]
    assert r.rejected[0][1] == ["no tool calling", "no image input"]


def test_quality_minimum_and_unknown_scores() -> None:
    cat = _cat(_m("sim-a", "scored", 1, 1, quality={"math": 0.6}), _m("sim-b", "unscored", 0.1, 0.1))
    r = rank(cat, Needs(quality={"math": 0.5}))
    assert [c.spec.model for c in r.candidates] == ["scored"]
    assert r.rejected[0][1] == [unscored_reason("math")]
    assert r.rejected[0][1][0].startswith("unscored for math (rule: reject")
    r = rank(cat, Needs(quality={"math": 0.7}))
    assert not r.candidates
    assert "quality.math 0.60 < 0.7" in dict((s.model, x) for s, x in r.rejected)["scored"]


def test_provider_model_price_and_latency_caps() -> None:
    cat = _cat(_m("sim-a", "a", 0.1, 0.1, latency_ms=5000), _m("sim-b", "b", 50, 50),
               _m("sim-c", "c", 1, 1))
    msgs = [HumanMessage("hi")]
    assert [c.spec.model for c in rank(cat, Needs(providers=("sim-b",)), msgs).candidates] == ["b"]
    assert [c.spec.model for c in rank(cat, Needs(exclude_providers="sim-a"), msgs).candidates] == ["c", "b"]
    assert [c.spec.model for c in rank(cat, Needs(models=("sim-c/c",)), msgs).candidates] == ["c"]
    assert "b" not in [c.spec.model for c in rank(cat, Needs(max_cost_per_call=0.001), msgs).candidates]
    assert "a" not in [c.spec.model for c in rank(cat, Needs(max_latency_ms=1000), msgs).candidates]


def test_budget_left_rejects_expensive_candidates() -> None:
    cat = _cat(_m("sim-a", "cheap", 0.1, 0.1), _m("sim-b", "dear", 100, 100))
    r = rank(cat, Needs(), [HumanMessage("hi")], budget_left=0.001)
    assert [c.spec.model for c in r.candidates] == ["cheap"]
    assert "budget left" in r.rejected[0][1][0]


def test_same_open_weight_model_at_several_providers_cheapest_first() -> None:
    cat = Catalog.simulated()
    r = rank(cat, Needs(providers=("sim-groq", "sim-together")), [HumanMessage("hi")])
    keys = [c.spec.key for c in r.candidates]
    assert keys.index("sim-groq/llama-3.3-70b-versatile") < keys.index(
        "sim-together/meta-llama/Llama-3.3-70B-Instruct-Turbo")


def test_images_require_vision() -> None:
    cat = _cat(_m("sim-a", "text", 0.1, 0.1), _m("sim-b", "eyes", 1, 1, capabilities={"vision": True}))
    msg = HumanMessage(content=[{"type": "text", "text": "what is this"},
                                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}}])
    r = rank(cat, Needs(), [msg])
    assert [c.spec.model for c in r.candidates] == ["eyes"]


def test_explain_lists_every_model() -> None:
    cat = Catalog.builtin()
    rows = explain(cat, Needs(tools=True))
    assert len(rows) == len(cat)
    assert all(not r["accepted"] for r in rows)  # no keys in tests: nothing available
    assert any("set OPENAI_API_KEY" in "; ".join(r["reasons"]) for r in rows)


def test_token_estimate_is_offline_and_reasonable() -> None:
    n = estimate_tokens([HumanMessage("hello world " * 100)])
    assert 250 < n < 350


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"quality": {"reasonning": 0.5}}, "did you mean 'reasoning'"),
        ({"quality": {"math": 2}}, "between 0 and 1"),
        ({"max_cost_per_call": -1}, "greater than 0"),
        ({"tool": True}, "Extra inputs"),
    ],
)
def test_bad_needs_are_rejected(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValidationError) as info:
        Needs(**kwargs)  # type: ignore[arg-type]
    assert needle in str(info.value)
