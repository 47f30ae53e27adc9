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


# -- the run's default deadline ------------------------------------------------------------------


@pytest.fixture
async def runner(db_url: str, emu: ProviderEmulator,  # noqa: F811
                 time_: Clock) -> AsyncIterator[Runner]:  # noqa: F811
    """Nightly enrichment whose enrich node has no deadline of its own (`nightly`), and the
    same with its own 6 hours (`nightly6`)."""
    forget_provider_clients()
    catalog = emulated_catalog(emu, MODELS)
    r = Runner(db_url, flows=[nightly(deadline=None), nightly(name="nightly6")],
               catalog=catalog, clock=time_, deadline_margin=timedelta(minutes=20))
    yield r
    await r.close()
    await catalog.aclose()
    forget_provider_clients()


async def test_a_run_default_deadline_parks_the_nodes_without_their_own(
        runner: Runner, emu: ProviderEmulator, time_: Clock) -> None:  # noqa: F811
    """Enrich has no deadline: started with 6 hours it parks on a batch due then; summarize
    says it may not wait (`Needs(deadline=timedelta(0))`) and is called at once."""
    emu.batches.script("openai", delay=None, times=None)
    started = time_.now
    result = await runner.start("nightly", {"docs": ["a", "b"]}, deadline=timedelta(hours=6))
    assert result.status == RunStatus.WAITING, result.error
    assert (await runner.get(result.run_id)).run.deadline_at == started + timedelta(hours=6)
    items = await runner.parked.all_items(result.run_id)
    assert [(i.node, i.tier, i.status) for i in items] == [
        ("enrich", "batch", BatchItemStatus.QUEUED)] * 2
    assert all(i.deadline_at == started + timedelta(hours=6) for i in items)
    assert emu.requests == []  # nothing called synchronously

    poll = runner.batch_poller(gather=0, poll_every=0, claim_for=60)
    await poll.tick()
    emu.batches.release()
    assert (await poll.tick()).woken == [result.run_id]
    final = await runner.wait(result.run_id)
    assert final.status == RunStatus.SUCCEEDED, final.error
    attempts = (await runner.get(result.run_id)).attempts
    assert [a.tier for a in attempts if a.node == "enrich"] == ["batch", "batch"]
    [summary] = [a for a in attempts if a.node == "summarize"]
    assert summary.tier is None  # standard, though the run's deadline would have let it wait
    assert [i.node for i in await runner.parked.all_items(result.run_id)] == ["enrich"] * 2
    assert [r.model for r in emu.requests] == [summary.model.split("/", 1)[1]]


async def test_without_a_run_deadline_a_node_without_its_own_never_waits(
        runner: Runner, emu: ProviderEmulator) -> None:
    result = await runner.start("nightly", {"docs": ["a"]})
    assert result.status == RunStatus.SUCCEEDED, result.error
    assert await runner.parked.all_items(result.run_id) == []
    assert (await runner.get(result.run_id)).run.deadline_at is None


@pytest.mark.parametrize("run_deadline", [timedelta(minutes=30), timedelta(days=1)],
                         ids=["shorter", "longer"])
async def test_a_nodes_own_deadline_wins_over_the_run_default(
        runner: Runner, emu: ProviderEmulator, time_: Clock,  # noqa: F811
        run_deadline: timedelta) -> None:
    """Enrich's own 6 hours, whatever the run's default: a batch (which 30 minutes would not
    allow) due 6 hours after the start (not a day)."""
    emu.batches.script("openai", delay=None, times=None)
    started = time_.now
    result = await runner.start("nightly6", {"docs": ["a"]}, deadline=run_deadline)
    assert result.status == RunStatus.WAITING, result.error
    [item] = await runner.parked.all_items(result.run_id)
    assert item.node == "enrich" and item.tier == "batch"
    assert item.deadline_at == started + timedelta(hours=6)


KEYS = {k: "test-key" for k in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GOOGLE_API_KEY",
                                 "DEEPSEEK_API_KEY")}


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in catalog's providers configured (explain prices them; nothing is called)."""
    for k, v in KEYS.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("FRUGALFLOW_CATALOG", raising=False)


def test_a_node_that_answers_now_ranks_as_without_a_deadline(keys: None) -> None:
    """`Needs(deadline=timedelta(0))`: valid (a negative one is not), described, and what
    `explain` shows for it under a run's default is the plan without a deadline."""
    from frugalflow import Catalog, Needs
    from frugalflow.costs_cli import explain_plan, node_deadline

    now = Needs(deadline=timedelta(0))
    assert now.answers_now and not Needs().answers_now
    assert not Needs(deadline=timedelta(hours=1)).answers_now
    assert "answers now" in now.describe()
    with pytest.raises(ValueError, match="deadline"):
        Needs(deadline=timedelta(seconds=-1))
    assert node_deadline(now, 6 * 3600) is None
    compiled = nightly().compile(Catalog.builtin())
    plan = explain_plan(compiled, 1000, 6 * 3600)
    assert all("tier" not in row for row in plan["summarize"])
    assert any(row.get("tier") == "batch" and row.get("chosen") for row in plan["enrich"])


# -- explain and the command line follow the runtime ---------------------------------------------


def test_explain_deadline_is_the_run_default_and_a_nodes_own_wins(keys: None) -> None:
    """`explain nightly_enrichment --deadline 20m`: enrich keeps its own 6 hours (a batch is
    chosen, as at run time), summarize answers now (no tiers); --help says so."""
    from typer.testing import CliRunner

    from frugalflow.cli import app

    cli = CliRunner()
    out = cli.invoke(app, ["explain", "nightly_enrichment", "--deadline", "20m", "--json"])
    assert out.exit_code == 0, out.output
    import json

    plan = json.loads(out.output)
    [chosen] = [r for r in plan["enrich"] if r.get("chosen")]
    assert chosen["tier"] == "batch"
    assert all("tier" not in r for r in plan["summarize"])
    text = cli.invoke(app, ["explain", "nightly_enrichment", "--deadline", "20m"],
                      terminal_width=200).output
    assert "[batch]" in text.split("summarize", 1)[0]
    help_text = " ".join(cli.invoke(app, ["explain", "--help"], terminal_width=200).output.split())
    assert "own deadline wins" in help_text


def test_frugalflow_run_deadline_sets_the_runs_default(tmp_path: Any) -> None:
    import asyncio
    import json

    from typer.testing import CliRunner

    from frugalflow.cli import app
    from frugalflow.persistence import Store
    from frugalflow.persistence.ledger import Ledger

    db = f"sqlite:///{tmp_path / 'runs.db'}"
    cli = CliRunner()
    out = cli.invoke(app, ["run", "support_triage", "-i", '{"ticket": "Order 12 is late"}',
                           "--db", db, "--json", "--deadline", "1h30m"])
    assert out.exit_code == 0, out.output
    run_id = json.loads(out.output)["run_id"]

    async def row() -> Any:
        store = Store(db, create=False)
        try:
            return await Ledger(store).get_run(run_id)
        finally:
            await store.close()

    run = asyncio.run(row())
    assert run.deadline_at - run.created_at == timedelta(hours=1, minutes=30)
    bad = cli.invoke(app, ["run", "support_triage", "--db", db, "--deadline", "soon"])
    assert bad.exit_code == 2
    lines = [line for line in bad.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "--deadline" in lines[0] and "not a duration" in lines[0], bad.output


# -- a cancel while an executor picks the run up -------------------------------------------------


def cancel_before_running(executor: Runner, canceller: Runner,
                          monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Make `canceller` (another process's view, e.g. the service) cancel the run while
    `executor` has read it and not yet written `running`: inside its context's building,
    which comes between the two."""
    cancelled: list[str] = []
    build = executor._context

    async def context(compiled: Any, row: Any, continuation: bool) -> Any:
        if continuation and not cancelled:
            cancelled.append(str((await canceller.cancel(row.id)).status))
        return await build(compiled, row, continuation)

    monkeypatch.setattr(executor, "_context", context)
    return cancelled


async def test_a_run_cancelled_as_its_executor_picks_it_up_is_never_executed(
        db_url: str, runner: Runner, emu: ProviderEmulator, time_: Clock,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A woken run is cancelled between its executor's read and its `running`: it stays
    cancelled, and its given-up batch items are not called synchronously instead."""
    emu.batches.script("openai", delay=None, times=None)
    result = await runner.start("nightly6", {"docs": ["a", "b"]})
    assert result.status == RunStatus.WAITING, result.error
    other = Runner(db_url, flows=[nightly(name="nightly6")], catalog=runner.catalog,
                   clock=time_)
    try:
        seen = cancel_before_running(runner, other, monkeypatch)
        after = await runner.resume(result.run_id)
        assert seen == ["cancelled"]
        assert after.status == RunStatus.CANCELLED, after.error
    finally:
        await other.close()
    record = await runner.get(result.run_id)
    assert record.run.status == RunStatus.CANCELLED
    assert record.attempts == [] and emu.requests == []  # nothing called, nothing paid
    items = await runner.parked.all_items(result.run_id)
    assert [i.status for i in items] == [BatchItemStatus.ABANDONED] * 2


async def test_with_workers_a_run_cancelled_after_its_delivery_is_never_executed(
        fresh_pg_url: str, emu: ProviderEmulator, time_: Clock,  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The dispatcher delivers a woken run to a worker; the service cancels it before the
    worker writes `running`: the worker leaves it cancelled and calls nothing."""
    from frugalflow.scale.dispatch import ProcrastinateDispatcher

    emu.batches.script("openai", delay=None, times=None)
    forget_provider_clients()
    catalog = emulated_catalog(emu, MODELS)
    flows = [nightly(name="nightly6")]
    service = Runner(fresh_pg_url, flows=flows, catalog=catalog, clock=time_,
                     dispatcher=ProcrastinateDispatcher(fresh_pg_url))
    worker = Runner(fresh_pg_url, flows=flows, catalog=catalog, clock=time_,
                    dispatcher=ProcrastinateDispatcher(fresh_pg_url))
    dispatcher = worker.dispatcher
    assert isinstance(dispatcher, ProcrastinateDispatcher)
    dispatcher.runner = worker

    async def deliver() -> None:  # the worker takes what is queued now, then returns
        await dispatcher.app.run_worker_async(queues=[dispatcher.queue], wait=False,
                                              install_signal_handlers=False,
                                              listen_notify=False)

    try:
        await worker.setup()
        run_id = (await service.start("nightly6", {"docs": ["a", "b"]}, wait=False)).run_id
        await deliver()
        assert (await service.get(run_id)).run.status == RunStatus.WAITING
        seen = cancel_before_running(worker, service, monkeypatch)
        assert (await service.resume(run_id, wait=False)).status == RunStatus.QUEUED  # woken
        await deliver()
        assert seen == ["cancelled"]
        record = await service.get(run_id)
        assert record.run.status == RunStatus.CANCELLED
        assert record.attempts == [] and emu.requests == []
        assert await dispatcher.status(run_id) == "succeeded"  # its job done, not retried
    finally:
        await worker.close()
        await service.close()
        await catalog.aclose()
        forget_provider_clients()
