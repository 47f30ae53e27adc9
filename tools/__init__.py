"""Tools that agents call, as langchain-core tools. All work offline.

- `calculator`: safe arithmetic (no eval), every intermediate result bounded before computing.
- `make_document_search(folder)`: search over local text/markdown files (BM25-style scoring);
  no symlinks out of the folder, a size cap per file.
- `make_sql_query(path)`: read-only SQL over a SQLite file, read-only by construction, with
  time, step, value-size and row limits.
- `web_search`: needs the internet; fails with a clear error when offline.
"""

from .calculator import calculator
from .documents import make_document_search
from .sql import make_sql_query
from .web import web_search

__all__ = ["calculator", "make_document_search", "make_sql_query", "web_search"]
