"""The checkpoint saver's SQL as *plans*, and the row shaping around them (no I/O here).

A plan is a generator that yields SQLAlchemy Core statements (`Op`) and receives their
rows; it returns its result. Plans do no I/O, so the saver's sync and async methods share
them and differ only in the driver that runs a plan on a connection (`drive`, `adrive`).
Row building, serialisation and tuple assembly are plain methods of `CheckpointPlans`, the
base class of `SQLModelSaver` (as LangGraph's `BasePostgresSaver` holds its SQL).

Layout (as LangGraph's own Postgres saver): a checkpoint row holds the checkpoint without
its channel values; a channel value is a blob stored once per (thread, namespace, channel,
version), written only by the put whose `new_versions` names it.
"""
from __future__ import annotations

import json
import typing
from collections import defaultdict
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.base import (
    WRITES_IDX_MAP,
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
    exists,
    func,
    literal,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql as pg
from sqlalchemy.dialects.postgresql import asyncpg as pg_asyncpg
from sqlalchemy.dialects import sqlite as sq
from sqlalchemy.dialects.sqlite import pysqlite
from sqlalchemy.engine import Connection, Row
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable

from .scrub import dump_scrubbed, scrub_json, scrub_metadata
from .tables import CheckpointBlobRow, CheckpointRow, CheckpointWriteRow

if TYPE_CHECKING:
    from .leases import Fence
    from .store import Store

__all__ = ["LIST_PAGE", "CheckpointPlans", "Lean", "Loaded", "Op", "Plan", "Rows", "adrive",
           "chunks", "drive", "drive_in_driver_transaction", "id_list", "lean_op",
           "prune_args"]

T = TypeVar("T")

# SQLModel sets `__table__` on table classes at class creation but does not declare it.
_CK = CheckpointRow.__table__  # type: ignore[attr-defined]
_BL = CheckpointBlobRow.__table__  # type: ignore[attr-defined]
_WR = CheckpointWriteRow.__table__  # type: ignore[attr-defined]

_EMPTY = "empty"  # blob type of a channel that has a version but no value
_CHUNK = 500  # rows per IN list (SQLite's bound-parameter limit is 999 on old builds)
LIST_PAGE = 100  # checkpoints whose blobs and writes are loaded per round of alist

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


def chunks(items: Sequence[T], size: int = _CHUNK) -> Iterator[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Op(NamedTuple):
    """One statement of a plan; `params` is a dict, or a list of dicts for executemany.

    `lean`: the same statement precompiled for one driver (see `Lean`); a driver for
    another dialect or driver runs `stmt` as usual."""

    stmt: Executable
    params: Any = None
    fetch: bool = False
    lean: Lean | None = None


class Lean:
    """A Core statement compiled once for one driver, run on that driver directly.

    The write statements of puts skip SQLAlchemy's per-call work (cache lookup, parameter
    processing, execution context): about a quarter of a put's client CPU. Their
    parameters need no processing but JSON's: lists become arrays and bytes bytea or
    BLOB in the drivers themselves. `process`: the parameters go through the types' bind
    processors (datetimes, JSON, ...) as SQLAlchemy would (the ledger's statements).
    Another driver runs `stmt` (its parameters as a dict) as usual.
    """

    def __init__(self, stmt: Any, dialect: Any, columns: Sequence[str] | None = None, *,
                 process: bool = False) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=columns)
        self.stmt = stmt
        self.driver = dialect.driver
        self.sql = str(compiled)
        self.order = tuple(compiled.positiontup or ())
        self.processors: dict[str, Callable[[Any], Any]] = (
            dict(compiled._bind_processors) if process else {})
        self.json = frozenset() if process else frozenset(
            name for name, bind in compiled.binds.items() if isinstance(bind.type, JSON))

    def args(self, params: dict[str, Any]) -> tuple[Any, ...]:
        if self.processors:
            get = self.processors.get
            return tuple(params[k] if (p := get(k)) is None or params[k] is None
                         else p(params[k]) for k in self.order)
        return tuple(json.dumps(params[k]) if k in self.json else params[k]
                     for k in self.order)


_LEANS: dict[tuple[str, tuple[str, ...] | None, bool], Lean] = {}
# The drivers of the lanes: pysqlite (SqliteLanes) and asyncpg (AsyncLanes).
_DIALECTS = {False: pysqlite.dialect(),
             True: pg_asyncpg.dialect()}  # type: ignore[no-untyped-call]  # unannotated in SQLAlchemy


def lean_op(name: str, build: Callable[[], Any], params: dict[str, Any], *, pg: bool,
            columns: Sequence[str] | None = None, fetch: bool = False) -> Op:
    """An Op for statement `name` (built once by `build`, compiled once per column set for
    the async driver of the dialect: asyncpg, or the sqlite lanes' pysqlite)."""
    key = (name, tuple(columns) if columns is not None else None, pg)
    lean = _LEANS.get(key)
    if lean is None:
        lean = _LEANS[key] = Lean(build(), _DIALECTS[pg], columns, process=True)
    return Op(lean.stmt, params, fetch, lean)


# A plan yields statements, is sent back their rows (a list when `fetch`, else None) and
# returns its result. Plans do no I/O themselves: `_drive` and `_adrive` run them.
Plan = Generator[Op, Any, T]


def drive(conn: Connection, plan: Plan[T]) -> T:
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
                    rows = cursor.fetchall() if op.fetch else None
            finally:
                cursor.close()
            continue
        if op.params is not None:
            result = conn.execute(op.stmt, op.params)
        else:
            result = conn.execute(op.stmt)
        rows = result.all() if op.fetch else None


async def adrive(conn: AsyncConnection, plan: Plan[T]) -> T:
    rows: Any = None
    raw: Any = None  # the asyncpg connection (untyped), for `Lean` statements
    while True:
        try:
            op = plan.send(rows)
        except StopIteration as stop:
            return typing.cast(T, stop.value)  # a Plan[T] returns a T
        if op.lean is not None and op.lean.driver == "asyncpg" == conn.dialect.driver:
            # On asyncpg itself (its statement cache; SQLAlchemy's adapter costs a greenlet
            # switch and a cursor per statement), in the transaction of the connection
            # (`AsyncLanes.transaction` runs asyncpg's; SQLAlchemy's side is autocommit).
            if raw is None:
                raw = (await conn.get_raw_connection()).driver_connection
            if isinstance(op.params, list):
                await raw.executemany(op.lean.sql, [op.lean.args(p) for p in op.params])
                rows = None
            elif op.fetch:
                rows = await raw.fetch(op.lean.sql, *op.lean.args(op.params))
            else:
                await raw.execute(op.lean.sql, *op.lean.args(op.params))
                rows = None
            continue
        if op.lean is not None and op.lean.driver == conn.dialect.driver:
            result = await conn.exec_driver_sql(op.lean.sql, op.lean.args(op.params))
        elif op.params is not None:
            result = await conn.execute(op.stmt, op.params)
        else:
            result = await conn.execute(op.stmt)
        rows = result.all() if op.fetch else None


class Loaded(NamedTuple):
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


class Rows(NamedTuple):
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


def drive_in_driver_transaction(conn: Connection, plan: Plan[T]) -> T:
    """`_drive` a plan of `Lean` statements in a transaction of the DBAPI connection
    itself (SQLAlchemy's transaction bookkeeping costs as much as the statements)."""
    raw: Any = conn.connection.driver_connection  # sqlite3.Connection (DBAPI: untyped)
    raw.execute("BEGIN IMMEDIATE")
    try:
        result = drive(conn, plan)
    except BaseException:
        raw.execute("ROLLBACK")
        raise
    raw.execute("COMMIT")
    return result



# -- the plans ---------------------------------------------------------------------------


class CheckpointPlans:
    """The saver's statements (built once per dialect) and plans; `SQLModelSaver` runs them."""

    serde: SerializerProtocol
    store: Store
    _pg: bool

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
            self._pg_shapes: dict[tuple[int, bool, bool], tuple[Any, Lean]] = {}
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
            self._lean_blobs = Lean(self._put_blobs, dialect, _BL_COLUMNS)
            self._lean_writes = Lean(self._put_writes, dialect, _WR_COLUMNS)
            self._lean_checkpoints = Lean(self._put_checkpoints, dialect, _CK_COLUMNS)

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

    def _pg_statement(self, checkpoints: int, blobs: bool, writes: bool) -> tuple[Any, Lean]:
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
            shape = self._pg_shapes[key] = (stmt, Lean(stmt, self.store.engine.dialect))
        return shape

    def _in(self, column: ColumnElement[Any], values: Iterable[Any]) -> ColumnElement[bool]:
        """`column IN values`: one array parameter on PostgreSQL (one prepared plan)."""
        values = list(values)
        if self._pg:
            array = literal(values, pg.ARRAY(column.type))
            return column == any_(array)
        return column.in_(values)

    # -- put -------------------------------------------------------------------------------

    def _put_rows(
        self,
        config: RunnableConfig,
        checkpoint: Checkpoint,
        metadata: CheckpointMetadata,
        new_versions: ChannelVersions,
        fence: Fence | None,
    ) -> tuple[Rows, RunnableConfig]:
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
        return Rows([row], blobs, [], fence), _config(thread_id, ns, checkpoint["id"])

    def _writes_rows(
        self,
        config: RunnableConfig,
        writes: Sequence[tuple[str, Any]],
        task_id: str,
        task_path: str,
        fence: Fence | None,
    ) -> Rows:
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
        return Rows([], [], list(by_idx.values()), fence)

    def _store_plan(self, batch: Sequence[Rows]) -> Plan[None]:
        """Write the rows of one or more puts / put_writes, atomically together."""
        checkpoints = [r for rows in batch for r in rows.checkpoints]
        blobs = [r for rows in batch for r in rows.blobs]
        writes = [r for rows in batch for r in rows.writes]
        if self._pg:
            params, n = _pg_params(checkpoints, blobs, writes)
            if n or blobs or params["w_idx"]:
                stmt, lean = self._pg_statement(n, bool(blobs), bool(params["w_idx"]))
                yield Op(stmt, params, lean=lean)  # lean: asyncpg; psycopg runs `stmt`
            return
        # Blobs before the checkpoint that points at them (one transaction anyway).
        for stmt, lean, rows in ((self._put_blobs, self._lean_blobs, blobs),
                                 (self._put_writes, self._lean_writes, writes),
                                 (self._put_checkpoints, self._lean_checkpoints, checkpoints)):
            if rows:  # executemany, or a plain execute for one row (less overhead)
                yield Op(stmt, rows if len(rows) > 1 else rows[0], lean=lean)

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

    def _attach_plan(self, rows: Sequence[Row[Any]]) -> Plan[Loaded]:
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
            found = yield Op(self._get_blobs, {
                "thread_id": thread_id, "checkpoint_ns": ns,
                "channels": sorted({c for c, _ in pairs}),
                "versions": sorted({v for _, v in pairs}),
            }, fetch=True)
            for b in found:
                if (b.channel, b.version) in pairs:
                    blobs[(thread_id, ns, b.channel, b.version)] = (b.type, b.blob)
        for (thread_id, ns), checkpoint_ids in ids.items():
            found = yield Op(self._get_writes, {
                "thread_id": thread_id, "checkpoint_ns": ns, "checkpoint_ids": checkpoint_ids,
            }, fetch=True)
            for w in found:
                writes[(thread_id, ns, w.checkpoint_id)].append(w)
        return Loaded(checkpoints, blobs, writes)

    def _assemble(self, rows: Sequence[Row[Any]], loaded: Loaded) -> list[CheckpointTuple]:
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

    def _get_plan(self, config: RunnableConfig) -> Plan[tuple[list[Row[Any]], Loaded] | None]:
        thread_id, ns = _thread_ns(config)
        params = {"thread_id": thread_id, "checkpoint_ns": ns}
        if checkpoint_id := get_checkpoint_id(config):
            rows = yield Op(self._get_by_id, {**params, "checkpoint_id": checkpoint_id},
                             fetch=True)
        else:
            rows = yield Op(self._get_latest, params, fetch=True)
        if not rows:
            return None
        return rows, (yield from self._attach_plan(rows))


    def _list_plan(self, stmt: Any) -> Plan[tuple[list[Row[Any]], Loaded]]:
        """The matching rows, with the first page's blobs and writes (one connection)."""
        rows = yield Op(stmt, fetch=True)
        return rows, (yield from self._attach_plan(rows[:LIST_PAGE]))


    # -- deletes, copies, pruning ------------------------------------------------------------

    def _delete_threads_plan(self, thread_ids: Sequence[str]) -> Plan[None]:
        for chunk in chunks(thread_ids):
            for table in (_WR, _BL, _CK):
                yield Op(delete(table).where(self._in(table.c.thread_id, chunk)))


    def _referenced_plan(self, thread_id: str, ns: str) -> Plan[set[tuple[str, str]]]:
        """The (channel, version) pairs the remaining checkpoints of a namespace use."""
        rows = yield Op(select(_CK.c.type, _CK.c.checkpoint).where(
            _CK.c.thread_id == thread_id, _CK.c.checkpoint_ns == ns), fetch=True)
        used: set[tuple[str, str]] = set()
        for r in rows:
            cp = self.serde.loads_typed((r.type, r.checkpoint))
            used.update((ch, str(v)) for ch, v in cp["channel_versions"].items())
        return used

    def _collect_blobs_plan(self, thread_id: str, ns: str) -> Plan[None]:
        """Delete the blobs no remaining checkpoint of the namespace points at."""
        used = yield from self._referenced_plan(thread_id, ns)
        stored = yield Op(select(_BL.c.channel, _BL.c.version).where(
            _BL.c.thread_id == thread_id, _BL.c.checkpoint_ns == ns), fetch=True)
        garbage: dict[str, list[str]] = defaultdict(list)
        for b in stored:
            if (b.channel, b.version) not in used:
                garbage[b.channel].append(b.version)
        for channel, versions in garbage.items():
            for chunk in chunks(versions):
                yield Op(delete(_BL).where(
                    _BL.c.thread_id == thread_id, _BL.c.checkpoint_ns == ns,
                    _BL.c.channel == channel, self._in(_BL.c.version, chunk)))

    def _unlink_orphans_plan(self, thread_id: str, ns: str) -> Plan[None]:
        """A checkpoint whose parent was deleted is left with no parent."""
        parent = _CK.alias("parent")
        yield Op(update(_CK).where(
            _CK.c.thread_id == thread_id, _CK.c.checkpoint_ns == ns,
            _CK.c.parent_checkpoint_id.is_not(None),
            ~exists().where(
                parent.c.thread_id == thread_id, parent.c.checkpoint_ns == ns,
                parent.c.checkpoint_id == _CK.c.parent_checkpoint_id,
            ),
        ).values(parent_checkpoint_id=None))

    def _delete_runs_plan(self, run_ids: Sequence[str]) -> Plan[None]:
        touched: set[tuple[str, str]] = set()
        for chunk in chunks(run_ids):
            rows = yield Op(select(_CK.c.thread_id, _CK.c.checkpoint_ns).distinct().where(
                self._in(_CK.c.run_id, chunk)), fetch=True)
            touched.update((r.thread_id, r.checkpoint_ns) for r in rows)
            # The runs' own writes, and any write pending on a checkpoint deleted here
            # (writes saved without a run_id in their config).
            yield Op(delete(_WR).where(or_(
                self._in(_WR.c.run_id, chunk),
                exists().where(
                    _CK.c.thread_id == _WR.c.thread_id,
                    _CK.c.checkpoint_ns == _WR.c.checkpoint_ns,
                    _CK.c.checkpoint_id == _WR.c.checkpoint_id,
                    self._in(_CK.c.run_id, chunk),
                ),
            )))
            yield Op(delete(_CK).where(self._in(_CK.c.run_id, chunk)))
        # Blobs are shared between the checkpoints of a namespace: keep those still used.
        for thread_id, ns in sorted(touched):
            yield from self._unlink_orphans_plan(thread_id, ns)
            yield from self._collect_blobs_plan(thread_id, ns)


    def _copy_plan(self, source: str, target: str) -> Plan[None]:
        insert = pg.insert if self._pg else sq.insert
        for table in (_CK, _BL, _WR):
            columns = [c for c in table.c.keys() if c != "thread_id"]
            rows = select(literal(target, String), *(table.c[c] for c in columns)).where(
                table.c.thread_id == source)
            # Rows the target already has are kept (a copy never clobbers a thread).
            yield Op(insert(table).from_select(["thread_id", *columns], rows)
                      .on_conflict_do_nothing())


    def _prune_plan(self, thread_ids: Sequence[str], strategy: str) -> Plan[None]:
        if strategy == "delete":
            yield from self._delete_threads_plan(thread_ids)
            return
        # keep_latest would cut a DeltaChannel off the ancestors it is rebuilt from; refuse
        # before deleting anything (the transaction rolls back).
        for chunk in chunks(thread_ids):
            delta = yield Op(select(_CK.c.thread_id).distinct().where(
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
        heads = yield Op(select(latest.c.checkpoint_ns, latest.c.head, _CK.c.metadata).join(
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
            found = yield Op(select(_CK.c.checkpoint_id).where(
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
                    yield Op(delete(table).where(
                        table.c.thread_id == thread_id, table.c.checkpoint_ns == ns))
                continue
            # `< head`, not `!= head`: a checkpoint a run saves meanwhile is newer, kept.
            for table in (_WR, _CK):
                yield Op(delete(table).where(
                    table.c.thread_id == thread_id, table.c.checkpoint_ns == ns,
                    table.c.checkpoint_id < head))
            yield Op(update(_CK).where(
                _CK.c.thread_id == thread_id, _CK.c.checkpoint_ns == ns,
                _CK.c.checkpoint_id == head,
            ).values(parent_checkpoint_id=None))
            yield from self._collect_blobs_plan(thread_id, ns)


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


def id_list(ids: Sequence[str], name: str) -> list[str]:
    if isinstance(ids, str):  # a lone ID would be iterated character by character
        raise TypeError(f"{name} must be a sequence of IDs, not a str")
    return list(ids)


def prune_args(thread_ids: Sequence[str], strategy: str) -> list[str]:
    if strategy not in ("keep_latest", "delete"):
        raise ValueError(f"unknown prune strategy {strategy!r}: use 'keep_latest' or 'delete'")
    return [str(t) for t in id_list(thread_ids, "thread_ids")]


