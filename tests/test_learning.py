"""Learned routing: routers learn who succeeds on what, save exactly, and choose in order."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from frugalflow import Catalog, MissingIntegrationError, UserError, learning
from frugalflow.exceptions import ErrorClass
from frugalflow.learning import (
    Example,
    LearnedRouter,
    LexicalFeaturizer,
    PriorRouter,
    Router,
    choose,
    default_featurizer,
    examples_from,
    features,
    success_of,
)
from frugalflow.persistence.ledger import CallOutcome
from frugalflow.statuses import Outcome

REPO = Path(__file__).resolve().parent.parent
TOPICS = {
    "calculus": ["derivative", "integral", "limit", "series", "gradient"],
    "history": ["empire", "treaty", "revolution", "dynasty", "war"],
    "cooking": ["recipe", "oven", "sauce", "flour", "simmer"],
    "travel": ["flight", "hotel", "passport", "beach", "museum"],
}


def _text(rng: random.Random, topic: str) -> str:
    words = rng.sample(TOPICS[topic], 3) + rng.sample(["the", "a", "of", "please", "about"], 2)
    rng.shuffle(words)
    lead = "a calculus question:" if topic == "calculus" else f"a {topic} question:"
    return f"{lead} {' '.join(words)}"


def planted(n: int, seed: int) -> list[Example]:
    """`small` fails calculus questions and passes the rest; `big` passes nearly everything."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        topic = rng.choice(list(TOPICS))
        text = _text(rng, topic)
        calc = topic == "calculus"
        out.append(Example("answer", text, "small", (rng.random() < 0.05) if calc
                           else (rng.random() < 0.9)))
        out.append(Example("answer", text, "big", rng.random() < 0.95))
    return out


def small_lexical() -> LexicalFeaturizer:
    return LexicalFeaturizer(n_features=2**12, tag_features=64)


@pytest.fixture(scope="module")
def fitted() -> LearnedRouter:
    return LearnedRouter(small_lexical()).fit(planted(300, seed=1))


def _log_loss(router: Router, examples: list[Example]) -> float:
    total = 0.0
    for ex in examples:
        p = router.predict(ex.text, [ex.model], node=ex.node)[ex.model]
        p = min(max(p, 1e-6), 1 - 1e-6)
        total -= math.log(p if ex.success else 1 - p)
    return total / len(examples)


def test_learns_the_planted_rule_and_beats_the_prior(fitted: LearnedRouter) -> None:
    held_out = planted(200, seed=2)
    texts = [e.text for e in held_out if e.model == "small"]
    calc = np.array(["calculus" in t for t in texts])
    P = fitted.predict_batch(texts, ["small", "big"], nodes=["answer"] * len(texts))
    assert P[calc, 0].mean() < 0.3 and P[~calc, 0].mean() > 0.75  # small: fails calculus
    assert P[:, 1].mean() > 0.85  # big: passes nearly everything

    train_rate = np.mean([e.success for e in planted(300, seed=1)])
    flat = PriorRouter(default=float(train_rate))  # the best input-blind guess
    assert _log_loss(fitted, held_out) < 0.7 * _log_loss(flat, held_out)

    # and the probabilities route: calculus to big, the rest to small
    costs = {"small": 0.001, "big": 0.02}
    first = [choose(dict(zip(["small", "big"], row, strict=True)), costs, target=0.7)[0][0]
             for row in P]
    agree = np.mean([(f == "big") == c for f, c in zip(first, calc, strict=True)])
    assert agree > 0.95


def test_fit_is_deterministic(fitted: LearnedRouter) -> None:
    again = LearnedRouter(small_lexical()).fit(planted(300, seed=1))
    texts = [e.text for e in planted(20, seed=3)[::2]]
    assert np.array_equal(again.predict_batch(texts, ["small", "big"]),
                          fitted.predict_batch(texts, ["small", "big"]))


def test_round_trip_gives_identical_predictions(fitted: LearnedRouter) -> None:
    blob = fitted.to_bytes()
    doc = json.loads(blob)  # plain JSON, no pickle
    assert doc["format"] == "frugalflow.router" and doc["version"] == 1
    loaded = LearnedRouter.from_bytes(blob)
    texts = [e.text for e in planted(30, seed=4)[::2]]
    cands = ["small", "big", "never-seen"]
    assert np.array_equal(loaded.predict_batch(texts, cands), fitted.predict_batch(texts, cands))
    assert loaded.predict(texts[0], cands, node="answer") == fitted.predict(
        texts[0], cands, node="answer")
    assert loaded.to_bytes() == blob

    doc["version"] = 99
    with pytest.raises(UserError, match="version 99"):
        LearnedRouter.from_bytes(json.dumps(doc).encode())
    with pytest.raises(UserError):
        LearnedRouter.from_bytes(b"\x80not json")


def test_unseen_models_fall_back_to_the_prior() -> None:
    prior = PriorRouter({"c": 0.42}, default=0.3)
    assert prior.predict("anything", ["c", "d"]) == {"c": 0.42, "d": 0.3}

    router = LearnedRouter(small_lexical(), prior=prior).fit(planted(100, seed=5))
    p = router.predict("a travel question: hotel", ["small", "c", "d"])
    assert p["c"] == pytest.approx(0.42) and p["d"] == pytest.approx(0.3)

    # no prior given: the global success rate of the training outcomes
    plain = LearnedRouter(small_lexical()).fit(planted(100, seed=5))
    rate = np.mean([e.success for e in planted(100, seed=5)])
    assert plain.predict("x", ["unknown"])["unknown"] == pytest.approx(rate)

    # a model with few examples stays close to its prior: p = (n p_l + k p_prior) / (n + k)
    few = [Example(None, "a history question: treaty", "rare", True) for _ in range(2)]
    blended = LearnedRouter(small_lexical(), prior={"rare": 0.1}, prior_strength=20).fit(
        planted(100, seed=5) + few)
    assert blended.predict("a history question: treaty", ["rare"])["rare"] < 0.25


def test_prior_from_catalog_uses_mean_quality() -> None:
    catalog = Catalog.simulated()
    prior = PriorRouter.from_catalog(catalog, ["reasoning"])
    for spec in catalog:
        if "reasoning" in spec.quality:
            assert prior.p(spec.key) == pytest.approx(spec.quality["reasoning"])
    assert prior.p("nobody/none") == 0.5


def test_partial_fit_adds_a_new_model(fitted: LearnedRouter) -> None:
    router = LearnedRouter.from_bytes(fitted.to_bytes())
    rng = random.Random(6)
    new = [Example("answer", _text(rng, t), "medium", t != "history")
           for t in list(TOPICS) * 15]
    router.partial_fit(new, max_iter=80)
    assert "medium" in router.heads and router.counts["medium"] == len(new)
    hist = router.predict("a history question: empire war", ["medium"], node="answer")
    cook = router.predict("a cooking question: oven flour", ["medium"], node="answer")
    assert hist["medium"] < cook["medium"]
    # the update keeps what the first fit learned about the other models
    calc = "a calculus question: integral limit the of"
    assert router.predict(calc, ["small"], node="answer")["small"] < 0.3


def test_choose_orders_by_target_price_weight_and_cost() -> None:
    probs = {"tiny": 0.4, "mid": 0.8, "large": 0.95}
    costs = {"tiny": 0.001, "mid": 0.01, "large": 0.05}
    by_target = choose(probs, costs, target=0.75)
    assert [m for m, _ in by_target] == ["mid", "tiny", "large"]
    assert "cheapest with p>=target" in by_target[0][1]
    # nothing reaches the target: the most likely model first, then by cost
    assert [m for m, _ in choose(probs, costs, target=0.99)] == ["large", "tiny", "mid"]
    # price_weight: p - lambda * cost
    assert [m for m, _ in choose(probs, costs, price_weight=1.0)] == ["large", "mid", "tiny"]
    assert [m for m, _ in choose(probs, costs, price_weight=20.0)] == ["mid", "tiny", "large"]
    assert [m for m, _ in choose(probs, costs, price_weight=100.0)] == ["tiny", "mid", "large"]
    # default: by cost
    assert [m for m, _ in choose(probs, costs)] == ["tiny", "mid", "large"]
    with pytest.raises(UserError, match="no cost for mid"):
        choose(probs, {"tiny": 1, "large": 2})


def test_what_counts_as_a_success() -> None:
    def call(outcome: Outcome, error_class: ErrorClass | None = None,
             feedback: bool | None = None) -> CallOutcome:
        return CallOutcome(node="n", text="t", model="m", category="c", outcome=outcome,
                           error_class=error_class, feedback=feedback)

    # an answer counts unless feedback says it was bad; a rejected or malformed answer is
    # a failure; anything else says nothing about the model and is left out
    cases = [
        (call(Outcome.OK), True),
        (call(Outcome.OK, feedback=True), True),
        (call(Outcome.OK, feedback=False), False),
        (call(Outcome.ERROR, ErrorClass.VALIDATION), False),
        (call(Outcome.ERROR, ErrorClass.MALFORMED), False),
        (call(Outcome.ERROR, ErrorClass.RATE_LIMIT), None),
        (call(Outcome.ERROR, ErrorClass.TIMEOUT), None),
        (call(Outcome.ERROR, ErrorClass.CONTEXT_LENGTH), None),
        (call(Outcome.ABANDONED, ErrorClass.ABANDONED), None),
        (call(Outcome.PENDING), None),
        (call(Outcome.REPLAYED), None),
    ]
    assert [success_of(c) for c, _ in cases] == [want for _, want in cases]
    assert examples_from(c for c, _ in cases) == [
        Example("n", "t", "m", want, "c") for _, want in cases if want is not None]


def test_lexical_featurizer_needs_no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    f = LexicalFeaturizer(n_features=256, tag_features=16).fit(["one text", "another text"])
    X = f.transform(["one text here", ""], ["cat:a|node:b", None])
    assert X.shape == (2, f.dim) and X.dtype == np.float32
    assert np.linalg.norm(X[0, :256]) == pytest.approx(1.0, abs=1e-6)  # l2-normalised text
    assert X[1, :256].sum() == 0  # empty text: only the length tag
    assert np.array_equal(f.transform(["one text here"]), f.transform(["one text here"]))
    assert np.allclose(f.transform_sparse(["one text here"], ["x"]).to_dense(),
                       f.transform(["one text here"], ["x"]))


def test_embeddings_are_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(features, "embeddings_available", lambda: False)
    assert isinstance(default_featurizer(), LexicalFeaturizer)
    with pytest.raises(MissingIntegrationError, match=r"frugalflow\[embeddings\]") as err:
        learning.EmbeddingFeaturizer()
    assert getattr(err.value, "extra", None) == "embeddings"


def test_bench_runs_on_a_small_csv(tmp_path: Path) -> None:
    rng = random.Random(7)
    path = tmp_path / "runs.csv"
    with path.open("w") as f:
        f.write("question,category,correct:small,correct:big,out_chars:small,out_chars:big\n")
        for _ in range(160):
            topic = rng.choice(list(TOPICS))
            calc = topic == "calculus"
            small = rng.random() < (0.1 if calc else 0.85)
            big = rng.random() < 0.93
            f.write(f"{_text(rng, topic)},{topic},{int(small)},{int(big)},"
                    f"{rng.randint(100, 400)},{rng.randint(200, 800)}\n")
        f.write("an incomplete row,travel,1,,100,200\n")
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "routing.py"), "--csv", str(path),
         "--models", "small,big", "--price", "small=0.1,0.4", "--price", "big=3,15",
         "--prefix-tokens", "100", "--max-iter", "40", "--val-folds", "2"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for needle in ("161 rows read, 1 dropped", "single models on the test split",
                   "oracle (cheapest correct model)", "cost-quality curve", "cost to reach",
                   "APGR", "CPT(50%)", "random (mean of 20)", "summary"):
        assert needle in out, f"{needle!r} not in output:\n{out}"
    assert "--price (given)" in out  # the price assumption is printed
