"""A worker process that routes on a stored node policy (the policy pick-up test).

    python tests/policy_worker.py DATABASE_URL POLICY_NAME

Executes dispatched runs of the one-node `chain` flow on the simulated catalog with
`Runner(policy=POLICY_NAME)`; prints `ready` once it is set up.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from durable_flows import chain_flow  # noqa: E402

from frugalflow import Catalog  # noqa: E402
from frugalflow.resilience import BreakerRegistry  # noqa: E402
from frugalflow.runner import Runner  # noqa: E402
from frugalflow.scale.dispatch import ProcrastinateDispatcher, run_worker  # noqa: E402


async def main() -> None:
    url, policy = sys.argv[1], sys.argv[2]
    runner = Runner(url, flows=[chain_flow(1)], catalog=Catalog.simulated(),
                    dispatcher=ProcrastinateDispatcher(url, stall_timeout=3.0, heartbeat=0.5),
                    breakers=BreakerRegistry(), policy=policy, lease_ttl=5.0)
    print("ready", flush=True)
    try:
        await run_worker(runner, concurrency=4, stall_check=0.5)
    finally:
        await runner.close()


if __name__ == "__main__":
    asyncio.run(main())
