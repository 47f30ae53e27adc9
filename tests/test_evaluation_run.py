"""The evaluation executor: cells run on the forced model, scored, recorded, resumed unpaid."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.messages import HumanMessage, SystemMessage
from sqlalchemy import func, select

from frugalflow import END, START, Flow, Needs, RoutedChatModel
from frugalflow.catalog import Catalog, ModelSpec
from frugalflow.evaluation.cases import CellOutcome, EvalCase, Score
from frugalflow.evaluation.results import EvalStatus, EvalStore
from frugalflow.evaluation.run import EvalProgress, Evaluation
from frugalflow.exceptions import UserError
from frugalflow.limits import RateLimiter
from frugalflow.persistence import Store
from frugalflow.persistence.tables import AttemptRow

NANO, MINI = "sim-openai/gpt-4.1-nano", "sim-openai/gpt-4o-mini"
FLASH = "sim-google/gemini-2.5-flash"


class S(TypedDict, total=False):
    question: str
    answer: str
    summary: str


def make_flow(validator: Any = None, out_tokens: int = 50, quality: float = 0.95) -> Flow[S]:
    flow: Flow[S] = Flow("qa", S)

    @flow.node(needs=Needs(quality={"reasoning": quality}, expected_output_tokens=out_tokens),
               validator=validator)
    async def answer(state: S, model: RoutedChatModel) -> S:
        reply = await model.ainvoke([SystemMessage("Answer."), HumanMessage(state["question"])])
        return {"answer": str(reply.content)}

    @flow.node(needs=Needs(expected_output_tokens=out_tokens))
    async def summarise(state: S, model: RoutedChatModel) -> S:
        reply = await model.ainvoke([HumanMessage(f"Summarise: {state['answer']}")])
        return {"summary": str(reply.content)}

    flow.add_edge(START, "answer").add_edge("answer", "summarise").add_edge("summarise", END)
    return flow


class ByModel:
    """Passes when the answer comes from one of the models the case expects (the simulated
    answers start with `[model]`)."""

    name = "by-model"

    def __init__(self, field: str = "answer") -> None:
        self.field = field
        self.seen: list[tuple[str, Any]] = []

    async def score(self, case: EvalCase, output: Any) -> Score:
        self.seen.append((case.id, output))
        text = output[self.field]
        ok = any(text.startswith(f"[{m}]") for m in case.expected)
        return Score(passed=ok, value=1.0 if ok else 0.0, reason=None if ok else "wrong model")


def cases(n: int = 3) -> list[EvalCase]:
    return [EvalCase(id=f"c{i}", inputs={"question": f"question number {i}?"},
                     expected=["gpt-4.1-nano"]) for i in range(n)]


@pytest.fixture
def store(tmp_path: Path) -> Store:
    return Store(f"sqlite:///{tmp_path / 'eval.db'}")


async def test_node_cells_run_on_the_forced_model_and_are_recorded(store: Store, sim: Any) -> None:
    scorer = ByModel()
    ev = Evaluation(make_flow(), cases(3), scorer, node="answer", catalog=Catalog.simulated(),
                    candidates=[NANO, MINI], store=store, concurrency=3)
    plan = await ev.plan()
    assert len(plan.todo) == 6 and plan.estimate_usd > 0 and not plan.resumed
    assert set(plan.per_model_usd) == {NANO, MINI}
    result = await ev.run(plan)
    assert result.status == EvalStatus.COMPLETED and result.complete
    assert {(c.model, c.outcome) for c in result.cells} == {
        (NANO, CellOutcome.PASS), (MINI, CellOutcome.FAIL)}
    # each cell called its own model once, and only the node ran (no summarise call)
    assert sim.calls[NANO] == 3 and sim.calls[MINI] == 3
    assert sum(sim.calls[k] for k in sim.calls if "/" in k) == 6
    # the node's state update is what was scored
    assert all(set(out) == {"answer"} for _, out in scorer.seen)
    cell = result.cells[0]
    assert cell.cost_usd > 0 and cell.input_tokens > 0 and cell.output_tokens > 0
    assert cell.latency_ms >= 0 and cell.node == "answer" and cell.output["answer"]
    stored = await EvalStore(store).cells(result.eval_id)
    assert sorted(stored, key=lambda c: (c.case_id, c.model)) == sorted(
        result.cells, key=lambda c: (c.case_id, c.model))
    record = await EvalStore(store).get(result.eval_id)
    assert record.status == EvalStatus.COMPLETED and record.node == "answer"
    assert record.cost_usd == pytest.approx(sum(c.cost_usd for c in result.cells))
    assert record.spec["candidates"] == [NANO, MINI] and record.spec["scorer"] == "by-model"
    # evaluation calls are not production traffic
    async with store.read() as conn:
        n = (await conn.execute(select(func.count()).select_from(AttemptRow.__table__))).scalar()
    assert n == 0
    await store.close()


async def test_flow_mode_forces_every_node_and_scores_the_final_state(sim: Any) -> None:
    scorer = ByModel("summary")
    ev = Evaluation(make_flow(), cases(2), scorer, catalog=Catalog.simulated(),
                    candidates="sim-openai/gpt-4.1*")
    result = await ev.run()
    assert result.complete and ev.candidates == [NANO, "sim-openai/gpt-4.1"]
    assert sim.calls[NANO] == 4 and sim.calls["sim-openai/gpt-4.1"] == 4  # 2 cases x 2 nodes
    assert all({"question", "answer", "summary"} <= set(out) for _, out in scorer.seen)
    by_model = {c.model: c.outcome for c in result.cells}
    assert by_model == {NANO: CellOutcome.PASS, "sim-openai/gpt-4.1": CellOutcome.FAIL}


async def test_default_candidates_ignore_the_quality_prior() -> None:
    catalog = Catalog.simulated()
    ev = Evaluation(make_flow(), cases(1), ByModel(), node="answer", catalog=catalog)
    # reasoning >= 0.95 rejects every model on the prior; the evaluation measures them all
    assert ev.candidates == [s.key for s in catalog]


async def test_a_killed_evaluation_resumes_without_paying_a_recorded_cell(
        store: Store, sim: Any) -> None:
    flow, catalog = make_flow(), Catalog.simulated()
    first = Evaluation(flow, cases(4), ByModel(), node="answer", catalog=catalog,
                       candidates=[NANO, MINI], store=store, concurrency=1)
    plan = await first.plan()
    task: asyncio.Task[Any] | None = None
    seen: list[int] = []

    def kill_after_three(p: EvalProgress) -> None:
        seen.append(p.done)
        if p.done == 3 and task is not None:
            task.cancel()

    task = asyncio.create_task(first.run(plan, on_progress=kill_after_three))
    with pytest.raises(asyncio.CancelledError):
        await task
    evals = EvalStore(store)
    record = await evals.get(plan.eval_id)
    assert record.status == EvalStatus.STOPPED and record.stop_reason == "interrupted"
    assert len(await evals.cells(plan.eval_id)) == 3
    assert sim.calls[NANO] + sim.calls[MINI] == 3
    # the same spec again: the same evaluation, its recorded cells skipped
    again = Evaluation(flow, cases(4), ByModel(), node="answer", catalog=catalog,
                       candidates=[NANO, MINI], store=store, concurrency=2)
    plan2 = await again.plan()
    assert plan2.resumed and plan2.eval_id == plan.eval_id and len(plan2.todo) == 5
    result = await again.run(plan2)
    assert result.complete and len(result.cells) == 8
    assert sim.calls[NANO] == 4 and sim.calls[MINI] == 4  # every cell paid exactly once
    assert (await evals.get(plan.eval_id)).status == EvalStatus.COMPLETED
    assert result.cost_usd == pytest.approx(sum(c.cost_usd for c in result.cells))
    # --resume ID with other candidates is refused before anything is paid
    other = Evaluation(flow, cases(4), ByModel(), node="answer", catalog=catalog,
                       candidates=[NANO], store=store, eval_id=plan.eval_id)
    with pytest.raises(UserError, match="other cases, models"):
        await other.plan()
    await store.close()


async def test_an_unavailable_model_and_an_outage_mark_their_cells_and_the_rest_goes_on(
        store: Store, sim: Any, clock: Any) -> None:
    keyed = ModelSpec(provider="acme", model="gpt-4o-mini", api_key_env="ACME_EVAL_KEY",
                      integration="frugalflow.testing.simulator:SimulatedChatModel",
                      input_price=0.15, output_price=0.6, context_window=128000,
                      max_output_tokens=16384, capabilities={"streaming": True})
    catalog = Catalog.simulated().extend([keyed])
    sim.down("sim-google")
    ev = Evaluation(make_flow(), cases(3), ByModel(), node="answer", catalog=catalog,
                    candidates=[NANO, FLASH, "acme/gpt-4o-mini"], store=store,
                    sleep=clock.sleep)  # retry backoffs on the fake clock
    plan = await ev.plan()
    assert "acme/gpt-4o-mini" in plan.unavailable
    result = await ev.run(plan)
    assert result.complete
    by_model: dict[str, set[CellOutcome]] = {}
    for c in result.cells:
        by_model.setdefault(c.model, set()).add(c.outcome)
    assert by_model == {NANO: {CellOutcome.PASS}, FLASH: {CellOutcome.ERROR},
                        "acme/gpt-4o-mini": {CellOutcome.ERROR}}
    reasons = {c.model: c.reason or "" for c in result.cells if c.outcome == CellOutcome.ERROR}
    assert "unavailable" in reasons["acme/gpt-4o-mini"]
    assert "set ACME_EVAL_KEY" in reasons["acme/gpt-4o-mini"]
    assert "503" in reasons[FLASH] or "unavailable" in reasons[FLASH].lower()
    # the outage is over: a re-run retries only the cells that got no answer
    sim.clear()
    calls_before = sim.calls[NANO]
    retry = Evaluation(make_flow(), cases(3), ByModel(), node="answer", catalog=catalog,
                       candidates=[NANO, FLASH, "acme/gpt-4o-mini"], store=store)
    plan2 = await retry.plan()
    assert {k.model for k in plan2.todo} == {FLASH, "acme/gpt-4o-mini"}
    again = await retry.run(plan2)
    assert sim.calls[NANO] == calls_before
    assert {c.outcome for c in again.cells if c.model == FLASH} == {CellOutcome.FAIL}
    await store.close()


async def test_a_scorer_that_raises_marks_its_cell_never_a_traceback() -> None:
    class Raising:
        name = "raising"

        async def score(self, case: EvalCase, output: Any) -> Score:
            if case.id == "c1":
                raise KeyError("missing")
            return Score(passed=True)

    ev = Evaluation(make_flow(), cases(2), Raising(), node="answer", catalog=Catalog.simulated(),
                    candidates=[NANO])
    result = await ev.run()
    assert result.complete
    bad = [c for c in result.cells if c.case_id == "c1"][0]
    assert bad.outcome == CellOutcome.ERROR and "KeyError" in (bad.reason or "")
    assert bad.cost_usd > 0 and bad.output is not None  # paid and answered: kept on resume
    assert [c.outcome for c in result.cells if c.case_id == "c0"] == [CellOutcome.PASS]


async def test_a_validator_rejection_is_the_models_failure_not_an_error() -> None:
    ev = Evaluation(make_flow(validator=lambda m: "too vague"), cases(1), ByModel(),
                    node="answer", catalog=Catalog.simulated(), candidates=[NANO])
    result = await ev.run()
    (cell,) = result.cells
    assert cell.outcome == CellOutcome.FAIL and "too vague" in (cell.reason or "")
    assert cell.cost_usd > 0


async def test_an_estimate_over_the_budget_is_refused_before_anything_is_paid(sim: Any) -> None:
    ev = Evaluation(make_flow(out_tokens=4000), cases(3), ByModel(), node="answer",
                    catalog=Catalog.simulated(), candidates=[NANO, MINI], budget=0.0001)
    with pytest.raises(UserError, match=r"estimated \$.* for 6 cells is over the budget left"):
        await ev.plan()
    assert not sim.calls


async def test_the_budget_stops_new_cells_and_a_larger_one_finishes(store: Store,
                                                                     sim: Any) -> None:
    # The node expects 1 output token; the simulated models answer ~60: the estimate
    # passes, the actual spend reaches the budget part way.
    flow, catalog = make_flow(out_tokens=1), Catalog.simulated()
    one = Evaluation(flow, cases(1), ByModel(), node="answer", catalog=catalog,
                     candidates=[MINI]).cell_cost(cases(1)[0], MINI)
    budget = one * 12
    ev = Evaluation(flow, cases(10), ByModel(), node="answer", catalog=catalog,
                    candidates=[MINI], budget=budget, store=store, concurrency=2)
    result = await ev.run()
    assert result.status == EvalStatus.STOPPED and result.stop_reason == "budget reached"
    assert 0 < len(result.cells) < 10
    per_cell = max(c.cost_usd for c in result.cells)
    # No cell starts once the budget is spent; the cells in flight (2) may finish over it.
    assert budget < result.cost_usd <= budget + 2 * per_cell
    # and none was cut short near the end of the budget: whole answers are measured
    whole = await Evaluation(flow, cases(10), ByModel(), node="answer", catalog=catalog,
                             candidates=[MINI]).run()
    tokens = {c.case_id: c.output_tokens for c in whole.cells}
    assert all(c.output_tokens == tokens[c.case_id] for c in result.cells)
    sim.calls.clear()
    record = await EvalStore(store).get(result.eval_id)
    assert record.status == EvalStatus.STOPPED and record.stop_reason == "budget reached"
    recorded = len(result.cells)
    bigger = Evaluation(flow, cases(10), ByModel(), node="answer", catalog=catalog,
                        candidates=[MINI], budget=1.0, store=store)
    done = await bigger.run()
    assert done.complete and len(done.cells) == 10
    assert sim.calls[MINI] == 10 - recorded  # recorded cells are never paid again
    await store.close()


async def test_calls_wait_for_room_in_the_models_rate_limit(clock: Any, sim: Any) -> None:
    catalog = Catalog.simulated().override(NANO, rpm=2)
    ev = Evaluation(make_flow(), cases(5), ByModel(), node="answer", catalog=catalog,
                    candidates=[NANO], limiter=RateLimiter(clock=clock), sleep=clock.sleep,
                    concurrency=3)
    result = await ev.run()
    assert result.complete and {c.outcome for c in result.cells} == {CellOutcome.PASS}
    assert sim.calls[NANO] == 5  # none skipped to another model, none failed
    assert clock.now - 1000.0 >= 120  # 5 calls at 2 a minute: two full windows waited


async def test_progress_reports_per_model_counts_and_cost() -> None:
    seen: list[EvalProgress] = []
    ev = Evaluation(make_flow(), cases(2), ByModel(), node="answer", catalog=Catalog.simulated(),
                    candidates=[NANO, MINI], concurrency=1)
    await ev.run(on_progress=seen.append)
    assert [p.done for p in seen] == [1, 2, 3, 4]
    last = seen[-1]
    assert last.total == 4 and last.models[NANO].done == 2 and last.models[MINI].total == 2
    assert last.cost_usd > 0 and last.eta_s == 0
    assert seen[0].eta_s is not None and seen[0].eta_s >= 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"node": "answr"}, "no node 'answr'; did you mean 'answer'"),
    ({"candidates": "sim-openai/gpt-4.1-nanoo"}, "did you mean sim-openai/gpt-4.1-nano"),
    ({"candidates": "nothing/*"}, "matches no model"),
    ({"repeats": 0}, "repeats must be at least 1"),
    ({"budget": float("nan")}, "budget"),
])
def test_bad_arguments_are_one_clear_line(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        Evaluation(make_flow(), cases(1), ByModel(), catalog=Catalog.simulated(), **kwargs)


def test_duplicate_case_ids_and_empty_data_are_refused() -> None:
    with pytest.raises(UserError, match="appears twice"):
        Evaluation(make_flow(), cases(1) * 2, ByModel(), catalog=Catalog.simulated())
    with pytest.raises(UserError, match="empty"):
        Evaluation(make_flow(), [], ByModel(), catalog=Catalog.simulated())


def test_a_named_model_without_a_hard_need_is_refused() -> None:
    flow: Flow[S] = Flow("tools", S)

    @flow.node(needs=Needs(vision=True))
    async def look(state: S, model: RoutedChatModel) -> S:
        return {}

    flow.add_edge(START, "look").add_edge("look", END)
    catalog = Catalog.simulated()
    blind = next(s.key for s in catalog if not s.caps.vision)
    with pytest.raises(UserError, match="no image input"):
        Evaluation(flow, cases(1), ByModel(), node="look", catalog=catalog, candidates=[blind])
    ev = Evaluation(flow, cases(1), ByModel(), node="look", catalog=catalog, candidates="*")
    assert blind not in ev.candidates and blind in ev._chosen.dropped


@pytest.mark.slow
async def test_sigkill_mid_evaluation_then_resume_never_repays_a_recorded_cell(
        tmp_path: Path, sim: Any) -> None:
    import os
    import signal
    import subprocess
    import sys

    import eval_child

    db = f"sqlite:///{tmp_path / 'killed.db'}"
    here = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(here.parent), str(here)])}
    proc = subprocess.Popen([sys.executable, str(here / "eval_child.py"), db],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None
    for line in proc.stdout:  # blocks on the child's output: no sleeps
        if line.strip() == "cell 5":
            break
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL, err
    store = Store(db)
    evals = EvalStore(store)
    (killed,) = await evals.list()
    assert killed.status == EvalStatus.RUNNING  # the kill left it mid-run, not "completed"
    recorded = await evals.cells(killed.id)
    assert len(recorded) >= 5
    ev = eval_child.evaluation(db)
    plan = await ev.plan()
    assert plan.resumed and plan.eval_id == killed.id
    result = await ev.run(plan)
    assert result.complete and len(result.cells) == 12
    # this process paid only the cells the killed one had not recorded
    assert sum(sim.calls[m] for m in eval_child.MODELS) == 12 - len(recorded)
    assert {(c.case_id, c.model) for c in result.cells} == {
        (c.id, m) for c in eval_child.CASES for m in eval_child.MODELS}
    await store.close()
    assert ev.store is not None
    await ev.store.store.close()


async def test_rows_that_do_not_fit_the_input_are_refused_before_anything_is_paid(
        sim: Any) -> None:
    bad = [EvalCase(id="c0", inputs={"questin": "typo"})]
    with pytest.raises(UserError, match="do not fit flow 'qa'"):
        Evaluation(make_flow(), bad, ByModel(), node="answer", catalog=Catalog.simulated())
    assert not sim.calls


async def test_recorded_calls_are_replayed_to_each_candidate_apart_from_the_ledger(
        store: Store, sim: Any) -> None:
    from frugalflow.evaluation.from_ledger import cases_from_ledger
    from frugalflow.evaluation.scorers import ReferenceScorer
    from frugalflow.persistence.ledger import Ledger
    from frugalflow.runner import Runner

    flow, catalog = make_flow(quality=0.5), Catalog.simulated()
    runner = Runner(store, flows=[flow], catalog=catalog)
    for i in range(3):
        assert (await runner.start("qa", {"question": f"recorded question {i}"})).ok
    async with store.read() as conn:
        production = (await conn.execute(
            select(func.count()).select_from(AttemptRow.__table__))).scalar()
    cases = await cases_from_ledger(Ledger(store), flow="qa", node="answer")
    assert len(cases) == 3 and all(c.request is not None for c in cases)
    used = cases[0].metadata["model"]
    sim.calls.clear()
    ev = Evaluation(flow, cases, ReferenceScorer("exact"), node="answer", catalog=catalog,
                    candidates=[used, MINI if used != MINI else NANO], store=store)
    result = await ev.run()
    assert result.complete and len(result.cells) == 6
    # the model production used gives the same (seeded) answer: it passes; the other fails
    assert {c.outcome for c in result.cells if c.model == used} == {CellOutcome.PASS}
    assert {c.outcome for c in result.cells if c.model != used} == {CellOutcome.FAIL}
    assert sum(sim.calls[k] for k in sim.calls if "/" in k) == 6  # one call per cell
    async with store.read() as conn:
        after = (await conn.execute(
            select(func.count()).select_from(AttemptRow.__table__))).scalar()
    assert after == production  # the evaluation wrote nothing to production statistics
    await runner.close()


async def test_a_judge_scores_in_the_evaluations_context_and_its_spend_counts(
        store: Store, sim: Any) -> None:
    from frugalflow.evaluation.scorers import JudgeScorer
    from frugalflow.judge import Judge

    catalog = Catalog.simulated()
    ev = Evaluation(make_flow(), cases(2), JudgeScorer(Judge("The answer is polite.")),
                    node="answer", catalog=catalog, candidates=[NANO], store=store)
    result = await ev.run()
    assert result.complete and all(c.scored for c in result.cells)
    judged = ev.scoring.spent_usd
    assert judged > 0  # the judge was asked in the evaluation's context, on its catalog
    cells = sum(c.cost_usd for c in result.cells)
    assert result.cost_usd == pytest.approx(cells + judged)
    record = await EvalStore(store).get(result.eval_id)
    assert record.cost_usd == pytest.approx(result.cost_usd)
    await store.close()


async def test_a_result_reports_itself() -> None:
    ev = Evaluation(make_flow(), cases(3), ByModel(), node="answer", catalog=Catalog.simulated(),
                    candidates=[NANO, MINI])
    report = (await ev.run()).report(target=0.2)
    (node,) = report.per_node.values()
    assert node.node == "answer" and {r.model for r in node.rows} == {NANO, MINI}
    assert node.row(NANO) is not None and node.row(NANO).rate == 1.0  # type: ignore[union-attr]


async def test_the_results_store_on_sqlite_and_postgres(db_url: str) -> None:
    from frugalflow.evaluation.cases import Cell

    store = Store(db_url)
    evals = EvalStore(store)
    record = await evals.create("ev-test", "qa", "answer", {"key": "k1", "candidates": [NANO]})
    assert record.status == EvalStatus.RUNNING and record.cost_usd == 0
    cell = Cell("c0", NANO, 0, CellOutcome.ERROR, reason="outage", output=None)
    await evals.record_cell("ev-test", cell)
    paid = Cell("c0", NANO, 0, CellOutcome.PASS, score=1.0, cost_usd=0.25,
                output={"answer": "fine\x00", "api_key": "sk-abcdefghijklmnopqrstuv"},
                reasoning_tokens=7)
    await evals.record_cell("ev-test", paid)  # the retried cell replaces the error
    await evals.record_cell("ev-test", Cell("c1", NANO, 0, CellOutcome.FAIL, cost_usd=0.5))
    cells = await evals.cells("ev-test")
    assert [(c.case_id, c.outcome) for c in cells] == [("c0", CellOutcome.PASS),
                                                       ("c1", CellOutcome.FAIL)]
    assert cells[0].node == "answer" and cells[0].reasoning_tokens == 7
    assert cells[0].output["answer"] == "fine" and "sk-" not in str(cells[0].output)
    assert (await evals.get("ev-test")).cost_usd == pytest.approx(0.75)
    assert (await evals.find("qa", "answer", "k1")) is not None
    assert (await evals.find("qa", None, "k1")) is None
    done = await evals.finish("ev-test", EvalStatus.STOPPED, "budget reached")
    assert done.status == EvalStatus.STOPPED and done.stop_reason == "budget reached"
    again = await evals.resume("ev-test")
    assert again.status == EvalStatus.RUNNING and again.stop_reason is None
    assert [r.id for r in await evals.list(flow="qa")] == ["ev-test"]
    with pytest.raises(UserError, match="no evaluation 'nope'"):
        await evals.get("nope")
    await store.close()


async def test_reasoning_tokens_are_recorded_per_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    from langchain_core.messages import AIMessage

    from frugalflow.testing.simulator import SimulatedChatModel

    original = SimulatedChatModel._answer

    def with_reasoning(self: Any, *args: Any, **kwargs: Any) -> AIMessage:
        msg = original(self, *args, **kwargs)
        assert msg.usage_metadata is not None
        msg.usage_metadata["output_token_details"] = {"reasoning": 11}  # a thinking model
        return msg

    monkeypatch.setattr(SimulatedChatModel, "_answer", with_reasoning)
    ev = Evaluation(make_flow(), cases(2), ByModel(), node="answer", catalog=Catalog.simulated(),
                    candidates=[NANO])
    result = await ev.run()
    assert [c.reasoning_tokens for c in result.cells] == [11, 11]


async def test_a_model_waiting_for_its_rate_limit_does_not_hold_up_the_others(
        clock: Any, sim: Any) -> None:
    slow = "sim-openai/gpt-4o-mini"
    catalog = Catalog.simulated().override(slow, rpm=1)

    async def sleep(seconds: float) -> None:  # the fake clock, letting other tasks run
        clock.now += seconds
        await asyncio.sleep(0)

    done: list[str] = []  # the model of each cell, in the order they completed
    before: dict[str, int] = {}

    def seen(p: EvalProgress) -> None:
        done.extend(m for m, mp in p.models.items() if mp.done > before.get(m, 0))
        before.update({m: mp.done for m, mp in p.models.items()})

    ev = Evaluation(make_flow(), cases(3), ByModel(), node="answer", catalog=catalog,
                    candidates=[slow, NANO], limiter=RateLimiter(clock=clock), sleep=sleep,
                    concurrency=1)
    result = await ev.run(on_progress=seen)
    assert result.complete and sim.calls[slow] == 3 and sim.calls[NANO] == 3
    assert clock.now - 1000.0 >= 120  # the slow model's 3 calls span two minutes
    # one cell at a time, yet the fast model's cells did not wait behind the slow model's
    assert done == [slow, NANO, NANO, NANO, slow, slow]


async def test_the_budget_settles_cells_waiting_for_their_rate_window_without_a_deadlock(
        clock: Any, sim: Any) -> None:
    # One cell at a time; gpt-4o-mini may be called once a minute. Its second cell waits for
    # its window (its place given up); a later cell finds the budget nearly spent and must
    # let the waiting cell finish before deciding: that cell needs a place back to finish.
    catalog = Catalog.simulated().override(MINI, rpm=1)

    async def sleep(seconds: float) -> None:
        clock.now += seconds
        await asyncio.sleep(0)

    ev = Evaluation(make_flow(out_tokens=1), cases(3), ByModel(), node="answer",
                    catalog=catalog, candidates=[MINI, NANO], budget=1e-4,
                    limiter=RateLimiter(clock=clock), sleep=sleep, concurrency=1)
    result = await asyncio.wait_for(ev.run(), timeout=30)
    assert result.status == EvalStatus.STOPPED and result.stop_reason == "budget reached"
    assert clock.now - 1000.0 >= 60  # gpt-4o-mini's second cell waited for its window
    assert {(c.case_id, c.model) for c in result.cells} == {
        ("c0", NANO), ("c0", MINI), ("c1", NANO), ("c1", MINI)}
