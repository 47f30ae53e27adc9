"""A worker process for the scale-out tests and bench/scale.py.

    python tests/scale_worker.py DATABASE_URL [--latency 0.2] [--nodes 3] [--concurrency 16]

Executes dispatched runs of the `chain` flow on the simulated catalog (each model call
sleeps --latency seconds); breakers shared through Redis when FRUGALFLOW_REDIS_URL is set.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from durable_flows import chain_flow  # noqa: E402

from frugalflow import Catalog  # noqa: E402
from frugalflow.resilience import BreakerRegistry  # noqa: E402
from frugalflow.scale.dispatch import ProcrastinateDispatcher, run_worker  # noqa: E402
from frugalflow.scale.redis import RedisBreakerRegistry, RedisRateLimiter  # noqa: E402
from frugalflow.runner import Runner  # noqa: E402


def slow_catalog(latency: float) -> Catalog:
    return Catalog([s.model_copy(update={"model_kwargs": {"latency": latency}})
                    for s in Catalog.simulated()], name="slow")


def make_runner(url: str, *, latency: float, nodes: int, concurrency: int = 16,
                dispatcher: ProcrastinateDispatcher | None = None,
                lease_ttl: float = 5.0, stall_timeout: float = 3.0) -> Runner:
    redis = os.environ.get("FRUGALFLOW_REDIS_URL")
    return Runner(
        url, flows=[chain_flow(nodes)], catalog=slow_catalog(latency),
        dispatcher=dispatcher or ProcrastinateDispatcher(
            url, stall_timeout=stall_timeout, heartbeat=0.5),
        lease_ttl=lease_ttl, max_concurrency=concurrency,
        breakers=RedisBreakerRegistry(redis) if redis else BreakerRegistry(),
        limiter=RedisRateLimiter(redis) if redis else None,
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("url")
    ap.add_argument("--latency", type=float, default=0.2)
    ap.add_argument("--nodes", type=int, default=3)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--lease-ttl", type=float, default=5.0)
    ap.add_argument("--stall-timeout", type=float, default=3.0)
    args = ap.parse_args()
    runner = make_runner(args.url, latency=args.latency, nodes=args.nodes,
                         concurrency=args.concurrency, lease_ttl=args.lease_ttl,
                         stall_timeout=args.stall_timeout)
    print(f"worker {runner.holder} ready", flush=True)
    try:
        await run_worker(runner, concurrency=args.concurrency, stall_check=0.5)
    finally:
        await runner.close()


if __name__ == "__main__":
    asyncio.run(main())
