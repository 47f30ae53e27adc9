"""Durable runs at once: frugalflow's Runner against plain LangGraph with the official saver.

    python bench/concurrency.py [--runs 100,1000] [--databases sqlite,postgres] [--repeat 3]
                                [--node model|sleep] [--latency 0.02] [--nodes 5]
                                [--pg postgresql://postgres@127.0.0.1:5432/test]
                                [--no-memory] [--no-profile]

The work: a chain of --nodes nodes, N runs started at once in this process, each to its end.

    frugalflow  Runner(<db>, flows=[chain]).start(...) for N runs (asyncio.gather): lease,
                ledger rows (run, nodes, every model call written down before it is sent and
                filled in after), checkpoints through SQLModelSaver, all fenced by the lease.
    official    the same chain as a plain LangGraph StateGraph compiled with the official
                saver (langgraph-checkpoint-sqlite AsyncSqliteSaver / -postgres
                AsyncPostgresSaver on a psycopg pool), `ainvoke` per run, same durability
                ("async", LangGraph's default, which the Runner uses too).

--node model (default): each node calls a model through the simulated provider, LATENCY s
per call (frugalflow: the routed model over the simulated catalog; official: a
SimulatedChatModel, the same kind of model, called directly). --node sleep: each node
sleeps LATENCY s and calls no model, to isolate what persistence costs.

Each figure is measured on a fresh database (a new SQLite file in a temp dir; a new
PostgreSQL database on the --pg server, dropped after). Rounds alternate the order (ours
first, then official first, ...); the ratio is ours / official of the median runs/s, and
the spread (min-max over the rounds) is printed. Then, untimed, one more round of each at
the largest N with tracemalloc (peak bytes / N: memory per in-flight run) and one of ours
under cProfile (top functions by cumulative and by own time).
It prints figures; it asserts nothing. Targets (issue 12): ratio >= 0.8 on PostgreSQL and
>= 0.6 on SQLite at 1,000 runs, 0 runs failed.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import platform
import pstats
import statistics
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypedDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from langchain_core.messages import HumanMessage  # noqa: E402
from langgraph.graph import END, START, StateGraph  # noqa: E402
from pg import create_database, drop_database  # noqa: E402  (the tests' throwaway databases)

from frugalflow import Catalog, Flow, Needs, RoutedChatModel  # noqa: E402
from frugalflow.resilience import BreakerRegistry  # noqa: E402
from frugalflow.testing import SimulatedChatModel  # noqa: E402
from frugalflow.runner import Runner  # noqa: E402

PROMPT = "Classify this support ticket: my invoice is wrong."


class State(TypedDict, total=False):
    topic: str
    last: str
    count: int


# -- the two contenders ------------------------------------------------------------------------


def _chain(graph: Any, nodes: int, make: Callable[[int], Any]) -> None:
    for i in range(nodes):
        graph.add_node(f"n{i}", make(i))
        graph.add_edge(START if i == 0 else f"n{i - 1}", f"n{i}")
    graph.add_edge(f"n{nodes - 1}", END)


def _sleeper(i: int, latency: float) -> Any:
    """A node that only waits `latency` (`--node sleep`: persistence alone, no model)."""
    async def sleeper(state: State) -> State:
        await asyncio.sleep(latency)
        return {"last": f"n{i}", "count": state.get("count", 0) + 1}
    return sleeper


def frugal_flow(args: argparse.Namespace) -> Flow[State]:
    flow: Flow[State] = Flow("chain", State)

    def make(i: int) -> Any:
        if args.node == "sleep":
            return _sleeper(i, args.latency)

        async def node(state: State, model: RoutedChatModel) -> State:
            msg = await model.ainvoke([HumanMessage(f"{PROMPT} {state.get('last', '')}")])
            return {"last": str(msg.content)[:40], "count": state.get("count", 0) + 1}
        return node

    for i in range(args.nodes):
        needs = Needs(quality={"classification": 0.45}) if args.node == "model" else None
        flow.add_node(f"n{i}", make(i), needs=needs)
        flow.add_edge(START if i == 0 else f"n{i - 1}", f"n{i}")
    flow.add_edge(f"n{args.nodes - 1}", END)
    return flow


def plain_graph(args: argparse.Namespace, saver: Any) -> Any:
    model = SimulatedChatModel(model_name="llama-3.1-8b-instant", provider="sim-groq",
                               latency=args.latency)
    graph = StateGraph(State)

    def make(i: int) -> Any:
        if args.node == "sleep":
            return _sleeper(i, args.latency)

        async def node(state: State) -> State:
            msg = await model.ainvoke([HumanMessage(f"{PROMPT} {state.get('last', '')}")])
            return {"last": str(msg.content)[:40], "count": state.get("count", 0) + 1}
        return node

    _chain(graph, args.nodes, make)
    return graph.compile(checkpointer=saver)


def catalog(latency: float) -> Catalog:
    sim = Catalog.simulated()
    return Catalog([s.model_copy(update={"model_kwargs": {"latency": latency}}) for s in sim],
                   name="bench")


# -- databases ----------------------------------------------------------------------------------


@asynccontextmanager
async def database(kind: str, args: argparse.Namespace, tmp: str) -> AsyncIterator[str]:
    """A fresh database: a SQLite file path URL, or a new PostgreSQL database's URL."""
    if kind == "sqlite":
        path = os.path.join(tmp, f"{uuid.uuid4().hex}.db")
        yield f"sqlite:///{path}"
        for suffix in ("", "-wal", "-shm"):
            if os.path.exists(path + suffix):
                os.remove(path + suffix)
        return
    url = await create_database(args.pg)
    try:
        yield url
    finally:
        await drop_database(url, args.pg)


@asynccontextmanager
async def official_saver(url: str, pool: int) -> AsyncIterator[Any]:
    if url.startswith("sqlite"):
        from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver

        async with AsyncSqliteSaver.from_conn_string(url.removeprefix("sqlite:///")) as saver:
            await saver.setup()  # WAL
            cursor = await saver.conn.execute("PRAGMA synchronous=NORMAL")  # as the Store
            await cursor.close()
            yield saver
        return
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row
    from psycopg_pool import AsyncConnectionPool

    from frugalflow.persistence.store import postgres_url

    async with AsyncConnectionPool(postgres_url(url), min_size=pool, max_size=pool, open=False,
                                   kwargs={"autocommit": True, "prepare_threshold": 0,
                                           "row_factory": dict_row}) as conns:
        saver = AsyncPostgresSaver(conns)  # type: ignore[arg-type]
        await saver.setup()
        yield saver


# -- one measured round -----------------------------------------------------------------------

Result = tuple[float, float, Counter[str]]  # runs/s, CPU s per run (all threads), failures


async def run_ours(url: str, n: int, args: argparse.Namespace) -> Result:
    runner = Runner(url, flows=[frugal_flow(args)], catalog=catalog(args.latency),
                    breakers=BreakerRegistry(), max_concurrency=n, lease_ttl=args.lease_ttl)
    try:
        await runner.setup()
        runner.compiled("chain")
        t0, c0 = time.perf_counter(), time.process_time()
        results = await asyncio.gather(
            *(runner.start("chain", {"topic": f"load {i}"}) for i in range(n)),
            return_exceptions=True)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    finally:
        await runner.close()
    failed: Counter[str] = Counter()
    for r in results:
        if isinstance(r, BaseException):
            failed[f"{type(r).__name__}: {str(r)[:70]}"] += 1
        elif r.status != "succeeded":
            failed[f"{r.status}: {(r.error or '')[:70]}"] += 1
    return n / elapsed, cpu / n, failed


async def run_official(url: str, n: int, args: argparse.Namespace) -> Result:
    async with official_saver(url, args.pool) as saver:
        app = plain_graph(args, saver)

        async def one(i: int) -> Any:
            return await app.ainvoke({"topic": f"load {i}"},
                                     {"configurable": {"thread_id": uuid.uuid4().hex}})

        t0, c0 = time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    failed: Counter[str] = Counter()
    for r in results:
        if isinstance(r, BaseException):
            failed[f"{type(r).__name__}: {str(r)[:70]}"] += 1
        elif r.get("count") != args.nodes:
            failed["incomplete"] += 1
    return n / elapsed, cpu / n, failed


CONTENDERS: dict[str, Callable[[str, int, argparse.Namespace], Awaitable[Result]]] = {
    "frugalflow": run_ours, "official": run_official}


async def measure(kind: str, n: int, args: argparse.Namespace, tmp: str) -> None:
    rates: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    cpus: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    failed: dict[str, Counter[str]] = {name: Counter() for name in CONTENDERS}
    ratios = []
    for r in range(args.repeat):
        order = list(CONTENDERS) if r % 2 == 0 else list(reversed(CONTENDERS))
        this: dict[str, float] = {}
        for name in order:
            async with database(kind, args, tmp) as url:
                rate, cpu, what = await CONTENDERS[name](url, n, args)
            this[name] = rate
            cpus[name].append(cpu)
            rates[name].append(rate)
            failed[name] += what
        ratios.append(this["frugalflow"] / this["official"])
        print(f"    round {r + 1} ({' then '.join(order)}): frugalflow "
              f"{this['frugalflow']:6.1f} runs/s, official {this['official']:6.1f} runs/s, "
              f"ratio {ratios[-1]:.2f}; CPU per run: frugalflow {cpus['frugalflow'][-1] * 1e3:.1f}"
              f" ms, official {cpus['official'][-1] * 1e3:.1f} ms", flush=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"  {kind:8s} {n:5d} runs: frugalflow {med['frugalflow']:6.1f} runs/s "
          f"[{min(rates['frugalflow']):.1f}-{max(rates['frugalflow']):.1f}], official "
          f"{med['official']:6.1f} [{min(rates['official']):.1f}-{max(rates['official']):.1f}]"
          f", ratio {statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}], "
          f"failed: frugalflow {sum(failed['frugalflow'].values())} of {n * args.repeat}, "
          f"official {sum(failed['official'].values())}", flush=True)
    cpu = {name: statistics.median(v) for name, v in cpus.items()}
    print(f"  {'':8s} {'':5s}       CPU per run (all threads): frugalflow "
          f"{cpu['frugalflow'] * 1e3:.1f} ms, official {cpu['official'] * 1e3:.1f} ms, ratio "
          f"official/frugalflow {cpu['official'] / cpu['frugalflow']:.2f}", flush=True)
    for name, what in failed.items():
        for text, count in what.most_common(3):
            print(f"      {name}: {count} x {text}")


# -- memory and profile (untimed) ---------------------------------------------------------------


async def memory(kind: str, n: int, args: argparse.Namespace, tmp: str) -> None:
    for name, fn in CONTENDERS.items():
        async with database(kind, args, tmp) as url:
            tracemalloc.start()
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            await fn(url, n, args)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        print(f"  {kind:8s} {n:5d} runs: {name:10s} peak {(peak - base) / 2**20:7.1f} MiB "
              f"traced, {(peak - base) / n / 1024:6.1f} KiB per in-flight run", flush=True)


async def profile(kind: str, n: int, args: argparse.Namespace, tmp: str) -> None:
    async with database(kind, args, tmp) as url:
        prof = cProfile.Profile()
        prof.enable()
        await run_ours(url, n, args)
        prof.disable()
    for key, count in (("cumulative", 25), ("tottime", 20)):
        out = io.StringIO()
        stats = pstats.Stats(prof, stream=out).strip_dirs().sort_stats(key)
        stats.print_stats(count)
        text = out.getvalue()
        body = text[text.index("ncalls"):] if "ncalls" in text else text
        print(f"  frugalflow on {kind}, {n} runs, top {count} by {key}:")
        print("    " + body.rstrip().replace("\n", "\n    "), flush=True)


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", default="100,1000", help="comma-separated run counts")
    ap.add_argument("--databases", default="sqlite,postgres")
    ap.add_argument("--repeat", type=int, default=3, help="rounds per figure (median kept)")
    ap.add_argument("--node", choices=["model", "sleep"], default="model")
    ap.add_argument("--latency", type=float, default=0.02, help="seconds per node")
    ap.add_argument("--nodes", type=int, default=5)
    ap.add_argument("--lease-ttl", type=float, default=30.0)
    ap.add_argument("--pool", type=int, default=10, help="the official PG saver's connections")
    ap.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test",
                    help="a server where this user may CREATE DATABASE")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    sizes = [int(x) for x in args.runs.split(",")]
    kinds = [k for k in ("sqlite", "postgres") if k in args.databases]
    print(f"python {platform.python_version()}, {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}; chain of {args.nodes} nodes ({args.node}, "
          f"{args.latency * 1000:g} ms each), all runs started at once; median of "
          f"{args.repeat} alternating rounds [min-max]", flush=True)
    with tempfile.TemporaryDirectory(prefix="ff-concurrency-") as tmp:
        for kind in kinds:
            for n in sizes if args.repeat else ():
                await measure(kind, n, args, tmp)
        for kind in kinds:
            if not args.no_memory:
                await memory(kind, max(sizes), args, tmp)
            if not args.no_profile:
                await profile(kind, max(sizes), args, tmp)


if __name__ == "__main__":
    asyncio.run(main())
