"""How the saver reaches the database fast: group commit, and connections kept between calls.

* Group commit (`Writer`): the writes of many runs (checkpoints, ledger rows, leases) that
  arrive together are written together, one transaction for the lot.
* Lanes: `Store.write()` takes a connection per transaction (PostgreSQL pre-pings each
  checkout with three round trips; SQLite opens a file per transaction). The hot path keeps
  a few connections checked out of the Store's own pools instead (`AsyncLanes`,
  `SqliteLanes`), at most the pool's size, returned on `store.close()`.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import typing
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..exceptions import LeaseError, StoreUnavailableError
from .errors import is_transient
from .leases import Fence, fence_checks
from .plans import Plan, Rows, adrive, drive, drive_in_driver_transaction

if TYPE_CHECKING:
    from .store import Store

__all__ = ["AsyncLanes", "SqliteLanes", "Write", "Writer"]

T = TypeVar("T")

_MAX_BATCH = 256  # calls written by one transaction at most
_DEFER_S = 0.05  # a deferred write waits this long at most for a transaction to join
log = logging.getLogger("frugalflow")


@dataclass(eq=False)
class Write:
    """One caller's part of a batch: checkpoint `rows` (merged with the batch's rows of the
    same `merge` into one statement) and/or a `plan` run in the batch's transaction, under
    `fence` (checked once per batch for all the calls it fences)."""

    plan: Callable[[], Plan[Any]] | None = None
    rows: Rows | None = None
    merge: Callable[[Sequence[Rows]], Plan[None]] | None = None
    fence: Fence | None = None
    done: asyncio.Future[Any] | None = None


class _Lost(NamedTuple):
    """The outcome of a call whose fence failed its check in the batch."""

    error: LeaseError


class Writer:
    """Group commit for a Store: the writes of every run (checkpoints, ledger rows, leases)
    that arrive together go to the database together, in ONE transaction.

    A call alone is written at once, as a batch of one. Under load, calls that arrive while
    a batch is in flight queue up, and the next batch writes all of them: each distinct
    lease fence is checked (and its lease renewed) once, the checkpoint rows of all the
    calls are one statement, then each call's plan runs. A call whose fence fails gets its
    LeaseError; the others commit. Each call stays atomic (a batch commits whole or not at
    all), and a batch that fails is retried call by call, so a call only sees its own error.
    A caller cancelled before its batch starts is dropped; once started, it is written.

    `defer` queues a write nobody waits for (bookkeeping: a node's row): it goes with the
    next transaction of its shard, or after _DEFER_S at the latest.

    PostgreSQL: calls are sharded by `key` (the run) over the lanes, one batch in flight per
    shard, so two batches never lock the same run's rows (no deadlock between them).
    SQLite: one shard (one writer).
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._queues: dict[int, list[Write]] = {}
        self._busy: set[int] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._deferred: dict[int, list[Write]] = {}
        self._timer: asyncio.TimerHandle | None = None

    def _shard(self, key: str) -> int:
        return 0 if self.store.is_sqlite else hash(key) % self.store.lanes.width()

    def defer(self, write: Write, key: str) -> None:
        """Write `write` with the next transaction of its shard (within _DEFER_S)."""
        self._deferred.setdefault(self._shard(key), []).append(write)
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(_DEFER_S, self._flush_deferred)

    def _flush_deferred(self) -> None:
        self._timer = None
        for shard, writes in self._deferred.items():
            if writes:  # a write of nothing carries them
                task = asyncio.get_running_loop().create_task(self._submit(Write(), shard))
                self._tasks.add(task)
                task.add_done_callback(_forget_carrier(self._tasks))

    async def submit(self, write: Write, key: str) -> Any:
        """Write `write` (with others, maybe); the value its plan returned."""
        return await self._submit(write, self._shard(key))

    async def _submit(self, write: Write, shard: int) -> Any:
        queue = self._queues.setdefault(shard, [])
        if shard not in self._busy and not queue:
            # The shard is free: after one turn of the loop, in which the runs that are
            # ready queue their writes (a SQLite transaction runs on the loop's thread:
            # nothing could queue while it runs), this task writes its own write alone,
            # or hands it with those that joined to a drain task (a caller cancelled then
            # cancels no other run's write).
            self._busy.add(shard)
            handed = False
            try:
                await asyncio.sleep(0)
                if queue:
                    write.done = asyncio.get_running_loop().create_future()
                    queue.insert(0, write)
                    handed = True
                else:
                    (outcome,) = await self._run([write], shard)
            finally:
                self._busy.discard(shard)
                self._start_drain(shard)  # for calls that queued meanwhile
            if handed:
                assert write.done is not None
                return await write.done
            if isinstance(outcome, _Lost):
                raise outcome.error
            return outcome
        write.done = asyncio.get_running_loop().create_future()
        queue.append(write)
        self._start_drain(shard)
        return await write.done

    def _start_drain(self, shard: int) -> None:
        if self._queues.get(shard) and shard not in self._busy:
            self._busy.add(shard)
            task = asyncio.get_running_loop().create_task(self._drain(shard))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self, shard: int) -> None:
        queue = self._queues[shard]
        batch: list[Write] = []
        try:
            while queue:
                batch = [w for w in queue[:_MAX_BATCH] if w.done is None or not w.done.done()]
                del queue[:_MAX_BATCH]
                if batch:
                    await self._flush(batch, shard)
                batch = []
        except BaseException:  # cancelled (loop shutdown): so are the calls waiting on us
            for w in batch + queue:
                if w.done is not None:
                    w.done.cancel()
            queue.clear()
            raise
        finally:
            self._busy.discard(shard)

    async def _flush(self, batch: list[Write], shard: int) -> None:
        try:
            outcomes = await self._run(batch, shard)
        except Exception as error:
            # An unreachable database: all of them (each caller retries its own call).
            if len(batch) == 1 or isinstance(error, StoreUnavailableError):
                for w in batch:
                    _settle(w, error)
                return
            for w in batch:  # isolate the failing call(s)
                try:
                    (outcome,) = await self._run([w], shard)
                except Exception as e:
                    _settle(w, e)
                else:
                    _settle(w, outcome)
            return
        for w, outcome in zip(batch, outcomes, strict=True):
            _settle(w, outcome)

    async def _run(self, batch: list[Write], shard: int) -> list[Any]:
        """One transaction for the batch and the shard's deferred writes: the batch's
        outcomes, in order."""
        deferred = self._deferred.pop(shard, [])
        if not deferred:
            return await self._transaction(batch)
        try:
            return (await self._transaction(deferred + batch))[len(deferred):]
        except StoreUnavailableError:
            self._deferred.setdefault(shard, [])[:0] = deferred  # with the next one
            raise
        except Exception:
            pass  # one of them is at fault: the deferred writes alone, then the batch
        except BaseException:  # cancelled: maybe written, maybe not (they are idempotent)
            self._deferred.setdefault(shard, [])[:0] = deferred
            raise
        for w in deferred:
            try:
                await self._transaction([w])
            except Exception as e:  # bookkeeping only (a node's row): logged, not raised
                log.warning("frugalflow: a deferred write failed: %s", e)
        return await self._transaction(batch)

    async def _transaction(self, batch: list[Write]) -> list[Any]:
        """One transaction for the batch: its outcomes, in order."""
        store = self.store
        bare = all(w.plan is None and w.fence is None for w in batch)  # rows only
        try:
            if store.is_sqlite:
                # Queue with the Store's other writers of this process (store.write() takes
                # the same lock). A transaction handed to the lane's thread commits or rolls
                # back whole even if this task is cancelled meanwhile.
                async with store.sqlite_writer():
                    return await store.sqlite_lanes.ainline(
                        lambda: _batch_plan(batch, pg=False), write=True, lean=bare)
            plan = _batch_plan(batch, pg=True)
            await store.setup()
            if bare:  # one statement: atomic in autocommit mode, no BEGIN/COMMIT trips
                async with store.lanes.connection() as conn:
                    return await adrive(conn, plan)
            async with store.lanes.transaction() as conn:
                return await adrive(conn, plan)
        except Exception as e:
            if is_transient(e) and not isinstance(e, StoreUnavailableError):
                raise store.unavailable(e) from e
            raise

    async def wait(self) -> None:
        """Until the batches in flight and the deferred writes are written."""
        if self._timer is not None:
            self._timer.cancel()
            self._flush_deferred()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _forget_carrier(tasks: set[asyncio.Task[Any]]) -> Callable[[asyncio.Task[Any]], None]:
    def done(task: asyncio.Task[Any]) -> None:
        tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning("frugalflow: deferred writes failed: %s", task.exception())
    return done


def _batch_plan(batch: Sequence[Write], *, pg: bool) -> Plan[list[Any]]:
    """The fence checks (in run order: locks taken in one order), the merged checkpoint
    rows, then each call's plan; the outcome of each call."""
    lost = yield from fence_checks({w.fence for w in batch if w.fence is not None}, pg=pg)
    live = [w for w in batch if w.fence is None or lost[w.fence] is None]
    merges: dict[Callable[[Sequence[Rows]], Plan[None]], list[Rows]] = {}
    for w in live:
        if w.rows is not None and w.merge is not None:
            merges.setdefault(w.merge, []).append(w.rows)
    for merge, rows in merges.items():
        yield from merge(rows)
    outcomes: list[Any] = []
    for w in batch:
        error = lost.get(w.fence) if w.fence is not None else None
        if error is not None:
            outcomes.append(_Lost(error))
        else:
            outcomes.append((yield from w.plan()) if w.plan is not None else None)
    return outcomes


def _settle(write: Write, outcome: Any) -> None:
    done = write.done
    if done is None or done.done():  # the caller was cancelled and no longer waits
        return
    if isinstance(outcome, _Lost):
        done.set_exception(outcome.error)
    elif isinstance(outcome, BaseException):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


# -- connections kept between operations ---------------------------------------------------
#
# The Store hands out a connection per transaction: on PostgreSQL a checkout pre-pings
# (BEGIN; ping; ROLLBACK: three round trips), on SQLite it opens a new connection (and the
# last one to close checkpoints the WAL). A step's checkpoint costs one statement, so the
# saver keeps a few connections checked out of the Store's own pools and reuses them.
# `store.close()` (the `engine_disposed` event) or `saver.aclose()` returns them.

_LANE_MAX_IDLE_S = 10.0  # older idle lanes go back to the pool (its pre-ping guards them)


class AsyncLanes:
    """Autocommit connections checked out of the Store's async pool, reused (PostgreSQL).

    At most `pool.size()` at a time (operations beyond that wait for a free lane): the
    pool's overflow stays free for the Store's other users, and no connection is opened,
    pinged and closed per operation under load.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._engine: Any = None
        self._idle: list[tuple[float, AsyncConnection]] = []  # (last used, connection)
        self._free: asyncio.Semaphore | None = None

    def _adopt(self, engine: Any) -> None:
        self._engine = engine
        self._idle = []  # lanes of a previous engine were released when it was disposed
        self._free = asyncio.Semaphore(max(1, engine.pool.size()))
        event.listen(engine.sync_engine, "engine_disposed", self._on_dispose)

    def _on_dispose(self, sync_engine: Any) -> None:
        # Runs inside AsyncEngine.dispose()'s greenlet: the sync API may do I/O here.
        idle, self._idle, self._engine = self._idle, [], None
        for _, conn in idle:
            # a lane's connection was started (it ran statements): it has its sync side
            _release_sync(typing.cast(Connection, conn.sync_connection))

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[AsyncConnection]:
        engine = self.store.engine
        if engine is not self._engine:
            self._adopt(engine)
        assert self._free is not None
        async with self._free:
            conn = await self._take(engine)
            try:
                yield conn
            except BaseException as e:
                # An error or a cancellation mid-statement: the connection's state is
                # unknown, so it is not reused.
                await _discard(conn)
                if isinstance(e, Exception) and is_transient(e):
                    # The server or the network dropped connections: the idle lanes (not
                    # pinged on reuse) are most likely dead too.
                    await self.drop_idle()
                raise
            if engine is self._engine:
                self._idle.append((asyncio.get_running_loop().time(), conn))
            else:  # the Store was closed meanwhile: its old pool is gone
                await _discard(conn)

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """A lane in a transaction (BEGIN ... COMMIT): asyncpg's own, around statements
        sent through SQLAlchemy (in autocommit mode: it sends no BEGIN of its own) or
        straight to asyncpg (`adrive`)."""
        async with self.connection() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection  # asyncpg
            tx = raw.transaction()
            await tx.start()
            try:
                yield conn
            except BaseException:
                if not raw.is_closed():
                    with contextlib.suppress(Exception):  # the lane is discarded anyway
                        await asyncio.shield(tx.rollback())
                raise
            await tx.commit()

    async def _take(self, engine: AsyncEngine) -> AsyncConnection:
        now = asyncio.get_running_loop().time()
        while self._idle:
            used, conn = self._idle.pop()
            if now - used < _LANE_MAX_IDLE_S:
                return conn
            await conn.close()  # back to the pool, which pings it on its next checkout
        try:
            conn = await engine.connect()
            await conn.execution_options(isolation_level="AUTOCOMMIT")
        except Exception as e:
            raise (self.store.unavailable(e) if is_transient(e) else e) from e
        return conn

    def width(self) -> int:
        """How many lanes there may be (the pool's size)."""
        engine = self.store.engine
        if engine is not self._engine:
            self._adopt(engine)
        return max(1, typing.cast(_SizedPool, engine.pool).size())

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for _, conn in idle:
            await conn.close()

    async def drop_idle(self) -> None:
        """Invalidate the idle lanes (after a connection failure)."""
        idle, self._idle = self._idle, []
        for _, conn in idle:
            await _discard(conn)


async def _discard(conn: AsyncConnection) -> None:
    try:
        try:
            await conn.invalidate()
        finally:
            await conn.close()
    except Exception as e:  # the connection is already dead: nothing more to release
        if not is_transient(e):
            raise


class _SizedPool(Protocol):
    """The PostgreSQL engine's QueuePool (typed `Pool`, which has no size)."""

    def size(self) -> int: ...


def _release_sync(conn: Connection) -> None:
    conn.invalidate()  # closes the DBAPI connection: its pool is being disposed
    conn.close()


_INLINE_BUSY_MS = 20  # how long a write on the event loop waits for another process's lock


class SqliteLanes:
    """Write and read connections of the Store's sync engine, kept open (SQLite).

    `ainline` runs a transaction on the event loop's own thread: SQLite answers in
    microseconds (WAL, synchronous=NORMAL: no fsync per commit), far less than handing
    the work to a thread, which then waits for the GIL behind the busy loop at every
    statement. Only if another process holds the write lock (or the disk fails) does the
    transaction go to the lane's worker thread (`arun`), which waits the Store's
    busy_timeout without blocking the loop. The sync methods run on the caller's thread.
    One user at a time per lane. WAL: the reader never blocks the writer.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._engine: Any = None
        self._conns: dict[tuple[bool, bool], Connection] = {}  # (write, inline)
        self._locks = {(w, i): threading.Lock() for w in (True, False) for i in (True, False)}
        self._threads: dict[bool, ThreadPoolExecutor] = {}

    async def ainline(self, make: Callable[[], Plan[T]], *, write: bool,
                      lean: bool = False) -> T:
        """`run` on the event loop's thread; on a lock held by another process (or any
        transient failure), on the lane's worker thread instead (a new plan from `make`)."""
        try:
            return self.run(make(), write=write, lean=lean, inline=True)
        except Exception as e:
            if not is_transient(e):
                raise
        return await self.arun(make(), write=write, lean=lean)

    async def arun(self, plan: Plan[T], *, write: bool, lean: bool = False) -> T:
        """`run` on the lane's worker thread. If the caller is cancelled, the thread still
        finishes the transaction: all of it or none of it is written."""
        thread = self._threads.get(write)
        if thread is None:
            thread = self._threads[write] = ThreadPoolExecutor(
                1, thread_name_prefix=f"frugalflow-sqlite-{'write' if write else 'read'}")
        return await asyncio.get_running_loop().run_in_executor(
            thread, partial(self.run, plan, write=write, lean=lean))

    def run(self, plan: Plan[T], *, write: bool, lean: bool = False,
            inline: bool = False) -> T:
        """Run `plan` in one transaction; `lean`: all its statements are `Lean`; `inline`:
        on the connection used from the event loop's thread."""
        self.store.setup_sync()
        lane = (write, inline)
        with self._locks[lane]:
            engine = self.store.sync_engine
            if engine is not self._engine:
                self._engine = engine
                self._conns = {}
                event.listen(engine, "engine_disposed", self._on_dispose)
            conn = self._conns.get(lane)
            if conn is None:
                conn = engine.connect()
                # The Store's "begin" hook issues BEGIN IMMEDIATE on connections with
                # ff_write: a writer takes the write lock before it reads.
                conn.execution_options(ff_write=write)
                if inline:  # never block the event loop long on another process's lock
                    raw: Any = conn.connection.driver_connection  # sqlite3 (DBAPI: untyped)
                    raw.execute(f"PRAGMA busy_timeout={_INLINE_BUSY_MS}")
                self._conns[lane] = conn
            try:
                if lean:  # every statement runs on the driver: so can the transaction
                    return drive_in_driver_transaction(conn, plan)
                with conn.begin():  # also ends each read: no snapshot pins the WAL
                    return drive(conn, plan)
            except BaseException as e:
                if isinstance(e, Exception) and not is_transient(e) \
                        and not conn.in_transaction() and not conn.invalidated:
                    raise  # rolled back (a lease refused, a constraint): the lane is fine
                self._conns.pop(lane, None)
                conn.invalidate()
                conn.close()
                raise

    def _on_dispose(self, engine: Any) -> None:
        self.close()

    def close(self) -> None:
        for lane, lock in self._locks.items():
            with lock:
                conn = self._conns.pop(lane, None)
                if conn is not None:
                    conn.close()
        for write in (True, False):
            thread = self._threads.pop(write, None)
            if thread is not None:
                thread.shutdown(wait=False)  # its idle thread exits; a new one on demand


