"""Routers on their hull (operating curve, the mix of two adjacent points, its use in a run)
and the pure functions of bench/calibration.py, on tiny synthetic data."""

from __future__ import annotations

import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langchain_core.messages import HumanMessage

from frugalflow import Catalog, Needs
from frugalflow.evaluation import Measured
from frugalflow.exceptions import UserError
from frugalflow.learning import (
    Example,
    HullMix,
    LearnedRouter,
    LexicalFeaturizer,
    OperatingPoint,
    Rule,
    choose,
    hull_mix,
    operating_curve,
)
from frugalflow.learning.hull import route_batch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import calibration as cal  # noqa: E402

# -- the hull of a router's operating points ------------------------------------------

# Three operating points on a convex curve and one above the chord (never worth running).
POINTS = [OperatingPoint(0.0, 1000, 950, 0.010), OperatingPoint(0.5, 1000, 900, 0.004),
          OperatingPoint(0.7, 1000, 880, 0.0039), OperatingPoint(0.9, 1000, 700, 0.001)]


def test_a_quality_between_two_hull_points_is_a_stated_mix_of_them() -> None:
    lows = {p.param: Measured("x", p.n, p.successes, p.cost).interval().low for p in POINTS}
    target = (lows[0.9] + lows[0.5]) / 2
    mix = hull_mix(POINTS, Rule.PRICE_WEIGHT, quality=target)
    assert mix is not None and [p for p, _ in mix.shares] == [0.9, 0.5]
    assert mix.assured_rate == pytest.approx(target)
    # Halfway in lower-bound rate is halfway in cost on the chord: cheaper than the dearer point.
    assert mix.expected_cost == pytest.approx((0.001 + 0.004) / 2, rel=1e-6)
    assert hull_mix(POINTS, Rule.PRICE_WEIGHT, quality=0.99) is None
    # On observed rates (no interval), 0.9 is exactly the point at 0.5.
    observed = hull_mix(POINTS, Rule.PRICE_WEIGHT, quality=0.9, confidence=None)
    assert observed is not None and observed.shares == ((0.5, 1.0),)


def test_a_cost_target_gets_the_best_assured_rate_it_can_pay_for() -> None:
    mix = hull_mix(POINTS, Rule.TARGET, cost=0.007)
    assert mix is not None and [p for p, _ in mix.shares] == [0.5, 0.0]
    assert mix.expected_cost == pytest.approx(0.007) and sum(s for _, s in mix.shares) == 1
    assert hull_mix(POINTS, Rule.TARGET, cost=0.0005) is None  # cheaper than any point
    whole = hull_mix(POINTS, Rule.TARGET, cost=1.0)
    assert whole is not None and whole.shares == ((0.0, 1.0),)
    with pytest.raises(UserError, match="exactly one"):
        hull_mix(POINTS, Rule.TARGET, cost=0.1, quality=0.5)


def test_draws_follow_the_stated_shares_and_the_mix_round_trips() -> None:
    mix = HullMix(Rule.TARGET, ((0.3, 0.25), (0.8, 0.75)), 0.002, 0.9)
    rng = random.Random(1)
    draws = [mix.draw(rng) for _ in range(4000)]
    assert draws.count(0.3) / len(draws) == pytest.approx(0.25, abs=0.03)
    assert HullMix.from_dict(mix.to_dict()) == mix
    assert HullMix(Rule.TARGET, ((0.3, 0.004), (0.8, 0.996)), 0.0, 0.9).describe() \
        .startswith("0.4% target=0.3 + 99.6% target=0.8")  # never rounded to 0% / 100%
    with pytest.raises(UserError, match="sum to 1"):
        HullMix(Rule.TARGET, ((0.3, 0.5),), 0.0, 0.0)
    with pytest.raises(UserError, match="not a saved hull mix"):
        HullMix.from_dict({"rule": "nope", "shares": [], "expected_cost": 0, "assured_rate": 0})


@pytest.mark.parametrize("rule", list(Rule))
def test_the_vectorised_rule_is_what_choose_puts_first(rule: Rule) -> None:
    rng = np.random.default_rng(3)
    P, C = rng.random((60, 4)), rng.random((60, 4)) / 100
    models = ["a", "b", "c", "d"]
    for param in (0.0, 0.4, 0.8) if rule is Rule.TARGET else (0.0, 10.0, 100.0):
        picks = route_batch(rule, P, C, param)
        for i in range(len(P)):
            kw: dict[str, Any] = {str(rule): param}
            first = choose(dict(zip(models, P[i])), dict(zip(models, C[i])), **kw)[0][0]
            assert models[int(picks[i])] == first


def test_choose_draws_the_operating_point_from_the_mix() -> None:
    probs, costs = {"cheap": 0.7, "big": 0.95}, {"cheap": 0.001, "big": 0.01}
    mix = HullMix(Rule.TARGET, ((0.5, 0.5), (0.9, 0.5)), 0.005, 0.8)
    rng = random.Random(0)
    firsts = [choose(probs, costs, target=0.99, mix=mix, rng=rng)[0] for _ in range(400)]
    share_cheap = sum(m == "cheap" for m, _ in firsts) / len(firsts)
    assert share_cheap == pytest.approx(0.5, abs=0.08)  # t=0.5 -> cheap, t=0.9 -> big
    assert all("drawn from 50% target=0.5 + 50% target=0.9" in why for _, why in firsts)
    with pytest.raises(UserError, match="cascade"):
        choose(probs, costs, cascade=True, mix=mix)
    # A price-weight mix decides alone, whatever target the node states.
    by_value = HullMix(Rule.PRICE_WEIGHT, ((0.0, 1.0),), 0.01, 0.9)
    assert choose(probs, costs, target=0.5, mix=by_value)[0][0] == "big"


CHEAP, STRONG = "sim-groq/llama-3.1-8b-instant", "sim-deepseek/deepseek-chat"


def _router() -> LearnedRouter:
    # Billing tickets: both models pass; legal ones: only the strong model.
    examples = [Example("extract", "please read this ticket", m, ok, cat)
                for cat in ("billing", "legal") for _ in range(40)
                for m, ok in ((CHEAP, cat == "billing"), (STRONG, True))]
    return LearnedRouter(LexicalFeaturizer(), prior_strength=1.0).fit(examples)


def test_a_calibrated_router_keeps_its_mix_per_node_and_when_saved() -> None:
    router = _router()
    cats = ["billing"] * 50 + ["legal"] * 50
    outcomes = np.array([[c == "billing", True] for c in cats])
    paid = np.tile([0.001, 0.01], (100, 1))
    texts = ["please read this ticket"] * 100
    # Quality 0.75: between sending legal tickets only to the strong model (rate 1.0) and
    # everything to the cheap one (rate 0.5): a mix of two operating points.
    mix = router.calibrate(texts, [CHEAP, STRONG], outcomes, paid, node="extract",
                           categories=cats, quality=0.75)
    assert len(mix.shares) == 2 and mix.assured_rate == pytest.approx(0.75)
    assert 0.001 < mix.expected_cost < 0.0055
    assert router.mix_for("extract") == mix and router.mix_for("other") is None
    again = LearnedRouter.from_bytes(router.to_bytes())
    assert again.mix_for("extract") == mix
    with pytest.raises(UserError, match="no operating point"):
        router.calibrate(texts, [CHEAP, STRONG], outcomes, paid, quality=0.999)


async def test_a_run_routes_on_the_calibrated_mix() -> None:
    from frugalflow import RoutedChatModel
    from frugalflow.routed import RunContext
    from frugalflow.usage import RunUsage

    router = _router()
    # Legal tickets: by p alone (target 0.5) they go to the strong model; a mix that sends
    # half the calls at target 0.0 (the cheapest model) and half at 0.5 splits them.
    router.mixes["extract"] = HullMix(Rule.TARGET, ((0.0, 0.5), (0.5, 0.5)), 0.005, 0.75)
    seen: list[Any] = []
    ctx = RunContext(catalog=Catalog.simulated(), usage=RunUsage(listeners=[seen.append]))
    ctx.router = router
    model = RoutedChatModel(context=ctx, node="extract",
                            needs=Needs(models=(CHEAP, STRONG), target=0.5)).with_category("legal")
    for _ in range(40):
        await model.ainvoke([HumanMessage("please read this ticket")])
    firsts = [a.model for a in seen]
    assert 8 <= firsts.count(CHEAP) <= 32 and 8 <= firsts.count(STRONG) <= 32
    assert all("drawn from" in (a.route_reason or "") for a in seen)


# -- bench/calibration.py's pure functions ---------------------------------------------


def test_a_node_policy_follows_the_lower_bound_rule_or_keeps_the_incumbent() -> None:
    measured = [Measured("cheap", 100, 90, 0.001), Measured("big", 100, 99, 0.01)]
    chosen = cal.node_policy(measured, 0.8, incumbent="big")
    assert chosen.promised and chosen.policy.shares == (("cheap", 1.0),)
    kept = cal.node_policy(measured, 0.999, incumbent="big")
    assert not kept.promised and kept.policy.shares == (("big", 1.0),)


def test_held_out_figures_of_a_mix_are_share_weighted() -> None:
    from frugalflow.evaluation import Policy

    policy = Policy((("cheap", 0.25), ("big", 0.75)), 0.0, 0.8)
    Y = np.array([[1, 1], [0, 1], [0, 1], [1, 0]], dtype=bool)
    paid = np.array([[1.0, 4.0]] * 4)
    rate, cost = cal.held_out(policy, ["cheap", "big"], Y, paid)
    assert rate == pytest.approx(0.25 * 0.5 + 0.75 * 0.75)
    assert cost == pytest.approx(0.25 * 1.0 + 0.75 * 4.0)


def test_the_calibration_experiment_on_synthetic_nodes() -> None:
    rng = np.random.default_rng(0)
    # Two nodes: on "easy" the cheap model never fails, on "hard" it mostly does.
    tasks = ["easy"] * 400 + ["hard"] * 400
    p_cheap = np.where(np.array(tasks) == "easy", 1.0, 0.3)
    Y = np.stack([rng.random(800) < p_cheap, rng.random(800) < 0.97], axis=1)
    paid = np.tile([0.001, 0.02], (800, 1))
    data = cal.TaskData("synthetic", ["cheap", "big"], tasks, Y, paid, None, None, [])
    run = cal.run_size(data, n=100, seed=1, targets=(0.8,), min_holdout=25)
    assert run.incumbent == "big" and run.nodes == 2
    assert run.moved == 1  # only the easy node leaves the big model
    assert 0.4 < run.cost_share < 0.7 and run.acc_share > 0.95
    assert run.eval_cost == pytest.approx(200 * 0.021)
    assert run.payback_calls == pytest.approx(run.eval_cost / run.saving_per_call)
    met, promised = run.kept[0.8]
    assert promised == 2 and met == 2  # both nodes promise 0.8 (big on hard) and keep it


# -- both benches on a foreign CSV -----------------------------------------------------

WEAK_NAME, STRONG_NAME = "acme-small-instruct-2025", "acme-frontier-reasoner-2025"


def _foreign_csv(path: Path, rows: int = 240) -> None:
    rng = random.Random(5)
    words = {"refunds": "refund charge invoice", "poetry": "poem verse rhyme metre"}
    with path.open("w") as f:
        # The strong model first: the benches must not take column order for weak/strong.
        f.write(f"eval_name,question,split,correct:{STRONG_NAME},correct:{WEAK_NAME},"
                f"cost:{STRONG_NAME},cost:{WEAK_NAME}\n")
        for i in range(rows):
            task = rng.choice(list(words))
            weak_ok = rng.random() < (0.9 if task == "refunds" else 0.3)
            split = "test" if i % 4 == 0 else "train"
            f.write(f"{task},{words[task]} number {i},{split},{int(rng.random() < 0.95)},"
                    f"{int(weak_ok)},{0.01 + rng.random() / 1000},{0.001}\n")


@pytest.mark.slow
def test_routing_bench_reads_a_foreign_csv(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "evals.csv"
    _foreign_csv(path)
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "routing.py"), "--csv", str(path), "--models",
         f"{STRONG_NAME},{WEAK_NAME}", "--max-iter", "60", "--val-folds", "2"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "split: the file's 'split' column, 180 train / 60 test" in out
    assert "task column: 'eval_name'" in out
    assert f"weak/strong by mean cost per query on train (--strong to state it): weak {WEAK_NAME}" \
        in out
    assert f"PGR vs share of calls to {STRONG_NAME}" in out
    assert STRONG_NAME in out.split("cost-quality curve on test")[1].splitlines()[1]  # full name
    for needle in ("accuracy at 20% of the best model's cost", "on the hull instead", "APGR"):
        assert needle in out, needle
    stated = subprocess.run(
        [sys.executable, str(REPO / "bench" / "routing.py"), "--csv", str(path), "--models",
         f"{STRONG_NAME},{WEAK_NAME}", "--strong", "nobody"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert stated.returncode != 0 and "--strong 'nobody' is not one of the models" in stated.stderr


@pytest.mark.slow
def test_calibration_bench_runs_on_a_task_csv(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "evals.csv"
    _foreign_csv(path, rows=600)
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "calibration.py"), "--csv", str(path),
         "--sizes", "25,50", "--seeds", "2", "--max-iter", "60"],
        capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "2 nodes" in out and "the 'split' column (test rows held out)" in out
    for needle in ("(a) held-out accuracy", "(b) nodes whose held-out", "(c) the evaluation's",
                   "per-task table", "learned router", "never worse than the per-task table"):
        assert needle in out, needle
