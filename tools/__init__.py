"""Tools that agents call, as langchain-core tools. All work offline.

- `calculator`: safe arithmetic (no eval).
- `make_document_search(folder)`: search over local text/markdown files (BM25-style scoring).
- `make_sql_query(path)`: read-only SQL over a SQLite file.
- `web_search`: needs the internet; fails with a clear error when offline.
"""

from .calculator import calculator
from .documents import make_document_search
from .sql import make_sql_query
from .web import web_search

__all__ = ["calculator", "make_document_search", "make_sql_query", "web_search"]
