"""Pass-rate intervals, the cost-quality frontier and the cheapest policy for a target."""

from __future__ import annotations

import pytest

from frugalflow.evaluation import Measured, cheapest_policy, frontier, lower_hull, wilson


def test_wilson_matches_the_textbook_value_and_behaves_at_the_ends() -> None:
    # 8 of 10 at 95%: [0.490, 0.943] (Wilson 1927; e.g. Agresti & Coull 1998, table 1)
    ci = wilson(8, 10)
    assert ci.low == pytest.approx(0.4902, abs=1e-4) and ci.high == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 10).low == 0.0 and 0.0 < wilson(0, 10).high < 0.35
    assert wilson(10, 10).high == 1.0 and 0.65 < wilson(10, 10).low < 1.0
    assert (wilson(0, 0).low, wilson(0, 0).high) == (0.0, 1.0)  # nothing measured


def test_wilson_narrows_with_more_calls_and_widens_with_confidence() -> None:
    small, large = wilson(9, 10), wilson(900, 1000)
    assert small.low < large.low < 0.9 < large.high < small.high
    assert wilson(90, 100, 0.99).low < wilson(90, 100, 0.95).low < wilson(90, 100, 0.80).low


@pytest.mark.parametrize("successes, n, confidence", [(11, 10, 0.95), (-1, 10, 0.95),
                                                      (5, 10, 1.0), (5, 10, 0.0)])
def test_wilson_refuses_impossible_counts(successes: int, n: int, confidence: float) -> None:
    with pytest.raises(ValueError):
        wilson(successes, n, confidence)


CHEAP = Measured("cheap", 100, 70, 0.001)
MID = Measured("mid", 100, 85, 0.004)
BIG = Measured("big", 100, 97, 0.020)
DOMINATED = Measured("dominated", 100, 60, 0.010)  # dearer than cheap and worse
ABOVE_CHORD = Measured("above-chord", 100, 80, 0.0035)  # on the frontier, never worth choosing


def test_the_frontier_drops_models_a_cheaper_one_matches() -> None:
    assert [m.model for m in frontier([BIG, DOMINATED, MID, CHEAP, ABOVE_CHORD])] == \
        ["cheap", "above-chord", "mid", "big"]
    assert frontier([Measured("unmeasured", 0, 0, 0.0)]) == []


def test_the_hull_keeps_only_models_a_mix_cannot_beat() -> None:
    hull = lower_hull([BIG, DOMINATED, MID, CHEAP, ABOVE_CHORD])
    assert [m.model for m in hull] == ["cheap", "mid", "big"]


def test_a_target_the_cheapest_model_meets_routes_to_it_alone() -> None:
    policy = cheapest_policy([CHEAP, MID, BIG], target=0.5)
    assert policy is not None and policy.shares == (("cheap", 1.0),)
    assert policy.expected_cost == CHEAP.cost and policy.assured_rate >= 0.5


def test_a_target_between_two_models_is_met_by_mixing_them_for_less() -> None:
    target = 0.8
    policy = cheapest_policy([CHEAP, MID, BIG, DOMINATED, ABOVE_CHORD], target)
    assert policy is not None
    models = [m for m, _ in policy.shares]
    assert models == ["mid", "big"] and sum(s for _, s in policy.shares) == pytest.approx(1.0)
    lows = {"mid": MID.interval().low, "big": BIG.interval().low}
    assert sum(s * lows[m] for m, s in policy.shares) == pytest.approx(target)
    # cheaper than the cheapest single model whose lower bound meets the target
    assert policy.expected_cost < BIG.cost
    assert "mid" in policy.describe() and "big" in policy.describe()


def test_no_policy_when_no_model_is_good_enough_and_bad_targets_are_refused() -> None:
    assert cheapest_policy([CHEAP, MID, BIG], target=0.99) is None
    assert cheapest_policy([], target=0.5) is None
    with pytest.raises(ValueError):
        cheapest_policy([CHEAP], target=1.5)
