"""Read-only SQL over a SQLite file: the connection itself refuses writes."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from langchain_core.tools import BaseTool, ToolException, tool


def make_sql_query(path: str | Path, *, max_rows: int = 50) -> BaseTool:
    """A `sql_query(query)` tool over the SQLite database at `path`, opened read-only."""
    db = Path(path)
    if not db.is_file():
        raise ToolException(f"SQLite file {str(db)!r} does not exist")
    uri = f"file:{db.resolve()}?mode=ro"

    @tool
    def sql_query(query: str) -> str:
        """Run one read-only SQL query (SELECT) on the database; returns rows as text."""
        with sqlite3.connect(uri, uri=True) as conn:  # mode=ro: writes fail in SQLite itself
            try:
                cur = conn.execute(query)
            except sqlite3.Error as e:
                raise ToolException(f"SQL error: {e}") from None
            names = [d[0] for d in cur.description or []]
            rows = cur.fetchmany(max_rows + 1)
        if not names:
            return "query returned no columns"
        lines = [" | ".join(names)] + [" | ".join(str(v) for v in r) for r in rows[:max_rows]]
        if len(rows) > max_rows:
            lines.append(f"... more than {max_rows} rows; add a LIMIT or a WHERE")
        return "\n".join(lines)

    sql_query.handle_tool_error = True
    return sql_query
