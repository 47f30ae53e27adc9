"""Events that never miss across processes: a run executed by a worker process on PostgreSQL
is streamed by the service with ids (replayed for a subscriber that comes late, relayed
live, resumed with Last-Event-ID by a service started again)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from scale_worker import make_runner
from served import served
from test_events import frames, logged, wait_for_event

from frugalflow.service import create_app

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def worker(url: str, *extra: str) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen([sys.executable, str(HERE / "scale_worker.py"), url, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # blocks until the worker is up: no sleeps
        assert "ready" in line, proc.stderr.read() if proc.stderr else line
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
async def test_a_worker_s_run_streamed_late_then_resumed_by_a_new_service(
        fresh_pg_url: str) -> None:
    url = fresh_pg_url
    service = make_runner(url, latency=0.3, nodes=3)
    with worker(url, "--latency", "0.3"):
        async with served(create_app(service)) as base, httpx.AsyncClient(
                base_url=base, timeout=60) as client, service.events.queue() as relayed:
            r = await client.post("/runs", json={"flow": "chain", "input": {"topic": "w"}})
            run_id = r.json()["run_id"]
            # The worker has called n1's model: run_started, node_started... happened.
            await wait_for_event(relayed, "attempt")
            first = await frames(client, f"/runs/{run_id}/events", until="node_started")
            first += await frames(client, f"/runs/{run_id}/events?after={first[-1]['id']}",
                                  until="node_finished")
        # The service stops; a new one on the same database resumes the stream.
        service2 = make_runner(url, latency=0.3, nodes=3)
        async with served(create_app(service2)) as base, httpx.AsyncClient(
                base_url=base, timeout=60) as client:
            rest = await frames(client, f"/runs/{run_id}/events",
                                headers={"Last-Event-ID": str(logged(first)[-1]["id"])})
            assert service2.events.log is not None
            everything = await service2.events.log.read(run_id)
    seen = logged(first) + logged(rest)
    kinds = [f["event"] for f in seen]
    assert kinds[:2] == ["run_started", "node_started"] and kinds[-1] == "run_finished"
    assert kinds.count("attempt") >= 3
    assert [f["id"] for f in seen] == [e["id"] for e in everything]  # no gap, no duplicate
    assert [f["data"] for f in seen] == everything
    assert rest[-1]["event"] == "status" and rest[-1]["data"]["status"] == "succeeded"
