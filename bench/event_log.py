"""What the persisted event log costs per event: publish N events and wait until they are
written (ff_events) and delivered, against a bus without a log; SQLite and PostgreSQL.

    python bench/event_log.py [--events 2000] [--repeat 5] [--pg postgresql://...]

A third shape, publish_only, is what `publish` itself takes on the run's path. Last, what the
log costs a durable run: a 20-node chain of routed calls (bench/overhead.py's) through a
Runner on SQLite, with the event log and without it (a bus that delivers at once),
alternated, `--runs` rounds (`--runs 0` skips it).

Two shapes: a burst (N events published at once: batched, the writer's best case) and a
trickle (one event, wait for it, the next: a transaction per event, the worst case, as a
run whose nodes are far apart publishes). Prints the median and the spread of `--repeat`
runs in microseconds per event (wall time, this process's event loop included).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from sqlalchemy import text

from frugalflow import BreakerRegistry, Catalog
from frugalflow.events import EventBus
from frugalflow.persistence.event_log import EventLog
from frugalflow.persistence.store import Store

FIELDS = {"node": "n1", "model": "sim/small", "provider": "sim", "outcome": "ok",
          "cost_usd": 0.00012, "latency_ms": 812.5, "input_tokens": 120, "output_tokens": 40}


async def publish_only(bus: EventBus, n: int) -> float:
    """What `publish` itself takes (the run's own cost: the write happens in the writer)."""
    async with bus.queue("bench") as queue:
        t = time.perf_counter()
        for _ in range(n):
            bus.publish("bench", "attempt", **FIELDS)
        cost = (time.perf_counter() - t) / n * 1e6
        for _ in range(n):
            await queue.get()
        return cost


async def burst(bus: EventBus, n: int) -> float:
    async with bus.queue("bench") as queue:
        t = time.perf_counter()
        for _ in range(n):
            bus.publish("bench", "attempt", **FIELDS)
        for _ in range(n):
            await queue.get()
        return (time.perf_counter() - t) / n * 1e6


async def trickle(bus: EventBus, n: int) -> float:
    async with bus.queue("bench") as queue:
        t = time.perf_counter()
        for _ in range(n):
            bus.publish("bench", "attempt", **FIELDS)
            await queue.get()
        return (time.perf_counter() - t) / n * 1e6


async def measure(url: str | None, n: int, repeat: int) -> None:
    store = Store(url) if url else None
    if store is not None:
        await store.setup()
    for shape in (publish_only, burst, trickle):
        count = n if shape is not trickle else max(50, n // 10)
        costs = []
        for _ in range(repeat):
            bus = EventBus(maxsize=count + 10, log=EventLog(store) if store else None)
            costs.append(await shape(bus, count))
            if bus.log is not None:
                await bus.log.close()
        where = "no log" if store is None else store.dialect
        print(f"{where:10} {shape.__name__:12} {count:5} events: median "
              f"{statistics.median(costs):8.1f} us/event, min {min(costs):8.1f}, "
              f"max {max(costs):8.1f}")
    if store is not None:
        async with store.write() as conn:  # leave the database as it was
            await conn.execute(text("DELETE FROM ff_events WHERE run_id = 'bench'"))
        await store.close()


async def durable_runs(nodes: int, rounds: int) -> None:
    """Runs of an n-node chain through a Runner on SQLite, with and without the event log."""
    from overhead import bench_flow  # bench/overhead.py, next to this file

    from frugalflow.runner import Runner

    inp = {"text": "Classify this support ticket: my invoice is wrong."}
    with tempfile.TemporaryDirectory() as tmp:
        runners = {label: Runner(f"sqlite:///{tmp}/{label}.db", flows=[bench_flow(nodes)],
                                 catalog=Catalog.simulated(), breakers=BreakerRegistry())
                   for label in ("log", "nolog")}
        runners["nolog"].events = EventBus()  # delivers at once, writes nothing
        times: dict[str, list[float]] = {label: [] for label in runners}
        try:
            for r in range(rounds + 2):  # two warm-up rounds, then alternating
                for label in (("log", "nolog") if r % 2 else ("nolog", "log")):
                    t = time.perf_counter()
                    result = await runners[label].start("bench", inp)
                    assert result.ok, result.error
                    if r >= 2:
                        times[label].append(time.perf_counter() - t)
        finally:
            for runner in runners.values():
                await runner.close()
    ratios = [a / b for a, b in zip(times["log"], times["nolog"])]
    for label, ts in times.items():
        print(f"durable {nodes}-node runs, {label:5s}: median {statistics.median(ts) * 1e3:7.1f} "
              f"ms/run, min {min(ts) * 1e3:7.1f}, max {max(ts) * 1e3:7.1f}")
    print(f"ratio log / no log (same rounds): median {statistics.median(ratios):.3f}, "
          f"min {min(ratios):.3f}, max {max(ratios):.3f}")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--pg", help="a PostgreSQL URL to measure too (its schema is set up)")
    ap.add_argument("--runs", type=int, default=15, help="durable-run rounds (0: skip)")
    ap.add_argument("--nodes", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for url in (None, f"sqlite:///{Path(tmp) / 'bench.db'}", *([args.pg] if args.pg else [])):
            await measure(url, args.events, args.repeat)
    if args.runs > 0:
        await durable_runs(args.nodes, args.runs)


if __name__ == "__main__":
    asyncio.run(main())
