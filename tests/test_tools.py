from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from tools import calculator, make_document_search, make_sql_query, web_search


def test_calculator() -> None:
    assert calculator.invoke({"expression": "(1299 * 0.15) + 4.5"}) == "199.35"
    assert calculator.invoke({"expression": "2 ** 10"}) == "1024"
    assert "division by zero" in calculator.invoke({"expression": "1/0"})
    assert "unsupported" in calculator.invoke({"expression": "__import__('os')"})
    assert "too large" in calculator.invoke({"expression": "9 ** 99999"})


def test_document_search(tmp_path: Path) -> None:
    (tmp_path / "refunds.md").write_text("# Refunds\n\nRefunds are issued within 5 business days.\n\n"
                                         "Shipping is free over $50.")
    (tmp_path / "other.txt").write_text("Passwords can be reset from the login page.")
    search = make_document_search(tmp_path)
    out = search.invoke({"query": "how long do refunds take"})
    assert out.startswith("[refunds.md] Refunds: Refunds are issued within 5 business days")
    assert search.invoke({"query": "zzzz"}) == "no matching passage"


def test_sql_is_read_only(tmp_path: Path) -> None:
    db = tmp_path / "shop.db"
    with sqlite3.connect(db) as conn:
        conn.execute("create table orders (id integer, status text)")
        conn.execute("insert into orders values (1, 'shipped'), (2, 'open')")
    sql = make_sql_query(db)
    assert sql.invoke({"query": "select status from orders where id = 1"}) == "status\nshipped"
    assert "SQL error" in sql.invoke({"query": "delete from orders"})
    assert "SQL error" in sql.invoke({"query": "drop table orders"})
    with sqlite3.connect(db) as conn:
        assert conn.execute("select count(*) from orders").fetchone() == (2,)


def test_web_search_fails_clearly_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FRUGALFLOW_SEARCH_URL", raising=False)
    assert "needs internet access" in web_search.invoke({"query": "x"})
