"""A `frugalflow worker` for the waiting-run tests: executes dispatched runs of the nightly
flow against the provider emulator at EMULATOR_URL and runs a fast batch poller.

    python tests/waiting_worker.py DATABASE_URL EMULATOR_URL
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from waiting_flows import MODELS, nightly  # noqa: E402

from frugalflow.runner import Runner  # noqa: E402
from frugalflow.scale.dispatch import ProcrastinateDispatcher, run_worker  # noqa: E402
from frugalflow.testing.emulator import emulated_catalog  # noqa: E402


async def main(db: str, url: str) -> None:
    runner = Runner(db, flows=[nightly()], catalog=emulated_catalog(url, MODELS),
                    lease_ttl=5.0,
                    dispatcher=ProcrastinateDispatcher(db, stall_timeout=3.0, heartbeat=0.5))
    print(f"worker {runner.holder} ready", flush=True)
    try:
        await run_worker(runner, concurrency=8, stall_check=0.5,
                         poll_batches=runner.batch_poller(gather=0, poll_every=0, every=0.05,
                                                         claim_for=5))
    finally:
        await runner.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
