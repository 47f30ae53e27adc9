"""Output-token estimates per node x model, ranking on them, and budgets that reserve p90
and cap each call's max output."""

from __future__ import annotations

import asyncio
from typing import Any, TypedDict

import pytest
from langchain_core.messages import HumanMessage

from frugalflow import (
    END,
    START,
    BudgetExceededError,
    Catalog,
    Flow,
    ModelSpec,
    Needs,
    RoutedChatModel,
)
from frugalflow.allowance import MIN_USEFUL_OUTPUT, allowance
from frugalflow.policies import Evidence, NodePolicy, Policy
from frugalflow.ranking import explain, prefilter, priced, rank
from frugalflow.routed import RunContext
from frugalflow.runner import Runner
from frugalflow.usage import RunUsage
from frugalflow.verbosity import (
    DEFAULT_OUTPUT_TOKENS,
    TokenEstimate,
    Verbosity,
    VerbosityCache,
    VerbosityPrior,
    prior_estimate,
)

HI = [HumanMessage("hello there")]


def spec(model: str, price_out: float, *, price_in: float = 0.1, **kw: Any) -> ModelSpec:
    return ModelSpec(provider="sim-v", model=model, simulated=True, input_price=price_in,
                     output_price=price_out, context_window=100_000,
                     max_output_tokens=kw.pop("max_output_tokens", 50_000),
                     quality={"writing": 0.8}, **kw)


def est(p50: float, p90: float, n: int = 10, source: str = "measured (ledger, n=10)") -> TokenEstimate:
    return TokenEstimate(p50, p90, n=n, source=source)


# -- where an estimate comes from ----------------------------------------------------------


def test_ledger_rows_make_quantiles_per_node_and_model() -> None:
    rows = [("draft", "sim-v/a", out, None) for out in range(1, 101)]  # newest first
    rows += [("draft", "sim-v/b", 50, 30)] * 3 + [("other", "sim-v/a", 7, None)]
    v = Verbosity.from_rows(rows)
    a = v.ledger[("draft", "sim-v/a")]
    assert (a.p50, a.p90, a.n) == (50, 90, 100)
    assert a.source == "measured (ledger, n=100)"
    b = v.ledger[("draft", "sim-v/b")]
    # Three calls: the p90 is at least the prior's spread times the median.
    assert b.p50 == 50 and b.reasoning_p50 == 30
    assert b.p90 == pytest.approx(50 * VerbosityPrior.builtin().spread)
    assert v.estimate("draft", Needs(), spec("a", 1.0)).p50 == 50
    assert v.estimate("other", Needs(), spec("a", 1.0)).p50 == 7
    # Another node, or none: the prior.
    assert v.estimate("third", Needs(), spec("a", 1.0)).source == "node default"
    assert v.estimate(None, Needs(), spec("a", 1.0)).source == "node default"


def test_per_pair_keeps_the_newest_calls() -> None:
    rows = [("n", "sim-v/a", 10, None)] * 5 + [("n", "sim-v/a", 1000, None)] * 50
    assert Verbosity.from_rows(rows, per_pair=5).ledger[("n", "sim-v/a")].p90 < 100


def test_policy_evidence_is_used_and_the_ledger_wins_over_it() -> None:
    policy = Policy(flow="f", nodes={"draft": NodePolicy(models={
        "sim-v/a": Evidence(n=40, passes=30, output_tokens_p50=120, output_tokens_p90=300,
                            reasoning_tokens_p50=80, reasoning_tokens_p90=200,
                            source="eval:abc"),
        "sim-v/b": Evidence(n=40, passes=30)})})  # no token figures: not an estimate
    v = Verbosity().with_policy(policy)
    a = v.estimate("draft", Needs(), spec("a", 1.0))
    assert (a.p50, a.p90, a.reasoning_p50, a.n) == (120, 300, 80, 40)
    assert a.source == "measured (eval:abc, n=40)"
    assert v.estimate("draft", Needs(), spec("b", 1.0)).source == "node default"
    measured = Verbosity.from_rows([("draft", "sim-v/a", 60, None)] * 30).with_policy(policy)
    assert measured.estimate("draft", Needs(), spec("a", 1.0)).source.startswith(
        "measured (ledger")


def ref(model: str, *, reasoning: bool = False) -> ModelSpec:
    """A model known to the prior by its catalog key (`quality_ref`)."""
    return spec(model, 1.0, quality_ref=model, capabilities={"reasoning": reasoning})


def test_prior_scales_the_default_by_model_verbosity_and_adds_reasoning() -> None:
    gpt4o = prior_estimate(Needs(), ref("gpt-4o"))
    assert gpt4o.p50 == pytest.approx(DEFAULT_OUTPUT_TOKENS * 4.72)
    assert gpt4o.source == "prior (model verbosity)"
    assert gpt4o.p90 == pytest.approx(gpt4o.p50 * VerbosityPrior.builtin().spread)
    # Not in the MMLU-Pro data: the median model.
    mini = prior_estimate(Needs(), ref("gpt-4o-mini"))
    assert (mini.p50, mini.source) == (DEFAULT_OUTPUT_TOKENS, "node default")
    # A reasoning model bills hidden thinking tokens on top of its answer.
    flash = prior_estimate(Needs(), ref("gemini-2.5-flash", reasoning=True))
    visible = DEFAULT_OUTPUT_TOKENS * 1.01
    assert flash.p50 == pytest.approx(visible * 4)
    assert flash.reasoning_p50 == pytest.approx(visible * 3)
    # Anthropic thinks only when asked: no reasoning prior.
    haiku = prior_estimate(Needs(), ref("claude-haiku-4-5", reasoning=True))
    assert haiku.reasoning_p50 == 0 and haiku.p50 == DEFAULT_OUTPUT_TOKENS
    # The simulated mirrors share the real models' keys, so their prior too.
    assert Catalog.simulated()["sim-google/gemini-2.5-flash"].quality_ref == "gemini-2.5-flash"


def test_explicit_node_setting_wins_over_the_prior_and_max_output_bounds_all() -> None:
    needs = Needs(expected_output_tokens=150)
    gpt4o = prior_estimate(needs, ref("gpt-4o"))
    assert (gpt4o.p50, gpt4o.source) == (150, "node setting")
    flash = prior_estimate(needs, ref("gemini-2.5-flash", reasoning=True))
    assert flash.p50 == 600 and flash.source == "node setting + reasoning prior"
    # The default value given explicitly is explicit too.
    assert prior_estimate(Needs(expected_output_tokens=400), ref("gpt-4o")).p50 == 400
    capped = Needs(max_output_tokens=100)
    v = Verbosity.from_rows([("n", "sim-v/a", 500, None)] * 30)
    assert v.estimate("n", capped, spec("a", 1.0)).p90 == 100
    assert prior_estimate(capped, ref("gpt-4o")).p90 == 100


# -- ranking ---------------------------------------------------------------------------------


def test_a_verbose_cheap_per_token_model_ranks_after_a_terse_one() -> None:
    cat = Catalog([spec("chatty", 1.0), spec("terse", 2.0)], name="t")
    needs = Needs()
    static = prefilter(cat, needs)
    before = rank(cat, needs, HI, prefiltered=static)
    assert before.first().spec.model == "chatty"  # same 400 tokens for both: price decides
    v = Verbosity(ledger={("n", "sim-v/chatty"): est(2000, 4000),
                          ("n", "sim-v/terse"): est(200, 400)})
    after = rank(cat, needs, HI, prefiltered=static, prices=priced(static, needs, "n", v))
    assert [c.spec.model for c in after] == ["terse", "chatty"]
    n_in = after.input_tokens
    assert after.first().expected_cost == pytest.approx((n_in * 0.1 + 200 * 2.0) / 1e6)
    # The per-call path (a budget given) prices the same way.
    slow = rank(cat, needs, HI, prefiltered=static, prices=priced(static, needs, "n", v),
                budget_left=1.0)
    assert [c.spec.model for c in slow] == ["terse", "chatty"]


async def test_a_routed_call_uses_the_runs_estimates(make_ctx: Any) -> None:
    cat = Catalog([spec("chatty", 1.0), spec("terse", 2.0)], name="t")
    ctx = make_ctx(cat=cat)
    model = RoutedChatModel(needs=Needs(), node="n", context=ctx)
    await model.ainvoke(HI)
    assert model.last_model == "sim-v/chatty"
    ctx2 = make_ctx(cat=cat)
    ctx2.verbosity = Verbosity(ledger={("n", "sim-v/chatty"): est(2000, 4000)})
    model2 = RoutedChatModel(needs=Needs(), node="n", context=ctx2)
    await model2.ainvoke(HI)
    assert model2.last_model == "sim-v/terse"


def test_explain_shows_each_estimate_and_its_source() -> None:
    cat = Catalog([spec("chatty", 1.0), spec("terse", 2.0)], name="t")
    v = Verbosity(ledger={("n", "sim-v/chatty"): est(2000, 4000, n=12,
                                                     source="measured (ledger, n=12)")})
    rows = {r["model"]: r for r in explain(cat, Needs(), input_tokens=100, node="n",
                                           verbosity=v)}
    chatty, terse = rows["sim-v/chatty"], rows["sim-v/terse"]
    assert (chatty["output_tokens"], chatty["output_tokens_p90"]) == (2000, 4000)
    assert chatty["output_source"] == "measured (ledger, n=12)"
    assert (terse["output_tokens"], terse["output_source"]) == (400, "node default")
    assert terse["rank"] == 1 and chatty["rank"] == 2
    plain = {r["model"]: r for r in explain(cat, Needs(), input_tokens=100)}
    assert plain["sim-v/chatty"]["output_source"] == "node default"


# -- budgets -----------------------------------------------------------------------------------


def test_admission_reserves_the_p90_and_sizes_the_max_output() -> None:
    s = spec("a", 10.0, price_in=0.0)  # $1e-5 per output token
    e = est(100, 1000)
    refused = allowance(s, Needs(), 0, e, left=999 * 1e-5)
    assert refused.refusal is not None and "p90 1000" in refused.refusal
    assert refused.needed_usd == pytest.approx(1000 * 1e-5)
    ok = allowance(s, Needs(), 0, e, left=1500 * 1e-5)
    assert ok.refusal is None and ok.max_output == 1500
    assert ok.hold_usd == pytest.approx(1500 * 1e-5)
    # The max output is what the budget pays, at most 4x the p90 (or 2048 tokens).
    assert allowance(s, Needs(), 0, e, left=1.0).max_output == 4000
    assert allowance(s, Needs(max_output_tokens=1200), 0, e, left=1.0).max_output == 1200
    tiny = est(2, 4)
    assert allowance(s, Needs(), 0, tiny, left=MIN_USEFUL_OUTPUT * 1e-5).max_output == 16
    low = allowance(s, Needs(), 0, tiny, left=(MIN_USEFUL_OUTPUT - 1) * 1e-5)
    assert low.refusal is not None and "15 output tokens" in low.refusal


def _verbose_catalog(tokens: int, latency: float = 0.0) -> Catalog:
    """The simulated catalog where every model writes `tokens` tokens unless bounded (and
    answers after `latency` seconds: calls started together are then in flight together)."""
    base = Catalog.simulated()
    kwargs = {"output_tokens": tokens, "latency": latency}
    return Catalog([s.model_copy(update={"model_kwargs": kwargs}) for s in base],
                   name="verbose")


class Chain(TypedDict, total=False):
    topic: str
    n1: str
    n2: str
    n3: str
    n4: str
    n5: str
    n6: str


def _chain(n: int) -> Flow[Chain]:
    flow: Flow[Chain] = Flow("long_chain", Chain)

    def make(i: int) -> Any:
        async def node(state: Chain, model: RoutedChatModel) -> dict[str, Any]:
            answer = await model.ainvoke([HumanMessage(f"step {i}: write at length")])
            return {f"n{i}": str(answer.content)[:40]}
        return node

    for i in range(1, n + 1):
        flow.add_node(f"n{i}", make(i), needs=Needs(quality={"classification": 0.6}))
        flow.add_edge(START if i == 1 else f"n{i - 1}", f"n{i}")
    flow.add_edge(f"n{n}", END)
    return flow


async def test_the_max_output_keeps_a_real_run_within_its_budget(tmp_path: Any) -> None:
    cat = _verbose_catalog(20_000)  # ~20k tokens an answer; the prior expects ~430
    budget = 0.0015
    # One unbounded answer of any model breaks it.
    assert min(s.estimate_cost(50, 20_000) for s in cat) > budget
    runner = Runner(f"sqlite:///{tmp_path / 'v.db'}", flows=[_chain(6)], catalog=cat)
    try:
        result = await runner.start("long_chain", {"topic": "t"}, budget=budget)
        record = await runner.get(result.run_id)
    finally:
        await runner.close()
    ok = [a for a in record.attempts if a.outcome == "ok"]
    assert ok, "no call was admitted"
    assert all(a.output_tokens < 20_000 for a in ok)  # each answer stopped at its max output
    assert record.run.cost_usd <= budget
    assert sum(a.cost_usd for a in record.attempts) <= budget
    assert result.status == "budget_exceeded"  # it stopped before a call it could not pay


async def _parallel(tokens: int, budget: float, n: int = 6) -> tuple[RunContext, list[Any]]:
    ctx = RunContext(catalog=_verbose_catalog(tokens, latency=0.01),
                     usage=RunUsage(budget_usd=budget, run_id="par"))
    model = RoutedChatModel(needs=Needs(quality={"classification": 0.6}), node="n",
                            context=ctx)
    results = await asyncio.gather(*(model.ainvoke([HumanMessage(f"q{i}")])
                                     for i in range(n)), return_exceptions=True)
    return ctx, results


async def test_parallel_calls_together_stay_within_the_budget() -> None:
    # Each call may answer ~4,000 tokens (~$0.0015 on the cheapest model): six in parallel
    # would spend six times the budget; holds make the others wait, then find it spent.
    ctx, results = await _parallel(20_000, 0.0015)
    answered = [r for r in results if not isinstance(r, BaseException)]
    assert answered and len(answered) < 6
    assert all(isinstance(r, BudgetExceededError) for r in results if r not in answered)
    assert ctx.usage.spent_usd <= 0.0015
    assert ctx.held_usd == 0.0 and not ctx.others_hold()  # every hold was freed


async def test_parallel_calls_wait_for_holds_rather_than_fail() -> None:
    # Short answers: one call's hold takes most of the budget while it is in flight, but
    # the others wait for it to be recorded (its real cost is small) and all answer.
    ctx, results = await _parallel(60, 0.0015)
    assert not [r for r in results if isinstance(r, BaseException)]
    assert len(ctx.usage.attempts) == 6 and ctx.usage.spent_usd < 0.0005


async def test_the_runner_reads_estimates_from_its_ledger(tmp_path: Any) -> None:
    cat = Catalog.simulated()
    runner = Runner(f"sqlite:///{tmp_path / 'l.db'}", flows=[_chain(2)], catalog=cat)
    runner.verbosity = VerbosityCache(refresh=0.0)  # (default: a second after a run ends)
    try:
        for i in range(2):
            assert (await runner.start("long_chain", {"topic": str(i)})).ok
        # Read at the second run's start (one call then); a run ended since: read again.
        v = await runner.verbosity.get(runner.store, "long_chain")
    finally:
        await runner.close()
    (key,) = [k for k in v.ledger if k[0] == "n1"]
    e = v.ledger[key]
    assert e.n == 2 and e.source == "measured (ledger, n=2)"
    assert 0 < e.p50 < 200  # the simulator's short answers, not the 400-token default


def test_binding_tools_keeps_the_default_a_default() -> None:
    ref_spec = ref("gpt-4o")
    tools_needs = Needs().with_(tools=True)
    assert prior_estimate(tools_needs, ref_spec).source == "prior (model verbosity)"
    assert prior_estimate(Needs(expected_output_tokens=90).with_(tools=True),
                          ref_spec).p50 == 90


# -- the bound reaches real integrations -----------------------------------------------------

_BOUND = {"openai": ("max_completion_tokens",), "anthropic": ("max_tokens",),
          "gemini": ("generationConfig", "maxOutputTokens")}


def _bound(route: str, body: dict[str, Any]) -> int:
    value: Any = body
    for k in _BOUND[route]:
        value = value[k]
    return int(value)


@pytest.mark.slow
@pytest.mark.parametrize(("key", "route"), [("openai/gpt-4o-mini", "openai"),
                                            ("anthropic/claude-haiku-4-5", "anthropic"),
                                            ("google/gemini-2.5-flash", "gemini")])
async def test_each_integration_sends_the_max_output(key: str, route: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from frugalflow.testing.emulator import EMULATOR_KEY_ENV, ProviderEmulator, emulated_catalog

    monkeypatch.setenv(EMULATOR_KEY_ENV, "emulator-test-key")

    def long_answer(provider: str, model: str, body: dict[str, Any]) -> str:
        # A model that would write 50,000 tokens, stopped at the bound the request carries.
        return "word " * (4 * _bound(provider, body) // 5)

    async with ProviderEmulator(seed=0, responder=long_answer) as emu:
        cat = emulated_catalog(emu, [key])
        budget = 0.02
        ctx = RunContext(catalog=cat, usage=RunUsage(budget_usd=budget, run_id="wire"))
        model = RoutedChatModel(needs=Needs(), node="n", context=ctx)
        try:
            await model.ainvoke(HI)
        finally:
            await cat.aclose()
    (request,) = emu.requests
    spec_ = cat[key]
    bound = _bound(route, request.body)
    assert MIN_USEFUL_OUTPUT <= bound <= spec_.max_output
    assert spec_.estimate_cost(50, 50_000) > budget  # unbounded, the answer breaks the cap
    assert 0 < ctx.usage.spent_usd <= budget
