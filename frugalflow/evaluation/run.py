"""The evaluation executor: each case answered by each candidate model, scored, recorded at once.

    evaluation = Evaluation(flow, cases, scorer, node="extract", store=EvalStore(store))
    plan = await evaluation.plan()          # candidates, cells left, estimated cost
    result = await evaluation.run(plan, on_progress=print)

A *cell* is one case answered by one model (one repeat). In node mode the node runs alone on
the case's inputs with its model forced to the candidate and its state update is scored; in
flow mode the whole flow runs with every model node forced to the candidate and its final
state is scored; a case drawn from the ledger replays its recorded request to the candidate.
Calls go through the routed model (the catalog's prices, the candidate's rate limits, circuit
breakers) in a context of their own: nothing reaches the production ledger. Cells are
written as they complete (`EvalStore`), so a killed evaluation resumes without paying a
recorded cell again; the budget covers the whole evaluation.
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import json
import time
import uuid
from contextvars import ContextVar
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, BaseMessage
from pydantic import BaseModel

from ..catalog import Catalog
from ..exceptions import short_error
from ..validation import ModelJudge
from ..exceptions import (
    AllModelsFailedError,
    BudgetExceededError,
    MalformedResponseError,
    UserError,
)
from ..flow import CompiledFlow, Flow, check_budget
from ..limits import Limiter, RateReservation
from ..needs import Needs
from ..persistence.store import Store
from ..resilience import BreakerRegistry, Breakers, FallbackPolicy
from ..routed import RoutedChatModel, RunContext, Sleep
from ..statuses import Outcome
from ..usage import RunUsage
from .candidates import force_flow, forced_needs, model_needs, resolve_candidates
from .cases import Cell, CellOutcome, EvalCase, Score, Scorer
from .datasets import check_cases
from .from_ledger import replay_request
from .results import EvalStatus, EvalStore
from .scorers import JudgeScorer, ValidatorScorer, safe_score

if TYPE_CHECKING:
    from .report import Report

__all__ = ["CellKey", "EvalPlan", "EvalProgress", "EvalResult", "Evaluation", "ModelProgress",
           "PacedLimiter", "check_node", "retryable"]

BUDGET_REACHED = "budget reached"
INTERRUPTED = "interrupted"


@dataclass(frozen=True, slots=True, order=True)
class CellKey:
    """Which cell: a case, a model, a repeat (the primary key of `ff_eval_cells`)."""

    case_id: str
    model: str
    repeat: int


@dataclass(slots=True)
class ModelProgress:
    """One candidate's cells: done (recorded, this run or before) of total, errors, spend."""

    done: int
    total: int
    errors: int = 0
    cost_usd: float = 0.0


@dataclass(slots=True)
class EvalProgress:
    """What the live display shows after each cell."""

    eval_id: str
    models: dict[str, ModelProgress]
    cost_usd: float
    """Spent by the whole evaluation (earlier runs of it included)."""
    elapsed_s: float
    eta_s: float | None

    @property
    def done(self) -> int:
        return sum(m.done for m in self.models.values())

    @property
    def total(self) -> int:
        return sum(m.total for m in self.models.values())


ProgressFn = Callable[[EvalProgress], object]


@dataclass(slots=True)
class EvalPlan:
    """What `run` will do: the cells left and what they should cost."""

    eval_id: str
    resumed: bool
    candidates: list[str]
    cases: int
    repeats: int
    todo: list[CellKey]
    done: list[Cell]
    estimate_usd: float
    """Expected cost of the cells left (catalog prices, estimated tokens)."""
    per_model_usd: dict[str, float]
    cell_usd: dict[CellKey, float]
    spent_usd: float
    """Already spent by this evaluation (when resumed)."""
    budget_usd: float | None
    unavailable: dict[str, str] = field(default_factory=dict)
    """Candidates that cannot be called here (no API key...): their cells become errors."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Models a --models pattern matched that cannot run the node, and why."""

    @property
    def total_cells(self) -> int:
        return self.cases * self.repeats * len(self.candidates)

    def describe(self) -> str:
        """One line: what runs and what it should cost."""
        left = len(self.todo)
        head = (f"{left} cells ({self.cases} cases x {self.repeats} repeats x "
                f"{len(self.candidates)} models"
                + (f"; {len(self.done)} already recorded" if self.done else "") + ")")
        return f"{head}, estimated ${self.estimate_usd:.6f}" + (
            f" of a ${self.budget_usd:g} budget" if self.budget_usd is not None else "")


@dataclass(slots=True)
class EvalResult:
    """An evaluation after `run`: every recorded cell (earlier runs of it included)."""

    eval_id: str
    flow: str
    node: str | None
    status: EvalStatus
    cells: list[Cell]
    candidates: list[str]
    cost_usd: float
    """Spent by the whole evaluation."""
    new_cost_usd: float
    """Spent by this run of it."""
    stop_reason: str | None = None

    @property
    def complete(self) -> bool:
        return self.status == EvalStatus.COMPLETED

    def report(self, *, catalog: Catalog | None = None, target: float = 0.9,
               confidence: float = 0.95) -> Report:
        """The report of these cells (`build_report`): per node and model, the pass rate
        with its interval, cost, latency, the frontier and the cheapest policy for `target`."""
        from .report import build_report

        return build_report(self.cells, catalog=catalog, target=target, confidence=confidence)


class _Slot:
    """A cell's place among the cells run at once. It is given up while the cell waits for
    room in its model's rate window, so that other models' cells run meanwhile."""

    def __init__(self, sem: asyncio.Semaphore) -> None:
        self.sem, self.held = sem, True

    def give_up(self) -> None:
        if self.held:
            self.held = False
            self.sem.release()

    async def take(self) -> None:
        if not self.held:
            await self.sem.acquire()
            self.held = True


_SLOT: ContextVar[_Slot | None] = ContextVar("frugalflow_eval_slot", default=None)


class PacedLimiter:
    """A rate limiter that waits for room in the model's window instead of refusing: an
    evaluation's cell must be answered by its own model, never skipped to another. While it
    waits, the cell gives up its place among those run at once (other models go on)."""

    def __init__(self, inner: Limiter, *, sleep: Sleep | None = None, poll: float = 1.0,
                 max_wait: float = 300.0) -> None:
        self.inner, self.poll, self.max_wait = inner, poll, max_wait
        self._sleep = sleep or asyncio.sleep

    async def aacquire(self, spec: Any, tokens: int) -> RateReservation | None:
        waited = 0.0
        slot = _SLOT.get()
        try:
            while True:
                reservation = await self.inner.aacquire(spec, tokens)
                too_big = spec.tpm is not None and tokens > spec.tpm  # never fits: no wait
                if reservation is not None or too_big or waited >= self.max_wait:
                    return reservation
                if slot is not None:
                    slot.give_up()
                await self._sleep(self.poll)
                waited += self.poll
        finally:
            if slot is not None:
                await slot.take()

    async def acorrect(self, reservation: RateReservation, actual_tokens: int) -> None:
        await self.inner.acorrect(reservation, actual_tokens)

    async def acheck(self) -> str:
        return await self.inner.acheck()

    def shared_state(self) -> str:
        return self.inner.shared_state()

    async def aclose(self) -> None:
        await self.inner.aclose()


class _BudgetStop(Exception):
    """A cell's call would go over what is left of the evaluation's budget."""

    def __init__(self, spent: float) -> None:
        super().__init__(BUDGET_REACHED)
        self.spent = spent


def _digest(cases: Sequence[EvalCase]) -> str:
    rows = [[c.id, dict(c.inputs), c.expected,
             None if c.request is None else [c.request.messages, c.request.tools,
                                             c.request.schema]] for c in cases]
    text = json.dumps(rows, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value: Any) -> Any:
    """A JSON form of a cell's output (a state update, a final state, an answer)."""
    def default(obj: Any) -> Any:
        if isinstance(obj, BaseMessage):
            out: dict[str, Any] = {"type": obj.type, "content": obj.content}
            if isinstance(obj, AIMessage) and obj.tool_calls:
                out["tool_calls"] = [{"name": c["name"], "args": c["args"]}
                                     for c in obj.tool_calls]
            return out
        if isinstance(obj, BaseModel):
            return obj.model_dump(mode="json")
        return str(obj)

    return json.loads(json.dumps(value, default=default))


def _failure(error: BaseException) -> tuple[CellOutcome, str]:
    """A cell's outcome when its run raised: a model whose answers were rejected (schema,
    validator) failed the case; anything else (no key, outage, a bug) is an error."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if isinstance(error, AllModelsFailedError) and error.exceptions:
        # The model's own words (one candidate: the headline only counts attempts).
        text = "; ".join(dict.fromkeys(short_error(e) for e in error.exceptions))
        if all(isinstance(e, MalformedResponseError) for e in error.exceptions):
            return CellOutcome.FAIL, text[:500]
    if not isinstance(error, UserError) and not isinstance(error, AllModelsFailedError):
        text = f"{type(error).__name__}: {text}"
    return CellOutcome.ERROR, text[:500]


def _judging_in(scorer: Scorer, ctx: RunContext) -> Scorer:
    """A scorer that asks a judge, given no context of its own, judges in the evaluation's:
    its catalog, breakers and rate limits, its spend counted in the evaluation's."""
    if not isinstance(scorer, ValidatorScorer) or not isinstance(scorer.validator, ModelJudge) \
            or getattr(scorer, "_context", None) is not None:
        return scorer
    if isinstance(scorer, JudgeScorer):
        return JudgeScorer(scorer.judge, name=scorer.name, context=ctx)
    return ValidatorScorer(scorer.validator, name=scorer.name, context=ctx)


def check_node(flow: Flow[Any], node: str) -> None:
    """UserError unless `node` is a node of `flow` that calls a model (or a subflow)."""
    if node not in flow.nodes:
        close = difflib.get_close_matches(node, list(flow.nodes), n=2)
        hint = f"; did you mean {' or '.join(map(repr, close))}?" if close else ""
        raise UserError(f"flow {flow.name!r} has no node {node!r}{hint} "
                        f"(nodes: {', '.join(flow.nodes)})")
    spec = flow.nodes[node]
    if spec.fn is not None and spec.needs is None:
        raise UserError(f"node {node!r} of flow {flow.name!r} calls no model: there is no "
                        "model choice to evaluate; pick a model node")


def retryable(cell: Cell) -> bool:
    """A cell worth running again on resume: an error that cost nothing and answered
    nothing (no key, an open breaker, an outage before any token)."""
    return cell.outcome == CellOutcome.ERROR and cell.cost_usd == 0 and cell.output is None


class Evaluation:
    """One flow (end to end) or one node, measured on `cases` for each candidate model."""

    def __init__(
        self,
        flow: Flow[Any],
        cases: Sequence[EvalCase],
        scorer: Scorer,
        *,
        node: str | None = None,
        catalog: Catalog | None = None,
        candidates: str | Sequence[str] | None = None,
        repeats: int = 1,
        budget: float | None = None,
        concurrency: int = 4,
        store: EvalStore | Store | None = None,
        data: Mapping[str, Any] | None = None,
        eval_id: str | None = None,
        fresh: bool = False,
        policy: FallbackPolicy | None = None,
        breakers: Breakers | None = None,
        limiter: Limiter | None = None,
        sleep: Sleep | None = None,
    ) -> None:
        self.flow, self.node, self.scorer = flow, node, scorer
        self.catalog = catalog if catalog is not None else Catalog.default()
        self._check_args(cases, repeats, concurrency, budget)
        # Rows that do not fit the input are refused here, unpaid; the cases to run come back.
        self.cases = check_cases(cases, flow, node)
        self._by_id = {c.id: c for c in self.cases}
        self.repeats, self.concurrency = repeats, concurrency
        self.budget = check_budget(budget)
        self.store = EvalStore(store) if isinstance(store, Store) else store
        self.data = dict(data or {})
        self.eval_id, self.fresh = eval_id, fresh
        self.policy = policy or FallbackPolicy()
        self.breakers = breakers if breakers is not None else BreakerRegistry(
            threshold=self.policy.breaker_threshold, cooldown=self.policy.breaker_cooldown)
        self.sleep = sleep
        if limiter is None:
            from ..limits import RateLimiter

            limiter = RateLimiter()
        self.limiter = PacedLimiter(limiter, sleep=sleep)
        self.scoring = RunUsage(run_id="eval:scoring")
        """Spend of the scorer's own calls (a judge): the evaluation's, in no cell's cost."""
        self.scorer = _judging_in(scorer, self._context(self.scoring))
        self.needs = model_needs(flow, node)
        self._chosen = resolve_candidates(self.catalog, self.needs, candidates)
        self.candidates = self._chosen.models
        self._compiled: dict[str, CompiledFlow | UserError] = {}

    def _check_args(self, cases: Sequence[EvalCase], repeats: int, concurrency: int,
                    budget: float | None) -> None:
        if self.node is not None:
            check_node(self.flow, self.node)
        if not cases:
            raise UserError("no cases to evaluate: the data set is empty")
        seen: set[str] = set()
        for c in cases:
            if c.id in seen:
                raise UserError(f"case id {c.id!r} appears twice; give every case its own id")
            seen.add(c.id)
        if repeats < 1:
            raise UserError(f"repeats must be at least 1, got {repeats}")
        if concurrency < 1:
            raise UserError(f"concurrency must be at least 1, got {concurrency}")
        try:
            check_budget(budget)
        except ValueError as e:
            raise UserError(f"budget: {e}") from None

    def _context(self, usage: RunUsage) -> RunContext:
        """A context of the evaluation's own: no ledger hooks (nothing reaches production
        statistics), the evaluation's breakers, paced rate limits and retry policy."""
        return RunContext(catalog=self.catalog, policy=self.policy, breakers=self.breakers,
                          usage=usage, sleep=self.sleep, limiter=self.limiter)

    # -- the plan ---------------------------------------------------------------------------

    def _case_node(self, case: EvalCase) -> str | None:
        meta = case.metadata.get("node") if case.request is not None else None
        return str(meta) if meta else self.node

    def spec(self) -> dict[str, Any]:
        """What is measured, as stored in `ff_evals.spec`; `key` identifies it for resume."""
        identity = {"flow": self.flow.name, "node": self.node, "cases": _digest(self.cases),
                    "scorer": self.scorer.name, "candidates": self.candidates,
                    "repeats": self.repeats}
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        spec: dict[str, Any] = {
            "key": key, "data": self.data, "cases": len(self.cases),
            "cases_digest": identity["cases"], "scorer": self.scorer.name,
            "candidates": self.candidates, "repeats": self.repeats, "budget": self.budget,
            "concurrency": self.concurrency,
            "mode": "node" if self.node else "flow",
        }
        nodes = {c.id: n for c in self.cases
                 if c.request is not None and (n := self._case_node(c)) and n != self.node}
        if nodes:
            spec["case_nodes"] = nodes
        return spec

    def cell_cost(self, case: EvalCase, model: str) -> float:
        """The expected cost of one cell: catalog prices at estimated tokens."""
        spec = self.catalog[model]
        if self.catalog.unavailable_reason(spec) is not None:
            return 0.0  # not called: recorded as an error
        if case.request is not None:
            req = case.request
            n_in = len(json.dumps([req.messages, req.tools], default=str)) // 4 + 4
            node = self._case_node(case)
            needs = self.flow.nodes[node].needs if node in self.flow.nodes else None
            n_out = case.metadata.get("output_tokens")
            if not isinstance(n_out, int) or n_out <= 0:
                n_out = (needs or Needs()).expected_output_tokens
            return spec.estimate_cost(n_in, n_out)
        # A node's prompt is its instructions around the inputs: the inputs plus a margin.
        n_in = len(json.dumps(dict(case.inputs), default=str)) // 4 + 50
        return sum(spec.estimate_cost(n_in, n.expected_output_tokens) for _, n in self.needs)

    async def plan(self) -> EvalPlan:
        """The cells left to run (a matching earlier evaluation is resumed) and their cost.

        Raises UserError, before anything is paid, when the estimate is over the budget
        left, or when `eval_id` names an evaluation of other cases or models."""
        spec = self.spec()
        record = None
        if self.store is not None:
            if self.eval_id is not None:
                record = await self.store.get(self.eval_id)
                if record.flow != self.flow.name or record.node != self.node or \
                        record.spec.get("key") != spec["key"]:
                    raise UserError(
                        f"evaluation {self.eval_id} measured other cases, models, scorer or "
                        f"repeats (flow {record.flow}, node {record.node}); resume it with the "
                        "same data and options, or start a new evaluation without --resume")
            elif not self.fresh:
                record = await self.store.find(self.flow.name, self.node, spec["key"])
        done = await self.store.cells(record.id) if record is not None and self.store else []
        kept = [c for c in done if not retryable(c)]
        have = {CellKey(c.case_id, c.model, c.repeat) for c in kept}
        todo = [CellKey(case.id, m, r) for case in self.cases for r in range(self.repeats)
                for m in self.candidates]
        todo = [k for k in todo if k not in have]
        cell_usd = {k: self.cell_cost(self._by_id[k.case_id], k.model) for k in todo}
        per_model: dict[str, float] = {m: 0.0 for m in self.candidates}
        for k, usd in cell_usd.items():
            per_model[k.model] += usd
        unavailable = {m: why for m in self.candidates
                       if (why := self.catalog.unavailable_reason(self.catalog[m]))}
        plan = EvalPlan(
            eval_id=record.id if record is not None else (self.eval_id or _new_id()),
            resumed=record is not None, candidates=list(self.candidates),
            cases=len(self.cases), repeats=self.repeats, todo=todo, done=kept,
            estimate_usd=sum(cell_usd.values()), per_model_usd=per_model, cell_usd=cell_usd,
            spent_usd=record.cost_usd if record is not None else 0.0, budget_usd=self.budget,
            unavailable=unavailable, dropped=dict(self._chosen.dropped))
        self._check_estimate(plan)
        return plan

    def _check_estimate(self, plan: EvalPlan) -> None:
        if self.budget is None:
            return
        left = self.budget - plan.spent_usd
        if plan.estimate_usd > left:
            spent = f" (${plan.spent_usd:.6f} already spent)" if plan.spent_usd else ""
            raise UserError(
                f"estimated ${plan.estimate_usd:.6f} for {len(plan.todo)} cells is over the "
                f"budget left, ${max(left, 0):.6f}{spent}: raise the budget to at least "
                f"${plan.estimate_usd + plan.spent_usd:.6f}, or evaluate fewer cases, "
                "repeats or models")

    # -- one cell ---------------------------------------------------------------------------

    def _graph(self, model: str) -> CompiledFlow:
        hit = self._compiled.get(model)
        if hit is None:
            try:
                hit = force_flow(self.flow, model, self.node).compile(
                    self.catalog, policy=self.policy, breakers=self.breakers)
            except UserError as e:  # the forced flow does not compile for this model
                hit = e
            self._compiled[model] = hit
        if isinstance(hit, UserError):
            raise hit
        return hit

    async def _answer(self, case: EvalCase, model: str, ctx: RunContext) -> Any:
        """What the scorer judges: a replayed answer, the node's update or the final state."""
        if case.request is not None:
            node = self._case_node(case)
            spec = self.flow.nodes.get(node) if node is not None else None
            needs = spec.needs if spec is not None and spec.needs is not None else Needs()
            routed = RoutedChatModel(needs=forced_needs(needs, model), node=node, context=ctx)
            return await replay_request(routed, case.request, key=model)
        graph = self._graph(model)
        if self.node is None:
            state = await graph.ainvoke(dict(case.inputs), context=ctx)
            if isinstance(state, dict) and state.get("__interrupt__"):
                raise UserError("the flow stopped at an interrupt (it asks a human): "
                                "evaluate its nodes one by one instead")
            return state
        update: Any = None
        async for chunk in graph.astream(dict(case.inputs), context=ctx,
                                         stream_mode="updates"):
            if isinstance(chunk, dict) and "__interrupt__" in chunk:
                raise UserError(f"node {self.node!r} stopped at an interrupt (it asks a human)")
            if isinstance(chunk, dict) and self.node in chunk:
                update = chunk[self.node]
        return update

    async def cell(self, key: CellKey, *, budget_left: float | None = None) -> Cell:
        """Run and score one cell. `budget_left` caps its calls (raises `_BudgetStop` when it
        cannot pay one); the runner gives none: a routed call that the budget caps gets a
        smaller max output, and an answer cut short would be measured as the model's."""
        case, spec = self._by_id[key.case_id], self.catalog[key.model]
        node = self._case_node(case)
        why = self.catalog.unavailable_reason(spec)
        if why is not None:
            return Cell(key.case_id, key.model, key.repeat, CellOutcome.ERROR, node=node,
                        reason=f"{key.model} unavailable: {why}")
        usage = RunUsage(budget_usd=budget_left,
                         run_id=f"eval:{key.case_id}:{key.model}:{key.repeat}")
        ctx = self._context(usage)
        output: Any = None
        verdict: Score | str
        try:
            output = await self._answer(case, key.model, ctx)
        except BudgetExceededError:
            raise _BudgetStop(usage.spent_usd) from None
        except asyncio.CancelledError:
            raise
        except Exception as e:  # recorded against this cell with its reason; others go on
            outcome, reason = _failure(e)
            verdict = Score(passed=False, reason=reason) if outcome == CellOutcome.FAIL else reason
        else:
            verdict = await safe_score(self.scorer, case, output)
        return self._cell(key, node, usage, verdict, output)

    def _cell(self, key: CellKey, node: str | None, usage: RunUsage, verdict: Score | str,
              output: Any) -> Cell:
        own = [a for a in usage.attempts if a.model == key.model and a.outcome != Outcome.REPLAYED]
        common: dict[str, Any] = dict(
            node=node, cost_usd=usage.spent_usd,
            latency_ms=sum(a.latency_ms for a in own),
            input_tokens=sum(a.usage.input_tokens for a in own if a.usage),
            output_tokens=sum(a.usage.output_tokens for a in own if a.usage),
            reasoning_tokens=sum(a.usage.reasoning_tokens for a in own if a.usage),
            output=None if output is None else _jsonable(output))
        if isinstance(verdict, str):
            return Cell(key.case_id, key.model, key.repeat, CellOutcome.ERROR, reason=verdict,
                        **common)
        outcome = CellOutcome.PASS if verdict.passed else CellOutcome.FAIL
        return Cell(key.case_id, key.model, key.repeat, outcome, score=verdict.value,
                    reason=verdict.reason, **common)

    # -- the run ----------------------------------------------------------------------------

    async def run(self, plan: EvalPlan | None = None, *,
                  on_progress: ProgressFn | None = None) -> EvalResult:
        """Run the plan's cells (concurrently, within the budget), recording each as it
        completes; the evaluation is `completed` once every cell is recorded."""
        plan = plan if plan is not None else await self.plan()
        store = self.store
        if store is not None:
            if plan.resumed:
                await store.resume(plan.eval_id)
            else:
                await store.create(plan.eval_id, self.flow.name, self.node, self.spec())
        runner = _Runner(self, plan, on_progress)
        try:
            stop = await runner.go()
            await runner.record_scoring_cost()
        except asyncio.CancelledError:
            if store is not None:
                await store.finish(plan.eval_id, EvalStatus.STOPPED, INTERRUPTED)
            raise
        cells = sorted([*plan.done, *runner.cells],
                       key=lambda c: (c.case_id, c.model, c.repeat))
        complete = stop is None and len(cells) == plan.total_cells
        status = EvalStatus.COMPLETED if complete else EvalStatus.STOPPED
        if store is not None:
            await store.finish(plan.eval_id, status, None if complete else stop or "incomplete")
        return EvalResult(plan.eval_id, self.flow.name, self.node, status, cells,
                          list(plan.candidates), plan.spent_usd + runner.total(),
                          runner.total(), None if complete else stop)


def _new_id() -> str:
    return f"ev-{uuid.uuid4().hex[:12]}"




class _Runner:
    """One run of a plan: schedules cells under the concurrency and the budget."""

    def __init__(self, ev: Evaluation, plan: EvalPlan, on_progress: ProgressFn | None) -> None:
        self.ev, self.plan, self.on_progress = ev, plan, on_progress
        self.cells: list[Cell] = []
        self.spent = 0.0  # this run's
        self.reserved = 0.0  # expected cost of the cells in flight
        self.stop: str | None = None
        self.failure: BaseException | None = None
        self.t0 = time.monotonic()
        self.scoring0 = ev.scoring.spent_usd  # the scorer's spend before this run
        self.scoring_recorded = 0.0
        self.progress = {m: ModelProgress(0, plan.cases * plan.repeats)
                         for m in plan.candidates}
        for c in plan.done:
            p = self.progress[c.model]
            p.done += 1
            p.errors += c.outcome == CellOutcome.ERROR
            p.cost_usd += c.cost_usd

    def _left(self) -> float | None:
        budget = self.ev.budget
        return None if budget is None else budget - self.plan.spent_usd - self.total()

    def total(self) -> float:
        """This run's spend: its cells', and its scorer's (a judge)."""
        return self.spent + self.ev.scoring.spent_usd - self.scoring0

    async def record_scoring_cost(self) -> None:
        """Record what the scorer's judge spent since the last cell (in no cell's cost)."""
        added = self.ev.scoring.spent_usd - self.scoring0 - self.scoring_recorded
        if added > 0 and self.ev.store is not None:
            self.scoring_recorded += added
            await self.ev.store.add_cost(self.plan.eval_id, added)

    async def go(self) -> str | None:
        sem = asyncio.Semaphore(self.ev.concurrency)
        pending: set[asyncio.Task[None]] = set()
        try:
            for key in self.plan.todo:
                usd = self.plan.cell_usd.get(key, 0.0)
                if not await self._slot(usd, sem, pending):
                    break
                # Started only while the budget left covers what the cells in flight and
                # this one should cost; each then runs uncapped, to measure whole answers.
                self.reserved += usd
                task = asyncio.create_task(self._one(key, usd, sem))
                pending.add(task)
                task.add_done_callback(pending.discard)
            if pending:
                await asyncio.gather(*pending)
        except asyncio.CancelledError:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            raise
        if self.failure is not None:
            raise self.failure
        return self.stop

    async def _slot(self, usd: float, sem: asyncio.Semaphore,
                    pending: set[asyncio.Task[None]]) -> bool:
        """Take a place for a cell expected to cost `usd`; False (no place held): start no
        more cells. No place is held while the cells in flight settle: one that waits for
        its rate window gave its place up and needs one back to finish."""
        while True:
            if self.stop is None and not await self._affordable(usd, pending):
                self.stop = BUDGET_REACHED
            if self.stop is not None:
                return False
            await sem.acquire()
            left = self._left()
            if self.stop is None and (left is None or self.reserved + usd <= left):
                return True
            sem.release()  # spent or reserved meanwhile: settle again, then decide

    async def _affordable(self, usd: float, pending: set[asyncio.Task[None]]) -> bool:
        left = self._left()
        if left is None or self.reserved + usd <= left:
            return True
        if pending:  # settle the cells in flight: their actual spend decides
            await asyncio.gather(*list(pending))
            left = self._left()
        return left is not None and self.stop is None and usd <= left

    async def _one(self, key: CellKey, usd: float, sem: asyncio.Semaphore) -> None:
        store = self.ev.store
        slot = _Slot(sem)
        _SLOT.set(slot)  # this task's own context: its calls' limiter finds it
        try:
            cell = await self.ev.cell(key)
            if store is not None:
                await store.record_cell(self.plan.eval_id, cell)
                await self.record_scoring_cost()
        except _BudgetStop as stop:
            self.stop = BUDGET_REACHED
            self.spent += stop.spent
            if store is not None:
                await store.add_cost(self.plan.eval_id, stop.spent)
        except Exception as e:  # the database failed: stop, the paid cell is not lost silently
            self.failure, self.stop = e, self.stop or f"failed: {e}"
        else:
            self.cells.append(cell)
            self.spent += cell.cost_usd
            p = self.progress[key.model]
            p.done += 1
            p.errors += cell.outcome == CellOutcome.ERROR
            p.cost_usd += cell.cost_usd
            self._report()
        finally:
            self.reserved -= usd
            slot.give_up()

    def _report(self) -> None:
        if self.on_progress is None:
            return
        elapsed = time.monotonic() - self.t0
        new, left = len(self.cells), len(self.plan.todo) - len(self.cells)
        eta = elapsed / new * left if new else None
        snapshot = {m: replace(p) for m, p in self.progress.items()}
        self.on_progress(EvalProgress(self.plan.eval_id, snapshot,
                                      self.plan.spent_usd + self.total(), elapsed, eta))
