"""Learned routing inside flows: outcomes in the ledger train a router, the database keeps
its versions, runs use the newest, and validated quality holds while cost per run falls."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import HumanMessage
from typer.testing import CliRunner

from flows.document_extraction import flow as extraction, sample_invoices
from flows.support_triage import TicketFields, check_fields
from frugalflow import Catalog, Needs
from frugalflow.cli import app
from frugalflow.learning import LearnedRouter, PriorRouter, choose, examples_from
from frugalflow.runner import Runner
from frugalflow.testing.oracles import read_invoice, read_ticket

ROOT = Path(__file__).resolve().parents[1]


def test_choose_cascade_orders_by_cost_per_success() -> None:
    probs = {"cheap": 0.05, "mid": 0.9, "big": 0.99}
    costs = {"cheap": 1.0, "mid": 5.0, "big": 9.0}
    order = choose(probs, costs, cascade=True)
    # cheap: 20 per success, mid: 5.6, big: 9.1 -> the cheap model is a waste on this input.
    assert [m for m, _ in order] == ["mid", "big", "cheap"]
    assert "cost per success" in order[0][1]
    assert [m for m, _ in choose({**probs, "cheap": 0.9}, costs, cascade=True)][0] == "cheap"
    assert choose({"never": 0.0, "ok": 0.5}, {"never": 0.1, "ok": 1.0}, cascade=True)[0][0] == "ok"


def test_cascade_is_one_routing_rule() -> None:
    with pytest.raises(ValueError, match="cascade .* cannot be combined"):
        Needs(cascade=True, target=0.8)
    assert Needs(cascade=True).routed and Needs(target=0.5).routed and not Needs().routed
    assert "cascade" in Needs(cascade=True).describe()


def test_ticket_validator_catches_what_the_oracle_says_is_wrong() -> None:
    ticket = "Hi, I'm Dana Reyes. I was charged twice for order 88231 (the standing desk)."
    right, _ = read_ticket([HumanMessage(ticket)])
    assert right["customer_name"] == "Dana Reyes" and right["order_id"] == "88231"
    assert check_fields(TicketFields(**right), ticket) is True
    wrong_name = TicketFields(**{**right, "customer_name": "seyeR anaD"})
    assert "customer name" in str(check_fields(wrong_name, ticket))
    assert "order" in str(check_fields(TicketFields(**{**right, "order_id": None}), ticket))


async def _extract_all(runner: Runner, docs: list[str]) -> list[Any]:
    return list(await asyncio.gather(*(runner.start(extraction.name, {"document": d})
                                       for d in docs)))


async def _cost_and_quality(runner: Runner, docs: list[str]) -> tuple[float, int, int]:
    results = await _extract_all(runner, docs)
    right = sum(r.state["invoice"] == read_invoice([HumanMessage(d)])[0]
                for r, d in zip(results, docs, strict=True))
    calls = 0
    for r in results:
        calls += len((await runner.get(r.run_id)).attempts)
    return sum(r.cost_usd for r in results), right, calls


@pytest.mark.slow
async def test_router_learned_from_outcomes_lowers_cost_at_equal_quality(tmp_path: Path) -> None:
    catalog = Catalog.simulated()
    production = Runner(f"sqlite:///{tmp_path / 'prod.db'}", flows=[extraction],
                        catalog=catalog, router="invoices")
    evaluation = Runner(f"sqlite:///{tmp_path / 'eval.db'}", flows=[extraction], catalog=catalog)
    held_out = sample_invoices(15, seed=999)
    try:
        static_cost, static_right, static_calls = await _cost_and_quality(evaluation, held_out)
        await _extract_all(production, sample_invoices(100, seed=1))
        router = await production.retrain_router(flow=extraction.name)
        assert isinstance(router, LearnedRouter)
        evaluation.router = router
        cost, right, calls = await _cost_and_quality(evaluation, held_out)
    finally:
        await production.close()
        await evaluation.close()
    assert right == static_right == len(held_out)  # the validator holds quality
    # About 0.88 of the static cost. Simulated models are charged their list price at every
    # hour of the runner's clock (a real DeepSeek would pay its off-peak hours' price).
    assert cost < 0.9 * static_cost and calls < static_calls
    # The saving comes from messy invoices skipping models the router expects to fail.
    messy = next(d for d in held_out if read_invoice([HumanMessage(d)])[1] > 0.5)
    p = router.predict(messy, ["sim-groq/llama-3.1-8b-instant", "sim-deepseek/deepseek-chat"],
                       node="extract")
    assert p["sim-groq/llama-3.1-8b-instant"] < 0.3 < p["sim-deepseek/deepseek-chat"]


@pytest.mark.slow
async def test_named_router_is_stored_versioned_and_picked_up(db_url: str) -> None:
    catalog = Catalog.simulated()
    trainer = Runner(db_url, flows=[extraction], catalog=catalog)
    user = Runner(db_url, flows=[extraction], catalog=catalog, router="invoices")
    try:
        # Nothing stored yet: the catalog's prior routes, runs still work.
        first = await user.start(extraction.name, {"document": sample_invoices(1)[0]})
        assert first.ok and isinstance(user.router, PriorRouter)
        assert await trainer.retrain_router("invoices", min_examples=50) is None  # too few
        await _extract_all(trainer, sample_invoices(30, seed=3))
        trained = await trainer.retrain_router("invoices", flow=extraction.name)
        assert [r["version"] for r in await trainer.ledger.routers()] == [1]

        doc = sample_invoices(2, seed=4)[1]
        result = await user.start(extraction.name, {"document": doc})
        assert result.ok and isinstance(user.router, LearnedRouter)
        keys = [s.key for s in catalog]
        assert user.router.predict(doc, keys, node="extract") == \
            trained.predict(doc, keys, node="extract")
        attempts = (await user.get(result.run_id)).attempts
        assert attempts[0].route_reason and "cost per success" in attempts[0].route_reason

        await _extract_all(trainer, sample_invoices(10, seed=5))
        newer = await trainer.retrain_router("invoices", flow=extraction.name)
        await user.start(extraction.name, {"document": doc})
        assert user.router.predict(doc, keys, node="extract") == \
            newer.predict(doc, keys, node="extract")
        assert [r["version"] for r in await user.ledger.routers()] == [1, 2]
    finally:
        await trainer.close()
        await user.close()


@pytest.mark.slow
def test_cli_trains_lists_and_runs_with_a_router(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    cli = CliRunner()
    few = cli.invoke(app, ["router", "train", "--db", db, "--name", "inv"])
    assert few.exit_code == 1 and "only 0 outcomes" in few.output and "Traceback" not in few.output

    async def fill() -> None:
        runner = Runner(db, flows=[extraction], catalog=Catalog.simulated())
        try:
            await _extract_all(runner, sample_invoices(24, seed=8))
        finally:
            await runner.close()

    asyncio.run(fill())
    trained = cli.invoke(app, ["router", "train", "--db", db, "--name", "inv",
                               "--flow", extraction.name, "--json"])
    assert trained.exit_code == 0, trained.output
    out = json.loads(trained.output)
    assert out["version"] == 1 and out["examples"] >= 24 and out["models"]
    listed = json.loads(cli.invoke(app, ["router", "list", "--db", db, "--json"]).output)
    assert [(r["name"], r["version"]) for r in listed] == [("inv", 1)]

    doc = sample_invoices(3, seed=9)[0]
    monkeypatch.delenv("FRUGALFLOW_CATALOG", raising=False)
    for key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "GEMINI_API_KEY",
                "DEEPSEEK_API_KEY", "GROQ_API_KEY", "TOGETHER_API_KEY", "MISTRAL_API_KEY"):
        monkeypatch.delenv(key, raising=False)  # no keys: the default catalog is simulated
    ran = cli.invoke(app, ["run", "document_extraction", "--db", db, "--router", "inv",
                           "--json", "--input", json.dumps({"document": doc})])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.output)["status"] == "succeeded"
    run_id = json.loads(ran.output)["run_id"]
    marked = cli.invoke(app, ["runs", "feedback", run_id, "--bad", "--node", "extract",
                              "--db", db])
    assert marked.exit_code == 0 and "1 answer(s) marked bad" in marked.output
    wrong = cli.invoke(app, ["runs", "feedback", run_id, "--good", "--db", db])
    assert wrong.exit_code == 1 and "exactly one of node or call_id" in wrong.output


async def test_category_is_a_routing_feature_and_is_recorded(tmp_path: Path) -> None:
    from frugalflow.learning import Example, LexicalFeaturizer
    from frugalflow.routed import RunContext
    from frugalflow.usage import RunUsage

    catalog = Catalog.simulated()
    cheap, strong = "sim-groq/llama-3.1-8b-instant", "sim-deepseek/deepseek-chat"
    # The same words in every ticket: only the category says which model succeeds. Enough
    # examples that, on legal tickets, the cheap model's cost per success is far above the
    # strong one's (with 40, p=0.06 put them within 25%: the order turned on their prices).
    examples = [Example("extract", "please read this ticket", m, ok, cat)
                for cat in ("billing", "legal") for _ in range(200)
                for m, ok in ((cheap, cat == "billing"), (strong, True))]
    router = LearnedRouter(LexicalFeaturizer(), prior_strength=1.0).fit(examples)
    seen: list[Any] = []
    ctx = RunContext(catalog=catalog, usage=RunUsage(listeners=[seen.append]))
    ctx.router = router
    from frugalflow import RoutedChatModel

    model = RoutedChatModel(context=ctx, node="extract",
                            needs=Needs(models=(cheap, strong), cascade=True))
    for category, first in (("billing", cheap), ("legal", strong)):
        await model.with_category(category).ainvoke([HumanMessage("please read this ticket")])
        assert (seen[-1].model, seen[-1].category) == (first, category)


async def test_triage_records_the_ticket_category_with_its_extraction(tmp_path: Path) -> None:
    from flows.support_triage import flow as triage

    runner = Runner(f"sqlite:///{tmp_path / 'triage.db'}", flows=[triage],
                    catalog=Catalog.simulated())
    try:
        ticket = "Hi, I'm Dana Reyes. I was charged twice for order 88231 (the standing desk)."
        result = await runner.start(triage.name, {"ticket": ticket})
        assert result.ok
        examples = examples_from(await runner.ledger.outcomes(flow=triage.name, node="extract"))
    finally:
        await runner.close()
    assert examples and {e.category for e in examples} == {result.state["category"]}
