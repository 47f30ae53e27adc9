"""How the saver reaches the database fast: group commit, and connections kept between calls.

* Group commit (`GroupCommit`): concurrent puts and put_writes (many runs on one saver) are
  written together, one statement or transaction for the lot.
* Lanes: the Store gives a connection per transaction (PostgreSQL pre-pings each checkout
  with three round trips; SQLite opens a file per transaction). The saver keeps a few
  connections checked out of the Store's own pools instead (`AsyncLanes`, `SqliteLanes`),
  at most the pool's size, and returns them on `store.close()` or `saver.aclose()`.
"""
from __future__ import annotations

import asyncio
import threading
import typing
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from functools import partial
from typing import Any, Protocol, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ..exceptions import LeaseError, StoreUnavailableError
from .plans import Plan, Rows, drive, drive_in_driver_transaction
from .store import Store, is_transient

__all__ = ["AsyncLanes", "GroupCommit", "SqliteLanes"]

T = TypeVar("T")

_MAX_BATCH = 256  # calls written by one statement / transaction at most


class GroupCommit:
    """Concurrent puts and put_writes written together (group commit).

    A call alone is written at once, as a batch of one. Under load, calls that arrive while
    `width()` batches are in flight queue up, and the next batch writes all of them in ONE
    statement (PostgreSQL) or transaction (SQLite): one round trip instead of one each.
    Each call stays atomic (a batch commits whole or not at all), and a failed batch is
    retried call by call, so a call only ever sees its own error. A caller cancelled
    before its batch starts is dropped; once started, its rows are written anyway.
    """

    def __init__(self, write: Callable[[list[Rows]], Awaitable[None]],
                 width: Callable[[], int]) -> None:
        self._write = write
        self._width = width
        self._queue: list[tuple[Rows, asyncio.Future[None]]] = []
        self._draining = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, rows: Rows) -> None:
        if not self._queue and self._draining < self._width():
            # Nobody waits and a lane is free: write now, in this task (no hand-off).
            self._draining += 1
            try:
                await self._write([rows])
            finally:
                self._draining -= 1
                self._start_drain()  # for calls that queued meanwhile
            return
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.append((rows, done))
        self._start_drain()
        await done

    def _start_drain(self) -> None:
        if self._queue and self._draining < self._width():
            self._draining += 1
            task = asyncio.get_running_loop().create_task(self._drain())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _drain(self) -> None:
        batch: list[tuple[Rows, asyncio.Future[None]]] = []
        try:
            while self._queue:
                # Only calls under the same lease fence (or none) share a batch: the batch
                # is checked against it once, in its transaction.
                fence = self._queue[0][0].fence
                rest: list[tuple[Rows, asyncio.Future[None]]]
                batch, rest = [], []
                for item in self._queue:
                    same = item[0].fence == fence and len(batch) < _MAX_BATCH
                    (batch if same else rest).append(item)
                self._queue = rest
                batch = [(r, f) for r, f in batch if not f.done()]
                if batch:
                    await self._flush(batch)
                batch = []
        except BaseException:  # cancelled (loop shutdown): so are the calls waiting on us
            for _, f in batch:
                f.cancel()
            raise
        finally:
            self._draining -= 1
            if not self._draining:
                for _, f in self._queue:
                    f.cancel()
                self._queue.clear()

    async def _flush(self, batch: list[tuple[Rows, asyncio.Future[None]]]) -> None:
        try:
            await self._write([rows for rows, _ in batch])
        except Exception as error:
            # A lost lease or an unreachable database (already retried): all of them.
            if len(batch) == 1 or isinstance(error, (LeaseError, StoreUnavailableError)):
                for _, done in batch:
                    _settle(done, error)
                return
            for rows, done in batch:  # isolate the failing call(s)
                try:
                    await self._write([rows])
                except Exception as e:
                    _settle(done, e)
                else:
                    _settle(done, None)
            return
        for _, done in batch:
            _settle(done, None)

    async def wait(self) -> None:
        """Until the batches in flight are written."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():  # the caller was cancelled and no longer waits
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


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
        """A lane in a transaction (BEGIN ... COMMIT) instead of autocommit mode."""
        async with self.connection() as conn:
            if conn.in_transaction():  # SQLAlchemy's autobegun no-op one of autocommit mode
                await conn.commit()  # (sends nothing: the driver is in autocommit)
            await conn.execution_options(isolation_level=conn.default_isolation_level)
            async with conn.begin():
                yield conn
            await conn.execution_options(isolation_level="AUTOCOMMIT")

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


class SqliteLanes:
    """One write and one read connection of the Store's sync engine, kept open (SQLite).

    The async methods run on each lane's own worker thread (a connection stays on one
    thread); the sync methods run on the caller's thread. One user at a time per lane.
    WAL: the reader never blocks the writer.
    """

    def __init__(self, store: Store) -> None:
        self.store = store
        self._engine: Any = None
        self._conns: dict[bool, Connection] = {}
        self._locks = {True: threading.Lock(), False: threading.Lock()}
        self._threads: dict[bool, ThreadPoolExecutor] = {}

    async def arun(self, plan: Plan[T], *, write: bool, lean: bool = False) -> T:
        """`run` on the lane's worker thread. If the caller is cancelled, the thread still
        finishes the transaction: all of it or none of it is written."""
        thread = self._threads.get(write)
        if thread is None:
            thread = self._threads[write] = ThreadPoolExecutor(
                1, thread_name_prefix=f"frugalflow-sqlite-{'write' if write else 'read'}")
        return await asyncio.get_running_loop().run_in_executor(
            thread, partial(self.run, plan, write=write, lean=lean))

    def run(self, plan: Plan[T], *, write: bool, lean: bool = False) -> T:
        """Run `plan` in one transaction; `lean`: all its statements are `Lean`."""
        self.store.setup_sync()
        with self._locks[write]:
            engine = self.store.sync_engine
            if engine is not self._engine:
                self._engine = engine
                self._conns = {}
                event.listen(engine, "engine_disposed", self._on_dispose)
            conn = self._conns.get(write)
            if conn is None:
                conn = engine.connect()
                # The Store's "begin" hook issues BEGIN IMMEDIATE on connections with
                # ff_write: a writer takes the write lock before it reads.
                conn.execution_options(ff_write=write)
                self._conns[write] = conn
            try:
                if lean:  # every statement runs on the driver: so can the transaction
                    return drive_in_driver_transaction(conn, plan)
                with conn.begin():  # also ends each read: no snapshot pins the WAL
                    return drive(conn, plan)
            except BaseException:
                self._conns.pop(write, None)
                conn.invalidate()
                conn.close()
                raise

    def _on_dispose(self, engine: Any) -> None:
        self.close()

    def close(self) -> None:
        for write in (True, False):
            with self._locks[write]:
                conn = self._conns.pop(write, None)
                if conn is not None:
                    conn.close()
                thread = self._threads.pop(write, None)
                if thread is not None:
                    thread.shutdown(wait=False)  # its idle thread exits; a new one on demand


