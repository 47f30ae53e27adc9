"""A throwaway PostgreSQL database for tests: created per test session, dropped at its end.

    from pg import pg_url  # noqa: F401  (the session fixture, in a test module)

or, for every test module at once, in tests/conftest.py:  pytest_plugins = ["pg"]

The server is `FRUGALFLOW_TEST_PG_URL` (default postgresql://postgres@127.0.0.1:5432/test,
which CI provides); when it does not answer, a throwaway server is started for the session
(tests/services.py). If neither can be had, the tests that need it FAIL, never skip.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from services import session
from sqlalchemy.engine import make_url

__all__ = ["ADMIN_URL", "create_database", "current_admin_url", "drop_database", "pg_url"]


def current_admin_url() -> str:
    """The session's PostgreSQL admin URL: FRUGALFLOW_TEST_PG_URL's server if it answers, else
    a throwaway one started now (raises `services.ServiceUnavailable` if neither can be had)."""
    return session.postgres_url()


def __getattr__(name: str) -> str:
    # `ADMIN_URL` is resolved on first use, so importing this module starts no server.
    if name == "ADMIN_URL":
        return current_admin_url()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _asyncpg_dsn(url: str) -> str:
    """asyncpg takes plain postgresql:// DSNs, without a SQLAlchemy driver suffix."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_database(admin_url: str | None = None) -> str:
    """Create an empty database `ff_test_<hex>` on the server of `admin_url` (default: the
    session's); its URL."""
    import asyncpg

    admin_url = admin_url or current_admin_url()
    name = f"ff_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(url: str, admin_url: str | None = None) -> None:
    """Drop the database of `url`, disconnecting whatever still uses it."""
    import asyncpg

    admin_url = admin_url or current_admin_url()
    name = make_url(url).database
    if not name or not name.startswith("ff_test_"):  # never drop anything we did not create
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_url(pg_admin_url: str) -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test session (dropped afterwards)."""
    # Its own event loop: a session fixture must not share the per-test loops.
    try:
        url = asyncio.run(create_database(pg_admin_url))
    except Exception as e:  # refused, unknown host, bad credentials, timeout...
        shown = make_url(pg_admin_url).render_as_string(hide_password=True)
        pytest.fail(
            f"PostgreSQL is required for this test but {shown} is unusable: "
            f"{type(e).__name__}: {e}. Start PostgreSQL (CI has it) or point "
            "FRUGALFLOW_TEST_PG_URL at a server where this user may CREATE DATABASE.",
            pytrace=False,
        )
    try:
        yield url
    finally:
        asyncio.run(drop_database(url, pg_admin_url))
