"""Nodes that can wait, at scale: a nightly enrichment flow with a 6-hour deadline against the
same flow all-standard, on PostgreSQL with worker processes, batch failures and a SIGKILL.

`--runs` runs of `--items / --runs` documents each (one `enrich` call per document, which may
wait 6 hours, then a `summarize` call that may not) are dispatched to `frugalflow worker`
processes (`python bench/deadline.py --worker ...`: frugalflow.scale.dispatch.run_worker
with a ProcrastinateDispatcher, so each worker executes runs AND runs a batch poller). The
same documents go through the flow without a deadline (the all-standard baseline) on the same
workers. Every process reads one virtual clock (virtual = T0 + (wall - wall0) * scale,
starting at 20:00 UTC): the runners, the pollers and the emulator's batch desk, so hours of
batch turnaround pass in minutes. The provider emulator (in this process) answers through
the real OpenAI and Anthropic clients; its batches take 1 to 2 virtual hours, two carry
per-item errors and one expires with items unanswered. One worker is SIGKILLed while runs
park and a replacement started.

    python bench/deadline.py [--items 10000] [--runs 100] [--workers 2] [--scale 60]
                             [--pg postgresql://postgres@127.0.0.1:5432/test] [--quick]

Prints: cost against all-standard (target: at least 45% lower), items answered after their
deadline (target 0; an answer's time is its batch item's end, or its synchronous attempt's
start plus latency, in virtual time), items paid twice (0: the emulator's paid counter and
the ledger), runs lost (0), batches sent, items that fell back to a synchronous call, wall
time. Figures, not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from flows.nightly_enrichment import nightly  # noqa: E402
from frugalflow.runner import Runner  # noqa: E402
from frugalflow.testing.emulator import EMULATOR_KEY_ENV  # noqa: E402

MODELS = ("openai/gpt-4o-mini", "anthropic/claude-haiku-4-5")
DEADLINE = timedelta(hours=6)
# 20:00 UTC: no provider's cheaper hour is near (DeepSeek's off-peak starts 16:30 / 00:30).
T0 = datetime(2026, 11, 30, 20, 0, tzinfo=timezone.utc)
KEY = "bench-deadline-key"
TERMINAL = ("succeeded", "failed", "cancelled", "budget_exceeded", "interrupted")


# -- the clock (imported by the workers) ----------------------------------------------------

class ScaledClock:
    """Virtual time shared by every process: T0 + (wall - wall0) * scale."""

    def __init__(self, wall0: float, scale: float) -> None:
        self.wall0, self.scale = wall0, scale

    def virtual(self, wall: float) -> datetime:
        return T0 + timedelta(seconds=(wall - self.wall0) * self.scale)

    def __call__(self) -> datetime:
        return self.virtual(time.time())

    def seconds(self) -> float:
        return self().timestamp()


# Virtual seconds: gather 10 minutes' requests per batch, poll every 5 minutes, a dead
# poller's claim lapses after 5 minutes; one tick per wall second.
POLLER = {"gather": 600.0, "poll_every": 300.0, "every": 1.0, "claim_for": 300.0}


def make_runner(db: str, emulator_url: str, clock: ScaledClock, concurrency: int) -> Runner:
    from frugalflow.scale.dispatch import ProcrastinateDispatcher
    from frugalflow.testing.emulator import emulated_catalog

    catalog = emulated_catalog(emulator_url, MODELS)
    return Runner(
        db, flows=[nightly(DEADLINE, name="nightly"), nightly(None, name="all_standard")],
        catalog=catalog, clock=clock, deadline_margin=timedelta(minutes=30),
        dispatcher=ProcrastinateDispatcher(db, stall_timeout=3.0, heartbeat=0.5),
        lease_ttl=3.0, max_concurrency=concurrency)


async def worker_main(args: argparse.Namespace) -> None:
    from frugalflow.scale.dispatch import run_worker

    os.environ[EMULATOR_KEY_ENV] = KEY
    clock = ScaledClock(args.wall0, args.scale)
    runner = make_runner(args.db, args.emulator, clock, args.concurrency)
    print(f"worker {runner.holder} ready", flush=True)
    try:
        await run_worker(runner, concurrency=args.concurrency, stall_check=0.5,
                         poll_batches=runner.batch_poller(**POLLER, max_items=args.max_items))
    finally:
        await runner.close()


# -- the driver ------------------------------------------------------------------------------

class Workers:
    """The worker processes: spawn, SIGKILL, stop."""

    def __init__(self, args: argparse.Namespace, db: str, emulator: str, wall0: float,
                 log: Path) -> None:
        self.cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--db", db,
                    "--emulator", emulator, "--wall0", repr(wall0), "--scale", str(args.scale),
                    "--concurrency", str(args.concurrency), "--max-items", str(args.max_items)]
        self.procs: list[subprocess.Popen[str]] = []
        self.log = log

    def spawn(self) -> subprocess.Popen[str]:
        with self.log.open("a") as err:
            p = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=err, text=True,
                                 env={**os.environ, EMULATOR_KEY_ENV: KEY})
        assert p.stdout is not None
        if "ready" not in p.stdout.readline():
            raise RuntimeError(f"a worker did not start (see {self.log})")
        self.procs.append(p)
        return p

    def kill_one(self) -> int:
        victim = next(p for p in self.procs if p.poll() is None)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        return victim.pid

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def script_batches(emu: Any, max_items: int) -> None:
    """Batch turnaround in virtual hours, with failures: two batches with 5 per-item errors
    each (1.5 h), then three that expire after 2 h with the items past `max_items - 25`
    unanswered (a batch smaller than that expires with all answered: hence three); the
    rest answer in 1 hour."""
    h = 3600.0
    emu.batches.script("openai", delay=1.5 * h, fail_items={3, 17, 41, 99, 150}, times=2,
                       item_error="server_error")
    emu.batches.script("openai", delay=2 * h, expire=True, answered=max(max_items - 25, 0),
                       times=3)
    emu.batches.script("openai", delay=1 * h, times=None)
    emu.batches.script("anthropic", delay=1 * h, times=None)


async def driver(args: argparse.Namespace) -> None:
    from pg import create_database, drop_database
    from sqlalchemy import text

    from frugalflow.testing.emulator import ProviderEmulator

    os.environ[EMULATOR_KEY_ENV] = KEY
    per_run = args.items // args.runs
    db = await create_database(args.pg)
    work = Path(args.workdir or "/tmp") / f"frugalflow-deadline-{os.getpid()}"
    work.mkdir(parents=True, exist_ok=True)
    wall0 = time.time()
    clock = ScaledClock(wall0, args.scale)
    try:
        async with ProviderEmulator(seed=args.seed, latency=args.latency) as emu:
            emu.batches.clock = clock.seconds
            script_batches(emu, args.max_items)
            sub = make_runner(db, emu.url, clock, 1)
            await sub.setup()
            assert sub.dispatcher is not None
            await sub.dispatcher.open()
            workers = Workers(args, db, emu.url, wall0, work / "workers.log")
            for _ in range(args.workers):
                workers.spawn()
            print(f"{args.runs} runs x {per_run} documents, deadline-aware and all-standard; "
                  f"{args.workers} workers x concurrency {args.concurrency}; virtual time x"
                  f"{args.scale:g} from {T0:%H:%M} UTC; batches of at most {args.max_items}; "
                  f"logs in {work}", flush=True)
            t0 = time.monotonic()
            nightly_runs: list[str] = []
            standard_runs: list[str] = []
            for r in range(args.runs):
                docs = [f"night-{r * per_run + i:06d}" for i in range(per_run)]
                nightly_runs.append((await sub.start("nightly", {"docs": docs},
                                                     wait=False)).run_id)
            for r in range(args.runs):
                # Same length as the nightly documents: the same tokens, told apart.
                docs = [f"stand-{r * per_run + i:06d}" for i in range(per_run)]
                standard_runs.append((await sub.start("all_standard", {"docs": docs},
                                                      wait=False)).run_id)
            killed = False
            nightly_done: datetime | None = None
            statuses: dict[str, str] = {}
            while time.monotonic() - t0 < args.timeout:
                async with sub.store.read() as c:
                    statuses = {r[0]: r[1] for r in (await c.execute(text(
                        "select id, status from ff_runs"))).all()}
                waiting = sum(statuses.get(r) == "waiting" for r in nightly_runs)
                if not killed and waiting >= args.runs // 2:
                    pid = workers.kill_one()
                    workers.spawn()
                    killed = True
                    print(f"  {time.monotonic() - t0:.0f} s ({clock():%H:%M} virtual): "
                          f"{waiting} runs waiting; worker {pid} SIGKILLed, a new one started",
                          flush=True)
                if nightly_done is None and all(statuses.get(r) in TERMINAL
                                                for r in nightly_runs):
                    nightly_done = clock()
                if sum(statuses.get(r) in TERMINAL for r in nightly_runs + standard_runs) \
                        == 2 * args.runs:
                    break
                await asyncio.sleep(1.0)
            elapsed = time.monotonic() - t0
            workers.stop()
            await sub.dispatcher.close()
            raw = await collect(sub, emu)
            raw.update(wall0=wall0, scale=args.scale, elapsed=elapsed, killed=killed,
                       items_asked=args.items, nightly_done=nightly_done.isoformat()
                       if nightly_done else None)
            (work / "raw.json").write_text(json.dumps(raw))
            await sub.close()
            await sub.catalog.aclose()
    finally:
        await drop_database(db, args.pg)
    report(raw)


def _utc(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


async def collect(sub: Runner, emu: Any) -> dict[str, Any]:
    """The raw rows the figures are made of (written to the work folder, so `--measure`
    can recompute the figures after the database is dropped)."""
    from sqlalchemy import text

    def rows(result: Any) -> list[dict[str, Any]]:
        return [{k: (v.isoformat() if isinstance(v, datetime) else v)
                 for k, v in r._mapping.items()} for r in result.all()]

    async with sub.store.read() as c:
        runs = rows(await c.execute(text("select id, flow, status from ff_runs")))
        attempts = rows(await c.execute(text(
            "select run_id, flow, node, model, outcome, tier, cost_usd, call_key, "
            "batch_item_id, started_at, latency_ms from ff_attempts")))
        items = rows(await c.execute(text(
            "select id, run_id, call_key, status, deadline_at, ended_at, batch_id "
            "from ff_batch_items")))
        batches = rows(await c.execute(text(
            "select id, model, status, items, provider_batch_id from ff_batches")))
    return {"runs": runs, "attempts": attempts, "items": items, "batches": batches,
            "paid_twice_emulator": sum(n > 1 for n in emu.batches.paid.values()),
            "batch_items_paid": sum(emu.batches.paid.values()),
            "sync_enrich_twice": _sync_twice(emu)}


def _time(value: str | None) -> datetime | None:
    if value is None:
        return None
    t = datetime.fromisoformat(value)
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def measure(raw: dict[str, Any], clock: ScaledClock) -> dict[str, Any]:
    statuses = {r["id"]: r["status"] for r in raw["runs"]}
    flows = {r["id"]: r["flow"] for r in raw["runs"]}
    nightly = {r for r, fl in flows.items() if fl == "nightly"}
    cost: Counter[str] = Counter()
    enrich_cost: Counter[str] = Counter()
    by_tier: dict[str, Counter[str]] = defaultdict(Counter)
    for a in raw["attempts"]:
        cost[a["flow"]] += a["cost_usd"]
        if a["node"] == "enrich":
            enrich_cost[a["flow"]] += a["cost_usd"]
        by_tier[a["flow"]][a["tier"] or "standard"] += a["cost_usd"]
    item_by_id = {i["id"]: i for i in raw["items"]}
    deadline_of = {(i["run_id"], i["call_key"]): _time(i["deadline_at"]) for i in raw["items"]}
    late_answers, answered, sync_fallback, no_deadline = 0, 0, 0, 0
    paid: Counter[tuple[str, str]] = Counter()
    latest: datetime | None = None
    for a in raw["attempts"]:
        if a["run_id"] not in nightly or a["node"] != "enrich":
            continue
        key = a["call_key"]
        if key is None and a["batch_item_id"] in item_by_id:  # a late answer: try 0, no key
            key = item_by_id[a["batch_item_id"]]["call_key"]
        if a["outcome"] in ("ok", "late") and a["cost_usd"] > 0:
            paid[(a["run_id"], key)] += 1
        if a["outcome"] != "ok":
            continue
        answered += 1
        if a["tier"] == "batch" and a["batch_item_id"] in item_by_id:
            at = _time(item_by_id[a["batch_item_id"]]["ended_at"])
        else:
            sync_fallback += 1
            # ff_attempts.started_at is wall time (time.time()): mapped onto virtual time.
            started = _time(a["started_at"])
            assert started is not None
            at = clock.virtual(started.timestamp() + a["latency_ms"] / 1000)
        deadline = deadline_of.get((a["run_id"], a["call_key"]))
        if deadline is None:
            no_deadline += 1
        elif at is not None and at > deadline:
            late_answers += 1
        if at is not None and (latest is None or at > latest):
            latest = at
    sent = [b for b in raw["batches"] if b["provider_batch_id"]]
    return {
        "cost": dict(cost), "enrich_cost": dict(enrich_cost), "by_tier": {f: dict(t) for f, t in by_tier.items()},
        "lost": [r for r in statuses if statuses[r] != "succeeded"],
        "statuses": Counter(statuses.values()),
        "answered": answered, "late": late_answers, "no_deadline": no_deadline,
        "sync_fallback": sync_fallback,
        "paid_twice_ledger": sum(n > 1 for n in paid.values()),
        "paid_twice_emulator": raw["paid_twice_emulator"],
        "batch_items_paid": raw["batch_items_paid"],
        "sync_enrich_twice": raw["sync_enrich_twice"],
        "batches": Counter(b["status"] for b in sent),
        "sizes": sorted(b["items"] for b in sent),
        "items": Counter(i["status"] for i in raw["items"]),
        "last_answer": latest,
    }


def _sync_twice(emu: Any) -> int:
    """Nightly documents the emulator answered synchronously more than once."""
    seen: Counter[str] = Counter()
    for r in emu.requests:
        if r.status != 200 or r.fault is not None:
            continue
        body = json.dumps(r.body)
        i = body.find("Tag this document: night-")
        if i >= 0:
            seen[body[i:i + 31]] += 1
    return sum(n > 1 for n in seen.values())


def report(raw: dict[str, Any]) -> None:
    f = measure(raw, ScaledClock(raw["wall0"], raw["scale"]))
    std, night = f["cost"].get("all_standard", 0.0), f["cost"].get("nightly", 0.0)
    saving = 1 - night / std if std else 0.0
    paid_twice = f["paid_twice_ledger"] + f["paid_twice_emulator"] + f["sync_enrich_twice"]
    done = _time(raw["nightly_done"])
    hours = (done - T0).total_seconds() / 3600 if done else None
    last = (f["last_answer"] - T0).total_seconds() / 3600 if f["last_answer"] else None
    print()
    print(f"items (enrich calls)               {f['answered']} answered of {raw['items_asked']}")
    print(f"cost, all-standard                 ${std:.4f}  ("
          + ", ".join(f"{k} ${v:.4f}" for k, v in f["by_tier"].get("all_standard", {}).items())
          + ")")
    print(f"cost, deadline-aware               ${night:.4f}  ("
          + ", ".join(f"{k} ${v:.4f}" for k, v in f["by_tier"].get("nightly", {}).items())
          + ")")
    e_std = f["enrich_cost"].get("all_standard", 0.0)
    e_night = f["enrich_cost"].get("nightly", 0.0)
    print(f"saving                             {saving:.1%}  (target >= 45%; the enrich "
          f"node alone, the one that can wait: "
          f"{1 - e_night / e_std if e_std else 0.0:.1%}, ${e_night:.4f} vs ${e_std:.4f})")
    print(f"items answered after their deadline {f['late']}"
          + (f"  ({f['no_deadline']} without a parked deadline)" if f["no_deadline"] else ""))
    print(f"items paid twice                   {paid_twice}  (ledger {f['paid_twice_ledger']}, "
          f"emulator batch items {f['paid_twice_emulator']}, synchronous "
          f"{f['sync_enrich_twice']}; {f['batch_items_paid']} batch items paid)")
    print(f"runs lost                          {len(f['lost'])}  ({dict(f['statuses'])})")
    print(f"batches sent                       {len(f['sizes'])}  ({dict(f['batches'])}; "
          f"sizes {min(f['sizes'], default=0)}..{max(f['sizes'], default=0)})")
    print(f"fell back to a synchronous call    {f['sync_fallback']}  "
          f"(batch items: {dict(f['items'])})")
    print(f"worker SIGKILL                     {'1, replaced' if raw['killed'] else 'none'}")
    print(f"deadline-aware runs all ended      "
          f"{'-' if hours is None else f'+{hours:.1f}'} virtual hours after 20:00 "
          f"(last answer +{'-' if last is None else f'{last:.1f}'} h; deadline 6 h)")
    print(f"wall time                          {raw['elapsed']:.0f} s "
          f"(virtual time x{raw['scale']:g})")
    ok = saving >= 0.45 and f["late"] == 0 and paid_twice == 0 and not f["lost"]
    print(f"targets (>= 45% lower, 0 late, 0 paid twice, 0 lost): {'met' if ok else 'NOT met'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--scale", type=float, default=None,
                    help="virtual seconds per wall second (default 12; 60 with --quick)")
    ap.add_argument("--max-items", type=int, default=500, help="items per batch at most")
    ap.add_argument("--latency", type=float, default=0.0, help="emulated seconds per call")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600.0, help="wall seconds at most")
    ap.add_argument("--quick", action="store_true", help="1,000 items in 20 runs")
    ap.add_argument("--pg", default=os.environ.get("FRUGALFLOW_TEST_PG_URL",
                                                   "postgresql://postgres@127.0.0.1:5432/test"))
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--measure", metavar="RAW_JSON",
                    help="print the figures of an earlier run's raw.json (no run)")
    # worker mode (spawned by the driver)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--db", help=argparse.SUPPRESS)
    ap.add_argument("--emulator", help=argparse.SUPPRESS)
    ap.add_argument("--wall0", type=float, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.quick:
        args.items, args.runs, args.max_items = 1000, 20, 250
    if args.scale is None:
        args.scale = 60.0 if args.quick else 12.0
    if args.measure:
        report(json.loads(Path(args.measure).read_text()))
    elif args.worker:
        asyncio.run(worker_main(args))
    else:
        asyncio.run(driver(args))


if __name__ == "__main__":
    main()
