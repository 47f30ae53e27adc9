"""Which errors mean "the database is unreachable or busy" (retry) rather than "this is wrong"."""

from __future__ import annotations

import asyncio
import sqlite3

from sqlalchemy.exc import (
    DBAPIError,
    InterfaceError,
    OperationalError,
    PendingRollbackError,
    ResourceClosedError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

from ..exceptions import StoreUnavailableError

__all__ = ["is_transient"]


# Error texts of SQLite that mean "busy or unreachable", not "your statement is wrong".
_SQLITE_TRANSIENT = ("database is locked", "database is busy", "database table is locked",
                     "unable to open database", "disk i/o error")


def is_transient(error: BaseException) -> bool:
    """Whether `error` means the database is unreachable or busy (a retry may succeed), as
    opposed to a bad statement or a constraint: connection errors of asyncpg, psycopg and
    aiosqlite/sqlite3, as raised by the drivers or wrapped by SQLAlchemy."""
    if isinstance(error, (StoreUnavailableError, OSError, asyncio.TimeoutError, PoolTimeoutError,
                          PendingRollbackError, ResourceClosedError)):
        return True
    if isinstance(error, DBAPIError):
        if error.connection_invalidated:
            return True
        orig = error.orig if error.orig is not None else error
        if isinstance(orig, sqlite3.Error) or "sqlite" in type(orig).__module__:
            return any(t in str(orig).lower() for t in _SQLITE_TRANSIENT)
        if isinstance(error, (InterfaceError, OperationalError)):
            return True
        return _driver_transient(orig)
    if isinstance(error, sqlite3.OperationalError):  # raw driver (lean statements)
        return any(t in str(error).lower() for t in _SQLITE_TRANSIENT)
    return _driver_transient(error)


def _driver_transient(error: BaseException) -> bool:
    module = type(error).__module__
    if module.startswith("asyncpg"):
        import asyncpg

        return isinstance(error, (asyncpg.exceptions.PostgresConnectionError,
                                  asyncpg.exceptions.InterfaceError,
                                  asyncpg.exceptions.CannotConnectNowError))
    if module.startswith("psycopg"):
        import psycopg

        return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError))
    return False
