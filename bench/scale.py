"""Runs per second with 1, 2 and 4 worker processes, and recovery time after a SIGKILL.

Each run is the `chain` flow with 5 model nodes on the simulated catalog, every model call
sleeping 200 ms (so a run takes about 1 s of model time); runs are dispatched through
procrastinate in a throwaway PostgreSQL database and executed by `tests/scale_worker.py`
processes (4 runs at once each: a worker's capacity is its concurrency, so adding
workers is what adds throughput; on this 2-core machine more per-worker concurrency makes
the whole test CPU-bound and hides the scaling). Then one worker is SIGKILLed while it executes runs, and
the time until its runs make progress again elsewhere is measured.

    python bench/scale.py [--runs 64] [--pg postgresql://postgres@127.0.0.1:5432/test]

Targets (issue 7): >= 1.8x runs/s from 1 to 2 workers; recovery within the configured
stall timeout plus 5 s. It prints figures; it is not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from pg import create_database, drop_database  # noqa: E402
from scale_worker import make_runner  # noqa: E402
from sqlalchemy import text  # noqa: E402

LATENCY, NODES, CONCURRENCY, LEASE_TTL, STALL = 0.2, 5, 4, 5.0, 3.0


def spawn(url: str, n: int) -> list[subprocess.Popen[str]]:
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "scale_worker.py"), url, "--latency", str(LATENCY),
         "--nodes", str(NODES), "--concurrency", str(CONCURRENCY), "--lease-ttl", str(LEASE_TTL),
         "--stall-timeout", str(STALL)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
    for p in procs:
        assert p.stdout is not None and "ready" in p.stdout.readline()
    return procs


def stop(procs: list[subprocess.Popen[str]]) -> None:
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


async def throughput(admin: str, workers: int, runs: int) -> float:
    url = await create_database(admin)
    try:
        sub = make_runner(url, latency=LATENCY, nodes=NODES)
        await sub.setup()
        procs = spawn(url, workers)
        try:
            t0 = time.monotonic()
            ids = [(await sub.start("chain", {"topic": f"t{i}"}, wait=False)).run_id
                   for i in range(runs)]
            results = await asyncio.gather(*(sub.wait(i) for i in ids))
            elapsed = time.monotonic() - t0
            bad = [r.status for r in results if r.status != "succeeded"]
            if bad:
                print(f"  ({len(bad)} of {runs} runs did not succeed: {sorted(set(bad))})")
        finally:
            stop(procs)
            await sub.close()
        return runs / elapsed
    finally:
        await drop_database(url, admin)


async def recovery(admin: str) -> float:
    url = await create_database(admin)
    try:
        sub = make_runner(url, latency=LATENCY, nodes=NODES)
        await sub.setup()
        procs = spawn(url, 2)
        try:
            ids = [(await sub.start("chain", {"topic": f"r{i}"}, wait=False)).run_id
                   for i in range(24)]
            victim = procs[0]
            marker = f":{victim.pid}:"
            while True:  # wait until the victim executes runs
                async with sub.store.read() as c:
                    held = (await c.execute(text(
                        "select run_id from ff_leases where holder like :h"), {"h": f"%{marker}%"})).all()
                if held:
                    break
                await asyncio.sleep(0.05)
            held_ids = [r[0] for r in held]
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            while True:  # until every run it held is executing (or done) elsewhere
                async with sub.store.read() as c:
                    rows = (await c.execute(text(
                        "select distinct run_id from ff_node_runs where holder not like :h "
                        "and run_id = any(:ids)"), {"h": f"%{marker}%", "ids": held_ids})).all()
                if len(rows) == len(held_ids):
                    break
                await asyncio.sleep(0.05)
            recovered = time.monotonic() - killed_at
            await asyncio.gather(*(sub.wait(i) for i in ids))
        finally:
            stop(procs)
            await sub.close()
        return recovered
    finally:
        await drop_database(url, admin)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=64)
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = ap.parse_args()
    print(f"chain flow, {NODES} model nodes x {LATENCY * 1000:.0f} ms simulated latency; "
          f"{args.runs} runs; worker concurrency {CONCURRENCY}; lease TTL {LEASE_TTL} s; "
          f"stall timeout {STALL} s")
    rates = {}
    for n in (1, 2, 4):
        rates[n] = await throughput(args.pg, n, args.runs)
        print(f"{n} worker(s): {rates[n]:6.2f} runs/s  ({rates[n] / rates[1]:.2f}x of 1 worker)")
    r = await recovery(args.pg)
    print(f"recovery after SIGKILL: {r:.2f} s until every run the dead worker held executes "
          f"elsewhere (target <= stall timeout + 5 s = {STALL + 5:.0f} s; the lease TTL "
          f"{LEASE_TTL} s bounds it from below)")
    print(f"target 1->2 workers >= 1.8x: {'met' if rates[2] / rates[1] >= 1.8 else 'NOT met'}; "
          f"recovery target: {'met' if r <= STALL + 5 else 'NOT met'}")


if __name__ == "__main__":
    asyncio.run(main())
