"""A LangGraph checkpoint saver on frugalflow's Store: SQLModel tables, SQLite or PostgreSQL.

    saver = SQLModelSaver(Store("postgresql://user@host/db"))
    graph = builder.compile(checkpointer=saver)

The SQL lives in `plans.py` (one plan per operation, shared by the sync and async methods);
group commit and the connections kept between calls in `batching.py`. This module picks
the driver for each call. Why the I/O looks the way it does (speed, and atomicity):

* One statement per write on PostgreSQL: a put's blobs and checkpoint (data-modifying
  CTEs, arrays through `unnest`) commit together in autocommit mode; no BEGIN/COMMIT trips
  (a fenced write adds BEGIN, the lease check and COMMIT).
  One transaction per write on SQLite (BEGIN IMMEDIATE). A cancelled caller leaves the
  whole checkpoint or nothing.
* Group commit (the Store's `Writer`): concurrent puts and put_writes of many runs, and
  their ledger rows, are written together, one transaction for the lot.
* SQLite work runs on the event loop's thread on the Store's sync engine (microseconds in
  WAL); a worker thread takes it only while another process holds the write lock. Async
  SQLite writes queue on the Store's per-process writer lock, with its other writers.

Lease fences (`leases.fenced`, set by the Runner around a run) hold for every write, as for
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
import random
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    BaseCheckpointSaver,
    ChannelVersions,
    Checkpoint,
    CheckpointMetadata,
    CheckpointTuple,
)
from langgraph.checkpoint.serde.base import SerializerProtocol
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from ..exceptions import StoreUnavailableError
from .batching import Write
from .leases import Fence, current_fence, fence_plan
from .plans import (
    LIST_PAGE,
    CheckpointPlans,
    Plan,
    Rows,
    chunks,
    drive,
    id_list,
    prune_args,
)
from .errors import is_transient
from .store import Store

__all__ = ["SQLModelSaver"]

T = TypeVar("T")


# -- the saver -----------------------------------------------------------------------------


class SQLModelSaver(CheckpointPlans, BaseCheckpointSaver[str]):
    """LangGraph checkpointer storing into frugalflow's SQLModel tables through a `Store`.

    Construction does no I/O; the schema is created on first use (`store.setup()`).
    Passes `langgraph-checkpoint-conformance` at level FULL on SQLite and PostgreSQL.
    """

    def __init__(self, store: Store, *, serde: SerializerProtocol | None = None) -> None:
        super().__init__(serde=serde)
        self.store = store
        self._pg = store.dialect == "postgresql"
        self._build_statements()

    # -- drivers: the only places that differ between sync and async ------------------------

    def _read(self, plan: Plan[T]) -> T:
        with self._mapped():
            return self._read_raw(plan)

    def _read_raw(self, plan: Plan[T]) -> T:
        if not self._pg:
            return self.store.sqlite_lanes.run(plan, write=False)
        self.store.setup_sync()
        with self._pg_sync_connection() as conn:
            return drive(conn, plan)

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
        (`single`); `lean`: all its statements are `Lean` (put/put_writes plans)."""
        with self._mapped():
            return self._write_raw(plan, fence=fence, single=single, lean=lean)

    def _write_raw(self, plan: Plan[T], *, fence: Fence | None, single: bool = False,
                   lean: bool = False) -> T:
        if fence is not None:  # the lease check and the write: one transaction
            plan, single, lean = fence_plan(fence, plan, pg=self._pg), False, False
        if not self._pg:
            return self.store.sqlite_lanes.run(plan, write=True, lean=lean)
        self.store.setup_sync()
        if single:
            with self._pg_sync_connection() as conn:
                return drive(conn, plan)
        with self.store.write_sync() as conn:
            return drive(conn, plan)

    async def _aread(self, make: Callable[[], Plan[T]]) -> T:
        """A read on one of the Store's kept connections, retried while the database is
        briefly unreachable (`Store.retrying`)."""
        return await self.store.run_read(make, what="checkpoint read")

    async def _awrite(self, make: Callable[[], Plan[T]], *, key: str) -> T:
        """Run a write plan atomically, fenced by this context's fence, in the Store's
        group commit (`Writer`)."""
        return await self.store.run_write(make, key=key, retry=False)

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
        await self.store.writer.wait()
        if self._pg:
            await self.store.lanes.aclose()
        else:
            await asyncio.to_thread(self.store.sqlite_lanes.close)  # waits for a lane in use

    def close(self) -> None:
        """Sync twin of `aclose` (SQLite; PostgreSQL lanes need `aclose` or store.close())."""
        if not self._pg:
            self.store.sqlite_lanes.close()

    async def setup(self) -> None:
        """Create or migrate the schema now (otherwise done on first use)."""
        await self.store.setup()

    async def _submit(self, rows: Rows, key: str) -> None:
        """Write `rows` in the Store's group commit, merged with the other calls' rows. A
        dropped connection is retried (upserts: safe to repeat), within the lease TTL."""
        write = Write(rows=rows, merge=self._store_plan, fence=rows.fence)
        await self.store.retrying(lambda: self.store.writer.submit(write, key),
                                  what="checkpoint write", fence=rows.fence)

    def put(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
    ) -> RunnableConfig:
        """Store a checkpoint and the blobs of the channels in `new_versions`."""
        rows, next_config = self._put_rows(config, checkpoint, metadata, new_versions,
                                            current_fence())
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
        rows, next_config = self._put_rows(config, checkpoint, metadata, new_versions,
                                            current_fence())
        await self._submit(rows, str(config["configurable"]["thread_id"]))
        return next_config

    def put_writes(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str = "",
    ) -> None:
        """Store a task's writes, pending on the checkpoint `config` points at."""
        rows = self._writes_rows(config, writes, task_id, task_path, current_fence())
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
        rows = self._writes_rows(config, writes, task_id, task_path, current_fence())
        if rows.writes:
            await self._submit(rows, str(config["configurable"]["thread_id"]))

    def get_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint `config` names, or the thread's latest in its namespace."""
        found = self._read(self._get_plan(config))
        return self._assemble(*found)[0] if found else None

    async def aget_tuple(self, config: RunnableConfig) -> CheckpointTuple | None:
        """The checkpoint `config` names, or the thread's latest in its namespace."""
        found = await self._aread(lambda: self._get_plan(config))
        return self._assemble(*found)[0] if found else None

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
        yield from self._assemble(rows[:LIST_PAGE], loaded)
        # Later pages load lazily, each on a short connection (none held across yields).
        for page in chunks(rows[LIST_PAGE:], LIST_PAGE):
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
        rows, loaded = await self._aread(lambda: self._list_plan(stmt))
        for tup in self._assemble(rows[:LIST_PAGE], loaded):
            yield tup
        for page in chunks(rows[LIST_PAGE:], LIST_PAGE):
            for tup in self._assemble(page, await self._aread(partial(self._attach_plan, page))):
                yield tup

    def delete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint, blob and write of a thread (all namespaces)."""
        self._write(self._delete_threads_plan([str(thread_id)]), fence=current_fence())

    async def adelete_thread(self, thread_id: str) -> None:
        """Delete every checkpoint, blob and write of a thread (all namespaces)."""
        await self._awrite(partial(self._delete_threads_plan, [str(thread_id)]),
                           key=str(thread_id))

    def delete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints and writes of these runs, and blobs left unused."""
        if run_ids := [str(r) for r in id_list(run_ids, "run_ids")]:
            self._write(self._delete_runs_plan(run_ids), fence=current_fence())

    async def adelete_for_runs(self, run_ids: Sequence[str]) -> None:
        """Delete the checkpoints and writes of these runs, and blobs left unused."""
        if run_ids := [str(r) for r in id_list(run_ids, "run_ids")]:
            await self._awrite(partial(self._delete_runs_plan, run_ids), key=run_ids[0])

    def copy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, blob and write of a thread to another thread ID."""
        plan = self._copy_plan(str(source_thread_id), str(target_thread_id))
        self._write(plan, fence=current_fence())

    async def acopy_thread(self, source_thread_id: str, target_thread_id: str) -> None:
        """Copy every checkpoint, blob and write of a thread to another thread ID."""
        plan = partial(self._copy_plan, str(source_thread_id), str(target_thread_id))
        await self._awrite(plan, key=str(target_thread_id))

    def prune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """`keep_latest`: keep each namespace's latest checkpoint, its writes and the blobs
        it uses; `delete`: delete the threads. One transaction."""
        if ids := prune_args(thread_ids, strategy):
            self._write(self._prune_plan(ids, strategy), fence=current_fence())

    async def aprune(self, thread_ids: Sequence[str], *, strategy: str = "keep_latest") -> None:
        """`keep_latest`: keep each namespace's latest checkpoint, its writes and the blobs
        it uses; `delete`: delete the threads. One transaction."""
        if ids := prune_args(thread_ids, strategy):
            await self._awrite(partial(self._prune_plan, ids, strategy), key=ids[0])

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


