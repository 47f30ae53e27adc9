"""The runner: start, resume and cancel durable runs by id.

A run is a row in the ledger plus a LangGraph thread (its checkpoints), both in one Store.
Whoever holds a run's *lease* may execute it: the runner takes the lease, renews it while
the run executes, and releases it at the end. A crashed process's lease expires after
`lease_ttl` seconds, and any process (this one, another one, a worker elsewhere) can then
resume the run from its last checkpoint. Completed nodes never run again; the node that
was executing at the crash runs again from its start.

    runner = Runner("sqlite:///runs.db", flows=[triage_flow], catalog=Catalog.default())
    result = await runner.start("support_triage", {"ticket": "..."}, budget=0.10)
    result = await runner.resume(result.run_id, budget=0.50)   # after budget_exceeded
    result = await runner.wait(run_id)   # started with wait=False, or executed by workers
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

from langchain_core.messages import AIMessage
from langgraph.graph import START
from langgraph.types import Command

from .batches.parking import Parking, utcnow
from .catalog import Catalog
from .events import EventBus, attempt_event
from .exceptions import (
    BudgetExceededError,
    FrugalflowError,
    LeaseError,
    RunStateError,
    StoreUnavailableError,
    UserError,
)
from .inputs import check_input
from .measured import MeasureConfig
from .policies import Policy
from .resilience import Breakers, FallbackPolicy, default_breakers
from .run_knowledge import RunKnowledge
from .run_result import ENDED, STOPPED, Ending, RunResult
from .statuses import FINAL_STATUSES, NodeStatus, RunStatus
from .usage import Attempt
from .flow import CompiledFlow, Flow, check_budget
from .persistence.event_log import EventLog
from .persistence.ledger import Ledger, RunRecord, scrub
from .persistence.parked import ParkedLedger, aware
from .persistence.leases import Lease, acquire_lease, afenced, fenced, holder_id, unfenced
from .persistence.store import Store
from .persistence.tables import RunRow
from .tracing.otel_setup import run_tracing
from .usage import RunUsage
from .verbosity import VerbosityCache
from .waiting import deadline_at, resume_input, user_interrupts

if TYPE_CHECKING:
    from langchain_core.callbacks import BaseCallbackHandler
    from langchain_core.runnables import RunnableConfig
    from langgraph.checkpoint.base import BaseCheckpointSaver
    from langgraph.types import StateSnapshot
    from opentelemetry.metrics import MeterProvider
    from opentelemetry.trace import TracerProvider

    from typing_extensions import Unpack

    from .batches.poller import BatchPoller, PollerOptions
    from .limits import Limiter
    from .learning import Router
    from .routed import Replay, RunContext
    from .scale.dispatch import Dispatcher
    from .scale.relay import PostgresEventRelay
    from .tracing.otel import RunTracing

__all__ = ["FINAL_STATUSES", "Lease", "RunResult", "RunStatus", "Runner"]

_RUNNABLE = frozenset(RunStatus) - FINAL_STATUSES
"""The statuses a run may start executing from."""


class RunEndedError(Exception):
    """The run reached a final status (cancelled) between its read and its execution."""

log = logging.getLogger("frugalflow")


class Runner(RunKnowledge):
    """Executes flows as durable runs in a Store (SQLite by default, PostgreSQL by URL)."""

    def __init__(
        self,
        store: Store | str | None = None,
        *,
        flows: Iterable[Flow[Any]] = (),
        catalog: Catalog | None = None,
        policy: Policy | str | FallbackPolicy | None = None,
        breakers: Breakers | None = None,
        lease_ttl: float = 30.0,
        max_concurrency: int = 64,
        holder: str | None = None,
        checkpointer: BaseCheckpointSaver[Any] | None = None,
        dispatcher: Dispatcher | None = None,
        share_events: bool | None = None,
        router: Router | str | None = None,
        limiter: Limiter | None = None,
        fallback: FallbackPolicy | None = None,
        measure: MeasureConfig | bool | None = None,
        explore: float | Mapping[str, float] = 0.0,
        callbacks: Iterable[BaseCallbackHandler] = (),
        tracer_provider: TracerProvider | None = None,
        meter_provider: MeterProvider | None = None,
        deadline_margin: timedelta = timedelta(minutes=10),
        clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.ledger = Ledger(self.store)
        self.catalog = catalog if catalog is not None else Catalog.default()
        if isinstance(policy, FallbackPolicy):  # what `policy` meant before node policies
            fallback, policy = fallback or policy, None
        self.fallback = fallback
        """Retries, fallbacks and timeouts of model calls (`FallbackPolicy`)."""
        self._init_measuring(policy, measure, explore)
        self.breakers = breakers if breakers is not None else default_breakers
        self.lease_ttl = lease_ttl
        self.holder = holder or holder_id()
        self._flows: dict[str, Flow[Any]] = {}
        self._compiled: dict[str, CompiledFlow] = {}
        self._tasks: dict[str, asyncio.Task[RunResult]] = {}
        self._launching: set[str] = set()  # runs whose lease is being taken here
        self._slots = asyncio.Semaphore(max_concurrency)
        self._closing = False
        self.events = EventBus(log=EventLog(self.store))
        """Live run events in this process: run/node start and finish, every model attempt;
        written to the event log (ff_events) first, delivered with their ids."""
        self._saver = checkpointer  # default: SQLModelSaver on the same store
        self.limiter = limiter
        """A RateLimiter for the catalog's rpm/tpm (RedisRateLimiter: shared by the fleet)."""
        self._router_name: str | None = router if isinstance(router, str) else None
        self._router_version: int | None = None
        self.router: Router | None = None if isinstance(router, str) else router
        """The `frugalflow.learning.Router` for nodes whose needs set `target`, `price_weight`
        or `cascade`; swap it and the next runs use the new one. Given by name, the runner
        uses the newest stored version (checked at each run's start, so every worker picks
        up a `frugalflow router train`), the catalog's prior until one is stored."""
        self.dispatcher = dispatcher
        """With a dispatcher (e.g. ProcrastinateDispatcher), start/resume enqueue the run
        for a worker process instead of executing it here."""
        self._share_events = share_events if share_events is not None else (
            dispatcher is not None and not self.store.is_sqlite)
        self._relay: PostgresEventRelay | None = None
        self.verbosity = VerbosityCache()
        """Output-token estimates per flow, node and model, read from the ledger at a run's
        start (at most once a minute per flow): ranking and budgets use them."""
        self.callbacks = list(callbacks)
        """LangChain callback handlers given every run's graph (a Langfuse `CallbackHandler`,
        a `LangChainTracer`...): graph, nodes, routed calls and their attempts. LangSmith
        tracing from the environment (LANGSMITH_TRACING=true) needs none."""
        # OpenTelemetry (frugalflow.tracing): None unless configured (explicit, global, OTEL_*)
        self._otel: RunTracing | None = run_tracing(tracer_provider, meter_provider, self.breakers)
        self.deadline_margin = deadline_margin
        """Time kept before a deadline for a synchronous call once a batch is given up."""
        self.clock = clock
        """Now, as deadlines and parked requests see it (tests and benchmarks pass a fake)."""
        self.parked = ParkedLedger(self.store)
        """The parked requests (batch items, timers) of this store's runs."""
        for f in flows:
            self.register(f)

    # -- flows ---------------------------------------------------------------------

    def register(self, flow: Flow[Any]) -> None:
        """Make `flow` runnable (and resumable) by this runner, under `flow.name`."""
        self._flows[flow.name] = flow
        self._compiled.pop(flow.name, None)

    @property
    def flows(self) -> dict[str, Flow[Any]]:
        return dict(self._flows)

    def compiled(self, name: str) -> CompiledFlow:
        """The flow compiled against the catalog with this store's checkpointer."""
        hit = self._compiled.get(name)
        if hit is None:
            flow = self._flows.get(name)
            if flow is None:
                import difflib

                close = difflib.get_close_matches(name, list(self._flows), n=1)
                raise UserError(
                    f"unknown flow {name!r}"
                    + (f" (did you mean {close[0]!r}?)" if close else "")
                    + f"; registered flows: {', '.join(sorted(self._flows)) or 'none'}"
                )
            hit = self._compiled[name] = flow.compile(
                self.catalog, checkpointer=self.saver,
                policy=self.fallback, breakers=self.breakers,
            )
        return hit

    @property
    def saver(self) -> BaseCheckpointSaver[Any]:
        if self._saver is None:
            from .persistence.saver import SQLModelSaver

            self._saver = SQLModelSaver(self.store)
        return self._saver

    # -- runs ----------------------------------------------------------------------

    async def setup(self) -> None:
        await self.store.setup()
        if self._share_events and self._relay is None and not self.store.is_sqlite:
            from .scale.relay import PostgresEventRelay

            self._relay = PostgresEventRelay(self.store.url, self.events)
            await self._relay.start()
        if self.dispatcher is not None:
            await self.dispatcher.open()

    async def start(self, flow: str | Flow[Any], input: Any, *, budget: float | None = None,
                    run_id: str | None = None, wait: bool = True,
                    principal: str | None = None,
                    deadline: timedelta | datetime | None = None) -> RunResult:
        """Create a run and execute it; with `wait=False`, execute it in the background.
        `principal` records who started it (the service's named tokens). `deadline` is the
        default of its nodes' `Needs.deadline` (a duration from now, or a moment). An input
        that does not fit the flow's input fields raises `InputError` (`frugalflow.inputs`)."""
        if isinstance(flow, Flow):
            if flow.name not in self._flows:
                self.register(flow)
            name = flow.name
        else:
            name = flow
        self.compiled(name)  # unknown flow or impossible needs: fail before writing anything
        check_input(self._flows[name], input)  # InputError: missing, unknown, mistyped fields
        budget = check_budget(budget)  # ValueError: NaN, infinite, zero or negative
        now = self.clock()  # a node's deadline counts from the run's creation
        due = deadline_at(deadline, now)
        run_id = run_id or uuid.uuid4().hex
        await self.setup()
        await self._check_policy()  # an unknown policy name: fail before writing anything
        if self.dispatcher is None:
            await self.ledger.create_run(run_id, name, input, budget_usd=budget,
                                         principal=principal, deadline_at=due, created_at=now)
            return await self._launch(run_id, input, wait=wait)
        # Dispatched: the input becomes the thread's first checkpoint (state, not a message),
        # then the queue says "run X is ready".
        await self.ledger.create_run(run_id, name, input, budget_usd=budget,
                                     status=RunStatus.QUEUED, principal=principal, deadline_at=due,
                                     created_at=now)
        graph = self.compiled(name).graph
        await graph.aupdate_state(self._config(run_id), input, as_node=START)
        return await self._dispatch(self.dispatcher, run_id, wait=wait)

    async def resume(self, run_id: str, value: Any = None, *, budget: float | None = None,
                     wait: bool = True, wait_for_lease: float = 0.0) -> RunResult:
        """Continue a run from its last checkpoint.

        `value` answers an interrupt; `budget` replaces the run's budget (e.g. after
        `budget_exceeded`); `wait_for_lease` waits up to that many seconds for a crashed
        executor's lease to expire.
        """
        budget = check_budget(budget)  # ValueError: NaN, infinite, zero or negative
        row = await self.ledger.get_run(run_id)
        if row.status in FINAL_STATUSES:
            raise RunStateError(
                f"run {run_id!r} already {row.status}; it cannot be resumed (start a new run)",
                run_id=run_id, status=row.status,
            )
        if run_id in self._tasks:
            raise LeaseError(f"run {run_id!r} is already executing in this process",
                             run_id=run_id, holder=self.holder)
        self.compiled(row.flow)
        await self._check_policy()  # an unknown policy name: fail before changing anything
        if budget is not None:
            if budget < row.cost_usd:
                raise UserError(
                    f"run {run_id!r} has already spent ${row.cost_usd:.6f}; a budget of "
                    f"${budget} would be exceeded at once"
                )
            await self.ledger.update_run(run_id, budget_usd=budget)
        graph_input: Any = None
        if row.status == RunStatus.INTERRUPTED:
            graph_input = resume_input(await self._interrupts(row.flow, run_id), value)
        elif value is not None:
            raise RunStateError(
                f"run {run_id!r} is {row.status}, not waiting on an interrupt: resume it "
                "without a value", run_id=run_id, status=row.status,
            )
        if self.dispatcher is not None and row.status == RunStatus.WAITING:
            # Woken: it stays `waiting` (a continuation: its calls replay) until a worker runs it.
            return await self._dispatch(self.dispatcher, run_id, wait=wait)
        if self.dispatcher is not None:
            await self.ledger.update_run(
                run_id, status=RunStatus.QUEUED,
                pending_resume={"value": value} if row.status == RunStatus.INTERRUPTED else None)
            return await self._dispatch(self.dispatcher, run_id, wait=wait)
        return await self._launch(run_id, graph_input, wait=wait, wait_for_lease=wait_for_lease)

    async def execute_dispatched(self, run_id: str) -> RunResult | None:
        """Execute a run a dispatcher delivered (in a worker). A run that another live
        executor holds, or that already finished, is left alone."""
        row = await self.ledger.get_run(run_id)
        if row.status in FINAL_STATUSES:
            return None
        graph_input: Any = None
        if row.pending_resume is not None:
            graph_input = resume_input(await self._interrupts(row.flow, run_id),
                                       row.pending_resume.get("value"))
        elif row.status == RunStatus.QUEUED and not await self._has_checkpoint(row.flow, run_id):
            # Its starter died before seeding the thread: start from the recorded input.
            graph_input = row.input
        try:
            # A crashed worker's lease expires after lease_ttl: wait that long, no longer.
            result = await self._launch(run_id, graph_input, wait=True,
                                        wait_for_lease=self.lease_ttl * 1.5)
        except LeaseError:
            log.info("frugalflow: run %s is held by a live executor; not executing it", run_id)
            return None
        if result.lost_lease:
            # This worker stalled past its lease. If nobody took the run over, it must not
            # stay orphaned: queue it again; whoever gets it resumes from the checkpoint.
            row = await self.ledger.get_run(run_id)
            if row.status not in FINAL_STATUSES and self.dispatcher is not None:
                await self.dispatcher.submit(run_id)
        return result

    async def _interrupts(self, flow: str, run_id: str) -> list[Any]:
        return list((await self.compiled(flow).graph.aget_state(self._config(run_id))).interrupts)

    async def _has_checkpoint(self, flow: str, run_id: str) -> bool:
        # the Runner compiles every flow with its own saver (never None, False or True)
        saver = cast("BaseCheckpointSaver[Any]", self.compiled(flow).graph.checkpointer)
        return await saver.aget_tuple(self._config(run_id)) is not None

    async def _dispatch(self, dispatcher: Dispatcher, run_id: str, *, wait: bool) -> RunResult:
        """Queue the run for a worker; with `wait`, follow it until it stops (a pause too:
        `start`/`resume` report it, while `wait` waits for the worker that takes it next)."""
        await dispatcher.submit(run_id)
        if not wait:
            return RunResult(run_id, RunStatus.QUEUED)
        return await self._follow(run_id, until=STOPPED)

    async def _follow(self, run_id: str, *, until: frozenset[RunStatus]) -> RunResult:
        """Follow a run that workers execute until its status is one of `until`."""
        async with self.events.queue(run_id) as events:
            while True:
                row = await self.ledger.get_run(run_id)
                if row.status in until:
                    return self._result(row)
                # Woken by the run's events (relayed from workers), re-checked every second.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(events.get(), 1.0)

    async def cancel(self, run_id: str) -> RunResult:
        """Stop a run: cancel it here if it executes here, else ask its executor to stop."""
        row = await self.ledger.get_run(run_id)
        if row.status in FINAL_STATUSES:
            return self._result(row)
        task = self._tasks.get(run_id)
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return self._result(await self.ledger.get_run(run_id))
        if self.dispatcher is not None and row.status == RunStatus.QUEUED:
            await self.dispatcher.cancel(run_id)
        # Only from the status read (a worker may have taken it meanwhile: then the request
        # below stops it); cancel_requested too, for an executor that holds it already.
        if row.status == RunStatus.RUNNING or not await self.ledger.move_run(
                run_id, RunStatus.CANCELLED, [RunStatus(row.status)], cancel_requested=True):
            # Executing elsewhere: its executor sees the request when it renews its lease
            # (and the poller gives its parked requests up once it has ended).
            if (await self.ledger.get_run(run_id)).status not in FINAL_STATUSES:
                await self.ledger.update_run(run_id, cancel_requested=True)
        elif row.status == RunStatus.WAITING:
            # Cancelled first, so no worker can take it up meanwhile and call synchronously
            # what it gives up here (its batches cancelled, answers already in recorded late).
            await self.parked.abandon_run(run_id, self.clock())
        return self._result(await self.ledger.get_run(run_id))

    async def wait(self, run_id: str, *, through_waiting: bool = False) -> RunResult:
        """The result of a run once it stops: one started with `wait=False`, one paused by
        a database outage (it resumes here when the database is back) and, with a
        dispatcher, one that workers execute (a pause there is not its end: the run is
        queued again, so this waits for the worker that takes it next; nor is `waiting`).
        `through_waiting`: a run waiting for batch answers or a cheaper hour is waited for
        until it ends (a batch poller must be running: `batch_poller().start()`, the
        service, or `frugalflow worker`)."""
        result = await self._wait_once(run_id)
        while through_waiting and result.status == RunStatus.WAITING:
            # Woken by a poller (here or elsewhere): follow it, then its execution here.
            await self._follow(run_id, until=ENDED | {RunStatus.RUNNING, RunStatus.QUEUED})
            result = await self._wait_once(run_id)
        return result

    async def _wait_once(self, run_id: str) -> RunResult:
        task = self._tasks.get(run_id)
        if task is None:
            if self.dispatcher is not None:
                return await self._follow(run_id, until=ENDED)
            return self._result(await self.ledger.get_run(run_id))
        while True:
            result = await asyncio.shield(task)
            # Paused by a database outage, it goes on in a recovery task: wait for that too.
            nxt = self._tasks.get(run_id)
            if nxt is None or nxt is task:
                return result
            task = nxt

    def batch_poller(self, **options: Unpack[PollerOptions]) -> BatchPoller:
        """A poller that sends this store's parked requests in provider batches, collects
        their answers and wakes their runs (`frugalflow.batches.poller`; the service and
        `frugalflow worker` run one)."""
        from .batches.poller import BatchPoller

        return BatchPoller(self, **options)

    @property
    def executing(self) -> frozenset[str]:
        """The runs executing in this process now (or recovering from a database outage)."""
        return frozenset(self._tasks)

    async def get(self, run_id: str) -> RunRecord:
        """The run with its node executions and model attempts."""
        return await self.ledger.run_record(run_id)

    async def state(self, run_id: str) -> StateSnapshot:
        """The run's LangGraph state snapshot (values, next nodes, interrupts)."""
        row = await self.ledger.get_run(run_id)
        return await self.compiled(row.flow).graph.aget_state(self._config(run_id))

    async def close(self) -> None:
        """Stop background runs (they stay resumable, status `paused`) and close the store."""
        self._closing = True
        tasks = list(self._tasks.values())
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        if self.ledger.unwritten():
            # Paid calls whose rows could not be written during an outage: a last try.
            try:
                with unfenced():
                    await self.ledger.flush_attempts()
            except StoreUnavailableError:
                log.error("frugalflow: %d attempt row(s) (paid model calls) could not be "
                          "written: the database is unreachable", self.ledger.unwritten())
        if self.events.log is not None:
            await self.events.log.close()  # the events that wait, written (relayed too)
        if self._relay is not None:
            await self._relay.close()
            self._relay = None
        if self._otel is not None:
            await self._otel.aclose()  # exports what is buffered
        if self.dispatcher is not None:
            await self.dispatcher.close()
        await self.store.close()

    # -- execution -----------------------------------------------------------------

    async def _launch(
        self, run_id: str, graph_input: Any, *, wait: bool, wait_for_lease: float = 0.0
    ) -> RunResult:
        running = self._tasks.get(run_id)
        if run_id in self._launching or (running is not None and not running.done()):
            # Never two executions of one run in one runner (its lease would let it in): a
            # queue delivers a run twice when the worker's heartbeat lapsed in a database
            # outage while it kept executing the run.
            raise LeaseError(f"run {run_id!r} is already executing in this process "
                             f"({self.holder})", run_id=run_id, holder=self.holder)
        self._launching.add(run_id)
        try:
            lease = await self._take_lease(run_id, wait_for_lease)
            task = asyncio.create_task(self._execute(run_id, graph_input, lease),
                                       name=f"run:{run_id}")
            self._tasks[run_id] = task
        finally:
            self._launching.discard(run_id)
        task.add_done_callback(lambda t: self._forget(run_id, t))
        if not wait:
            return RunResult(run_id, RunStatus.RUNNING)
        result = await asyncio.shield(task) if not task.done() else task.result()
        await self.events.flush(5.0)  # its last events reached the subscribers (the CLI's)
        return result

    def _forget(self, run_id: str, task: asyncio.Task[RunResult]) -> None:
        if self._tasks.get(run_id) is task:  # not a recovery task that replaced it
            self._tasks.pop(run_id, None)

    async def _take_lease(self, run_id: str, wait_for_lease: float) -> Lease:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_for_lease
        while True:
            try:
                return await acquire_lease(self.store, run_id, self.holder, self.lease_ttl)
            except LeaseError:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(min(0.2, max(self.lease_ttl / 10, 0.02)))

    def _config(self, run_id: str) -> RunnableConfig:
        config: RunnableConfig = {"configurable": {"thread_id": run_id}, "metadata": {"run_id": run_id}}
        with contextlib.suppress(ValueError):
            config["run_id"] = uuid.UUID(run_id)
        return config

    async def _execute(self, run_id: str, graph_input: Any, lease: Lease) -> RunResult:
        if self._otel is None:
            return await self._execute_once(run_id, graph_input, lease)
        with self._otel.execution(run_id) as ended:  # the execution's span
            return ended(await self._execute_once(run_id, graph_input, lease))

    async def _execute_once(self, run_id: str, graph_input: Any, lease: Lease) -> RunResult:
        keeper = asyncio.create_task(self._keep_lease(lease, asyncio.current_task()))
        end = Ending()
        try:
            async with self._slots, afenced(lease.fence):
                await self._drive(run_id, graph_input, end)
        except BudgetExceededError as e:
            end.stop(RunStatus.BUDGET_EXCEEDED, str(e), e)
        except RunEndedError:  # ended (cancelled) before it began: its end stays as written
            await self._stop_keeper(keeper)
            with unfenced():
                await lease.release()
            return self._result(await self.ledger.get_run(run_id))
        except asyncio.CancelledError:
            stopped = await self._stopped(run_id, lease, keeper, end.values)
            if stopped is None:
                raise
            return stopped
        except StoreUnavailableError as e:
            # The database stayed unreachable for the lease's time (every write retries
            # that long): release the run as `paused` once it is back, and resume it then.
            return await self._outage(run_id, lease, keeper, graph_input, end.values, e)
        except LeaseError:
            # A fenced write found another executor holding the run (our writes renew the
            # lease, so only a takeover ends here): write nothing more.
            lease.lost = True
            await self._stop_keeper(keeper)
            return self._lost_result(run_id, end.values)
        except FrugalflowError as e:
            end.stop(RunStatus.FAILED, str(e), e)
        except Exception as e:  # a bug in a node: the run fails, persisted and resumable
            log.exception("frugalflow: run %s failed", run_id)
            end.stop(RunStatus.FAILED, f"{type(e).__name__}: {e}", e)
        # Only a cut-short execution, or an earlier one, leaves node rows open.
        return await self._end(run_id, end, lease, keeper,
                               settle_nodes=end.continuation or end.status != RunStatus.SUCCEEDED)

    async def _drive(self, run_id: str, graph_input: Any, end: Ending) -> None:
        """Execute the run's graph up to its next stop, noting in `end` how far it got."""
        row = await self.ledger.get_run(run_id)
        compiled = self.compiled(row.flow)
        # A continuation: calls that completed before a crash are replayed.
        end.continuation = (row.status not in (RunStatus.PENDING, RunStatus.QUEUED)
                            or row.pending_resume is not None)
        ctx = await self._context(compiled, row, end.continuation)
        if self._otel is not None:  # the execution's span, the run's trace kept with it
            await self._otel.begin(row, ctx.usage, self.ledger)
        # Not over a final status: a run cancelled since it was read (e.g. while a worker
        # took it from the queue) is never executed.
        if not await self.ledger.move_run(run_id, RunStatus.RUNNING, _RUNNABLE, error=None,
                                          error_type=None):
            raise RunEndedError(run_id)
        self.events.publish(run_id, "run_started", flow=row.flow)
        config = self._config(run_id)
        if self.callbacks:
            config["callbacks"] = list(self.callbacks)
        async for mode, chunk in compiled.graph.astream(
            graph_input, config, context=ctx, stream_mode=["tasks", "values"]
        ):
            if mode == "values":
                end.values = chunk if isinstance(chunk, dict) else {"value": chunk}
            elif mode == "tasks":
                # a "tasks" event is a dict (a task starting or its result)
                await self._on_task(run_id, cast("dict[str, Any]", chunk))
        self.verbosity.ran(row.flow)
        snapshot = await compiled.graph.aget_state(config)
        asks = user_interrupts(snapshot.interrupts)
        end.interrupts = [scrub(i.value) for i in asks]
        end.status = (RunStatus.INTERRUPTED if asks
                      else RunStatus.WAITING if snapshot.interrupts
                      else RunStatus.INTERRUPTED if snapshot.next else RunStatus.SUCCEEDED)
        end.values = dict(snapshot.values) if snapshot.values else end.values

    async def _stopped(self, run_id: str, lease: Lease, keeper: asyncio.Task[None],
                       values: dict[str, Any] | None) -> RunResult | None:
        """The run's task was cancelled: by the lease keeper (the result), or by our caller
        or a shutdown (None: the cancellation goes on, the run's end recorded)."""
        me = asyncio.current_task()
        if lease.stop is not None and me is not None and me.uncancel() == 0:
            # Stopped by the lease keeper, not by our caller: the lease went to another
            # executor, or a cancel was requested from another process.
            if lease.stop == "lost":
                await self._stop_keeper(keeper)
                return self._lost_result(run_id, values)
            return await self._end(run_id, Ending(RunStatus.CANCELLED, values, error="cancelled"),
                                   lease, keeper, settle_nodes=True)
        end = (Ending(RunStatus.PAUSED, values, error="stopped by shutdown; resume it")
               if self._closing else Ending(RunStatus.CANCELLED, values, error="cancelled"))
        with contextlib.suppress(StoreUnavailableError):  # kept for the next executor
            await asyncio.shield(self._finish(run_id, end, lease, keeper, settle_nodes=True))
        return None

    async def _context(self, compiled: CompiledFlow, row: RunRow,
                       continuation: bool) -> RunContext:
        """A fresh run context (call keys count from 1 again: replay finds the calls)."""
        usage = RunUsage(budget_usd=row.budget_usd, run_id=row.id, spent_usd=row.cost_usd)
        ctx = compiled.new_context(usage=usage, listeners=[self._ledger_listener(row.flow)])
        ctx.router = await self._current_router()
        ctx.measured = await self._current_measurements(compiled.flow)
        ctx.explore = self.explore
        ctx.verbosity = await self._current_verbosity(row.flow)
        ctx.limiter = self.limiter
        ctx.intent = functools.partial(self.ledger.record_intent, flow=row.flow)
        ctx.parking = Parking(self.parked, row.flow, aware(row.created_at) or self.clock(),
                              aware(row.deadline_at), self.clock, self.deadline_margin)
        if continuation:
            ctx.replay = self._replayer(row.id)
        return ctx

    async def _end(self, run_id: str, end: Ending, lease: Lease, keeper: asyncio.Task[None],
                   *, settle_nodes: bool) -> RunResult:
        """Record the run's end and release it; the result the caller sees."""
        try:
            await asyncio.shield(self._finish(run_id, end, lease, keeper,
                                              settle_nodes=settle_nodes))
        except StoreUnavailableError as e:
            # The run ended but its end could not be written: written when the store is back.
            self._recover_later(run_id, lease, end, reason=e)
            return end.result(run_id)
        if lease.lost:
            return self._lost_result(run_id, end.values)
        try:
            row = await self.ledger.get_run(run_id)
        except StoreUnavailableError:  # recorded; only the read of it back failed
            return end.result(run_id)
        return RunResult(run_id, RunStatus(row.status), end.values, row.cost_usd, row.error,
                         end.interrupts)

    def _lost_result(self, run_id: str, values: dict[str, Any] | None) -> RunResult:
        return RunResult(run_id, RunStatus.PAUSED, values, lost_lease=True,
                         error="another executor took this run over (its lease expired "
                               "while this one stalled); it continues there")

    async def _stop_keeper(self, keeper: asyncio.Task[None]) -> None:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper

    async def _outage(self, run_id: str, lease: Lease, keeper: asyncio.Task[None],
                      graph_input: Any, values: dict[str, Any] | None,
                      e: StoreUnavailableError) -> RunResult:
        await self._stop_keeper(keeper)
        reason = (f"paused: the database was unreachable for longer than the lease "
                  f"({lease.ttl:g} s): {e}; resumed automatically when it is back")
        log.error("frugalflow: run %s %s", run_id, reason)
        end = Ending(RunStatus.PAUSED, values, error=reason, error_type="StoreUnavailableError")
        self._recover_later(run_id, lease, end, reason=e, graph_input=graph_input)
        return RunResult(run_id, RunStatus.PAUSED, values, error=reason)

    def _recover_later(self, run_id: str, lease: Lease, end: Ending, *,
                       reason: BaseException, graph_input: Any = None) -> None:
        """Once the database is back: write the kept attempt rows and the run's end (or
        `paused`), release the lease, and resume a paused run (here, or through the
        dispatcher). `runner.wait(run_id)` returns its final result."""
        task = asyncio.create_task(self._recover(run_id, lease, end, graph_input),
                                   name=f"recover:{run_id}")
        self._tasks[run_id] = task
        task.add_done_callback(lambda t: self._forget(run_id, t))

    async def _recover(self, run_id: str, lease: Lease, end: Ending,
                       graph_input: Any) -> RunResult:
        while True:
            await self._wait_for_store()
            try:
                with fenced(lease.fence):
                    await self.ledger.flush_attempts(run_id)
                    await self.ledger.close_nodes(run_id, recheck=True)
                    await self.ledger.update_run(
                        run_id, status=end.status, error=end.error, error_type=end.error_type,
                        output=scrub(end.values)
                        if end.values is not None and end.status != RunStatus.PAUSED else None,
                        interrupts=end.interrupts or None, pending_resume=None)
                with unfenced():
                    await lease.release()
                break
            except StoreUnavailableError:
                continue  # gone again: wait again
            except LeaseError:
                return self._lost_result(run_id, end.values)
        self.events.publish(run_id, "run_finished", status=end.status,
                            error=scrub(end.error) if end.error else None)
        if end.status == RunStatus.PAUSED and self.dispatcher is not None:
            await self.dispatcher.submit(run_id)  # a worker resumes it
        elif end.status == RunStatus.PAUSED and not self._closing:
            log.info("frugalflow: the database is back; resuming run %s", run_id)
            return await self._resume_after_outage(run_id, graph_input)
        return self._result(await self.ledger.get_run(run_id))

    async def _resume_after_outage(self, run_id: str, graph_input: Any) -> RunResult:
        """Execute a run paused by an outage again, with the input that did not land."""
        row = await self.ledger.get_run(run_id)
        resume_input: Any = None
        if isinstance(graph_input, Command):
            if (await self.compiled(row.flow).graph.aget_state(self._config(run_id))).interrupts:
                resume_input = graph_input  # the answer never reached the checkpoint
        elif graph_input is not None and not await self._has_checkpoint(row.flow, run_id):
            resume_input = graph_input  # not even the input reached the checkpoint
        new_lease = await acquire_lease(self.store, run_id, self.holder, self.lease_ttl)
        return await self._execute(run_id, resume_input, new_lease)

    async def _wait_for_store(self) -> None:
        """Until the database answers (probed with backoff, up to every 2 s)."""
        delay = 0.05
        while not await self.store.probe():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _finish(self, run_id: str, end: Ending, lease: Lease, keeper: asyncio.Task[None],
                      *, settle_nodes: bool) -> None:
        await self._stop_keeper(keeper)
        if lease.lost:
            return  # another executor owns the run now: write nothing more
        try:
            with fenced(lease.fence):
                # Attempt rows kept during a database outage go first: the ledger has
                # every paid call before the run's end is recorded and its lease released.
                await self.ledger.flush_attempts(run_id)
                if settle_nodes:
                    await self.ledger.close_nodes(run_id)
                await self.ledger.update_run(
                    run_id, status=end.status,
                    output=scrub(end.values) if end.values is not None else None,
                    interrupts=end.interrupts or None, error=end.error,
                    error_type=end.error_type, pending_resume=None,
                )
        except LeaseError:
            lease.lost = True
            log.error("frugalflow: run %s: another executor took it over before its end "
                      "was recorded", run_id)
            return
        with unfenced():
            await lease.release()
            if end.status == RunStatus.PAUSED and self.dispatcher is not None:
                # Stopped by this worker's shutdown: hand it to another worker.
                with contextlib.suppress(Exception):
                    await self.dispatcher.submit(run_id)
        self.events.publish(run_id, "run_finished", status=end.status,
                            error=scrub(end.error) if end.error else None)

    async def _on_task(self, run_id: str, chunk: dict[str, Any]) -> None:
        if self._otel is not None:
            self._otel.task(run_id, chunk)
        if self.ledger.unwritten(run_id):  # attempt rows kept during an outage go first
            await self.ledger.flush_attempts(run_id)
        if "input" in chunk:  # a task started
            await self.ledger.node_started(chunk["id"], run_id, chunk["name"], self.holder)
            self.events.publish(run_id, "node_started", node=chunk["name"], task_id=chunk["id"])
        else:
            err = chunk.get("error")
            asks = chunk.get("interrupts")
            status = (NodeStatus.ERROR if err else NodeStatus.DONE if not asks
                      else NodeStatus.INTERRUPTED if user_interrupts(asks)
                      else NodeStatus.WAITING)
            await self.ledger.node_finished(chunk["id"], status=status,
                                            error=str(err) if err else None)
            self.events.publish(run_id, "node_finished", node=chunk["name"],
                                task_id=chunk["id"], status=status)

    def _replayer(self, run_id: str) -> Replay:
        async def replay(node: str | None, call_key: str) -> AIMessage | None:
            answer = await self.ledger.replayable(run_id, node, call_key)
            return answer if isinstance(answer, AIMessage) else None

        return replay

    def _ledger_listener(self, flow: str) -> Callable[[Attempt], Awaitable[None]]:
        async def write(attempt: Attempt) -> None:
            try:
                await self.ledger.record_attempt(attempt, flow=flow)
            except StoreUnavailableError as e:
                # Kept in memory by the ledger; written before the run's next ledger write,
                # its end or its release. The model call itself succeeded: go on.
                log.warning("frugalflow: attempt row of run %s kept until the database is "
                            "back: %s", attempt.run_id, e)
            self.events.publish(attempt.run_id or "", "attempt", **attempt_event(attempt))

        return write

    async def _keep_lease(self, lease: Lease, task: asyncio.Task[Any] | None) -> None:
        """Renew the lease; stop the run if the lease is lost or a cancel was requested."""
        while True:
            await asyncio.sleep(lease.ttl / 3)
            try:
                kept = await lease.renew()
                row = await self.ledger.get_run(lease.run_id)
            except Exception:  # the database hiccupped: try again at the next beat
                log.warning("frugalflow: lease renewal of %s failed", lease.run_id, exc_info=True)
                continue
            if not kept:
                lease.lost = True
                log.error("frugalflow: lost the lease of run %s; stopping it", lease.run_id)
            if (not kept or row.cancel_requested) and task is not None:
                lease.stop = "lost" if not kept else "cancel"
                task.cancel()
                return

    def _result(self, row: RunRow) -> RunResult:
        return RunResult(row.id, RunStatus(row.status), row.output, row.cost_usd, row.error,
                         list(row.interrupts or []))
