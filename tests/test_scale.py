"""Scale-out on real parts: worker processes executing dispatched runs from PostgreSQL
(procrastinate), one of them SIGKILLed mid-run; cancellation and live events across
processes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from scale_worker import make_runner
from sqlalchemy import select

from frugalflow.persistence import tables as t
from frugalflow.runner import Runner
from frugalflow.service import create_app

HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def workers(url: str, n: int, *extra: str) -> Iterator[list[subprocess.Popen[str]]]:
    procs = [subprocess.Popen([sys.executable, str(HERE / "scale_worker.py"), url, *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(n)]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()  # blocks until the worker is up: no sleeps
            assert "ready" in line, p.stderr.read() if p.stderr else line
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.communicate()


@contextlib.asynccontextmanager
async def submitter(url: str, **kw: Any) -> AsyncIterator[Runner]:
    runner = make_runner(url, **kw)
    await runner.setup()
    try:
        yield runner
    finally:
        await runner.close()


async def rows(runner: Runner, table: Any) -> list[Any]:
    async with runner.store.read() as conn:
        return list((await conn.execute(select(table))).all())


@pytest.mark.slow
async def test_three_workers_200_runs_one_killed(fresh_pg_url: str) -> None:
    url = fresh_pg_url
    async with submitter(url, latency=0.2, nodes=3) as sub:
        with workers(url, 3, "--latency", "0.2") as procs:
            ids = [(await sub.start("chain", {"topic": f"t{i}"}, wait=False)).run_id
                   for i in range(200)]
            victim = procs[0]
            # Kill worker 0 once it has completed some node executions (and holds runs).
            victim_holder = None
            async with sub.events.subscribe() as events:
                async for e in events:  # woken by the workers' events (relayed by PostgreSQL)
                    if e["event"] == "node_finished":
                        node_rows = await rows(sub, t.NodeRunRow.__table__)
                        mine = [r.holder for r in node_rows if r.status == "done" and r.holder
                                and f":{victim.pid}:" in r.holder]
                        if mine:
                            victim_holder = mine[0]
                            break
            assert victim_holder is not None
            victim.send_signal(signal.SIGKILL)
            results = await asyncio.wait_for(
                asyncio.gather(*(sub.wait(i) for i in ids)), timeout=240)
        assert [r.status for r in results].count("succeeded") == 200

        nodes = await rows(sub, t.NodeRunRow.__table__)
        attempts = await rows(sub, t.AttemptRow.__table__)
        history = await rows(sub, t.LeaseHistoryRow.__table__)
        # Every run: each node completed exactly once, each completed call recorded once.
        for r in results:
            assert r.state and all(r.state.get(k) for k in ("n1", "n2", "n3"))
        for run_id in ids:
            done = [n.node for n in nodes if n.run_id == run_id and n.status == "done"]
            assert len(done) == len(set(done)), run_id  # no node completed twice
            ok = [a.node for a in attempts if a.run_id == run_id and a.outcome == "ok"]
            assert sorted(ok) == ["n1", "n2", "n3"], run_id  # each paid call exactly once
        # The killed worker's runs were taken over under a higher lease epoch.
        held = {h.run_id for h in history if h.holder == victim_holder and h.released_at is None}
        taken_over = {
            run_id for run_id in held
            if max((h.epoch, h.holder) for h in history if h.run_id == run_id)[1] != victim_holder
        }
        # (a run the victim had finished but not yet let go of needs no takeover)
        assert taken_over, "no run of the killed worker was taken over"
        # Never two executors at once: a run's leases form one chain of epochs; an epoch
        # that was never released (its holder died, or stalled past its lease and was then
        # fenced off: it could not write a row) is followed by a higher one.
        for run_id in ids:
            chain = sorted((h.epoch, h.acquired_at, h.released_at, h.holder)
                           for h in history if h.run_id == run_id)
            assert [c[0] for c in chain] == list(range(1, len(chain) + 1)), run_id
            for (_, _, released, _), (_, acquired, _, _) in zip(chain, chain[1:]):
                assert released is None or released <= acquired
            # the last executor let go, unless it was the killed worker caught between
            # recording the run's end and releasing the lease
            assert chain[-1][2] is not None or chain[-1][3] == victim_holder


@pytest.mark.slow
async def test_cancel_reaches_the_worker_executing_the_run(fresh_pg_url: str) -> None:
    url = fresh_pg_url
    async with submitter(url, latency=5.0, nodes=3) as sub:
        with workers(url, 1, "--latency", "5.0"):
            run_id = (await sub.start("chain", {"topic": "c"}, wait=False)).run_id
            async with sub.events.subscribe(run_id) as events:
                async for e in events:  # the worker's events, relayed through PostgreSQL
                    if e["event"] == "node_started":
                        break
            await sub.cancel(run_id)
            result = await asyncio.wait_for(sub.wait(run_id), timeout=30)
        assert result.status == "cancelled"


@pytest.mark.slow
async def test_worker_events_reach_a_service_client_as_sse(fresh_pg_url: str) -> None:
    url = fresh_pg_url
    async with submitter(url, latency=0.05, nodes=2) as sub:
        app = create_app(sub)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            with workers(url, 1, "--latency", "0.05"):
                async with httpx.AsyncClient(
                        base_url=f"http://127.0.0.1:{sock.getsockname()[1]}", timeout=30) as client:
                    r = await client.post("/runs", json={"flow": "chain", "input": {"topic": "sse"}})
                    run_id = r.json()["run_id"]
                    seen = []
                    async with client.stream("GET", f"/runs/{run_id}/events") as stream:
                        async for line in stream.aiter_lines():
                            if line.startswith("data: "):
                                seen.append(json.loads(line[6:]))
                                if seen[-1]["event"] == "run_finished":
                                    break
        finally:
            server.should_exit = True
            await serving
            sock.close()
    kinds = [e["event"] for e in seen]
    assert "node_started" in kinds and "attempt" in kinds
    assert seen[-1]["status"] == "succeeded"


@pytest.mark.slow
async def test_a_run_whose_starter_died_before_queueing_still_executes(fresh_pg_url: str) -> None:
    url = fresh_pg_url
    async with submitter(url, latency=0.05, nodes=3) as sub:
        # The starter wrote the run's row, then died: no seeded checkpoint, no job.
        await sub.ledger.create_run("orphan", "chain", {"topic": "o"}, status="queued")
        assert await sub.dispatcher.status("orphan") is None
        assert await sub.dispatcher.requeue_orphans(sub, older_than=0.0) == 1
        assert await sub.dispatcher.requeue_orphans(sub, older_than=0.0) == 0  # queued once
        with workers(url, 1):
            result = await asyncio.wait_for(sub.wait("orphan"), timeout=60)
        assert result.status == "succeeded"
        assert result.state is not None and result.state["topic"] == "o"
