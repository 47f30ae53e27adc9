"""Dispatching runs to worker processes through an existing task engine.

PostgreSQL holds the truth (runs, checkpoints, ledger, leases); the queue only says "run X
is ready". A `Dispatcher` submits, cancels and reports on those messages; the default engine
is procrastinate (a PostgreSQL task queue: per-job locks, priorities, retries, worker
heartbeats, stalled-job detection), so adding workers adds no new server. Another engine
(Celery or taskiq on RabbitMQ, Temporal) fits the same three methods.

    dispatcher = ProcrastinateDispatcher("postgresql://...")
    runner = Runner(url, flows=[...], dispatcher=dispatcher)   # start/resume enqueue
    await run_worker(runner, concurrency=8)                     # `frugalflow worker`

What may run twice: the node that was executing when its worker died (it restarts from its
last checkpoint on another worker; its unfinished model call was never recorded). What never
runs twice: a completed node, a recorded model call, and two executors on one run at once
(the lease, fenced on every checkpoint and ledger write).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from ..persistence.store import postgres_url
from ..statuses import RunStatus

if TYPE_CHECKING:
    from procrastinate.jobs import Job

    from ..batches.poller import BatchPoller
    from ..runner import Runner

__all__ = ["Dispatcher", "ProcrastinateDispatcher", "run_worker"]

log = logging.getLogger("frugalflow")

TASK_NAME = "frugalflow.execute_run"
# procrastinate's job statuses (not run statuses) of a run that no job will execute
_NO_LIVE_JOB = (None, "succeeded", "failed", "cancelled", "aborted")


class Dispatcher(Protocol):
    """What the runner needs of a task engine."""

    async def open(self) -> None: ...

    async def close(self) -> None: ...

    async def submit(self, run_id: str, *, priority: int = 0) -> None:
        """Enqueue "execute run `run_id`" (at most one such message per run at a time)."""

    async def cancel(self, run_id: str) -> bool:
        """Drop the run's queued message if no worker took it yet; True if dropped."""

    async def status(self, run_id: str) -> str | None:
        """The engine's view of the run's message (e.g. todo, doing, succeeded), or None."""


def _database_lost(error: BaseException) -> bool:
    """Whether `error` says the database (or the way to it) went away, not a bug."""
    from procrastinate.exceptions import ConnectorException

    from ..exceptions import StoreUnavailableError
    from ..persistence.errors import is_transient

    if isinstance(error, (ConnectorException, StoreUnavailableError, OSError)):
        return True
    return is_transient(error)


async def _until_reachable(step: Callable[[], Awaitable[object]], what: str, *,
                           first: float = 0.2, cap: float = 5.0) -> None:
    """Await `step()`, again and again with backoff while the database is unreachable."""
    delay = first
    while True:
        try:
            await step()
            return
        except Exception as e:  # only a lost database is retried; anything else is raised
            if not _database_lost(e):
                raise
            log.warning("frugalflow: worker could not %s (%s: %s); trying again in %.1f s",
                        what, type(e).__name__, str(e).strip()[:200], delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, cap)


class ProcrastinateDispatcher:
    """Runs dispatched through procrastinate's queue in the runs' own PostgreSQL database."""

    def __init__(self, url: str, *, queue: str = "frugalflow", stall_timeout: float = 30.0,
                 heartbeat: float = 10.0) -> None:
        import procrastinate

        self.url = url
        self.queue = queue
        self.stall_timeout = stall_timeout
        self.heartbeat = heartbeat
        self.app = procrastinate.App(connector=procrastinate.PsycopgConnector(
            conninfo=postgres_url(url), min_size=1, max_size=4))
        self.runner: Runner | None = None
        self._opened = False

        # A worker that cannot reach the database (or dies) does not fail the run: the job is
        # retried with backoff, and the run resumes from its last checkpoint.
        retry = procrastinate.RetryStrategy(max_attempts=30, wait=1, linear_wait=1)

        @self.app.task(name=TASK_NAME, queue=queue, pass_context=False, retry=retry)
        async def execute_run(run_id: str) -> None:
            if self.runner is None:
                raise RuntimeError("this process has no runner bound: use run_worker(runner)")
            await self.runner.execute_dispatched(run_id)

        self._task = execute_run

    async def open(self) -> None:
        if self._opened:
            return
        await self.app.open_async()
        self._opened = True
        await self._ensure_schema()

    async def _ensure_schema(self) -> None:
        # app.connector is typed as the base connector; ours is a PsycopgConnector (has .pool)
        async with self.app.connector.pool.connection() as conn:  # type: ignore[attr-defined]
            # Serialise concurrent first starts (several workers at once).
            await conn.execute("SELECT pg_advisory_lock(7430119553)")
            try:
                cur = await conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL")
                row = await cur.fetchone()
                if not (row and row[0]):
                    await self.app.schema_manager.apply_schema_async()
            finally:
                await conn.execute("SELECT pg_advisory_unlock(7430119553)")

    async def close(self) -> None:
        if self._opened:
            await self.app.close_async()
            self._opened = False

    async def submit(self, run_id: str, *, priority: int = 0) -> None:
        await self.open()
        from procrastinate import exceptions

        try:
            # lock: one job of a run executes at a time; queueing_lock: one queued at a time.
            await self._task.configure(lock=run_id, queueing_lock=run_id,
                                       priority=priority).defer_async(run_id=run_id)
        except exceptions.AlreadyEnqueued:
            log.info("frugalflow: run %s is already queued", run_id)

    async def _jobs(self, run_id: str) -> list[Job]:
        jobs = await self.app.job_manager.list_jobs_async(lock=run_id)
        return list(jobs)

    async def cancel(self, run_id: str) -> bool:
        await self.open()
        dropped = False
        for job in await self._jobs(run_id):
            if job.status == "todo" and job.id is not None:  # not yet taken by a worker
                dropped |= bool(await self.app.job_manager.cancel_job_by_id_async(job.id))
        return dropped

    async def status(self, run_id: str) -> str | None:
        await self.open()
        jobs = await self._jobs(run_id)
        return str(jobs[-1].status) if jobs else None

    async def retry_stalled(self) -> int:
        """Requeue jobs whose worker stopped heartbeating (it died); their runs resume elsewhere."""
        stalled = await self.app.job_manager.get_stalled_jobs(
            seconds_since_heartbeat=self.stall_timeout)
        n = 0
        for job in stalled:
            with contextlib.suppress(Exception):  # another worker may have retried it already
                await self.app.job_manager.retry_job(job)
                n += 1
        if n:
            log.warning("frugalflow: requeued %d stalled run(s)", n)
        return n


    async def requeue_orphans(self, runner: Runner, older_than: float) -> int:
        """Queue again the runs that should be executing but have no job and no executor
        for `older_than` seconds. Idempotent. Such runs are left
        - `queued`: their starter died between writing the run and queueing it (the run's
          row and procrastinate's job are two transactions);
        - `paused` by a database outage or a shutdown: the worker that paused them died
          before it queued them again;
        - `running` with an expired lease: their worker died after its job was already
          settled (e.g. retried as stalled while the database was away)."""
        from datetime import timedelta

        from sqlalchemy import select

        from ..persistence.tables import LeaseRow, utcnow

        leases = LeaseRow.__table__  # type: ignore[attr-defined]
        before = utcnow() - timedelta(seconds=older_than)
        n = 0
        for status in (RunStatus.QUEUED, RunStatus.PAUSED, RunStatus.RUNNING):
            rows = await runner.ledger.list_runs(status=status, limit=500, updated_before=before)
            for row in rows:
                if status == RunStatus.RUNNING:
                    async with runner.store.read() as conn:
                        live = (await conn.execute(select(leases.c.run_id).where(
                            leases.c.run_id == row.id, leases.c.expires_at > utcnow()))).first()
                    if live is not None:
                        continue  # an executor holds it
                if await self.status(row.id) in _NO_LIVE_JOB:
                    await self.submit(row.id)
                    n += 1
        if n:
            log.warning("frugalflow: queued %d run(s) that had no job", n)
        return n


async def run_worker(
    runner: Runner, *, concurrency: int = 8, queues: list[str] | None = None,
    stall_check: float | None = None, poll_batches: bool | BatchPoller = True,
) -> None:
    """Execute dispatched runs until cancelled (SIGINT/SIGTERM stop it gracefully: the runs
    in flight stop as `paused` and are requeued for other workers). With `poll_batches`
    (True, or a `BatchPoller` configured with its gathering window and batch size), the
    worker also runs a batch poller: parked requests are sent and waiting runs woken by
    whichever worker gets there first."""
    dispatcher = runner.dispatcher
    if not isinstance(dispatcher, ProcrastinateDispatcher):
        raise TypeError("run_worker needs a runner with a ProcrastinateDispatcher")
    dispatcher.runner = runner
    # A worker outlives its database: it waits for it at start and restarts its job loop
    # when the loop dies of a lost connection (procrastinate's loop ends on any database
    # error), as a supervisor would restart the process, without losing its runs in flight.
    await _until_reachable(runner.setup, "set up the database")
    await _until_reachable(dispatcher.open, "open the task queue")
    check = stall_check if stall_check is not None else max(dispatcher.stall_timeout / 3, 0.5)

    async def stall_loop() -> None:
        while True:
            await asyncio.sleep(check)
            try:
                await dispatcher.retry_stalled()
                await dispatcher.requeue_orphans(runner, older_than=dispatcher.stall_timeout)
            except Exception:  # the database hiccupped: try again at the next beat
                log.warning("frugalflow: stalled-job check failed", exc_info=True)

    async def job_loop() -> None:
        await dispatcher.app.run_worker_async(
            queues=queues or [dispatcher.queue], concurrency=concurrency,
            update_heartbeat_interval=dispatcher.heartbeat,
            stalled_worker_timeout=dispatcher.stall_timeout,
            fetch_job_polling_interval=1.0, install_signal_handlers=True,
        )

    watcher = asyncio.create_task(stall_loop())
    poller = (poll_batches if not isinstance(poll_batches, bool)
              else runner.batch_poller() if poll_batches else None)
    if poller is not None:
        poller.start()
    try:
        # Returns when a signal stopped the worker gracefully; a database error restarts it.
        await _until_reachable(job_loop, "fetch jobs")
    finally:
        watcher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
        if poller is not None:
            await poller.stop()
