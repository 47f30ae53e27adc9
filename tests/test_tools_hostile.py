"""Tools called with hostile arguments: bounded work, clear refusals, nothing outside the tool's
scope is touched (issue 11, item 7)."""

from __future__ import annotations

import ast
import asyncio
import importlib
import math
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

import tools.documents as documents
import tools.sql as sql
from tools import calculator, make_document_search, make_sql_query

calc = importlib.import_module("tools.calculator")  # `tools.calculator` is the tool object

# ---------------------------------------------------------------------------------- calculator

# Each hostile expression and a piece of the one-line message the model must see.
HOSTILE_EXPRESSIONS = {
    "((9**999)**999)**30": "too large",
    "9**99999": "too large",
    "2 ** (2**2000)": "too large",
    "10**999 * 10**999": "too large",
    "(10**500 + 1) * (10**500 + 1)": "too large",
    "round(5, -10**8)": "round() digits",
    "(-8) ** 0.5": "not a real number",
    "1e308 * 10": "too large",
    "1e999": "too large",
    "exp(1000)": "too large",
    "(10**999) / 3": "too large",
    "sqrt(10**999)": "too large",
    "(10**999) ** -999": "too large",
    "2.0 ** (2**3000)": "too large",
    "sqrt(-1)": "math domain error",
    "log(0)": "math domain error",
    "log(10, 1)": "division by zero",
    "1 / 0": "division by zero",
    "0 ** -1": "division by zero",
    "7 % 0": "division by zero",
    "sqrt(1, 2)": "invalid operation",
    "max()": "max() takes",
    "-" * 1999 + "1": "nested too deeply",
    "(" * 300 + "1" + ")" * 300: "not an arithmetic expression",
    "1+" * 999 + "1": "nested too deeply",
    "9" * 3000: "too long",
    "[1] * 10**9": "unsupported",
    "'a' * 10**9": "unsupported",
    "__import__('os').system('true')": "unsupported",
    "True + 1": "unsupported",
    "1j * 1j": "unsupported",
    "": "not an arithmetic expression",
    "1 +\x00 2": "not an arithmetic expression",
}

_ORACLE_BITS = 20_000  # far above the calculator's own limit, far below anything slow


class ComputedHugeValue(AssertionError):
    """Raised by the spy instead of computing an unbounded value (so a regression fails fast
    instead of freezing the test run)."""


def _spy_ops(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Wrap the calculator's operations: refuse (as a test failure) any int power or product
    whose result would exceed _ORACLE_BITS, and record the bit length of every int result."""
    sizes: list[int] = []

    def log2(x: Any) -> float:
        return math.log2(abs(x)) if x else 0.0

    def wrap(kind: type[ast.operator], op: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        def spied(a: Any, b: Any) -> Any:
            if isinstance(a, int) and isinstance(b, int):
                if kind is ast.Pow and b > 0 and abs(a) > 1 and (
                        b.bit_length() > 40 or b * log2(a) > _ORACLE_BITS):
                    raise ComputedHugeValue(f"computed {a}**{b}")
                if kind is ast.Mult and log2(a) + log2(b) > _ORACLE_BITS:
                    raise ComputedHugeValue("computed a huge product")
            result = op(a, b)
            if isinstance(result, int):
                sizes.append(result.bit_length())
            return result
        return spied

    monkeypatch.setattr(calc, "_BINARY", {k: wrap(k, v) for k, v in calc._BINARY.items()})
    real_round = calc._FUNCS["round"]

    def spied_round(x: Any, *nd: Any) -> Any:
        if nd and isinstance(nd[0], int) and nd[0] < -_ORACLE_BITS:
            raise ComputedHugeValue("round() with a huge negative digit count")
        return real_round(x, *nd)

    monkeypatch.setitem(calc._FUNCS, "round", spied_round)
    return sizes


def test_calculator_refuses_hostile_input_before_computing(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sizes = _spy_ops(monkeypatch)
    for expression, expected in HOSTILE_EXPRESSIONS.items():
        out = calculator.invoke({"expression": expression})
        assert expected in out, (expression[:40], out)
        assert "\n" not in out  # one line for the model
    # every integer actually computed stayed within the documented bound
    assert max(sizes) <= (calc.MAX_DIGITS + 2) * math.log2(10)


def test_calculator_bounds_are_exact_and_results_exact() -> None:
    assert calculator.invoke({"expression": "2**3321"}) == str(2**3321)  # 1000 digits
    assert "too large" in calculator.invoke({"expression": "2**3322"})  # 1001 digits
    assert calculator.invoke({"expression": "3**50"}) == str(3**50)  # exact, not a float
    assert calculator.invoke({"expression": "round(2.567, 2)"}) == "2.57"
    assert calculator.invoke({"expression": "(1)**(10**999)"}) == "1"
    assert calc.evaluate("2 ** 10") == 1024.0


def test_calculator_shows_bad_arguments_to_the_model() -> None:
    assert "validation error" in calculator.invoke({"expression": ["1"]})
    assert "validation error" in calculator.invoke({})


async def test_calculator_keeps_the_event_loop_running(monkeypatch: pytest.MonkeyPatch) -> None:
    """All hostile calls at once, from the loop: each returns its message, no huge value is
    computed, and a concurrent task keeps making progress meanwhile."""
    _spy_ops(monkeypatch)
    done = asyncio.Event()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while not done.is_set():
            ticks += 1
            await asyncio.sleep(0)

    tick_task = asyncio.create_task(ticker())
    outs = await asyncio.gather(*(calculator.ainvoke({"expression": e})
                                  for e in HOSTILE_EXPRESSIONS))
    ticks_during = ticks
    done.set()
    await tick_task
    assert [e in o for e, o in zip(HOSTILE_EXPRESSIONS.values(), outs)] == \
        [True] * len(outs)
    assert ticks_during > 0


# ------------------------------------------------------------------------------------------ SQL

@pytest.fixture
def shop(tmp_path: Path) -> Path:
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table orders (id integer primary key, status text, note text)")
        conn.executemany("insert into orders values (?, ?, ?)",
                         [(i, "open" if i % 2 else "shipped", "x" * 2000) for i in range(120)])
        conn.execute("create index orders_status on orders(status)")
    conn.close()
    return db


def _snapshot(db: Path) -> tuple[Any, ...]:
    conn = sqlite3.connect(db)
    try:
        return (conn.execute("select count(*), sum(id) from orders").fetchone(),
                conn.execute("select type, name, sql from sqlite_master order by name").fetchall(),
                conn.execute("pragma user_version").fetchone())
    finally:
        conn.close()


def test_sql_vacuum_into_and_attach_create_no_file(shop: Path, tmp_path: Path) -> None:
    tool = make_sql_query(shop)
    copy, new = tmp_path / "elsewhere" / "copy.db", tmp_path / "new.db"
    copy.parent.mkdir()
    out = tool.invoke({"query": f"VACUUM INTO '{copy}'"})
    assert out.startswith("SQL error: refused ATTACH") and "read-only SELECT" in out
    assert tool.invoke({"query": f"ATTACH DATABASE '{new}' AS x"}).startswith(
        "SQL error: refused ATTACH")
    assert "refused" in tool.invoke({"query": "VACUUM"})
    assert not copy.exists() and not new.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "shop.db"]


def test_sql_refuses_every_write_and_side_effect(shop: Path) -> None:
    before = _snapshot(shop)
    tool = make_sql_query(shop)
    refused = {
        "insert into orders values (999, 'x', '')": "INSERT orders",
        "update orders set status = 'lost'": "UPDATE orders",
        "delete from orders": "DELETE orders",
        "drop table orders": "DELETE sqlite_master",
        "create table t (a)": "INSERT sqlite_master",
        "create temp table t (a)": "INSERT sqlite_temp_master",
        "alter table orders add column c": "ALTER TABLE",
        "pragma user_version = 7": "PRAGMA user_version",
        "pragma writable_schema = 1": "PRAGMA writable_schema",
        "pragma query_only = 0": "PRAGMA query_only",
        "begin immediate": "TRANSACTION",
        "savepoint s": "SAVEPOINT",
        "reindex orders_status": "REINDEX",
        "analyze": "sqlite_master",
        "detach main": "DETACH",
        "select load_extension('/tmp/evil.so')": "FUNCTION load_extension",
        "select randomblob(900000000)": "FUNCTION randomblob",
        "select length(zeroblob(900000000))": "FUNCTION zeroblob",
    }
    for query, what in refused.items():
        out = tool.invoke({"query": query})
        assert out.startswith("SQL error: refused") and what in out, (query, out)
    assert _snapshot(shop) == before


def test_sql_refuses_multiple_statements(shop: Path) -> None:
    before = _snapshot(shop)
    tool = make_sql_query(shop)
    out = tool.invoke({"query": "select 1; delete from orders"})
    assert out == "SQL error: You can only execute one statement at a time."
    assert "SQL error" in tool.invoke({"query": "select 1 \x00; delete from orders"})
    assert _snapshot(shop) == before


def test_sql_recursive_cte_stops_at_the_step_budget(shop: Path) -> None:
    forever = "with recursive r(x) as (select 1 union all select x + 1 from r) " \
              "select count(*) from r"
    out = make_sql_query(shop, max_steps=1_000_000).invoke({"query": forever})
    assert out.startswith("SQL error: query stopped, it ran more than 1,000,000 steps")


def test_sql_recursive_cte_stops_at_the_time_budget(shop: Path) -> None:
    forever = "with recursive r(x) as (select 1 union all select x + 1 from r) select max(x) from r"
    started = time.monotonic()
    out = make_sql_query(shop, max_seconds=0.2, max_steps=None).invoke({"query": forever})
    elapsed = time.monotonic() - started
    assert out.startswith("SQL error: query stopped, it ran longer than 0.2 s")
    assert elapsed < 10  # measured, not waited for: an unbounded query would never return


def test_sql_values_cannot_grow_past_the_length_limit(shop: Path) -> None:
    tool = make_sql_query(shop, max_value_bytes=100_000)
    # printf('%.*c') fills character by character even past the limit; refused up front
    out = tool.invoke({"query": "select length(printf('%.*c', 900000000, 'x'))"})
    assert out == "SQL error: printf width or precision 900000000 is above the limit of 100,000"
    assert "above the limit" in tool.invoke({"query": "select format('%.2147483647c', 'x')"})
    assert "above the limit" in tool.invoke({"query": "select printf('%*d', 10000000, 1)"})
    out = tool.invoke({"query": "select length(replace(hex(printf('%.*c', 60000, 'x')), "
                                "'7', '77'))"})
    assert out.startswith("SQL error: string or blob too big (no value may exceed 100,000")
    # within the limit printf behaves as SQLite's own
    assert tool.invoke({"query": "select printf('%.2f|%5d|%.*c|%%', 3.14159, 42, 3, 'z')"}) \
        .endswith("\n3.14|   42|zzz|%")
    assert tool.invoke({"query": "select length(printf('%.*c', 1000, 'y'))"}).endswith("\n1000")


def test_sql_normal_select_with_caps(shop: Path) -> None:
    tool = make_sql_query(shop, max_rows=50)
    out = tool.invoke({"query": "select id, status from orders order by id"}).splitlines()
    assert out[0] == "id | status" and out[1] == "0 | shipped" and out[50] == "49 | open"
    assert out[51] == "... more than 50 rows; add a LIMIT or a WHERE" and len(out) == 52
    assert tool.invoke({"query": "select count(*) from orders where status = 'open'"}) == \
        "count(*)\n60"
    info = tool.invoke({"query": "pragma table_info(orders)"}).splitlines()
    assert info[0].startswith("cid | name | type") and len(info) == 4
    assert "CREATE TABLE orders" in tool.invoke({"query": "select sql from sqlite_master"})
    assert tool.invoke({"query": "with recursive r(x) as (select 1 union all select x + 1 "
                                 "from r where x < 10) select sum(x) from r"}) == "sum(x)\n55"
    cell = tool.invoke({"query": "select note from orders limit 1"}).splitlines()[1]
    assert cell == "x" * 500 + "... (2,000 characters)"  # long values cut for the model
    capped = make_sql_query(shop, max_rows=1000, max_output_chars=5000)
    out = capped.invoke({"query": "select * from orders"})
    assert len(out) <= 5000 + 100 and out.endswith("select fewer columns or rows")
    assert "<blob, 3 bytes>" in tool.invoke({"query": "select x'010203'"})


def test_sql_arguments_of_the_wrong_shape_reach_the_model(shop: Path) -> None:
    tool = make_sql_query(shop)
    assert "validation error" in tool.invoke({"query": {"sql": "select 1"}})
    assert "too long" in tool.invoke({"query": "select 1" + " " * sql.MAX_SQL_CHARS})


async def test_sql_runs_off_the_loop_and_stops_when_cancelled(
        shop: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The async tool runs its query in a thread; cancelling the call stops the query."""
    running, stopped = threading.Event(), threading.Event()
    reasons: list[str | None] = []
    real_progress = sql._Guard.progress

    def progress(self: sql._Guard) -> int:
        running.set()
        verdict = real_progress(self)
        if verdict:
            reasons.append(self.stopped)
            stopped.set()
        return verdict

    monkeypatch.setattr(sql._Guard, "progress", progress)
    tool = make_sql_query(shop, max_seconds=600, max_steps=None)
    call = asyncio.create_task(tool.ainvoke({"query": "with recursive r(x) as (select 1 union "
                                                      "all select x + 1 from r) select max(x) "
                                                      "from r"}))
    assert await asyncio.to_thread(running.wait, 30)  # the query runs, the loop is free
    ticks = 0
    for _ in range(100):
        ticks += 1
        await asyncio.sleep(0)
    assert ticks == 100 and not call.done()
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await asyncio.to_thread(stopped.wait, 30)
    assert reasons == ["the call was cancelled"]


def test_sql_path_with_uri_characters(tmp_path: Path) -> None:
    odd = tmp_path / "a?mode=rwc#x%20"
    odd.mkdir()
    db = odd / "d.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table t (a)")
    conn.close()
    assert make_sql_query(db).invoke({"query": "select count(*) from t"}) == "count(*)\n0"


# ------------------------------------------------------------------------------------ documents

@pytest.fixture
def kb(tmp_path: Path) -> tuple[Path, Path]:
    root, outside = tmp_path / "kb", tmp_path / "outside"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "refunds.md").write_text("# Refunds\n\nRefunds are issued within 5 business days.")
    (outside / "passwd").write_text("root:x:0:0:zebrasecret:/root:/bin/bash\n")
    (outside / "notes.md").write_text("The outside folder holds a giraffesecret.")
    return root, outside


def test_documents_do_not_follow_symlinks_out_of_the_root(kb: tuple[Path, Path]) -> None:
    root, outside = kb
    (root / "passwd.txt").symlink_to(outside / "passwd")  # a file outside
    (root / "sub" / "rel.md").symlink_to(Path("..") / ".." / "outside" / "notes.md")
    (root / "linked_dir").symlink_to(outside, target_is_directory=True)  # a directory outside
    (root / "up").symlink_to(Path(".."), target_is_directory=True)  # the root's parent
    (root / "dangling.md").symlink_to(root / "nowhere.md")
    (root / "alias.md").symlink_to(root / "refunds.md")  # inside: indexed once
    index = documents.DocumentIndex(root)
    assert index.passages == [("refunds.md", "Refunds: Refunds are issued within 5 business days.")]
    assert {p for p, _ in index.skipped} == {"passwd.txt", "sub/rel.md", "linked_dir", "up",
                                             "dangling.md"}
    search = make_document_search(root)
    assert search.invoke({"query": "zebrasecret root bash"}) == "no matching passage"
    assert search.invoke({"query": "giraffesecret outside"}) == "no matching passage"
    assert search.invoke({"query": "refunds"}).startswith("[refunds.md] Refunds:")


def test_documents_refuse_a_root_that_escapes_through_a_symlink(kb: tuple[Path, Path]) -> None:
    root, outside = kb
    (root / "linked_dir").symlink_to(outside / "..", target_is_directory=True)
    with pytest.raises(documents.ToolException, match="leaves through a symlink"):
        make_document_search(root / "sub" / ".." / "linked_dir" / "..")
    # a plain '..' through real directories is fine
    assert make_document_search(root / "sub" / "..").invoke({"query": "refunds"}) \
        .startswith("[refunds.md]")


def test_documents_skip_large_files_without_reading_them(
        kb: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = kb
    huge = root / "sub" / "huge.txt"
    with open(huge, "wb") as f:
        f.truncate(400 * 1024 * 1024)  # sparse: 400 MB apparent, no disk used
    (root / "medium.md").write_text("medium " * 1000)  # 7,000 bytes
    os.mkfifo(root / "pipe.txt")  # opening it for reading would block
    read: list[str] = []
    real_read = documents._read_bounded

    def spy(path: Path, limit: int, expect: os.stat_result) -> str | None:
        read.append(path.name)
        return real_read(path, limit, expect)

    monkeypatch.setattr(documents, "_read_bounded", spy)
    index = documents.DocumentIndex(root, max_file_bytes=5000)
    assert dict(index.skipped) == {
        "sub/huge.txt": "larger than 5,000 bytes (419,430,400)",
        "medium.md": "larger than 5,000 bytes (7,000)",
        "pipe.txt": "not a regular file"}
    assert read == ["refunds.md"]
    total = documents.DocumentIndex(root, max_file_bytes=10_000, max_total_bytes=7_000)
    assert dict(total.skipped)["refunds.md"] == "over the folder's total of 7,000 bytes"


def test_document_search_bounds_the_query(kb: tuple[Path, Path]) -> None:
    search = make_document_search(kb[0])
    assert "too long" in search.invoke({"query": "refunds " * 1000})
    assert "validation error" in search.invoke({"query": None})
    many = " ".join(f"w{i}" for i in range(300)) + " refunds"
    assert search.invoke({"query": many}) == "no matching passage"  # 64 distinct terms scored
    assert search.invoke({"query": "refunds " + many}).startswith("[refunds.md]")


def test_readme_limits_are_the_defaults(shop: Path, kb: tuple[Path, Path]) -> None:
    """The limits the README states are the tools' defaults."""
    import inspect

    assert calc.MAX_DIGITS == 1000
    params = inspect.signature(make_sql_query).parameters
    assert (params["max_seconds"].default, params["max_steps"].default) == (5.0, 100_000_000)
    tool = make_sql_query(shop)
    assert tool.invoke({"query": "select length(printf('%.*c', 100001, 'x'))"}).endswith(
        "above the limit of 100,000")
    assert tool.invoke({"query": "select id from orders"}).splitlines()[-1] == \
        "... more than 50 rows; add a LIMIT or a WHERE"
    root, _ = kb
    with open(root / "big.md", "wb") as f:
        f.truncate(2_000_001)
    assert dict(documents.DocumentIndex(root).skipped) == {
        "big.md": "larger than 2,000,000 bytes (2,000,001)"}
