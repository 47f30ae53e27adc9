"""Read-only SQL over a SQLite file, read-only by construction.

A model writes the query, so nothing in it is trusted. Three layers refuse anything but reading:
the file is opened with `mode=ro`, `query_only` is set, and an authorizer allows only SELECT,
reads, an allow-list of side-effect-free functions and a few schema pragmas (so no ATTACH,
VACUUM INTO, writes, transactions, `load_extension`, `randomblob`, ...). The work is bounded: a
progress handler stops a query past its time or step budget (or when the calling task is
cancelled), `SQLITE_LIMIT_LENGTH` caps every value SQLite builds, and rows and output are capped.
The async form runs the query in a thread, so the event loop never waits for SQLite.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from langchain_core.tools import BaseTool, StructuredTool, ToolException

_DESCRIPTION = "Run one read-only SQL query (SELECT) on the database; returns rows as text."
MAX_SQL_CHARS = 100_000
_CHECK_EVERY = 1000  # VM instructions between two progress-handler calls
_MAX_CELL_CHARS = 500  # per value in the text the model sees

# Side-effect-free functions a SELECT may call (core, math, date, JSON, window, FTS helpers).
# Not: load_extension, fts3_tokenizer, randomblob, zeroblob (allocate on demand), sqlite_log.
_FUNCTIONS = frozenset("""
abs acos acosh asin asinh atan atan2 atanh avg ceil ceiling char coalesce concat concat_ws cos
cosh count cume_dist current_date current_time current_timestamp date datetime degrees
dense_rank exp first_value floor format glob group_concat hex ifnull iif instr julianday lag
last_value lead length like likelihood likely ln log log10 log2 lower ltrim max min mod
nth_value ntile nullif octet_length percent_rank pi pow power printf quote radians random rank
replace round row_number rtrim sign sin sinh soundex sqlite_version sqrt strftime string_agg
substr substring sum tan tanh time timediff total trim trunc typeof unhex unicode unixepoch
unlikely upper
json json_array json_array_length json_error_position json_extract json_group_array
json_group_object json_insert json_object json_patch json_pretty json_quote json_remove
json_replace json_set json_type json_valid -> ->>
match bm25 highlight snippet offsets matchinfo
""".split())
# Schema introspection only; none of these takes a value that changes anything.
_PRAGMAS = frozenset({"table_info", "table_xinfo", "table_list", "index_list", "index_info",
                      "index_xinfo", "foreign_key_list"})
_ACTION_NAMES = {getattr(sqlite3, f"SQLITE_{n}"): n.replace("_", " ") for n in (
    "CREATE_INDEX CREATE_TABLE CREATE_TEMP_INDEX CREATE_TEMP_TABLE CREATE_TEMP_TRIGGER "
    "CREATE_TEMP_VIEW CREATE_TRIGGER CREATE_VIEW DELETE DROP_INDEX DROP_TABLE DROP_TEMP_INDEX "
    "DROP_TEMP_TABLE DROP_TEMP_TRIGGER DROP_TEMP_VIEW DROP_TRIGGER DROP_VIEW INSERT PRAGMA READ "
    "SELECT TRANSACTION UPDATE ATTACH DETACH ALTER_TABLE REINDEX ANALYZE CREATE_VTABLE "
    "DROP_VTABLE FUNCTION SAVEPOINT RECURSIVE").split()}


# One printf conversion: flags, width, precision (digits or `*`), length, type.
_SPEC = re.compile(r"%[-+ 0#!,]*(\d+|\*)?(?:\.(\d+|\*))?(?:ll|l)?(.)", re.DOTALL)


class _Printf:
    """SQLite's printf/format, refusing widths and precisions above the value limit.

    SQLite fills `%.*c` one character at a time even after its buffer hit the length limit
    (seconds per call, with no progress-handler check in between), so such a call is refused
    before it reaches SQLite. Valid calls run on a private in-memory connection.
    """

    def __init__(self, guard: _Guard, max_value_bytes: int) -> None:
        self.guard, self.limit = guard, max_value_bytes
        self.helper: sqlite3.Connection | None = None

    def __call__(self, fmt: Any = None, *args: Any) -> Any:
        if isinstance(fmt, str):
            self._check(fmt, args)
        if self.helper is None:
            self.helper = sqlite3.connect(":memory:")
            self.helper.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self.limit)
        marks = ", ".join("?" * (1 + len(args)))
        try:
            return self.helper.execute(f"SELECT printf({marks})", (fmt, *args)).fetchone()[0]
        except sqlite3.DataError:  # too big: the built-in answers NULL as well
            return None

    def _check(self, fmt: str, args: tuple[Any, ...]) -> None:
        i = 0
        for m in _SPEC.finditer(fmt):
            if m.group(3) == "%":
                continue
            for size in (m.group(1), m.group(2)):
                if size == "*":
                    size, i = (args[i] if i < len(args) else 0), i + 1
                try:
                    big = size is not None and abs(int(size)) > self.limit
                except (TypeError, ValueError):
                    big = False
                if big:
                    self.guard.too_big = (f"printf width or precision {size} is above the "
                                          f"limit of {self.limit:,}")
                    raise ValueError(self.guard.too_big)
            i += 1

    def close(self) -> None:
        if self.helper is not None:
            self.helper.close()


class _Guard:
    """Authorizer and progress handler of one query's connection."""

    def __init__(self, max_seconds: float, max_steps: int | None,
                 cancel: threading.Event) -> None:
        self.deadline = time.monotonic() + max_seconds
        self.max_seconds, self.max_steps, self.cancel = max_seconds, max_steps, cancel
        self.steps = 0
        self.denied: str | None = None
        self.too_big: str | None = None
        self.stopped: str | None = None

    def authorize(self, action: int, arg1: str | None, arg2: str | None,
                  db: str | None, source: str | None) -> int:
        if action in (sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE):
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _FUNCTIONS:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA and (arg1 or "").lower() in _PRAGMAS:
            return sqlite3.SQLITE_OK
        what = _ACTION_NAMES.get(action, f"action {action}")
        detail = arg2 if action == sqlite3.SQLITE_FUNCTION else arg1
        self.denied = self.denied or (f"{what} {detail}" if detail else what)
        return sqlite3.SQLITE_DENY

    def progress(self) -> int:
        self.steps += _CHECK_EVERY
        if self.cancel.is_set():
            self.stopped = "the call was cancelled"
        elif self.max_steps is not None and self.steps > self.max_steps:
            self.stopped = f"it ran more than {self.max_steps:,} steps (the limit)"
        elif time.monotonic() > self.deadline:
            self.stopped = f"it ran longer than {self.max_seconds:g} s (the limit)"
        return 1 if self.stopped else 0


def _cell(value: Any) -> str:
    if isinstance(value, bytes):
        return f"<blob, {len(value)} bytes>"
    text = str(value)
    if len(text) > _MAX_CELL_CHARS:
        return f"{text[:_MAX_CELL_CHARS]}... ({len(text):,} characters)"
    return text


def make_sql_query(path: str | Path, *, max_rows: int = 50, max_seconds: float = 5.0,
                   max_steps: int | None = 100_000_000, max_value_bytes: int = 100_000,
                   max_output_chars: int = 20_000) -> BaseTool:
    """A `sql_query(query)` tool over the SQLite database at `path`, read-only by construction.

    A query stops after `max_seconds` or `max_steps` SQLite VM steps; no value (stored or
    computed) may exceed `max_value_bytes` (also bounds a single function call's work); the
    answer shows at most `max_rows` rows and `max_output_chars` characters.
    """
    db = Path(path)
    if not db.is_file():
        raise ToolException(f"SQLite file {str(db)!r} does not exist")
    if not (max_rows > 0 and max_seconds > 0 and max_value_bytes > 0 and max_output_chars > 0):
        raise ValueError("make_sql_query limits must be positive")
    uri = f"file:{quote(str(db.resolve()))}?mode=ro"  # quoted: '?' or '#' in a path

    def run(query: str, cancel: threading.Event) -> str:
        if len(query) > MAX_SQL_CHARS:
            raise ToolException(f"query is too long ({len(query):,} characters; the limit is "
                                f"{MAX_SQL_CHARS:,})")
        guard = _Guard(max_seconds, max_steps, cancel)
        printf = _Printf(guard, max_value_bytes)
        conn = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=max_seconds)
        try:
            conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, max_value_bytes)
            conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, MAX_SQL_CHARS)
            conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)  # also what VACUUM INTO needs
            conn.execute("PRAGMA query_only = ON")
            conn.execute("PRAGMA trusted_schema = OFF")  # no unsafe functions from views
            for name in ("printf", "format"):
                conn.create_function(name, -1, printf, deterministic=True)
            conn.set_authorizer(guard.authorize)
            conn.set_progress_handler(guard.progress, _CHECK_EVERY)
            try:
                cur = conn.execute(query)
                names = [d[0] for d in cur.description or []]
                rows = cur.fetchmany(max_rows + 1) if names else []
            except sqlite3.Error as e:
                raise ToolException(_explain(e, guard, max_value_bytes)) from None
        finally:
            conn.close()
            printf.close()
        if not names:
            return "query returned no columns"
        lines = [" | ".join(names)]
        size = len(lines[0])
        for row in rows[:max_rows]:
            line = " | ".join(_cell(v) for v in row)
            size += len(line) + 1
            if size > max_output_chars:
                lines.append(f"... output cut at {max_output_chars:,} characters; select fewer "
                             "columns or rows")
                return "\n".join(lines)
            lines.append(line)
        if len(rows) > max_rows:
            lines.append(f"... more than {max_rows} rows; add a LIMIT or a WHERE")
        return "\n".join(lines)

    def sql_query(query: str) -> str:
        return run(query, threading.Event())

    async def asql_query(query: str) -> str:
        cancel = threading.Event()
        try:
            return await asyncio.to_thread(run, query, cancel)
        finally:
            cancel.set()  # a cancelled call stops its query at the next progress check

    tool = StructuredTool.from_function(func=sql_query, coroutine=asql_query, name="sql_query",
                                        description=_DESCRIPTION)
    tool.handle_tool_error = True  # the model sees why a query was refused or stopped
    tool.handle_validation_error = True
    return tool


def _explain(error: sqlite3.Error, guard: _Guard, max_value_bytes: int) -> str:
    """One line the model can act on."""
    if guard.stopped:
        return (f"SQL error: query stopped, {guard.stopped}; add a LIMIT, a narrower WHERE or "
                "a bound on the recursion")
    if guard.too_big:
        return f"SQL error: {guard.too_big}"
    if guard.denied:
        return (f"SQL error: refused {guard.denied}: this tool runs one read-only SELECT "
                "(the schema: SELECT sql FROM sqlite_master)")
    if "too big" in str(error):
        return f"SQL error: {error} (no value may exceed {max_value_bytes:,} bytes)"
    return f"SQL error: {error}"
