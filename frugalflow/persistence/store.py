"""The database: engines (async and sync) for SQLite or PostgreSQL, and versioned migrations.

`Store(url)` does no I/O; `await store.setup()` creates or migrates the schema
(`Store(url, create=False)`: opens an existing frugalflow database only). URLs:
`sqlite:///path.db` (default: `FRUGALFLOW_DATABASE_URL`, else `./frugalflow.db`) or
`postgresql://user@host/db`. Drivers are picked here: aiosqlite/pysqlite for SQLite,
asyncpg/psycopg for PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any, TypeVar

from sqlalchemy import event, inspect, select, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool
from sqlmodel import create_engine

from ..exceptions import SchemaVersionError, StoreUnavailableError
from . import tables
from .batching import AsyncLanes, SqliteLanes, Write, Writer
from .errors import is_transient
from .leases import Fence, check_fence, current_fence
from .plans import Plan, adrive

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Store",
    "default_url",
    "postgres_url",
]

T = TypeVar("T")
log = logging.getLogger("frugalflow")


def _v1(conn: Connection) -> None:
    """The first schema: every table of `tables` as it was at version 1."""
    tables.metadata.create_all(conn)


def _v2(conn: Connection) -> None:
    """ff_attempts.category: the input's category, which learned routers use as a feature."""
    columns = {c["name"] for c in inspect(conn).get_columns("ff_attempts")}
    if "category" not in columns:  # _v1 on this release already created it
        conn.execute(text("ALTER TABLE ff_attempts ADD COLUMN category VARCHAR"))


def _v3(conn: Connection) -> None:
    """ff_attempts.usage_estimated: whether an attempt's tokens are frugalflow's estimate."""
    columns = {c["name"] for c in inspect(conn).get_columns("ff_attempts")}
    if "usage_estimated" not in columns:  # _v1 on this release already created it
        conn.execute(text("ALTER TABLE ff_attempts ADD COLUMN usage_estimated BOOLEAN"))


def _v4(conn: Connection) -> None:
    """ff_runs.principal: who started the run (a named service token), indexed for listing."""
    columns = {c["name"] for c in inspect(conn).get_columns("ff_runs")}
    if "principal" not in columns:  # _v1 on this release already created it
        conn.execute(text("ALTER TABLE ff_runs ADD COLUMN principal VARCHAR"))
    conn.execute(text("CREATE INDEX IF NOT EXISTS ix_ff_runs_principal ON ff_runs (principal)"))


def _v5(conn: Connection) -> None:
    """ff_attempts(task_id): a node's cost is summed over its task's attempts when it ends
    (without the index, a scan of every attempt ever made, per node)."""
    conn.execute(text("CREATE INDEX IF NOT EXISTS ff_attempts_task ON ff_attempts (task_id)"))


def _v6(conn: Connection) -> None:
    """Measured capability: ff_attempts.request and .reasoning_tokens (replayable requests,
    hidden output), and the evaluation and node-policy tables."""
    columns = {c["name"] for c in inspect(conn).get_columns("ff_attempts")}
    if "request" not in columns:  # _v1 on this release already created it
        conn.execute(text("ALTER TABLE ff_attempts ADD COLUMN request JSON"))
    if "reasoning_tokens" not in columns:
        conn.execute(text("ALTER TABLE ff_attempts ADD COLUMN reasoning_tokens INTEGER"))
    for table in (tables.EvalRow, tables.EvalCellRow, tables.PolicyRow):
        table.__table__.create(conn, checkfirst=True)  # type: ignore[union-attr]


def _v7(conn: Connection) -> None:
    """Observability: the persisted event log (ff_events) and ff_runs.trace_context."""
    columns = {c["name"] for c in inspect(conn).get_columns("ff_runs")}
    if "trace_context" not in columns:  # _v1 on this release already created it
        conn.execute(text("ALTER TABLE ff_runs ADD COLUMN trace_context JSON"))
    tables.EventRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _v8(conn: Connection) -> None:
    """Nodes that can wait: ff_attempts.tier and .batch_item_id, ff_runs.deadline_at, and the
    parked requests (ff_batches, ff_batch_items)."""
    columns = {c["name"] for c in inspect(conn).get_columns("ff_attempts")}
    if "tier" not in columns:  # _v1 on this release already created it
        conn.execute(text("ALTER TABLE ff_attempts ADD COLUMN tier VARCHAR"))
    if "batch_item_id" not in columns:
        conn.execute(text("ALTER TABLE ff_attempts ADD COLUMN batch_item_id VARCHAR"))
    runs = {c["name"] for c in inspect(conn).get_columns("ff_runs")}
    if "deadline_at" not in runs:
        kind = "TIMESTAMP" if conn.dialect.name == "postgresql" else "DATETIME"
        conn.execute(text(f"ALTER TABLE ff_runs ADD COLUMN deadline_at {kind}"))
    for table in (tables.BatchRow, tables.BatchItemRow):
        table.__table__.create(conn, checkfirst=True)  # type: ignore[union-attr]


def _v9(conn: Connection) -> None:
    """ff_batch_items.call_position: a parked call's place among its node execution's
    parked calls (a call whose prompt changed is known by its place, not its key)."""
    columns = {c["name"] for c in inspect(conn).get_columns("ff_batch_items")}
    if "call_position" not in columns:  # _v1 on this release already created it
        conn.execute(text("ALTER TABLE ff_batch_items ADD COLUMN call_position INTEGER"))


# Append-only: the index + 1 is the schema version. A release that changes a table adds a
# function here that alters existing databases (and must be a no-op where _v1 already
# created the new shape). Never edit or reorder an applied migration.
MIGRATIONS: list[Callable[[Connection], None]] = [_v1, _v2, _v3, _v4, _v5, _v6, _v7, _v8, _v9]
SCHEMA_VERSION = len(MIGRATIONS)

_PG_MIGRATION_LOCK = 7_430_119_552  # advisory lock key serialising concurrent setups


def default_url() -> str:
    return os.environ.get("FRUGALFLOW_DATABASE_URL") or "sqlite:///frugalflow.db"


def postgres_url(url: str, driver: str = "postgresql") -> str:
    """A user's PostgreSQL URL (`postgres://` or `postgresql[+driver]://`) for `driver`,
    password kept: "postgresql" gives the libpq form (asyncpg.connect, psycopg conninfo)."""
    u = make_url(url.replace("postgres://", "postgresql://", 1))
    return u.set(drivername=driver).render_as_string(hide_password=False)


def _driver_urls(url: str) -> tuple[str, str, str]:
    """(dialect, async URL, sync URL) for a user URL."""
    if url.startswith("sqlite"):
        u = make_url(url)
        base = u.set(drivername="sqlite")
        return "sqlite", base.set(drivername="sqlite+aiosqlite").render_as_string(False), base.render_as_string(False)
    if url.startswith(("postgresql", "postgres")):
        return ("postgresql", postgres_url(url, "postgresql+asyncpg"),
                postgres_url(url, "postgresql+psycopg"))
    raise StoreUnavailableError(
        f"unsupported database URL {_mask(url)!r}: use sqlite:///path.db or postgresql://user@host/db"
    )


def _mask(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even a URL: show only its scheme
        return url.split(":", 1)[0] + ":..."


class Store:
    """Engines and migrations for one database. Share one Store per process and database."""

    def __init__(self, url: str | None = None, *, pool_size: int = 5,
                 busy_timeout: float = 30.0, retry_for: float = 2.0,
                 create: bool = True) -> None:
        self.url = url or default_url()
        self.create = create
        """False: never create the database (no SQLite file, no schema): a missing one is a
        `StoreUnavailableError` saying so. For read-only commands, where a typo in the URL
        must not leave an empty database behind."""
        self.dialect, self._async_url, self._sync_url = _driver_urls(self.url)
        self._pool_size = pool_size
        self.busy_timeout = busy_timeout
        """SQLite: seconds a writer waits for another process's write lock."""
        self.retry_for = retry_for
        """Seconds a transient failure (dropped connection, server restarting, SQLite lock)
        is retried with backoff by `retrying`, for writes outside a run's lease; under a
        Runner's fence, the lease's TTL bounds it instead."""
        self._engine: AsyncEngine | None = None
        self._sync_engine: Engine | None = None
        self._ready = False
        # SQLite has one writer at a time: writers of this process queue here instead of
        # spinning on "database is locked"; other processes wait on busy_timeout.
        self._alock: asyncio.Lock | None = None
        self._tlock = threading.Lock()
        # The hot path (checkpoints, ledger rows of a run, leases): connections kept
        # between calls, and group commit across runs (batching.py).
        self.lanes = AsyncLanes(self)
        self.sqlite_lanes = SqliteLanes(self)
        self.writer = Writer(self)

    def __repr__(self) -> str:
        return f"Store({_mask(self.url)!r})"

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @property
    def engine(self) -> AsyncEngine:
        if self._engine is None:
            if self.is_sqlite:
                self._prepare_sqlite_path()
                self._engine = create_async_engine(self._async_url, poolclass=NullPool)
                _sqlite_pragmas(self._engine.sync_engine, self.busy_timeout, wal=self.create)
            else:
                # Several processes share the server's max_connections (100 by default):
                # keep each process's pool small; writes are short transactions.
                self._engine = create_async_engine(
                    self._async_url, pool_size=self._pool_size, max_overflow=self._pool_size,
                    pool_pre_ping=True, pool_timeout=60,
                )
        return self._engine

    @property
    def sync_engine(self) -> Engine:
        if self._sync_engine is None:
            if self.is_sqlite:
                self._prepare_sqlite_path()
                self._sync_engine = create_engine(self._sync_url, poolclass=NullPool)
                _sqlite_pragmas(self._sync_engine, self.busy_timeout, wal=self.create)
            else:
                self._sync_engine = create_engine(self._sync_url, pool_pre_ping=True)
        return self._sync_engine

    def _prepare_sqlite_path(self) -> None:
        db = make_url(self._sync_url).database
        if not self.create and (not db or db == ":memory:" or not os.path.isfile(db)):
            raise self.missing(f"no file {os.path.abspath(db) if db else '(in memory)'}")
        if db and db != ":memory:":
            parent = os.path.dirname(os.path.abspath(db))
            if not os.path.isdir(parent):
                error = StoreUnavailableError(
                    f"cannot open SQLite database {db!r}: folder {parent!r} does not exist"
                )
                error.retryable = False  # waiting will not help
                raise error

    # -- transactions --------------------------------------------------------------

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction (serialised per process on SQLite), fenced if a Fence is set."""
        fence = current_fence()
        async with self.sqlite_writer():
            async with self._connect(begin=True) as conn:
                if fence is not None:
                    await check_fence(conn, fence, sqlite=self.is_sqlite)
                yield conn

    @asynccontextmanager
    async def sqlite_writer(self) -> AsyncIterator[None]:
        """This process's turn to write to SQLite (one async writer at a time: SQLite has a
        single write lock, and waiting here is cheaper than its busy timeout). A no-op on
        PostgreSQL. Writers that bypass `write()` (the checkpoint saver) take it too."""
        if not self.is_sqlite:
            yield
            return
        if self._alock is None:
            self._alock = asyncio.Lock()
        async with self._alock:
            yield

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        async with self._connect(begin=False) as conn:
            yield conn

    @asynccontextmanager
    async def _connect(self, *, begin: bool) -> AsyncIterator[AsyncConnection]:
        try:
            engine = self.engine.execution_options(ff_write=True) if begin else self.engine
            cm = engine.begin() if begin else engine.connect()
            conn = await cm.__aenter__()
        except Exception as e:
            raise (self.unavailable(e) if is_transient(e) else e) from e
        try:
            yield conn
        except BaseException as e:
            try:
                await cm.__aexit__(type(e), e, e.__traceback__)
            except Exception as exit_error:  # the rollback on a dead connection failed too
                if not is_transient(exit_error):
                    raise
            if isinstance(e, Exception) and is_transient(e) and not isinstance(
                    e, StoreUnavailableError):
                # A connection that broke mid-transaction: SQLAlchemy invalidated it (the
                # pool drops it); the transaction did not commit.
                raise self.unavailable(e) from e
            raise
        else:
            try:
                await cm.__aexit__(None, None, None)
            except Exception as e:  # COMMIT lost with the connection: outcome unknown
                raise (self.unavailable(e) if is_transient(e) else e) from e

    async def retrying(self, op: Callable[[], Awaitable[T]], *, what: str = "write",
                       fence: Fence | None | bool = True) -> T:
        """`await op()`, retried with backoff while it fails with StoreUnavailableError, for
        up to the fence's lease TTL (in a Runner's run) or `retry_for` seconds. Each try is
        a new transaction, with its own fence check. `op` must be safe to repeat (its
        first try may have committed before the connection dropped). `fence`: the one
        whose TTL bounds the retries (default: this context's)."""
        if fence is True:
            fence = current_fence()
        budget = (fence.ttl if isinstance(fence, Fence) and fence.ttl is not None
                  else self.retry_for)
        deadline = time.monotonic() + budget
        delay = 0.02
        while True:
            try:
                return await op()
            except StoreUnavailableError as e:
                if not getattr(e, "retryable", True) or time.monotonic() + delay > deadline:
                    raise
                log.info("frugalflow: %s failed (%s); retrying in %.2f s", what, e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def run_write(self, plan: Callable[[], Plan[T]], *, key: str,
                        fence: Fence | None | bool = True, retry: bool = True,
                        what: str = "write") -> T:
        """Run a write plan in a transaction shared with the other runs' writes that arrive
        together (group commit), fenced by `fence` (default: this context's). `retry`: as
        `retrying` does (the plan must be safe to repeat). `key`: the run it writes."""
        if fence is True:
            fence = current_fence()
        write = Write(plan=plan, fence=fence or None)
        if not retry:
            return typing.cast(T, await self.writer.submit(write, key))
        return typing.cast(T, await self.retrying(
            lambda: self.writer.submit(write, key), what=what, fence=fence))

    async def run_read(self, plan: Callable[[], Plan[T]], *, what: str = "read") -> T:
        """Run a read plan on a kept connection (no pool checkout), retried like
        `retrying`."""
        async def once() -> T:
            try:
                if self.is_sqlite:
                    return await self.sqlite_lanes.ainline(plan, write=False)
                await self.setup()
                async with self.lanes.connection() as conn:
                    return await adrive(conn, plan())
            except Exception as e:
                raise (self.unavailable(e) if is_transient(e) else e) from e

        return await self.retrying(once, what=what)

    async def probe(self) -> bool:
        """Whether the database answers now (one short query; on SQLite, whether the write
        lock can be taken: readers are never blocked there)."""
        try:
            async with (self.write() if self.is_sqlite else self.read()) as conn:
                await conn.execute(text("SELECT 1"))
        except StoreUnavailableError:
            return False
        return True

    @contextmanager
    def write_sync(self) -> Iterator[Connection]:
        lock = self._tlock if self.is_sqlite else None
        if lock:
            lock.acquire()
        try:
            try:
                cm = self.sync_engine.execution_options(ff_write=True).begin()
                conn = cm.__enter__()
            except Exception as e:
                raise (self.unavailable(e) if is_transient(e) else e) from e
            try:
                yield conn
            except BaseException as e:
                try:
                    cm.__exit__(type(e), e, e.__traceback__)
                except Exception as exit_error:
                    if not is_transient(exit_error):
                        raise
                if isinstance(e, Exception) and is_transient(e) and not isinstance(
                        e, StoreUnavailableError):
                    raise self.unavailable(e) from e
                raise
            else:
                try:
                    cm.__exit__(None, None, None)
                except Exception as e:
                    raise (self.unavailable(e) if is_transient(e) else e) from e
        finally:
            if lock:
                lock.release()

    @contextmanager
    def read_sync(self) -> Iterator[Connection]:
        try:
            conn = self.sync_engine.connect()
        except Exception as e:
            raise (self.unavailable(e) if is_transient(e) else e) from e
        with conn:
            try:
                yield conn
            except Exception as e:
                if is_transient(e) and not isinstance(e, StoreUnavailableError):
                    raise self.unavailable(e) from e
                raise

    def unavailable(self, error: BaseException) -> StoreUnavailableError:
        """The error for an unreachable database (its URL shown with the password masked)."""
        if isinstance(error, StoreUnavailableError):
            return error
        return StoreUnavailableError(
            f"cannot connect to database {_mask(self.url)}: {type(error).__name__}: "
            f"{str(error).splitlines()[0][:200] if str(error) else ''}. Check that the server "
            "is running and the URL (FRUGALFLOW_DATABASE_URL) is right."
        )

    def missing(self, why: str, *, empty: bool = False) -> StoreUnavailableError:
        """The error for a database that does not exist, or (`empty`) holds no frugalflow
        tables, when `create` is False."""
        what = "is not a frugalflow database" if empty else "does not exist"
        return StoreUnavailableError(
            f"database {_mask(self.url)} {what} ({why}): check --db or "
            f"FRUGALFLOW_DATABASE_URL; `frugalflow run` creates {'them' if empty else 'it'}",
            retryable=False, missing=True)

    # -- schema --------------------------------------------------------------------

    async def setup(self) -> None:
        """Create the schema, or migrate it to this release's version. Idempotent."""
        if self._ready:
            return
        try:
            async with self.write() as conn:
                await conn.run_sync(self._migrate)
        except Exception as e:
            # PostgreSQL never creates a database on connect; say so in one line.
            if self.dialect == "postgresql" and "does not exist" in str(e) and not isinstance(
                    e, StoreUnavailableError):
                raise self.missing("the server has no such database") from None
            raise
        self._ready = True

    def setup_sync(self) -> None:
        if self._ready:
            return
        with self.write_sync() as conn:
            self._migrate(conn)
        self._ready = True

    def _migrate(self, conn: Connection) -> None:
        if not self.create and not inspect(conn).has_table(
                tables.SchemaVersionRow.__tablename__):
            raise self.missing("no frugalflow tables in it", empty=True)
        if self.dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_MIGRATION_LOCK})
        elif self.dialect == "sqlite":
            # Take the write lock before reading the version (no lost upgrade race).
            conn.exec_driver_sql("CREATE TABLE IF NOT EXISTS ff_schema_lock (x INTEGER)")
        # SQLModel declares neither `__table__` nor column attributes (typed as their values).
        tables.SchemaVersionRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]
        rows = conn.execute(select(tables.SchemaVersionRow.v)).scalars().all()  # type: ignore[call-overload]
        current = max(rows, default=0)
        if current > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"database {_mask(self.url)} has schema version {current}, newer than this "
                f"frugalflow's {SCHEMA_VERSION}: upgrade frugalflow (nothing was changed)"
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            MIGRATIONS[version - 1](conn)
            conn.execute(tables.SchemaVersionRow.__table__.insert().values(v=version))  # type: ignore[attr-defined]

    async def version(self) -> int:
        async with self.read() as conn:
            try:
                # SQLModel types the column attribute as its value (int)
                rows = (await conn.execute(select(tables.SchemaVersionRow.v))).scalars().all()  # type: ignore[call-overload]
            except (OperationalError, DBAPIError):
                return 0
        return max(rows, default=0)

    async def close(self) -> None:
        await self.writer.wait()
        if self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        if self._sync_engine is not None:
            self._sync_engine.dispose()
            self._sync_engine = None
        self._ready = False


def _sqlite_pragmas(engine: Engine, busy_timeout: float = 30.0, *, wal: bool = True) -> None:
    """`wal`: switch the file to WAL mode (a write: not for read-only opens, where a
    frugalflow database is WAL already and another file must stay as it was)."""
    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        # Writers take the write lock up front (BEGIN IMMEDIATE): a deferred transaction
        # that reads first and writes later can fail at once with SQLITE_BUSY instead of
        # waiting on busy_timeout when another process writes too.
        write = conn.get_execution_options().get("ff_write", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN (the driver's own is always deferred).
        dbapi_conn.isolation_level = None
        # WAL: readers never block the writer; busy_timeout: writers of other processes
        # wait instead of failing with "database is locked".
        cur = dbapi_conn.cursor()
        if wal:
            cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout * 1000)}")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()
