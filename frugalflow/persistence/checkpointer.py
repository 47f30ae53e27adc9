"""A LangGraph checkpoint saver on frugalflow's Store: SQLModel tables, SQLite or PostgreSQL.

    saver = SQLModelSaver(Store("postgresql://user@host/db"))
    graph = builder.compile(checkpointer=saver)

Layout (as LangGraph's own Postgres saver): a checkpoint row holds the checkpoint without
its channel values; a channel value is a blob stored once per (thread, namespace, channel,
version), written only by the put whose `new_versions` names it. A step that changes one
channel of ten writes one blob; loading reassembles the values from the blobs the
checkpoint's `channel_versions` point at.

Every operation is written once as a *plan*: a generator that yields SQLAlchemy Core
statements and receives their rows. Plans do no I/O, so the sync and async methods share
them and differ only in the driver that runs a plan on a connection (`_drive`, `_adrive`).
Row building, serialisation and tuple assembly are plain functions too.

Why the I/O looks the way it does (speed, and atomicity):

* One statement per write on PostgreSQL: a put's blobs and checkpoint (data-modifying
  CTEs, arrays through `unnest`) commit together in autocommit mode; no BEGIN/COMMIT trips
  (a fenced write adds BEGIN, the lease check and COMMIT).
  One transaction per write on SQLite (BEGIN IMMEDIATE). A cancelled caller leaves the
  whole checkpoint or nothing.
* Group commit: concurrent puts and put_writes (many runs on one saver) are written
  together, one statement or transaction for the lot (`_GroupCommit`).
* Lanes: the Store gives a connection per transaction (PostgreSQL pre-pings each checkout
  with three round trips; SQLite opens a file per transaction). The saver keeps a few
  connections checked out of the Store's own pools instead, at most the pool's size, and
  returns them on `store.close()` or `saver.aclose()`.
* SQLite work runs in a worker thread on the Store's sync engine: one thread hop per
  operation (aiosqlite hops per statement). Async SQLite writes queue on the Store's
  per-process writer lock, with the Store's other writers.

Lease fences (`store.fenced`, set by the Runner around a run) hold for every write, as for
`Store.write`: the caller's fence is captured when it calls, checked in the transaction of
the write (row-locked on PostgreSQL), and only calls under the same fence share a batch.
A Runner's fence (with a TTL) also renews the lease in that transaction.

Connection failures: driver errors become `StoreUnavailableError`; a lane that fails is
discarded with every idle lane (lanes are reused without the pool's pre-ping, so after a
dropped connection the others are suspect), and writes (upserts: safe to repeat) and reads
are retried with backoff by `Store.retrying`, for up to the fence's lease TTL.

Secrets never reach the database (one policy: `scrub.py`): metadata is stored as JSON after
`get_serializable_checkpoint_metadata` and `scrub_metadata`; every serialised value goes
through `dump_scrubbed`, which removes exact key values from the state and also key-shaped
values from the `__error__` channel (a provider's 401 may repeat the key).
"""
from __future__ import annotations

import asyncio
import json
import random
import threading
from collections import defaultdict
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from functools import partial
import typing
from typing import Any, NamedTuple, Protocol, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
    get_checkpoint_id,
    get_serializable_checkpoint_metadata,
    writes_sort_key,
)
from langgraph.checkpoint.serde.base import SerializerProtocol
from langgraph.checkpoint.serde.types import ERROR
from sqlalchemy import (
    JSON,
    ColumnElement,
    Integer,
    LargeBinary,
    String,
    and_,
    any_,
    bindparam,
    cast,
    delete,
    event,
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects import sqlite as sq
from sqlalchemy.dialects.sqlite import pysqlite
from sqlalchemy.engine import Connection, Row
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql import Executable

from ..exceptions import LeaseError, StoreUnavailableError
from .scrub import REDACTED, dump_scrubbed, scrub_json, scrub_metadata
from .store import Fence, Store, check_lease, current_fence, is_transient, renew_statement
from .tables import CheckpointBlobRow, CheckpointRow, CheckpointWriteRow, LeaseRow

__all__ = ["REDACTED", "SQLModelSaver", "scrub_metadata"]

T = TypeVar("T")

# SQLModel sets `__table__` on table classes at class creation but does not declare it.
_CK = CheckpointRow.__table__  # type: ignore[attr-defined]
_BL = CheckpointBlobRow.__table__  # type: ignore[attr-defined]
_WR = CheckpointWriteRow.__table__  # type: ignore[attr-defined]
_LEASES = LeaseRow.__table__  # type: ignore[attr-defined]

_EMPTY = "empty"  # blob type of a channel that has a version but no value
_CHUNK = 500  # rows per IN list (SQLite's bound-parameter limit is 999 on old builds)
_LIST_PAGE = 100  # checkpoints whose blobs and writes are loaded per round of alist


# -- pure helpers: metadata, rows, tuples ---------------------------------------------------


def _run_id(config: RunnableConfig, metadata: dict[str, Any] | None = None) -> str | None:
    """The run a checkpoint or write belongs to (for delete_for_runs)."""
    for source in (metadata, config.get("metadata"), config.get("configurable")):
        if source and source.get("run_id") is not None:
            return str(source["run_id"])
    return None


def _thread_ns(config: RunnableConfig) -> tuple[str, str]:
    conf = config["configurable"]
    return str(conf["thread_id"]), str(conf.get("checkpoint_ns") or "")


def _chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class _Op(NamedTuple):
    """One statement of a plan; `params` is a dict, or a list of dicts for executemany.

    `lean`: the same statement precompiled for one driver (see `_Lean`); a driver for
    another dialect or driver runs `stmt` as usual."""

    stmt: Executable
    params: Any = None
    fetch: bool = False
    lean: _Lean | None = None


class _Lean:
    """A Core statement compiled once for one driver, run on that driver directly.

    The write statements of puts skip SQLAlchemy's per-call work (cache lookup, parameter
    processing, execution context): about a quarter of a put's client CPU. Their
    parameters need no processing but JSON's: lists become arrays and bytes bytea or
    BLOB in the drivers themselves.
    """

    def __init__(self, stmt: Any, dialect: Any, columns: Sequence[str] | None = None) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=columns)
        self.driver = dialect.driver
        self.sql = str(compiled)
        self.order = tuple(compiled.positiontup or ())
        self.json = frozenset(name for name, bind in compiled.binds.items()
                              if isinstance(bind.type, JSON))

    def args(self, params: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(json.dumps(params[k]) if k in self.json else params[k]
                     for k in self.order)


# A plan yields statements, is sent back their rows (a list when `fetch`, else None) and
# returns its result. Plans do no I/O themselves: `_drive` and `_adrive` run them.
Plan = Generator[_Op, Any, T]


def _drive(conn: Connection, plan: Plan[T]) -> T:
    rows: Any = None
    while True:
        try:
            op = plan.send(rows)
        except StopIteration as stop:
            return typing.cast(T, stop.value)  # a Plan[T] returns a T
        rows = None
        if op.lean is not None and op.lean.driver == conn.dialect.driver:
            # On the DBAPI connection, inside the transaction SQLAlchemy began.
            driver: Any = conn.connection.driver_connection  # the DBAPI connection: untyped
            cursor = driver.cursor()
            try:
                if isinstance(op.params, list):
                    cursor.executemany(op.lean.sql, [op.lean.args(p) for p in op.params])
                else:
                    cursor.execute(op.lean.sql, op.lean.args(op.params))
            finally:
                cursor.close()
            continue
        if op.params is not None:
            result = conn.execute(op.stmt, op.params)
        else:
            result = conn.execute(op.stmt)
        rows = result.all() if op.fetch else None


async def _adrive(conn: AsyncConnection, plan: Plan[T]) -> T:
    rows: Any = None
    while True:
        try:
            op = plan.send(rows)
        except StopIteration as stop:
            return typing.cast(T, stop.value)  # a Plan[T] returns a T
        if op.lean is not None and op.lean.driver == conn.dialect.driver:
            result = await conn.exec_driver_sql(op.lean.sql, op.lean.args(op.params))
        elif op.params is not None:
            result = await conn.execute(op.stmt, op.params)
        else:
            result = await conn.execute(op.stmt)
        rows = result.all() if op.fetch else None


class _Loaded(NamedTuple):
    """What tuple assembly needs besides the checkpoint rows."""

    checkpoints: list[dict[str, Any]]  # deserialised, in row order, without channel_values
    blobs: dict[tuple[str, str, str, str], tuple[str, bytes | None]]
    writes: dict[tuple[str, str, str], list[Row[Any]]]


# -- writes: rows, batches, group commit ---------------------------------------------------

_CK_COLUMNS = ("thread_id", "checkpoint_ns", "checkpoint_id", "parent_checkpoint_id", "run_id",
               "type", "checkpoint", "metadata")
_BL_COLUMNS = ("thread_id", "checkpoint_ns", "channel", "version", "type", "blob")
_WR_COLUMNS = ("thread_id", "checkpoint_ns", "checkpoint_id", "task_id", "idx", "channel",
               "type", "blob", "task_path", "run_id")
_MAX_BATCH = 256  # calls written by one statement / transaction at most


class _Rows(NamedTuple):
    """The rows one put or put_writes adds (dicts keyed by column), and the lease fence of
    the caller's context (`store.fenced`), captured when it called."""

    checkpoints: list[dict[str, Any]]
    blobs: list[dict[str, Any]]
    writes: list[dict[str, Any]]
    fence: Fence | None = None


def _pg_params(checkpoints: list[dict[str, Any]], blobs: list[dict[str, Any]],
               writes: list[dict[str, Any]]) -> tuple[dict[str, Any], int]:
    """The parameters of the PostgreSQL write statement, and how many checkpoints it has.

    One statement may not upsert a row twice, so rows of a batch with the same key are
    merged as running the calls one after the other would: the last checkpoint wins, the
    first ordinary write wins, the last special write wins. Blobs are insert-if-absent.
    """
    cks = list({(r["thread_id"], r["checkpoint_ns"], r["checkpoint_id"]): r
                for r in checkpoints}.values())
    wrs: dict[tuple[Any, ...], dict[str, Any]] = {}
    for r in writes:
        key = (r["thread_id"], r["checkpoint_ns"], r["checkpoint_id"], r["task_id"], r["idx"])
        if r["idx"] < 0 or key not in wrs:
            wrs[key] = r
    params: dict[str, Any] = {}
    for prefix, rows, columns in (("b_", blobs, _BL_COLUMNS),
                                  ("w_", list(wrs.values()), _WR_COLUMNS)):
        for col in columns:
            params[prefix + col] = [r[col] for r in rows]
    if len(cks) == 1:
        params.update({f"c1_{col}": value for col, value in cks[0].items()})
    else:
        for col in _CK_COLUMNS:
            params["c_" + col] = [r[col] for r in cks]
        params["c_metadata"] = [json.dumps(m) for m in params["c_metadata"]]
    return params, len(cks)


class _GroupCommit:
    """Concurrent puts and put_writes written together (group commit).

    A call alone is written at once, as a batch of one. Under load, calls that arrive while
    `width()` batches are in flight queue up, and the next batch writes all of them in ONE
    statement (PostgreSQL) or transaction (SQLite): one round trip instead of one each.
    Each call stays atomic (a batch commits whole or not at all), and a failed batch is
    retried call by call, so a call only ever sees its own error. A caller cancelled
    before its batch starts is dropped; once started, its rows are written anyway.
    """

    def __init__(self, write: Callable[[list[_Rows]], Awaitable[None]],
                 width: Callable[[], int]) -> None:
        self._write = write
        self._width = width
        self._queue: list[tuple[_Rows, asyncio.Future[None]]] = []
        self._draining = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def submit(self, rows: _Rows) -> None:
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
        batch: list[tuple[_Rows, asyncio.Future[None]]] = []
        try:
            while self._queue:
                # Only calls under the same lease fence (or none) share a batch: the batch
                # is checked against it once, in its transaction.
                fence = self._queue[0][0].fence
                rest: list[tuple[_Rows, asyncio.Future[None]]]
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

    async def _flush(self, batch: list[tuple[_Rows, asyncio.Future[None]]]) -> None:
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


class _AsyncLanes:
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


class _SqliteLanes:
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
        """Run `plan` in one transaction; `lean`: all its statements are `_Lean`."""
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
                    return _drive_in_driver_transaction(conn, plan)
                with conn.begin():  # also ends each read: no snapshot pins the WAL
                    return _drive(conn, plan)
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


def _drive_in_driver_transaction(conn: Connection, plan: Plan[T]) -> T:
    """`_drive` a plan of `_Lean` statements in a transaction of the DBAPI connection
    itself (SQLAlchemy's transaction bookkeeping costs as much as the statements)."""
    raw: Any = conn.connection.driver_connection  # sqlite3.Connection (DBAPI: untyped)
    raw.execute("BEGIN IMMEDIATE")
    try:
        result = _drive(conn, plan)
    except BaseException:
        raw.execute("ROLLBACK")
        raise
    raw.execute("COMMIT")
    return result


# -- the saver -----------------------------------------------------------------------------


class SQLModelSaver(BaseCheckpointSaver[str]):
    """LangGraph checkpointer storing into frugalflow's SQLModel tables through a `Store`.

    Construction does no I/O; the schema is created on first use (`store.setup()`).
    Passes `langgraph-checkpoint-conformance` at level FULL on SQLite and PostgreSQL.
    """

    def __init__(self, store: Store, *, serde: SerializerProtocol | None = None) -> None:
        super().__init__(serde=serde)
        self.store = store
        self._pg = store.dialect == "postgresql"
        self._lanes = _AsyncLanes(store)
        self._sqlite = _SqliteLanes(store)
        # SQLite has one writer at a time: one batch in flight; PostgreSQL: one per lane.
        self._group = _GroupCommit(
            self._store_async, lambda: self._lanes.width() if self._pg else 1)
        self._build_statements()

    # -- statements built once (SQLAlchemy caches their compiled form) ----------------------

    def _build_statements(self) -> None:
        ck_pk = list(_CK.primary_key.columns)
        wr_pk = list(_WR.primary_key.columns)
        ck_update = ("type", "checkpoint", "metadata", "run_id")
        wr_update = ("channel", "type", "blob", "task_path", "run_id")
        if self._pg:
            # Several rows arrive as parallel arrays (`unnest`): ONE prepared statement
            # writes any number of checkpoints, blobs and writes.
            c = _unnest("c_", _CK_COLUMNS, checkpoint=LargeBinary)
            ck: Any = pg.insert(_CK).from_select(
                list(_CK_COLUMNS),
                select(*(cast(c.c.metadata, JSON) if col == "metadata" else c.c[col]
                         for col in _CK_COLUMNS)),
            )
            # A single checkpoint (the common case) as plain VALUES: cheaper to execute.
            ck1: Any = pg.insert(_CK).values(
                {col: bindparam(f"c1_{col}", type_=_CK.c[col].type) for col in _CK_COLUMNS})
            b = _unnest("b_", _BL_COLUMNS, blob=LargeBinary)
            bl: Any = pg.insert(_BL).from_select(
                list(_BL_COLUMNS), select(*(b.c[col] for col in _BL_COLUMNS)))
            w = _unnest("w_", _WR_COLUMNS, idx=Integer, blob=LargeBinary)
            wr: Any = pg.insert(_WR).from_select(
                list(_WR_COLUMNS), select(*(w.c[col] for col in _WR_COLUMNS)))
            self._put_one_checkpoint = ck1.on_conflict_do_update(
                index_elements=ck_pk, set_={col: ck1.excluded[col] for col in ck_update})
            self._pg_shapes: dict[tuple[int, bool, bool], tuple[Any, _Lean]] = {}
        else:
            ck, bl, wr = sq.insert(_CK), sq.insert(_BL), sq.insert(_WR)
        self._put_checkpoints = ck.on_conflict_do_update(
            index_elements=ck_pk, set_={col: ck.excluded[col] for col in ck_update})
        # A blob is immutable: (thread, namespace, channel, version) names one value.
        self._put_blobs = bl.on_conflict_do_nothing()
        # Writes to special channels (errors, interrupts, resumes: negative idx) replace
        # what the task wrote before; ordinary writes are kept from the first attempt.
        self._put_writes = wr.on_conflict_do_update(
            index_elements=wr_pk, set_={col: wr.excluded[col] for col in wr_update},
            where=wr.excluded.idx < literal_column("0"))
        if not self._pg:  # compiled for pysqlite (the Store's sync driver): `_drive`
            dialect = pysqlite.dialect()
            self._lean_blobs = _Lean(self._put_blobs, dialect, _BL_COLUMNS)
            self._lean_writes = _Lean(self._put_writes, dialect, _WR_COLUMNS)
            self._lean_checkpoints = _Lean(self._put_checkpoints, dialect, _CK_COLUMNS)

        # Reads: prebuilt too (building a select costs more than running it on SQLite).
        row = select(
            _CK.c.thread_id, _CK.c.checkpoint_ns, _CK.c.checkpoint_id,
            _CK.c.parent_checkpoint_id, _CK.c.type, _CK.c.checkpoint, _CK.c.metadata,
        ).where(_CK.c.thread_id == bindparam("thread_id"),
                _CK.c.checkpoint_ns == bindparam("checkpoint_ns"))
        self._get_latest = row.order_by(_CK.c.checkpoint_id.desc()).limit(1)
        self._get_by_id = row.where(_CK.c.checkpoint_id == bindparam("checkpoint_id"))
        # channel IN (...) AND version IN (...) is a superset of the (channel, version)
        # pairs wanted (one index range scan); `_attach_plan` keeps the exact pairs.
        self._get_blobs = select(_BL.c.channel, _BL.c.version, _BL.c.type, _BL.c.blob).where(
            _BL.c.thread_id == bindparam("thread_id"),
            _BL.c.checkpoint_ns == bindparam("checkpoint_ns"),
            self._in_param(_BL.c.channel, "channels"),
            self._in_param(_BL.c.version, "versions"),
        )
        self._get_writes = select(
            _WR.c.checkpoint_id, _WR.c.task_id, _WR.c.idx, _WR.c.channel, _WR.c.type,
            _WR.c.blob, _WR.c.task_path,
        ).where(
            _WR.c.thread_id == bindparam("thread_id"),
            _WR.c.checkpoint_ns == bindparam("checkpoint_ns"),
            self._in_param(_WR.c.checkpoint_id, "checkpoint_ids"),
        )

    def _in_param(self, column: ColumnElement[Any], name: str) -> ColumnElement[bool]:
        """`column IN :name` for a prebuilt statement; the values come at execution."""
        if self._pg:  # one array parameter: one prepared plan whatever the count
            array = bindparam(name, type_=pg.ARRAY(column.type))
            return column == any_(array)
        return column.in_(bindparam(name, expanding=True))

    def _pg_statement(self, checkpoints: int, blobs: bool, writes: bool) -> tuple[Any, _Lean]:
        """The PostgreSQL statement writing a batch: its parts as CTEs of one statement
        (atomic in autocommit mode), only the parts the batch has (an empty part still
        costs the server an insert); and that statement compiled for asyncpg."""
        key = (min(checkpoints, 2), blobs, writes)
        shape = self._pg_shapes.get(key)
        if shape is None:
            parts = []
            if checkpoints:
                parts.append(self._put_one_checkpoint if checkpoints == 1
                             else self._put_checkpoints)
            if writes:
                parts.append(self._put_writes)
            if blobs:
                parts.append(self._put_blobs)
            stmt = parts[0]
            for name, part in zip("xyz", parts[1:], strict=False):
                stmt = stmt.add_cte(part.cte(name))
            shape = self._pg_shapes[key] = (stmt, _Lean(stmt, self.store.engine.dialect))
        return shape

    def _in(self, column: ColumnElement[Any], values: Iterable[Any]) -> ColumnElement[bool]:
        """`column IN values`: one array parameter on PostgreSQL (one prepared plan)."""
        values = list(values)
        if self._pg:
            array = literal(values, pg.ARRAY(column.type))
            return column == any_(array)
        return column.in_(values)

    # -- drivers: the only places that differ between sync and async ------------------------

    def _read(self, plan: Plan[T]) -> T:
        with self._mapped():
            return self._read_raw(plan)

    def _read_raw(self, plan: Plan[T]) -> T:
        if not self._pg:
            return self._sqlite.run(plan, write=False)
        self.store.setup_sync()
        with self._pg_sync_connection() as conn:
            return _drive(conn, plan)

    def _fenced(self, fence: Fence | None, plan: Plan[T]) -> Plan[T]:
        """`plan`, after checking in its transaction that `fence` still holds its run's
        lease (the rule of `Store.write`): a stale executor writes nothing."""
        if fence is not None and fence.ttl is not None:
            renewed = yield _Op(renew_statement(fence), fetch=True)
            if renewed:  # still the holder: the write renews the lease (Fence.ttl)
                return (yield from plan)
        if fence is not None:
            q = select(_LEASES.c.holder, _LEASES.c.epoch, _LEASES.c.expires_at).where(
                _LEASES.c.run_id == fence.run_id)
            if self._pg:  # a takeover waits until this write commits
                q = q.with_for_update()
            rows = yield _Op(q, fetch=True)
            check_lease(fence, rows[0] if rows else None, "checkpoint write")
        return (yield from plan)

    @contextmanager
    def _mapped(self) -> Iterator[None]:
        """Driver connection errors (however raised) become StoreUnavailableError."""
        try:
            yield
        except Exception as e:
            if is_transient(e) and not isinstance(e, StoreUnavailableError):
                raise self.store.unavailable(e) from e
            raise

    def _write(self, plan: Plan[T], *, fence: Fence | None, single: bool = False,
               lean: bool = False) -> T:
        """Run a write plan atomically, fenced by `fence`: one transaction, or one statement
        (`single`); `lean`: all its statements are `_Lean` (put/put_writes plans)."""
        with self._mapped():
            return self._write_raw(plan, fence=fence, single=single, lean=lean)

    def _write_raw(self, plan: Plan[T], *, fence: Fence | None, single: bool = False,
                   lean: bool = False) -> T:
        if fence is not None:  # the lease check and the write: one transaction
            plan, single, lean = self._fenced(fence, plan), False, False
        if not self._pg:
            return self._sqlite.run(plan, write=True, lean=lean)
        self.store.setup_sync()
        if single:
            with self._pg_sync_connection() as conn:
                return _drive(conn, plan)
        with self.store.write_sync() as conn:
            return _drive(conn, plan)

    async def _aread(self, plan: Plan[T]) -> T:
        with self._mapped():
            return await self._aread_raw(plan)

    async def _aread_retrying(self, make: Callable[[], Plan[T]]) -> T:
        """A read, retried while the database is briefly unreachable (`Store.retrying`)."""
        return await self.store.retrying(lambda: self._aread(make()), what="checkpoint read")

    async def _aread_raw(self, plan: Plan[T]) -> T:
        if not self._pg:
            return await self._sqlite.arun(plan, write=False)
        await self.store.setup()
        async with self._lanes.connection() as conn:
            return await _adrive(conn, plan)

    async def _awrite(self, plan: Plan[T], *, fence: Fence | None, single: bool = False,
                      lean: bool = False) -> T:
        """Run a write plan atomically, fenced by `fence`: one transaction, or one statement
        (`single`); `lean`: all its statements are `_Lean` (put/put_writes plans)."""
        with self._mapped():
            return await self._awrite_raw(plan, fence=fence, single=single, lean=lean)

    async def _awrite_raw(self, plan: Plan[T], *, fence: Fence | None, single: bool = False,
                          lean: bool = False) -> T:
        if fence is not None:  # the lease check and the write: one transaction
            plan, single, lean = self._fenced(fence, plan), False, False
        if not self._pg:
            # Queue with the Store's other writers of this process (store.write() takes the
            # same lock) rather than in SQLite's busy handler. The thread commits or rolls
            # back the whole transaction even if this task is cancelled meanwhile.
            async with self.store.sqlite_writer():
                return await self._sqlite.arun(plan, write=True, lean=lean)
        await self.store.setup()
        if single:
            async with self._lanes.connection() as conn:
                return await _adrive(conn, plan)
        async with self._lanes.transaction() as conn:
            return await _adrive(conn, plan)

    @contextmanager
    def _pg_sync_connection(self) -> Iterator[Connection]:
        """An autocommit connection from the Store's sync (psycopg) pool."""
        try:
            conn = self.store.sync_engine.connect()
        except (OSError, DBAPIError) as e:
            raise self.store.unavailable(e) from e
        with conn:
            conn.execution_options(isolation_level="AUTOCOMMIT")
            yield conn

    async def aclose(self) -> None:
        """Finish the writes in flight and return the connections this saver keeps to
        the Store's pools. Optional: `await store.close()` returns the connections too."""
        await self._group.wait()
        if self._pg:
            await self._lanes.aclose()
        else:
            await asyncio.to_thread(self._sqlite.close)  # waits for a lane in use

    def close(self) -> None:
        """Sync twin of `aclose` (SQLite; PostgreSQL lanes need `aclose` or store.close())."""
        if not self._pg:
            self._sqlite.close()

    async def setup(self) -> None:
        """Create or migrate the schema now (otherwise done on first use)."""
        await self.store.setup()

    # -- put -------------------------------------------------------------------------------

    def _put_rows(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> tuple[_Rows, RunnableConfig]:
        thread_id, ns = _thread_ns(config)
        values = checkpoint["channel_values"]
        blobs = []
        # Only the channels whose version changed in this step get a blob: unchanged
        # channels keep pointing at the blob an earlier checkpoint wrote.
        for channel, version in new_versions.items():
            if channel in values:
                type_, blob = dump_scrubbed(self.serde, values[channel])
            else:
                type_, blob = _EMPTY, None
            blobs.append({"thread_id": thread_id, "checkpoint_ns": ns, "channel": channel,
                          "version": str(version), "type": type_, "blob": blob})
        bare = {k: v for k, v in checkpoint.items() if k != "channel_values"}
        type_, data = dump_scrubbed(self.serde, bare)
        md = scrub_metadata(get_serializable_checkpoint_metadata(config, metadata))
        row = {
            "thread_id": thread_id,
            "checkpoint_ns": ns,
            "checkpoint_id": checkpoint["id"],
            "parent_checkpoint_id": config["configurable"].get("checkpoint_id"),
            "run_id": _run_id(config, md),
            "type": type_,
            "checkpoint": data,
            "metadata": md,
        }
        return _Rows([row], blobs, [], current_fence()), _config(thread_id, ns, checkpoint["id"])

    def _writes_rows(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
    ) -> _Rows:
        thread_id, ns = _thread_ns(config)
        checkpoint_id = config["configurable"]["checkpoint_id"]
        run_id = _run_id(config)
        # One row per (task, idx): a special channel written twice in one call keeps the
        # last value, as successive upserts would.
        by_idx: dict[int, dict[str, Any]] = {}
        for i, (channel, value) in enumerate(writes):
            idx = WRITES_IDX_MAP.get(channel, i)
            # A node's error may quote a provider's 401 body, key included: full policy.
            type_, blob = dump_scrubbed(self.serde, value, full=channel == ERROR)
            by_idx[idx] = {"thread_id": thread_id, "checkpoint_ns": ns,
                           "checkpoint_id": checkpoint_id, "task_id": task_id, "idx": idx,
                           "channel": channel, "type": type_, "blob": blob,
                           "task_path": task_path, "run_id": run_id}
        return _Rows([], [], list(by_idx.values()), current_fence())

    def _store_plan(self, batch: Sequence[_Rows]) -> Plan[None]:
        """Write the rows of one or more puts / put_writes, atomically together."""
        checkpoints = [r for rows in batch for r in rows.checkpoints]
        blobs = [r for rows in batch for r in rows.blobs]
        writes = [r for rows in batch for r in rows.writes]
        if self._pg:
            params, n = _pg_params(checkpoints, blobs, writes)
            if n or blobs or params["w_idx"]:
                stmt, lean = self._pg_statement(n, bool(blobs), bool(params["w_idx"]))
                yield _Op(stmt, params, lean=lean)  # lean: asyncpg; psycopg runs `stmt`
            return
        # Blobs before the checkpoint that points at them (one transaction anyway).
        for stmt, lean, rows in ((self._put_blobs, self._lean_blobs, blobs),
                                 (self._put_writes, self._lean_writes, writes),
                                 (self._put_checkpoints, self._lean_checkpoints, checkpoints)):
            if rows:  # executemany, or a plain execute for one row (less overhead)
                yield _Op(stmt, rows if len(rows) > 1 else rows[0], lean=lean)

    async def _store_async(self, batch: list[_Rows]) -> None:
        # The calls of a batch share one fence (`_GroupCommit` groups them so). A dropped
        # connection is retried (upserts: safe to repeat), within the fence's lease TTL.
        fence = batch[0].fence
        await self.store.retrying(
            lambda: self._awrite(self._store_plan(batch), fence=fence, single=True, lean=True),
            what="checkpoint write", fence=fence)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store a checkpoint and the blobs of the channels in `new_versions`."""
        rows, next_config = self._put_rows(config, checkpoint, metadata, new_versions)
        self._write(self._store_plan([rows]), fence=rows.fence, single=True, lean=True)
        return next_config

    async def aput(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store a checkpoint and the blobs of the channels in `new_versions`."""
        rows, next_config = self._put_rows(config, checkpoint, metadata, new_versions)
        await self._group.submit(rows)
        return next_config

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes, pending on the checkpoint `config` points at."""
        rows = self._writes_rows(config, writes, task_id, task_path)
        if rows.writes:
            self._write(self._store_plan([rows]), fence=rows.fence, single=True, lean=True)

    async def aput_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes, pending on the checkpoint `config` points at."""
        rows = self._writes_rows(config, writes, task_id, task_path)
        if rows.writes:
            await self._group.submit(rows)

    # -- reads -----------------------------------------------------------------------------

    def _select_checkpoints(
        self,
        config: RunnableConfig | None,
        filter: dict[str, Any] | None,
        before: RunnableConfig | None,
        limit: int | None,
    ) -> Any:
        stmt = select(
            _CK.c.thread_id, _CK.c.checkpoint_ns, _CK.c.checkpoint_id,
            _CK.c.parent_checkpoint_id, _CK.c.type, _CK.c.checkpoint, _CK.c.metadata,
        )
        if config is not None:
            conf = config["configurable"]
            stmt = stmt.where(_CK.c.thread_id == str(conf["thread_id"]))
            if conf.get("checkpoint_ns") is not None:
                stmt = stmt.where(_CK.c.checkpoint_ns == conf["checkpoint_ns"])
            if checkpoint_id := get_checkpoint_id(config):
                stmt = stmt.where(_CK.c.checkpoint_id == checkpoint_id)
        for key, value in (filter or {}).items():
            stmt = stmt.where(self._metadata_equals(key, value))
        if before is not None and (before_id := get_checkpoint_id(before)):
            stmt = stmt.where(_CK.c.checkpoint_id < before_id)
        # Checkpoint IDs are time-ordered (uuid6): newest first.
        stmt = stmt.order_by(_CK.c.checkpoint_id.desc())
        if limit is not None:
            stmt = stmt.limit(int(limit))
        return stmt

    def _metadata_equals(self, key: str, value: Any) -> ColumnElement[bool]:
        """metadata[key] equals value as JSON (true is not 1, "1" is not 1); None matches a
        missing key or null. The same answers on both databases."""
        if self._pg:
            node = cast(_CK.c.metadata, pg.JSONB).op("->", return_type=pg.JSONB)(
                literal(key, String)
            )
            if value is None:
                return or_(node.is_(None), func.jsonb_typeof(node) == "null")
            as_json = json.dumps(scrub_json(value, redact=False))
            return node == cast(literal(as_json, String), pg.JSONB)
        if '"' in key:
            raise ValueError(f"metadata filter keys cannot contain '\"': {key!r}")
        path = literal(f'$."{key}"', String)
        kind = func.json_type(_CK.c.metadata, path)
        extracted = func.json_extract(_CK.c.metadata, path)
        if value is None:
            return or_(kind.is_(None), kind == "null")
        if isinstance(value, bool):
            return kind == ("true" if value else "false")
        if isinstance(value, (int, float)):
            return and_(kind.in_(("integer", "real")), extracted == value)
        if isinstance(value, (dict, list, tuple)):
            minified = json.dumps(scrub_json(value, redact=False), separators=(",", ":"))
            return and_(kind.in_(("object", "array")), extracted == func.json(minified))
        return and_(kind == "text", extracted == str(value))

    def _attach_plan(self, rows: Sequence[Row[Any]]) -> Plan[_Loaded]:
        """Load the blobs and pending writes of some checkpoint rows."""
        checkpoints = [self.serde.loads_typed((r.type, r.checkpoint)) for r in rows]
        wanted: dict[tuple[str, str], set[tuple[str, str]]] = defaultdict(set)
        ids: dict[tuple[str, str], list[str]] = defaultdict(list)
        for r, cp in zip(rows, checkpoints, strict=True):
            group = (r.thread_id, r.checkpoint_ns)
            ids[group].append(r.checkpoint_id)
            wanted[group].update((ch, str(v)) for ch, v in cp["channel_versions"].items())
        blobs: dict[tuple[str, str, str, str], tuple[str, bytes | None]] = {}
        writes: dict[tuple[str, str, str], list[Row[Any]]] = defaultdict(list)
        for (thread_id, ns), pairs in wanted.items():
            if not pairs:
                continue
            found = yield _Op(self._get_blobs, {
                "thread_id": thread_id, "checkpoint_ns": ns,
                "channels": sorted({c for c, _ in pairs}),
                "versions": sorted({v for _, v in pairs}),
            }, fetch=True)
            for b in found:
                if (b.channel, b.version) in pairs:
                    blobs[(thread_id, ns, b.channel, b.version)] = (b.type, b.blob)
        for (thread_id, ns), checkpoint_ids in ids.items():
            found = yield _Op(self._get_writes, {
                "thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_ids": checkpoint_ids,
            }, fetch=True)
            for w in found:
                writes[(thread_id, ns, w.checkpoint_id)].append(w)
        return _Loaded(checkpoints, blobs, writes)

    def _assemble(self, rows: Sequence[Row[Any]], loaded: _Loaded) -> list[CheckpointTuple]:
        out = []
        for r, cp in zip(rows, loaded.checkpoints, strict=True):
            values = {}
            for channel, version in cp["channel_versions"].items():
                blob = loaded.blobs.get((r.thread_id, r.checkpoint_ns, channel, str(version)))
                if blob is not None and blob[0] != _EMPTY:
                    # only an empty channel is stored without bytes (checked just above)
                    values[channel] = self.serde.loads_typed(
                        typing.cast("tuple[str, bytes]", blob))
            # Live execution applies a step's writes in writes_sort_key order; so must we.
            pending = sorted(
                loaded.writes.get((r.thread_id, r.checkpoint_ns, r.checkpoint_id), ()),
                key=lambda w: writes_sort_key(w.task_path, w.task_id, w.idx),
            )
            out.append(CheckpointTuple(
                config=_config(r.thread_id, r.checkpoint_ns, r.checkpoint_id),
                checkpoint=typing.cast(Checkpoint, {**cp, "channel_values": values}),
                metadata=typing.cast(CheckpointMetadata, r.metadata or {}),
                parent_config=(
                    _config(r.thread_id, r.checkpoint_ns, r.parent_checkpoint_id)
                    if r.parent_checkpoint_id else None
                ),
                pending_writes=[
                    (w.task_id, w.channel, self.serde.loads_typed((w.type, w.blob)))
                    for w in pending
                ],
            ))
        return out

    def _get_plan(self, config: RunnableConfig) -> Plan[tuple[list[Row[Any]], _Loaded] | None]:
        thread_id, ns = _thread_ns(config)
        params = {"thread_id": thread_id, "checkpoint_ns": ns}
        if checkpoint_id := get_checkpoint_id(config):
            rows = yield _Op(self._get_by_id, {**params, "checkpoint_id": checkpoint_id},
                             fetch=True)
        else:
            rows = yield _Op(self._get_latest, params, fetch=True)
        if not rows:
            return None
        return rows, (yield from self._attach_plan(rows))

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint `config` names, or the thread's latest in its namespace."""
        found = self._read(self._get_plan(config))
        return self._assemble(*found)[0] if found else None

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint `config` names, or the thread's latest in its namespace."""
        found = await self._aread_retrying(lambda: self._get_plan(config))
        return self._assemble(*found)[0] if found else None

    def _list_plan(self, stmt: Any) -> Plan[tuple[list[Row[Any]], _Loaded]]:
        """The matching rows, with the first page's blobs and writes (one connection)."""
        rows = yield _Op(stmt, fetch=True)
        return rows, (yield from self._attach_plan(rows[:_LIST_PAGE]))

    def list(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> Iterator[CheckpointTuple]:
        """Checkpoints matching `config`, metadata `filter` and `before`, newest first."""
        rows, loaded = self._read(self._list_plan(
            self._select_checkpoints(config, filter, before, limit)))
        yield from self._assemble(rows[:_LIST_PAGE], loaded)
        # Later pages load lazily, each on a short connection (none held across yields).
        for page in _chunks(rows[_LIST_PAGE:], _LIST_PAGE):
            yield from self._assemble(page, self._read(self._attach_plan(page)))

    async def alist(
        self,
        config: RunnableConfig | None,
        *,
        filter: dict[str, Any] | None = None,
        before: RunnableConfig | None = None,
        limit: int | None = None,
    ) -> AsyncIterator[CheckpointTuple]:
        """Checkpoints matching `config`, metadata `filter` and `before`, newest first."""
        stmt = self._select_checkpoints(config, filter, before, limit)
        rows, loaded = await self._aread_retrying(lambda: self._list_plan(stmt))
        for tup in self._assemble(rows[:_LIST_PAGE], loaded):
            yield tup
        for page in _chunks(rows[_LIST_PAGE:], _LIST_PAGE):
            for tup in self._assemble(page, await self._aread(self._attach_plan(page))):
                yield tup

    # -- deletes, copies, pruning ------------------------------------------------------------

    def _delete_threads_plan(self, thread_ids: Sequence[str]) -> Plan[None]:
        for chunk in _chunks(thread_ids):
            for table in (_WR, _BL, _CK):
                yield _Op(delete(table).where(self._in(table.c.thread_id, chunk)))

    def delete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint, blob and write of a thread (all namespaces)."""
        self._write(self._delete_threads_plan([str(thread_id)]), fence=current_fence())

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint, blob and write of a thread (all namespaces)."""
        await self._awrite(self._delete_threads_plan([str(thread_id)]), fence=current_fence())

    def _referenced_plan(self, thread_id: str, ns: str) -> Plan[set[tuple[str, str]]]:
        """The (channel, version) pairs the remaining checkpoints of a namespace use."""
        rows = yield _Op(select(_CK.c.type, _CK.c.checkpoint).where(
            _CK.c.thread_id == thread_id, _CK.c.checkpoint_ns == ns), fetch=True)
        used: set[tuple[str, str]] = set()
        for r in rows:
            cp = self.serde.loads_typed((r.type, r.checkpoint))
            used.update((ch, str(v)) for ch, v in cp["channel_versions"].items())
        return used

    def _collect_blobs_plan(self, thread_id: str, ns: str) -> Plan[None]:
        """Delete the blobs no remaining checkpoint of the namespace points at."""
        used = yield from self._referenced_plan(thread_id, ns)
        stored = yield _Op(select(_BL.c.channel, _BL.c.version).where(
            _BL.c.thread_id == thread_id, _BL.c.checkpoint_ns == ns), fetch=True)
        garbage: dict[str, list[str]] = defaultdict(list)
        for b in stored:
            if (b.channel, b.version) not in used:
                garbage[b.channel].append(b.version)
        for channel, versions in garbage.items():
            for chunk in _chunks(versions):
                yield _Op(delete(_BL).where(
                    _BL.c.thread_id == thread_id, _BL.c.checkpoint_ns == ns,
                    _BL.c.channel == channel, self._in(_BL.c.version, chunk)))

    def _unlink_orphans_plan(self, thread_id: str, ns: str) -> Plan[None]:
        """A checkpoint whose parent was deleted is left with no parent."""
        parent = _CK.alias("parent")
        yield _Op(update(_CK).where(
            _CK.c.thread_id == thread_id, _CK.c.checkpoint_ns == ns,
            _CK.c.parent_checkpoint_id.is_not(None),
            ~exists().where(
                parent.c.thread_id == thread_id, parent.c.checkpoint_ns == ns,
                parent.c.checkpoint_id == _CK.c.parent_checkpoint_id,
            ),
        ).values(parent_checkpoint_id=None))

    def _delete_runs_plan(self, run_ids: Sequence[str]) -> Plan[None]:
        touched: set[tuple[str, str]] = set()
        for chunk in _chunks(run_ids):
            rows = yield _Op(select(_CK.c.thread_id, _CK.c.checkpoint_ns).distinct().where(
                self._in(_CK.c.run_id, chunk)), fetch=True)
            touched.update((r.thread_id, r.checkpoint_ns) for r in rows)
            # The runs' own writes, and any write pending on a checkpoint deleted here
            # (writes saved without a run_id in their config).
            yield _Op(delete(_WR).where(or_(
                self._in(_WR.c.run_id, chunk),
                exists().where(
                    _CK.c.thread_id == _WR.c.thread_id,
                    _CK.c.checkpoint_ns == _WR.c.checkpoint_ns,
                    _CK.c.checkpoint_id == _WR.c.checkpoint_id,
                    self._in(_CK.c.run_id, chunk),
                ),
            )))
            yield _Op(delete(_CK).where(self._in(_CK.c.run_id, chunk)))
        # Blobs are shared between the checkpoints of a namespace: keep those still used.
        for thread_id, ns in sorted(touched):
            yield from self._unlink_orphans_plan(thread_id, ns)
            yield from self._collect_blobs_plan(thread_id, ns)

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints and writes of these runs, and blobs left unused."""
        if run_ids := [str(r) for r in _ids(run_ids, "run_ids")]:
            self._write(self._delete_runs_plan(run_ids), fence=current_fence())

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints and writes of these runs, and blobs left unused."""
        if run_ids := [str(r) for r in _ids(run_ids, "run_ids")]:
            await self._awrite(self._delete_runs_plan(run_ids), fence=current_fence())

    def _copy_plan(self, source: str, target: str) -> Plan[None]:
        insert = pg.insert if self._pg else sq.insert
        for table in (_CK, _BL, _WR):
            columns = [c for c in table.c.keys() if c != "thread_id"]
            rows = select(literal(target, String), *(table.c[c] for c in columns)).where(
                table.c.thread_id == source)
            # Rows the target already has are kept (a copy never clobbers a thread).
            yield _Op(insert(table).from_select(["thread_id", *columns], rows)
                      .on_conflict_do_nothing())

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, blob and write of a thread to another thread ID."""
        plan = self._copy_plan(str(source_thread_id), str(target_thread_id))
        self._write(plan, fence=current_fence())

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, blob and write of a thread to another thread ID."""
        plan = self._copy_plan(str(source_thread_id), str(target_thread_id))
        await self._awrite(plan, fence=current_fence())

    def _prune_plan(self, thread_ids: Sequence[str], strategy: str) -> Plan[None]:
        if strategy == "delete":
            yield from self._delete_threads_plan(thread_ids)
            return
        # keep_latest would cut a DeltaChannel off the ancestors it is rebuilt from; refuse
        # before deleting anything (the transaction rolls back).
        for chunk in _chunks(thread_ids):
            delta = yield _Op(select(_CK.c.thread_id).distinct().where(
                self._in(_CK.c.thread_id, chunk),
                cast(_CK.c.metadata, String).contains('"counters_since_delta_snapshot"'),
            ), fetch=True)
            if delta:
                raise NotImplementedError(
                    "keep_latest cannot prune threads that use a DeltaChannel: "
                    + ", ".join(sorted(r.thread_id for r in delta))
                )
        for thread_id in thread_ids:
            yield from self._keep_latest_plan(thread_id)

    def _keep_latest_plan(self, thread_id: str) -> Plan[None]:
        latest = select(_CK.c.checkpoint_ns, func.max(_CK.c.checkpoint_id).label("head")).where(
            _CK.c.thread_id == thread_id).group_by(_CK.c.checkpoint_ns).subquery()
        heads = yield _Op(select(latest.c.checkpoint_ns, latest.c.head, _CK.c.metadata).join(
            _CK, and_(_CK.c.thread_id == thread_id,
                      _CK.c.checkpoint_ns == latest.c.checkpoint_ns,
                      _CK.c.checkpoint_id == latest.c.head)), fetch=True)
        if not heads:
            return
        root_ids = {h.head for h in heads if h.checkpoint_ns == ""}
        saved_roots: set[str] = set()
        wanted_roots = {
            (h.metadata or {}).get("parents", {}).get("") for h in heads if ":" in h.checkpoint_ns
        } - {None}
        if wanted_roots:
            found = yield _Op(select(_CK.c.checkpoint_id).where(
                _CK.c.thread_id == thread_id, _CK.c.checkpoint_ns == "",
                self._in(_CK.c.checkpoint_id, wanted_roots)), fetch=True)
            saved_roots = {r.checkpoint_id for r in found}
        for h in heads:
            ns, head = h.checkpoint_ns, h.head
            root = (h.metadata or {}).get("parents", {}).get("")
            if ":" in ns and root in saved_roots and root not in root_ids:
                # A subgraph call's namespace (task ID after ":") belongs to the root
                # checkpoint it started from; that one is being deleted, so is the call.
                for table in (_WR, _BL, _CK):
                    yield _Op(delete(table).where(
                        table.c.thread_id == thread_id, table.c.checkpoint_ns == ns))
                continue
            # `< head`, not `!= head`: a checkpoint a run saves meanwhile is newer, kept.
            for table in (_WR, _CK):
                yield _Op(delete(table).where(
                    table.c.thread_id == thread_id, table.c.checkpoint_ns == ns,
                    table.c.checkpoint_id < head))
            yield _Op(update(_CK).where(
                _CK.c.thread_id == thread_id, _CK.c.checkpoint_ns == ns,
                _CK.c.checkpoint_id == head,
            ).values(parent_checkpoint_id=None))
            yield from self._collect_blobs_plan(thread_id, ns)

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """`keep_latest`: keep each namespace's latest checkpoint, its writes and the blobs
        it uses; `delete`: delete the threads. One transaction."""
        if ids := _prune_args(thread_ids, strategy):
            self._write(self._prune_plan(ids, strategy), fence=current_fence())

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """`keep_latest`: keep each namespace's latest checkpoint, its writes and the blobs
        it uses; `delete`: delete the threads. One transaction."""
        if ids := _prune_args(thread_ids, strategy):
            await self._awrite(self._prune_plan(ids, strategy), fence=current_fence())

    # -- versions --------------------------------------------------------------------------

    def get_next_version(self, current: str | None, channel: None = None) -> str:
        """"<counter, 32 digits>.<random>": sorts as a string; the random part keeps two
        forks that write the same channel at the same step from sharing a blob key."""
        if current is None:
            n = 0
        elif isinstance(current, (int, float)):
            n = int(current)
        else:
            n = int(str(current).split(".", 1)[0])
        return f"{n + 1:032}.{random.random():016}"


# -- small helpers -------------------------------------------------------------------------


def _config(thread_id: str, ns: str, checkpoint_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id, "checkpoint_ns": ns,
                             "checkpoint_id": checkpoint_id}}


def _unnest(prefix: str, columns: Sequence[str], **types: Any) -> Any:
    """`unnest(:<prefix>a, :<prefix>b, ...) AS x(a, b, ...)`: rows from parallel arrays
    (of strings unless `types` says otherwise)."""
    fn = func.unnest(*(bindparam(prefix + col, type_=pg.ARRAY(types.get(col, String)))
                       for col in columns))
    return fn.table_valued(*columns).render_derived()


def _ids(ids: Sequence[str], name: str) -> list[str]:
    if isinstance(ids, str):  # a lone ID would be iterated character by character
        raise TypeError(f"{name} must be a sequence of IDs, not a str")
    return list(ids)


def _prune_args(thread_ids: Sequence[str], strategy: str) -> list[str]:
    if strategy not in ("keep_latest", "delete"):
        raise ValueError(f"unknown prune strategy {strategy!r}: use 'keep_latest' or 'delete'")
    return [str(t) for t in _ids(thread_ids, "thread_ids")]

