"""Routing on measured capability: stored node policies picked up at each run's start, quality
judged on measured pass rates (Beta posteriors with decay, feedback), policy choices first,
and exploration that stays within its share and the run's budget."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.messages import HumanMessage

from frugalflow.verbosity import TokenEstimate, Verbosity
from frugalflow import END, START, Catalog, Flow, Needs, RoutedChatModel, RunContext, RunUsage
from frugalflow.exceptions import BudgetExceededError, UserError
from frugalflow.measured import (
    MeasureConfig,
    Measurements,
    Tally,
    beta_quantile,
    load_measurements,
)
from frugalflow.persistence.policy_store import PolicyStore
from frugalflow.persistence.store import Store
from frugalflow.persistence.tables import AttemptRow
from frugalflow.policies import Choice, Evidence, NodePolicy, Policy
from frugalflow.ranking import explain
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner

FLOW = "measured_demo"
CHEAP = "sim-groq/llama-3.1-8b-instant"  # writing 0.286: the prior rejects it at 0.42
PRIOR_FIRST = "sim-deepseek/deepseek-chat"  # writing 0.431: the prior's cheapest capable
STRONG = "sim-openai/gpt-4.1"
FLASH = "sim-google/gemini-2.5-flash"
# One output length for every model (the verbosity prior would reorder them by price).
NEEDS = Needs(quality={"writing": 0.42}, expected_output_tokens=400)


class S(TypedDict, total=False):
    text: str
    out: str


def make_flow(*, validator: bool = True) -> Flow[S]:
    flow: Flow[S] = Flow(FLOW, S)

    async def write(state: S, model: RoutedChatModel) -> dict[str, str]:
        answer = await model.ainvoke([HumanMessage(state["text"])])
        return {"out": str(answer.content)[:40]}

    flow.add_node("write", write, needs=NEEDS,
                  validator=(lambda answer: True) if validator else None)
    flow.add_edge(START, "write")
    flow.add_edge("write", END)
    return flow


def policy(*evidence: tuple[str, int, int], choice: Choice | None = None,
           source: str = "eval:abc") -> Policy:
    models = {m: Evidence(n=n, passes=p, source=source) for m, n, p in evidence}
    return Policy(flow=FLOW, nodes={"write": NodePolicy(models=models, choice=choice)})


# About 900 tokens: the prompt size `explain(input_tokens=1000)` ranks for. (On a short
# prompt the output's price decides, and PRIOR_FIRST is no longer the cheapest.)
PROMPT = "hello " * 600


async def first_model(runner: Runner, text: str = PROMPT) -> tuple[str, str | None]:
    result = await runner.start(FLOW, {"text": text})
    assert result.ok, result.error
    attempts = (await runner.get(result.run_id)).attempts
    return attempts[0].model, attempts[0].route_reason


# -- the posterior -------------------------------------------------------------------------


def test_beta_interval_matches_closed_forms() -> None:
    # Beta(a, 1): the CDF is x**a; Beta(1, 1) is uniform.
    assert beta_quantile(0.025, 21, 1) == pytest.approx(0.025 ** (1 / 21), abs=1e-9)
    assert beta_quantile(0.3, 1, 1) == pytest.approx(0.3, abs=1e-9)
    m = Measurements.from_policy(policy((CHEAP, 46, 45)))
    rate = m.rate("write", CHEAP)
    assert rate is not None and rate.n_eff == 46 and rate.mean == pytest.approx(46 / 48)
    assert rate.low < rate.mean < rate.high and rate.interval == (rate.low, rate.high)
    assert rate.describe().startswith("measured: n=46, rate 0.96 [0.")
    assert rate.describe().endswith("(eval:abc)")
    assert m.rate("write", STRONG) is None and m.rate("other", CHEAP) is None


# -- quality judged on measurements --------------------------------------------------------


def test_a_measurement_admits_what_the_prior_rejects_and_explain_says_so() -> None:
    cat = Catalog.simulated()
    prior = {r["model"]: r for r in explain(cat, NEEDS, input_tokens=1000, node="write")}
    assert not prior[CHEAP]["accepted"] and prior[CHEAP]["measured"] == "prior only"
    m = Measurements.from_policy(policy((CHEAP, 100, 99)))
    rows = explain(cat, NEEDS, input_tokens=1000, node="write", measured=m)
    by_model = {r["model"]: r for r in rows}
    assert by_model[CHEAP]["accepted"] and by_model[CHEAP]["rank"] == 1
    assert by_model[CHEAP]["measured"].startswith("measured: n=100, rate 0.98 [0.9")
    assert all(r["measured"] == "prior only" for r in rows if r["model"] != CHEAP)
    # Every other model is judged on the prior, as before.
    assert {r["model"] for r in rows if r["accepted"]} == \
        {r["model"] for r in prior.values() if r["accepted"]} | {CHEAP}


def test_a_measurement_rejects_what_the_prior_admits_on_its_lower_bound() -> None:
    cat = Catalog.simulated()
    # 47/50 passes: mean 0.92 but a lower bound under 0.9 (the pass rate a node with quality
    # thresholds and no target asks of a measured model) -> not admitted on it.
    m = Measurements.from_policy(policy((PRIOR_FIRST, 50, 47), (STRONG, 200, 196)))
    rate = m.rate("write", PRIOR_FIRST)
    assert rate is not None and rate.mean > 0.9 > rate.low
    by_model = {r["model"]: r for r in explain(cat, NEEDS, input_tokens=1000, node="write",
                                               measured=m)}
    assert not by_model[PRIOR_FIRST]["accepted"]
    (reason,) = by_model[PRIOR_FIRST]["reasons"]
    assert "measured pass rate 0.92" in reason and "lower bound < default target 0.9" in reason
    assert by_model[STRONG]["accepted"]
    # A target takes precedence over the quality thresholds.
    strict = explain(cat, NEEDS.with_(target=0.99), input_tokens=1000, node="write", measured=m)
    assert "lower bound < target 0.99" in next(
        r for r in strict if r["model"] == STRONG)["reasons"][0]


async def test_runs_route_on_the_measurement(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'm.db'}"
    flow = make_flow()
    plain = Runner(db, flows=[flow], catalog=Catalog.simulated(), breakers=BreakerRegistry())
    measured = Runner(db, flows=[flow], catalog=Catalog.simulated(), breakers=BreakerRegistry(),
                      policy=policy((CHEAP, 100, 99), (PRIOR_FIRST, 50, 40)))
    try:
        assert (await first_model(plain))[0] == PRIOR_FIRST
        model, reason = await first_model(measured)
        assert model == CHEAP and reason is None  # admitted, and the cheapest: no choice needed
    finally:
        await plain.close()
        await measured.close()


# -- stored policies, picked up at each run's start -----------------------------------------


async def test_a_stored_policy_is_picked_up_by_another_runner_at_its_next_run(
        db_url: str) -> None:
    flow = make_flow()
    writer = PolicyStore(Store(db_url))
    user = Runner(db_url, flows=[flow], catalog=Catalog.simulated(), breakers=BreakerRegistry(),
                  policy="writing")
    try:
        with pytest.raises(UserError, match="unknown policy 'writing'.*--save-policy writing"):
            await user.start(FLOW, {"text": "too early"})
        assert await user.ledger.list_runs() == []  # nothing was written
        await writer.save("writing", policy((STRONG, 60, 60),
                                            choice=Choice(models=(STRONG,), target=0.85)))
        assert await first_model(user, "one") == (STRONG, "policy writing v1")
        await writer.save("writing", policy((FLASH, 80, 80),
                                            choice=Choice(models=(FLASH,), target=0.85)))
        model, reason = await first_model(user, "two")
        assert (model, reason) == (FLASH, "policy writing v2")  # no restart needed
        assert user.policy is not None and FLASH in user.policy.nodes["write"].models
    finally:
        await user.close()
        await writer.store.close()


async def test_a_mix_draws_by_its_shares_and_a_resumed_call_draws_the_same(
        tmp_path: Path) -> None:
    mix = Choice(models=(STRONG, FLASH), shares=(0.25, 0.75))
    runner = Runner(f"sqlite:///{tmp_path / 'mix.db'}", flows=[make_flow()],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry(),
                    policy=policy((STRONG, 50, 50), (FLASH, 50, 50), choice=mix))
    try:
        firsts = [await first_model(runner, f"mix {i}") for i in range(60)]
    finally:
        await runner.close()
    share = sum(m == STRONG for m, _ in firsts) / len(firsts)
    assert 0.25 - 3 * math.sqrt(0.25 * 0.75 / 60) < share < 0.25 + 3 * math.sqrt(0.25 * 0.75 / 60)
    assert {r for _, r in firsts} == {
        f"policy (given): mix 25% {STRONG} / 75% {FLASH}"}
    # The draw is seeded by the run and the call's key: the same call draws the same model.
    ctx = RunContext(catalog=Catalog.simulated(), usage=RunUsage(run_id="r1"),
                     measured=Measurements.from_policy(policy(choice=mix)))
    model = RoutedChatModel(needs=NEEDS, node="write", context=ctx)
    picks = set()
    for _ in range(5):
        ctx.usage.run_id = "r1"
        picks.add(await _first_try(model, "same", key="write:abc#1"))
    assert len(picks) == 1


async def _first_try(model: RoutedChatModel, text: str, *, key: str | None = None) -> str:
    from frugalflow.attempts import CallAttempts

    attempts = CallAttempts(model, [HumanMessage(text)], None, {})
    attempts.call_key = key
    return next(iter(attempts.plan())).spec.key


# -- production verdicts, decay and feedback -----------------------------------------------


async def _insert(store: Store, node: str, model: str, *, n: int, outcome: str = "ok",
                  age_days: float = 0.0, feedback: bool | None = None,
                  call_prefix: str = "c") -> list[str]:
    table = AttemptRow.__table__  # type: ignore[attr-defined]
    at = datetime.now(timezone.utc) - timedelta(days=age_days)
    ids = [f"{call_prefix}{i}" for i in range(n)]
    await store.setup()
    async with store.write() as conn:
        await conn.execute(table.insert(), [dict(
            call_id=i, flow=FLOW, node=node, model=model, provider=model.split("/")[0],
            try_number=1, outcome=outcome, feedback=feedback, started_at=at,
            error_class="validation" if outcome == "error" else None) for i in ids])
    return ids


async def test_production_verdicts_decay_with_age(db_url: str) -> None:
    store = Store(db_url)
    try:
        await _insert(store, "write", CHEAP, n=40)
        await _insert(store, "write", CHEAP, n=40, outcome="error", age_days=60, call_prefix="o")
        await _insert(store, "unchecked", CHEAP, n=40)  # no validator: proves nothing
        decayed = await load_measurements(store, FLOW, validated={"write"})
        flat = await load_measurements(store, FLOW, validated={"write"},
                                       config=MeasureConfig(half_life_days=None))
        short = await load_measurements(store, FLOW, validated={"write"},
                                        config=MeasureConfig(half_life_days=5))
    finally:
        await store.close()
    r = decayed.rate("write", CHEAP)
    assert r is not None and r.source == "production"
    assert r.n_eff == pytest.approx(50, abs=1.0)  # 40 fresh + 40 at two half-lives (10)
    assert r.mean == pytest.approx(41 / 52, abs=0.01)
    flat_rate = flat.rate("write", CHEAP)
    assert flat_rate is not None and flat_rate.n_eff == pytest.approx(80) and \
        flat_rate.mean == pytest.approx(0.5)
    short_rate = short.rate("write", CHEAP)  # 60 days > 10 half-lives: not even read
    assert short_rate is not None and short_rate.n_eff == pytest.approx(40, abs=1.0)
    assert decayed.rate("unchecked", CHEAP) is None


async def test_feedback_moves_the_rate_and_joins_the_policy_evidence(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'f.db'}")
    try:
        ids = await _insert(store, "write", STRONG, n=30)
        await _insert(store, "unchecked", STRONG, n=25, feedback=True, call_prefix="u")
        before = await load_measurements(store, FLOW, validated={"write"})
        from frugalflow.persistence.ledger import Ledger

        for call_id in ids[:10]:
            await Ledger(store).feedback(call_id, False)
        after = await load_measurements(store, FLOW, validated={"write"},
                                        policy=policy((STRONG, 20, 20)), label="policy p v1")
        few = await load_measurements(store, FLOW, validated=set(),
                                      config=MeasureConfig(min_production=40))
    finally:
        await store.close()
    b, a = before.rate("write", STRONG), after.rate("write", STRONG)
    assert b is not None and a is not None
    # Fresh verdicts are weighted at the middle of their 6-hour age bucket: up to 3 hours
    # old, 0.3% less than 1 (the exact figures hold only early in a bucket).
    assert b.mean == pytest.approx(31 / 32, abs=1e-3) and a.n_eff == pytest.approx(50, abs=0.2)
    assert a.mean == pytest.approx((1 + 20 + 20) / 52, abs=1e-3)  # 10 answers marked bad
    assert a.source == "eval:abc, production"
    unchecked = before.rate("unchecked", STRONG)  # feedback counts on any node
    assert unchecked is not None and unchecked.n_eff == pytest.approx(25, abs=0.1)
    assert few.rate("unchecked", STRONG) is None  # production alone, too few verdicts
    assert after.label == "policy p v1" and after.choice("write") is None


# -- exploration ---------------------------------------------------------------------------


def _explorer(share: float, budget: float | None = None,
              validator: Callable[[Any], object] | None = lambda a: True,
              measured: Measurements | None = None) -> tuple[RoutedChatModel, RunContext]:
    m = measured or Measurements(FLOW, {("write", CHEAP): Tally(passes=3, fails=0,
                                                              policy_n=3, sources=("eval:x",))})
    ctx = RunContext(catalog=Catalog.simulated(), breakers=BreakerRegistry(),
                     usage=RunUsage(budget_usd=budget, run_id="explore"), measured=m,
                     explore=share)
    # Flash measured as terse as the rest (its reasoning prior would price it above gpt-4.1).
    ctx.verbosity = Verbosity(ledger={("write", FLASH): TokenEstimate(400, 1004, n=50)})
    return RoutedChatModel(needs=NEEDS, node="write", context=ctx, validator=validator), ctx


async def test_exploration_stays_within_its_share() -> None:
    n, share = 600, 0.1
    model, ctx = _explorer(share)
    for i in range(n):
        await model.ainvoke([HumanMessage(f"call {i}")])
    explored = [a for a in ctx.usage.attempts if (a.route_reason or "").startswith("exploration")]
    # Each call explores with probability share x P(a draw meets the target) <= share: a
    # binomial count, bounded here at 4 standard deviations above share (fixed seeds).
    assert 0 < len(explored) <= n * share + 4 * math.sqrt(n * share * (1 - share))
    cheap_first = ctx.catalog[PRIOR_FIRST].estimate_cost(10, 400)
    assert all(ctx.catalog[a.model].estimate_cost(10, 400) < cheap_first for a in explored)
    assert {a.model for a in explored} >= {CHEAP}
    assert all("draw" in (a.route_reason or "") for a in explored)
    # Without a validator, or with a share of 0, nothing is explored.
    for m, c in (_explorer(share, validator=None), _explorer(0.0)):
        for i in range(50):
            await m.ainvoke([HumanMessage(f"call {i}")])
        assert not any((a.route_reason or "").startswith("exploration") for a in c.usage.attempts)


async def test_exploration_never_spends_beyond_the_budget() -> None:
    # Enough for the planned call but not for an exploration before it: none happens.
    probe = await _plan_cost(_explorer(0.0)[0])
    tight, tctx = _explorer(1.0, budget=probe * 1.05)
    await tight.ainvoke([HumanMessage("one call")])
    assert not any((a.route_reason or "").startswith("exploration")
                   for a in tctx.usage.attempts)
    # Run many calls on a small budget, exploring every call it can: the cap holds.
    small, sctx = _explorer(1.0, budget=probe * 30)
    with pytest.raises(BudgetExceededError):
        for i in range(1000):
            await small.ainvoke([HumanMessage(f"call {i}")])
    assert sctx.usage.spent_usd <= probe * 30
    assert any((a.route_reason or "").startswith("exploration") for a in sctx.usage.attempts)


async def test_a_rejected_exploration_falls_back_to_the_plan_not_above_it() -> None:
    # Flash is unproven (9/10), every cheaper model proven below 0.9: the plan starts at
    # gpt-4.1. Flash's prior writing score (0.503) is above gpt-4.1's (0.43), yet its
    # rejected exploration must not make the plan skip gpt-4.1 for a pricier model.
    bad = ("sim-openai/gpt-4.1-nano", "sim-openai/gpt-4o-mini", "sim-google/gemini-2.5-flash-lite",
           CHEAP, PRIOR_FIRST, "sim-groq/llama-3.3-70b-versatile",
           "sim-together/meta-llama/Llama-3.3-70B-Instruct-Turbo",
           "sim-anthropic/claude-haiku-4-5")
    tallies = {("write", m): Tally(passes=0, fails=50, policy_n=50, sources=("eval:x",))
               for m in bad}
    tallies[("write", FLASH)] = Tally(passes=9, fails=1, policy_n=10, sources=("eval:x",))
    model, ctx = _explorer(1.0, measured=Measurements(FLOW, tallies),
                           validator=lambda a: "gemini-2.5-flash" not in str(a.content)
                           or "rejected")
    for i in range(12):
        await model.ainvoke([HumanMessage(f"call {i}")])
    calls: dict[str, list[Any]] = {}
    for a in ctx.usage.attempts:
        calls.setdefault(a.call_id, []).append(a)
    explored = [c for c in calls.values() if (c[0].route_reason or "").startswith("exploration")]
    assert explored and all(c[0].model == FLASH and c[0].error_class == "validation"
                            for c in explored)
    assert all([a.model for a in c[1:]] == [STRONG] for c in explored)
    assert all(c[0].model == STRONG for c in calls.values() if c not in explored)


async def _plan_cost(model: RoutedChatModel) -> float:
    from frugalflow.attempts import CallAttempts

    attempts = CallAttempts(model, [HumanMessage("one call")], None, {})
    # What a budget must hold for it: its input and the p90 of its output estimate.
    return attempts.allow(next(iter(attempts.plan()))).needed_usd


async def test_explored_calls_are_recorded_as_exploration(tmp_path: Path) -> None:
    runner = Runner(f"sqlite:///{tmp_path / 'x.db'}", flows=[make_flow()],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry(),
                    explore=1.0)
    try:
        reasons = []
        for i in range(20):
            result = await runner.start(FLOW, {"text": f"x {i}"})
            assert result.ok
            reasons += [a.route_reason for a in (await runner.get(result.run_id)).attempts]
    finally:
        await runner.close()
    assert any(r and r.startswith("exploration") for r in reasons)
    with pytest.raises(UserError, match="explore must be a share"):
        Runner(f"sqlite:///{tmp_path / 'y.db'}", explore=1.5)


# -- the command line ------------------------------------------------------------------------

FLOW_FILE = '''
from typing import TypedDict
from langchain_core.messages import HumanMessage
from frugalflow import END, START, Flow, Needs


class S(TypedDict, total=False):
    text: str
    out: str


flow = Flow("measured_demo", S)


async def write(state, model):
    answer = await model.ainvoke([HumanMessage(state["text"])])
    return {"out": str(answer.content)[:40]}


flow.add_node("write", write, needs=Needs(quality={"writing": 0.42}), validator=lambda a: True)
flow.add_edge(START, "write")
flow.add_edge("write", END)
'''


def test_cli_runs_explains_and_lists_with_a_policy(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from frugalflow.cli import app

    path = tmp_path / "demo_flow.py"
    path.write_text(FLOW_FILE)
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    cli = CliRunner()
    run = ["run", f"{path}:flow", "-i", '{"text": "hi"}', "--db", db, "--json"]
    out = cli.invoke(app, [*run, "--policy", "nope"])
    assert out.exit_code == 1 and "unknown policy 'nope'" in out.output
    assert "Traceback" not in out.output and len(out.output.strip().splitlines()) == 1

    async def save() -> None:
        store = Store(db)
        try:
            await PolicyStore(store).save("writing", policy(
                (CHEAP, 100, 99), (STRONG, 40, 40), choice=Choice(models=(STRONG,))))
            await PolicyStore(store).save("other", Policy(flow="elsewhere"))
        finally:
            await store.close()

    asyncio.run(save())
    listed = cli.invoke(app, ["policy", "list", "--db", db])
    assert listed.exit_code == 0 and "writing" in listed.output and FLOW in listed.output
    assert f"write ({STRONG})" in listed.output
    shown = cli.invoke(app, ["explain", f"{path}:flow", "--db", db, "--policy", "writing"])
    assert shown.exit_code == 0, shown.output
    assert "measured: n=100, rate 0.98 [0.9" in shown.output and "prior only" in shown.output
    assert "prior only" in cli.invoke(app, ["explain", f"{path}:flow"]).output
    ran = cli.invoke(app, [*run, "--policy", "writing"])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.output)["status"] == "succeeded"
    wrong = cli.invoke(app, [*run, "--policy", "other"])
    assert wrong.exit_code == 1 and "is for flow 'elsewhere'" in wrong.output

    async def reasons() -> list[str | None]:
        store = Store(db)
        try:
            from frugalflow.persistence.ledger import Ledger

            return [a.route_reason for a in await Ledger(store).all_attempts()]
        finally:
            await store.close()

    assert asyncio.run(reasons()) == ["policy writing v1"]


@pytest.mark.slow
async def test_a_worker_picks_up_each_new_policy_version(fresh_pg_url: str) -> None:
    import subprocess
    import sys

    from durable_flows import chain_flow

    from frugalflow.scale.dispatch import ProcrastinateDispatcher

    url = fresh_pg_url
    chain = Policy(flow="chain", nodes={"n1": NodePolicy(choice=Choice(models=(STRONG,)))})
    policies = PolicyStore(Store(url))
    await policies.save("chain-policy", chain)
    submitter = Runner(url, flows=[chain_flow(1)], catalog=Catalog.simulated(),
                       dispatcher=ProcrastinateDispatcher(url, stall_timeout=3.0, heartbeat=0.5))
    await submitter.setup()
    worker = subprocess.Popen([sys.executable, str(Path(__file__).parent / "policy_worker.py"),
                               url, "chain-policy"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        assert worker.stdout is not None and "ready" in worker.stdout.readline()

        async def first(topic: str) -> tuple[str, str | None]:
            result = await asyncio.wait_for(submitter.start("chain", {"topic": topic}), 60)
            assert result.ok, result.error
            a = (await submitter.get(result.run_id)).attempts[0]
            return a.model, a.route_reason

        assert await first("one") == (STRONG, "policy chain-policy v1")
        await policies.save("chain-policy", chain.model_copy(update={"nodes": {
            "n1": NodePolicy(choice=Choice(models=(FLASH,)))}}))
        assert await first("two") == (FLASH, "policy chain-policy v2")  # same worker process
    finally:
        worker.terminate()
        worker.communicate(timeout=30)
        await submitter.close()
        await policies.store.close()
