"""Checkpoint saver throughput: frugalflow's SQLModelSaver against LangGraph's official savers.

    python bench/checkpointer.py [--steps 10] [--sqlite-path /tmp/ff-bench.db]
                                 [--pg-url postgresql://postgres@127.0.0.1:5432/test]

Four savers in one process, the same work for each (a database's pair in alternating rounds):

    ours-sqlite     SQLModelSaver(Store("sqlite:///<path>"))
    official-sqlite langgraph-checkpoint-sqlite AsyncSqliteSaver.from_conn_string(<path>-official),
                    WAL and PRAGMA synchronous=NORMAL like the Store (--official-sqlite-synchronous)
    ours-pg         SQLModelSaver(Store(<temp db>, pool_size=--pool-size))
    official-pg     langgraph-checkpoint-postgres AsyncPostgresSaver.from_conn_string(<temp db>)

Two workloads, each at concurrency 1 and 64:

    aput        direct `aput` calls: a writer puts a chain of checkpoints on its own thread,
                10 channels, 2 of them new in each put (what a step of a small graph
                changes); a value is a message-like dict of ~130 bytes (not a str/int: the
                official PostgreSQL saver stores those inline, without a blob). Figure:
                puts per second (higher is better).
    graph       a LangGraph StateGraph, a chain of --steps nodes (each node writes its own
                key, a 100-character str, and an int counter: values the official
                PostgreSQL saver inlines), compiled with the saver, run to completion, durability
                "sync" so every checkpoint is on the run's critical path. 64 concurrent runs
                for concurrency 64. Figures: steps per second, and the saver's overhead per
                step = (wall time with the saver - wall time of the same runs compiled without
                a checkpointer) / steps, amortised over the concurrent runs.

The two savers of a database are measured in alternating rounds (load that comes and goes
hits both alike); every figure is the best of --repeat rounds after a warm-up; ratios are
ours / official for throughput and official / ours for overhead (> 1: ours is better).
PostgreSQL: a temporary database is created on the --pg-url server and dropped at the end.
It prints figures; it asserts nothing. Targets (issue): ratio >= 1 at concurrency 1,
>= 2 against AsyncPostgresSaver at concurrency 64. Runtime: about a minute on an idle
2-CPU machine (more when other work shares it: the load average is printed).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import datetime, timezone
from typing import Any, TypedDict

from langgraph.checkpoint.base import BaseCheckpointSaver, Checkpoint
from langgraph.checkpoint.base.id import uuid6
from langgraph.graph import END, START, StateGraph

from frugalflow.persistence import Store

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from pg import create_database, drop_database  # noqa: E402  (the tests' throwaway databases)
from frugalflow.persistence.saver import SQLModelSaver

CHANNELS = 10  # channels per checkpoint in the aput workload
CHANGED = 2  # channels with a new version in each put
VALUE = "x" * 100

Saver = BaseCheckpointSaver[Any]


# -- the workloads ---------------------------------------------------------------------------


async def put_chain(saver: Saver, puts: int) -> None:
    """One writer: `puts` checkpoints in a row on a new thread, CHANGED channels each."""
    config: Any = {"configurable": {"thread_id": uuid.uuid4().hex, "checkpoint_ns": ""}}
    versions: dict[str, Any] = {}
    values: dict[str, Any] = {}
    for step in range(puts):
        changed = [f"c{(step * CHANGED + k) % CHANNELS}" for k in range(CHANGED)]
        if step == 0:
            changed = [f"c{k}" for k in range(CHANNELS)]
        new_versions = {}
        for ch in changed:
            versions[ch] = saver.get_next_version(versions.get(ch), None)
            values[ch] = {"role": "ai", "content": VALUE, "step": step}
            new_versions[ch] = versions[ch]
        checkpoint: Checkpoint = {
            "v": 4, "id": str(uuid6(clock_seq=step)),
            "ts": datetime.now(timezone.utc).isoformat(),
            "channel_values": dict(values), "channel_versions": dict(versions),
            "versions_seen": {"node": dict(versions)}, "updated_channels": changed,
        }
        config = await saver.aput(config, checkpoint, {"source": "loop", "step": step,
                                                       "parents": {}}, new_versions)


def chain_graph(steps: int, checkpointer: Saver | None) -> Any:
    fields: dict[str, Any] = {"topic": str, "count": int, **{f"n{i}": str for i in range(steps)}}
    state = TypedDict("State", fields, total=False)  # type: ignore[misc]
    graph = StateGraph(state)

    def make(i: int) -> Callable[[dict[str, Any]], dict[str, Any]]:
        def node(s: dict[str, Any]) -> dict[str, Any]:
            return {"count": s.get("count", 0) + 1, f"n{i}": f"{VALUE}{i}"}
        return node

    for i in range(steps):
        graph.add_node(f"n{i}", make(i))  # type: ignore[call-overload]
        graph.add_edge(START if i == 0 else f"n{i - 1}", f"n{i}")
    graph.add_edge(f"n{steps - 1}", END)
    return graph.compile(checkpointer=checkpointer)


async def run_graphs(app: Any, runs: int, concurrency: int) -> None:
    async def one() -> None:
        config = {"configurable": {"thread_id": uuid.uuid4().hex}}
        out = await app.ainvoke({"topic": "bench"}, config, durability="sync")
        assert out["count"] > 0

    for start in range(0, runs, concurrency):
        await asyncio.gather(*(one() for _ in range(min(concurrency, runs - start))))


async def best_of(repeat: int, work: Callable[[], Awaitable[None]]) -> float:
    """Seconds of the fastest of `repeat` rounds, after one warm-up round."""
    await work()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        await work()
        times.append(time.perf_counter() - t0)
    return min(times)


# -- the savers ------------------------------------------------------------------------------


@asynccontextmanager
async def ours(url: str, pool_size: int) -> AsyncIterator[Saver]:
    store = Store(url, pool_size=pool_size)
    saver = SQLModelSaver(store)
    await saver.setup()
    try:
        yield saver
    finally:
        await saver.aclose()
        await store.close()


@asynccontextmanager
async def official_sqlite(path: str, synchronous: str = "NORMAL") -> AsyncIterator[Saver]:
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

    async with AsyncSqliteSaver.from_conn_string(path) as saver:
        await saver.setup()  # WAL, as the Store
        cursor = await saver.conn.execute(f"PRAGMA synchronous={synchronous}")
        await cursor.close()
        yield saver


@asynccontextmanager
async def official_pg(url: str) -> AsyncIterator[Saver]:
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

    async with AsyncPostgresSaver.from_conn_string(url) as saver:
        await saver.setup()
        yield saver


# -- the run ---------------------------------------------------------------------------------

Results = dict[str, dict[tuple[str, int], float]]


async def compare(savers: dict[str, Saver], args: argparse.Namespace,
                  baseline: dict[int, float], results: Results) -> None:
    """Measure two savers round by round, alternating, so load changes hit both alike."""
    for name in savers:
        results[name] = {}
    for conc in (1, 64):
        puts_each = args.puts if conc == 1 else max(1, args.puts // 16)
        runs = args.runs if conc == 1 else 64
        apps = {name: chain_graph(args.steps, saver) for name, saver in savers.items()}
        work: dict[str, Callable[[str], Awaitable[None]]] = {
            "aput": lambda name: asyncio.gather(  # type: ignore[dict-item]
                *(put_chain(savers[name], puts_each) for _ in range(conc))),
            "graph": lambda name: run_graphs(apps[name], runs, conc),
        }
        for kind, fn in work.items():
            best = dict.fromkeys(savers, float("inf"))
            for name in savers:  # warm-up round
                await fn(name)
            for r in range(args.repeat):
                for name in (list(savers) if r % 2 == 0 else list(reversed(savers))):
                    t0 = time.perf_counter()
                    await fn(name)
                    best[name] = min(best[name], time.perf_counter() - t0)
            for name, seconds in best.items():
                if kind == "aput":
                    results[name][("aput", conc)] = conc * puts_each / seconds
                else:
                    steps = runs * args.steps
                    results[name][("graph", conc)] = steps / seconds
                    results[name][("overhead", conc)] = (seconds - baseline[conc]) / steps
        for name in savers:
            r = results[name]
            print(f"  {name:16s} concurrency {conc:2d}: {r[('aput', conc)]:8.0f} puts/s, "
                  f"{r[('graph', conc)]:7.0f} steps/s, "
                  f"{r[('overhead', conc)] * 1e6:7.0f} us overhead/step", flush=True)


def _arguments() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sqlite-path", help="SQLite file for SQLModelSaver (the official saver "
                    "uses <path>-official); both must not exist; default: a temp directory")
    ap.add_argument("--pg-url", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="a server where this user may CREATE DATABASE (a temp one is used)")
    ap.add_argument("--steps", type=int, default=10, help="nodes per graph run (default 10)")
    ap.add_argument("--runs", type=int, default=20, help="sequential runs at concurrency 1")
    ap.add_argument("--puts", type=int, default=320, help="puts per writer at concurrency 1 "
                    "(each of the 64 writers does puts/16)")
    ap.add_argument("--repeat", type=int, default=4, help="rounds per figure (best is kept)")
    ap.add_argument("--pool-size", type=int, default=16, help="Store pool_size for ours-pg")
    ap.add_argument("--official-sqlite-synchronous", default="NORMAL",
                    choices=["NORMAL", "FULL"], help="PRAGMA synchronous of the official "
                    "SQLite saver: NORMAL (default) as the Store uses, or FULL, SQLite's default "
                    "and what AsyncSqliteSaver gets unless told otherwise")
    ap.add_argument("--databases", default="sqlite,postgres",
                    help="comma-separated subset of sqlite,postgres")
    return ap.parse_args()


async def main() -> None:
    args = _arguments()
    tmp = None
    if args.sqlite_path:
        path = os.path.abspath(args.sqlite_path)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="ff-bench-")
        path = os.path.join(tmp.name, "ours.db")
    official_path = path + "-official"
    for p in (path, official_path):
        if os.path.exists(p):
            sys.exit(f"{p} exists: pass a --sqlite-path that does not (nothing is overwritten)")

    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; graph: chain of {args.steps} nodes, durability=sync; "
          f"aput: {CHANNELS} channels, {CHANGED} new per put; best of {args.repeat} "
          "alternating rounds after a warm-up")
    print(f"SQLite files: {path} (ours), {official_path} (official)")

    # Baseline: the same graph runs without a checkpointer.
    baseline: dict[int, float] = {}
    bare = chain_graph(args.steps, None)
    for conc in (1, 64):
        runs = args.runs if conc == 1 else 64

        async def plain(runs: int = runs, conc: int = conc) -> None:
            for start in range(0, runs, conc):
                await asyncio.gather(*(bare.ainvoke({"topic": "bench"})
                                       for _ in range(min(conc, runs - start))))

        baseline[conc] = await best_of(args.repeat, plain)
        print(f"  {'no checkpointer':16s} concurrency {conc:2d}: "
              f"{runs * args.steps / baseline[conc]:7.0f} steps/s")

    results: Results = {}
    pg_url = None
    try:
        if "sqlite" in args.databases:
            async with ours(f"sqlite:///{path}", args.pool_size) as a, \
                    official_sqlite(official_path, args.official_sqlite_synchronous) as b:
                await compare({"ours-sqlite": a, "official-sqlite": b}, args, baseline, results)
        if "postgres" in args.databases:
            try:
                pg_url = await create_database(args.pg_url)
            except Exception as e:
                print(f"PostgreSQL skipped: cannot create a database on {args.pg_url}: {e}")
            if pg_url:
                async with ours(pg_url, args.pool_size) as a, official_pg(pg_url) as b:
                    await compare({"ours-pg": a, "official-pg": b}, args, baseline, results)
    finally:
        if pg_url:
            await drop_database(pg_url, args.pg_url)
        for p in (path, official_path):
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(p + suffix):
                    os.remove(p + suffix)
        if tmp:
            tmp.cleanup()

    print()
    print(_table(results))
    print()
    print("ratio: throughput ours/official; overhead official/ours (> 1 means ours is better).")
    print("Assumptions: one process, one event loop, the machine's other load as it is (see "
          "load average); a pair of savers is measured in alternating rounds, best round "
          "kept; the official PostgreSQL saver has one connection (from_conn_string, no "
          "pipeline; it serialises calls with a lock); ours has the Store's pool "
          f"(pool_size={args.pool_size}) and groups concurrent writes; both SQLite savers "
          "use WAL; ours synchronous=NORMAL (the Store's), the official one "
          f"synchronous={args.official_sqlite_synchronous}; the official SQLite saver has one "
          "aiosqlite connection, ours the Store's sync engine on the event loop's thread "
          "(a worker thread only while another process holds the write lock).")


def _table(results: dict[str, dict[tuple[str, int], float]]) -> str:
    rows = [("aput", 1, "puts/s"), ("aput", 64, "puts/s"), ("graph", 1, "steps/s"),
            ("graph", 64, "steps/s"), ("overhead", 1, "us/step"), ("overhead", 64, "us/step")]
    head = f"{'measure':10s} {'conc':>4s} {'unit':8s}"
    pairs = [("ours-sqlite", "official-sqlite"), ("ours-pg", "official-pg")]
    pairs = [p for p in pairs if p[0] in results]
    for a, b in pairs:
        head += f" | {a:>11s} {b:>15s} {'ratio':>6s}"
    lines = [head, "-" * len(head)]
    for kind, conc, unit in rows:
        line = f"{kind:10s} {conc:4d} {unit:8s}"
        for a, b in pairs:
            x, y = results[a][(kind, conc)], results[b][(kind, conc)]
            if kind == "overhead":
                ratio = y / x if x > 0 else float("inf")
                line += f" | {x * 1e6:11.0f} {y * 1e6:15.0f} {ratio:6.2f}"
            else:
                line += f" | {x:11.0f} {y:15.0f} {x / y:6.2f}"
        lines.append(line)
    return "\n".join(lines)


if __name__ == "__main__":
    asyncio.run(main())
