"""Shared fixtures. Tests never reach the network: only loopback connections are allowed."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from frugalflow import BreakerRegistry, Catalog, FallbackPolicy, RunContext, RunUsage
from frugalflow.resilience import Breakers, default_breakers
from frugalflow.testing.simulator import simulator as _simulator

# the session's PostgreSQL and Redis servers, real or throwaway (tests/services.py), and the
# session-wide throwaway PostgreSQL database (tests/pg.py)
pytest_plugins = ["services", "pg"]

_real_connect = socket.socket.connect


def _guarded_connect(self: socket.socket, address: Any) -> Any:
    host = address[0] if isinstance(address, tuple) else address
    if isinstance(host, str) and not (
        host.startswith("127.") or host in ("localhost", "::1") or host.startswith("/")
    ):
        raise RuntimeError(f"test tried to reach the network ({address!r}); tests stay offline")
    return _real_connect(self, address)


@pytest.fixture(autouse=True, scope="session")
def _no_network() -> Iterator[None]:
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign]
    yield
    socket.socket.connect = _real_connect  # type: ignore[method-assign]


@pytest.fixture(autouse=True)
def sim() -> Iterator[Any]:
    """The process-wide simulator, reset around every test."""
    _simulator.reset(seed=0)
    yield _simulator
    _simulator.reset(seed=0)


@pytest.fixture(autouse=True)
async def _fresh_breakers() -> AsyncIterator[None]:
    """The process-wide breakers, closed around every test."""
    await default_breakers.areset()
    yield
    await default_breakers.areset()


@pytest.fixture(autouse=True)
def _no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY", "DEEPSEEK_API_KEY",
                 "MISTRAL_API_KEY", "GROQ_API_KEY", "TOGETHER_API_KEY", "OLLAMA_HOST",
                 "FRUGALFLOW_CATALOG"):
        monkeypatch.delenv(name, raising=False)


class FakeClock:
    """A monotonic clock tests move by hand; `sleep` advances it instead of waiting."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def catalog() -> Catalog:
    return Catalog.simulated()


@pytest.fixture
def make_ctx(catalog: Catalog, clock: FakeClock) -> Any:
    """Build a RunContext with its own breakers and a fake clock (no real sleeps)."""

    def make(
        *, budget: float | None = None, policy: FallbackPolicy | None = None,
        cat: Catalog | None = None, breakers: Breakers | None = None,
    ) -> RunContext:
        return RunContext(
            catalog=cat or catalog,
            policy=policy or FallbackPolicy(),
            breakers=breakers or BreakerRegistry(clock=clock),
            usage=RunUsage(budget_usd=budget, run_id="test-run"),
            sleep=clock.sleep,
        )

    return make


@pytest.fixture
async def fresh_pg_url(pg_admin_url: str) -> Any:
    """A PostgreSQL database of its own for one test (created and dropped around it)."""
    from pg import create_database, drop_database

    try:
        url = await create_database(pg_admin_url)
    except Exception as e:  # CI has PostgreSQL: an unusable server fails, never skips
        pytest.fail(f"PostgreSQL at {pg_admin_url} is required and unusable: {e!r}", pytrace=False)
    yield url
    await drop_database(url, pg_admin_url)


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
    """Each durable test runs on a SQLite file and on a PostgreSQL database of its own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'runs.db'}"
    return request.getfixturevalue("fresh_pg_url")  # type: ignore[no-any-return]
