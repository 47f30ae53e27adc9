"""Kill a run mid-call and resume it in a new process; keep secrets out of everything at rest."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from durable_flows import _latency_catalog, chain_flow
from sqlalchemy import select

from frugalflow import Catalog, ModelSpec
from frugalflow.resilience import BreakerRegistry
from frugalflow.persistence import Store
from frugalflow.persistence import tables as t
from frugalflow.runner import Runner

HERE = Path(__file__).resolve().parent


def _worker(command: str, url: str, run_id: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(HERE)}
    return subprocess.Popen(
        [sys.executable, str(HERE / "durable_flows.py"), command, url, run_id],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


@pytest.mark.slow
async def test_sigkill_mid_call_then_resume_elsewhere_never_repays(db_url: str) -> None:
    run_id = uuid.uuid4().hex
    proc = _worker("start", db_url, run_id)
    assert proc.stdout is not None
    seen = []
    store = Store(db_url)
    runner = Runner(store, flows=[chain_flow()], catalog=_latency_catalog(),
                    breakers=BreakerRegistry())
    for line in proc.stdout:  # blocks on the child's output: no sleeps
        seen.append(line.strip())
        if line.strip() == "calling n4":
            break
    # The call is sent once it is written down (the ledger's `pending` row): wait for that
    # row (another process writes it), then kill while the call (KILL_WINDOW s) is in flight.
    deadline = time.monotonic() + 20
    while not any(a.node == "n4" for a in (await runner.get(run_id)).attempts):
        assert time.monotonic() < deadline, "n4's call was never written down"
        await asyncio.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=30)  # also closes the pipes
    assert proc.returncode == -signal.SIGKILL, (seen, err)

    crashed = await runner.get(run_id)
    assert crashed.run.status == "running"  # the crash left it mid-run
    # n4's call was written down before it was sent: it may have been paid.
    assert [(a.node, a.outcome) for a in crashed.attempts] == [
        ("n1", "ok"), ("n2", "ok"), ("n3", "ok"), ("n4", "pending")]

    resumer = _worker("resume", db_url, run_id)
    out, err = resumer.communicate(timeout=60)
    assert resumer.returncode == 0, err
    assert "calling n1" not in out and "calling n3" not in out  # completed nodes never rerun
    assert "calling n4" in out and "finished succeeded" in out

    record = await runner.get(run_id)
    assert record.run.status == "succeeded"
    calls = [a.node for a in record.attempts if a.outcome == "ok"]
    assert calls == ["n1", "n2", "n3", "n4", "n5"]  # each completed call exactly once
    assert len({a.call_id for a in record.attempts}) == len(record.attempts)
    # The call the crash cut short is settled at its estimated cost, never lost.
    cut = [a for a in record.attempts if a.outcome != "ok"]
    assert [(a.node, a.outcome) for a in cut] == [("n4", "abandoned")]
    assert cut[0].cost_usd > 0 and cut[0].usage_estimated and cut[0].input_tokens > 0
    assert record.run.cost_usd == pytest.approx(sum(a.cost_usd for a in record.attempts))
    # No node row is left `running` by the dead executor: each node is done once; n4, killed
    # mid-call, ran again (as the same task, or as a new one with the old row abandoned).
    done = sorted(n.node for n in record.nodes if n.status == "done")
    assert done == ["n1", "n2", "n3", "n4", "n5"]
    assert [n.node for n in record.nodes if n.status != "done"] in ([], ["n4"])
    assert {n.status for n in record.nodes} <= {"done", "abandoned"}
    assert all(n.cost_usd == pytest.approx(sum(a.cost_usd for a in record.attempts
                                               if a.task_id == n.id))
               for n in record.nodes)
    final = record.run.output

    # The same input run uninterrupted gives the same final state.
    reference = await runner.start("chain", {"topic": "durability"})
    assert reference.state == final
    await runner.close()


async def test_no_secret_reaches_checkpoints_ledger_logs_or_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-planted-" + uuid.uuid4().hex
    monkeypatch.setenv("OPENAI_API_KEY", secret)
    pytest.importorskip("langchain_openai")
    # A real OpenAI client (holding the key) pointed at a closed local port fails with a
    # connection error, so every call falls back to a simulated model.
    dead = ModelSpec(provider="openai", model="gpt-4o-mini", base_url="http://127.0.0.1:9/v1",
                     input_price=0.0, output_price=0.0,
                     capabilities={"tool_calling": True, "structured_output": True},
                     quality={"classification": 0.9})
    catalog = Catalog([dead, *Catalog.simulated()], name="mixed")
    db = tmp_path / "secrets.db"
    runner = Runner(f"sqlite:///{db}", flows=[chain_flow(2)], catalog=catalog,
                    breakers=BreakerRegistry())
    caplog.set_level(logging.DEBUG)
    ok = await runner.start("chain", {"topic": "secrets"})
    assert ok.ok
    failing = await runner.start("chain", {"topic": "x"}, budget=0.0000001)
    assert failing.status == "budget_exceeded"
    record = await runner.get(ok.run_id)
    assert any(a.provider == "openai" and a.error_class == "connection" for a in record.attempts)

    dumped = []
    async with runner.store.read() as conn:
        for table in t.metadata.sorted_tables:
            for row in (await conn.execute(select(table))).all():
                dumped.append(repr(tuple(row)))
    await runner.close()
    everything = "\n".join(dumped)
    assert "secrets" in everything  # the scan does see the data
    assert secret not in everything
    assert secret not in caplog.text
    for path in tmp_path.iterdir():
        assert secret.encode() not in path.read_bytes(), path.name


def test_scrub_redacts_secret_keys_and_values() -> None:
    from frugalflow.persistence.ledger import scrub

    out = scrub({"api_key": "x", "nested": {"Authorization": "Bearer abc"},
                 "input_tokens": 5, "note": "key sk-abcdefghijklmnop here", "list": [{"token": 1}]})
    assert out == {"api_key": "[redacted]", "nested": {"Authorization": "[redacted]"},
                   "input_tokens": 5, "note": "key [redacted] here", "list": [{"token": "[redacted]"}]}
