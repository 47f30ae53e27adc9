"""A throwaway PostgreSQL database for tests: created per test session, dropped at its end.

    from pg import pg_url  # noqa: F401  (the session fixture, in a test module)

or, for every test module at once, in tests/conftest.py:  pytest_plugins = ["pg"]

The server is `FRUGALFLOW_TEST_PG_URL` (default postgresql://postgres@127.0.0.1:5432/test,
which CI provides). An unreachable server FAILS the tests that need it, never skips them.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy.engine import make_url

__all__ = ["ADMIN_URL", "create_database", "drop_database", "pg_url"]

ADMIN_URL = os.environ.get("FRUGALFLOW_TEST_PG_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _asyncpg_dsn(url: str) -> str:
    """asyncpg takes plain postgresql:// DSNs, without a SQLAlchemy driver suffix."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def create_database(admin_url: str = ADMIN_URL) -> str:
    """Create an empty database `ff_test_<hex>` on the server of `admin_url`; its URL."""
    import asyncpg

    name = f"ff_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def drop_database(url: str, admin_url: str = ADMIN_URL) -> None:
    """Drop the database of `url`, disconnecting whatever still uses it."""
    import asyncpg

    name = make_url(url).database
    if not name or not name.startswith("ff_test_"):  # never drop anything we did not create
        raise ValueError(f"refusing to drop {name!r}: not a test database")
    conn = await asyncpg.connect(_asyncpg_dsn(admin_url), timeout=10)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """URL of a fresh PostgreSQL database for this test session (dropped afterwards)."""
    # Its own event loop: a session fixture must not share the per-test loops.
    try:
        url = asyncio.run(create_database())
    except Exception as e:  # refused, unknown host, bad credentials, timeout...
        shown = make_url(ADMIN_URL).render_as_string(hide_password=True)
        pytest.fail(
            f"PostgreSQL is required for this test but {shown} is unusable: "
            f"{type(e).__name__}: {e}. Start PostgreSQL (CI has it) or point "
            "FRUGALFLOW_TEST_PG_URL at a server where this user may CREATE DATABASE.",
            pytrace=False,
        )
    try:
        yield url
    finally:
        asyncio.run(drop_database(url))
