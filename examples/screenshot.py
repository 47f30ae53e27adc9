"""Regenerates docs/run-page.png, the README's picture of the run viewer: a support-triage run
on the simulated providers in which one provider fails and its calls fall back.

    python examples/screenshot.py [OUTPUT.png]

Offline: the simulated catalog, a throwaway SQLite database, the service on a free loopback
port, and the system's Chromium (Debian package `chromium`) driven by Playwright.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import uvicorn
from playwright.async_api import async_playwright

from frugalflow import BreakerRegistry, Catalog, FallbackPolicy
from frugalflow.cli import load_flow
from frugalflow.runner import Runner
from frugalflow.service import create_app
from frugalflow.testing.simulator import simulator

OUTPUT = Path(__file__).resolve().parent.parent / "docs" / "run-page.png"
WIDTH = 1200
TICKET = ("Hi, I was charged twice for order #4417 on May 3rd (two payments of $39.90). "
          "Please refund the duplicate. Thanks, Dana")


async def _run(db: str) -> tuple[Runner, str]:
    simulator.reset(seed=7)
    simulator.latency_scale = 0.02  # 2% of each model's typical latency: quick, still visible
    # sim-groq answers its first call, then is down: later calls fall back to another model.
    simulator.fail("sim-groq", "unavailable", calls=range(2, 10_000))
    runner = Runner(db, flows=[load_flow("support_triage")], catalog=Catalog.simulated(),
                    breakers=BreakerRegistry(),
                    fallback=FallbackPolicy(max_retries=0, backoff_base=0.01, backoff_max=0.05))
    result = await runner.start("support_triage", {"ticket": TICKET}, wait=True)
    return runner, result.run_id


async def screenshot(output: Path = OUTPUT) -> Path:
    """The run page of a fresh run with a fallback, as a PNG WIDTH pixels wide."""
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("examples/screenshot.py needs the system's Chromium: "
                         "sudo apt-get install chromium")
    with tempfile.TemporaryDirectory() as tmp:
        runner, run_id = await _run(f"sqlite:///{Path(tmp) / 'screenshot.db'}")
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        server = uvicorn.Server(uvicorn.Config(create_app(runner), log_level="warning"))
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        try:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/ui/runs/{run_id}"
            async with async_playwright() as p:
                browser = await p.chromium.launch(executable_path=chromium,
                                                  args=["--no-sandbox"])
                page = await browser.new_page(viewport={"width": WIDTH, "height": 900})
                await page.goto(url, wait_until="load")
                await page.wait_for_selector("tr.fell-back")
                # Down to the end of the timeline (the input and output follow it).
                box = await page.locator("section.timeline").bounding_box()
                assert box is not None
                output.parent.mkdir(parents=True, exist_ok=True)
                await page.screenshot(path=str(output), full_page=True, clip={
                    "x": 0, "y": 0, "width": WIDTH, "height": box["y"] + box["height"] + 14})
                await browser.close()
        finally:
            server.should_exit = True
            await serving
            sock.close()
            simulator.reset(seed=0)
    _shrink(output)
    return output


def _shrink(path: Path) -> None:
    """Fewer colours, far fewer bytes (the page is flat colours); needs Pillow, if present."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


if __name__ == "__main__":
    print(asyncio.run(screenshot(Path(sys.argv[1]) if len(sys.argv) > 1 else OUTPUT)))
