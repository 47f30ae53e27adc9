"""A run's deadline and its clock: the run-level default deadline (`Runner.start(deadline=)`)
parks nodes without their own, a node's own deadline wins over it, a node with
`Needs(deadline=timedelta(0))` never waits; every call is charged at the hour of the
runner's clock; a run cancelled while a worker picks it up is never executed.

Real parts as in tests/test_waiting_runs.py (whose clock and emulator fixtures these share):
the runner on SQLite and PostgreSQL, the SDKs talking HTTP to the provider emulator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from provider_clients import forget_provider_clients
from test_waiting_runs import Clock, emu, time_  # noqa: F401  (fixtures)
from waiting_flows import MODELS, nightly

from frugalflow import Runner, RunStatus
from frugalflow.statuses import BatchItemStatus
from frugalflow.testing.emulator import ProviderEmulator, emulated_catalog
from frugalflow.usage import Usage

DEEPSEEK = "deepseek/deepseek-chat"
PEAK = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc)
OFF_PEAK = datetime(2026, 11, 30, 17, 0, tzinfo=timezone.utc)  # DeepSeek's 16:30-00:30 UTC


@pytest.fixture
async def deepseek(db_url: str, emu: ProviderEmulator,  # noqa: F811
                   time_: Clock) -> AsyncIterator[Runner]:  # noqa: F811
    forget_provider_clients()
    catalog = emulated_catalog(emu, (DEEPSEEK,))
    runner = Runner(db_url, flows=[nightly(deadline=None)], catalog=catalog, clock=time_)
    yield runner
    await runner.close()
    await catalog.aclose()
    forget_provider_clients()


def usage_of(attempt: Any) -> Usage:
    return Usage(input_tokens=attempt.input_tokens, output_tokens=attempt.output_tokens,
                 requests=1)


# -- the runner's clock prices standard calls ---------------------------------------------------


@pytest.mark.parametrize("at", [PEAK, OFF_PEAK], ids=["peak", "off-peak"])
async def test_a_standard_call_is_charged_at_the_runner_clocks_hour(
        deepseek: Runner, time_: Clock, at: datetime) -> None:  # noqa: F811
    """DeepSeek's price halves in its off-peak hours: a call made at the runner's 17:00 pays
    half, one at its 10:00 the full price, whatever the wall clock says."""
    time_.now = at
    result = await deepseek.start("nightly", {"docs": ["now"]})
    assert result.status == RunStatus.SUCCEEDED, result.error
    attempts = (await deepseek.get(result.run_id)).attempts
    assert len(attempts) == 2 and all(a.tier is None for a in attempts)  # standard calls
    spec = deepseek.catalog[DEEPSEEK]
    for a in attempts:
        full = spec.cost(usage_of(a), at=PEAK)
        assert a.cost_usd == pytest.approx(full / 2 if at == OFF_PEAK else full)
        assert a.cost_usd == pytest.approx(spec.cost(usage_of(a), at=at))
