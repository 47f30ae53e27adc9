"""A batch poller in its own process, for the tests that SIGKILL it:

    python tests/batch_poller_child.py DATABASE_URL EMULATOR_URL after-sending|before-recording [MODEL...]

`after-sending`: one tick (the batch is sent and recorded), then `sent` is printed and the
process waits to be killed. `before-recording`: the tick sends the batch, prints `sent`
before recording it, and waits there to be killed (its claim lapses 2 s later). Its catalog
holds the emulated MODELs (default: waiting_flows.MODELS), as the killing test's does.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from waiting_flows import MODELS, nightly  # noqa: E402

from frugalflow.batches.poller import BatchPoller  # noqa: E402
from frugalflow.runner import Runner  # noqa: E402
from frugalflow.testing.emulator import emulated_catalog  # noqa: E402


async def main(db: str, url: str, mode: str, *models: str) -> None:
    runner = Runner(db, flows=[nightly()], catalog=emulated_catalog(url, models or MODELS))
    if mode == "before-recording":
        async def stop_here(self: BatchPoller, batch_id: str, provider_id: str) -> None:
            print("sent", flush=True)
            await asyncio.Event().wait()  # killed here

        BatchPoller._sent = stop_here  # type: ignore[method-assign]
    # A short claim (it lapses soon after the kill), yet long enough for the send: a send
    # is cut after half the claim.
    poller = runner.batch_poller(gather=0, poll_every=0, claim_for=2.0)
    await poller.tick()
    print("sent", flush=True)
    await asyncio.Event().wait()  # killed here


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:]))
