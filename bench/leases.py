"""Many concurrent runs in ONE process on PostgreSQL: does a busy executor lose its own leases?

No other executor exists, so every run should succeed; before issue 11, a process too busy
to renew its leases in time failed some of them ("lease lost before its end was recorded").
Each run is the `chain` flow (5 model nodes, simulated catalog, LATENCY s per call).

    python bench/leases.py [--runs 1000] [--lease-ttl 30] [--latency 0.05]
                           [--pg postgresql://postgres@127.0.0.1:5432/test]

It prints the statuses and the time; it is not a timed test.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from pg import ADMIN_URL, create_database, drop_database  # noqa: E402


async def main(runs: int, lease_ttl: float, latency: float, admin: str) -> None:
    from durable_flows import chain_flow

    from frugalflow import Catalog
    from frugalflow.resilience import BreakerRegistry
    from frugalflow.runner import Runner

    cat = Catalog.simulated()
    catalog = Catalog([s.model_copy(update={"model_kwargs": {"latency": latency}}) for s in cat],
                      name="bench")
    url = await create_database(admin)
    runner = Runner(url, flows=[chain_flow()], catalog=catalog, breakers=BreakerRegistry(),
                    lease_ttl=lease_ttl, max_concurrency=runs)
    try:
        await runner.setup()
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(runner.start("chain", {"topic": f"load {i}"}) for i in range(runs)),
            return_exceptions=True)
        elapsed = time.perf_counter() - t0
        statuses = Counter(r.status if not isinstance(r, BaseException) else type(r).__name__
                           for r in results)
        errors = Counter((r.error or "")[:80] for r in results
                         if not isinstance(r, BaseException) and r.status != "succeeded")
        print(f"{runs} runs x 5 nodes, one process, lease_ttl={lease_ttl:g} s, "
              f"latency={latency:g} s: {dict(statuses)} in {elapsed:.1f} s")
        for error, n in errors.most_common(5):
            print(f"  {n} x {error}")
    finally:
        await runner.close()
        await drop_database(url, admin)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--lease-ttl", type=float, default=30.0)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--pg", default=ADMIN_URL)
    args = parser.parse_args()
    asyncio.run(main(args.runs, args.lease_ttl, args.latency, args.pg))
