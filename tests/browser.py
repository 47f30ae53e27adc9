"""The run viewer in a real browser: the system's Chromium driven by Playwright (async API)
against a real app served by uvicorn on a free loopback port.

    async with open_browser() as browser, served(create_app(runner)) as url:
        page = await Watched.open(browser, "my-test")
        await page.visit(f"{url}/ui/runs")   # fails on console errors and failed requests
        await page.shot("runs")               # test-artifacts/my-test-runs.png

Chromium must be installed (Debian package `chromium`, which `.ci/run` installs): without it
the tests fail with the fix named, they never skip. Screenshots go to `test-artifacts/` (or
$FRUGALFLOW_TEST_ARTIFACTS), which git ignores.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from playwright.async_api import (
    Browser,
    ConsoleMessage,
    Page,
    Request,
    Response,
    async_playwright,
    expect,
)

ARTIFACTS = Path(os.environ.get("FRUGALFLOW_TEST_ARTIFACTS")
                 or Path(__file__).resolve().parent.parent / "test-artifacts")
TIMEOUT_MS = 30_000  # generous: two cores shared with other test processes
expect.set_options(timeout=TIMEOUT_MS)


def chromium() -> str:
    """The system Chromium's path; fails the test (with the fix) when it is missing."""
    path = os.environ.get("FRUGALFLOW_CHROMIUM") or shutil.which("chromium")
    if path is None:
        pytest.fail("the browser tests need the system's Chromium and `chromium` is not on "
                    "PATH: install it (Debian/Ubuntu: sudo apt-get install chromium; "
                    ".ci/run does it) or point FRUGALFLOW_CHROMIUM at a Chromium binary")
    return path


@contextlib.asynccontextmanager
async def open_browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        browser = await p.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Watched:
    """A page whose console errors, uncaught exceptions, failed requests and HTTP error
    answers are collected: `visit` and `check` fail the test on any of them."""

    page: Page
    name: str
    problems: list[str] = field(default_factory=list)
    allowed_statuses: set[int] = field(default_factory=set)

    @classmethod
    async def open(cls, browser: Browser, name: str, *, width: int = 1200,
                   height: int = 900) -> Watched:
        context = await browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(TIMEOUT_MS)
        watched = cls(await context.new_page(), re.sub(r"[^\w.-]+", "-", name))
        watched.page.on("console", watched._console)
        watched.page.on("pageerror", lambda e: watched.problems.append(f"page error: {e}"))
        watched.page.on("requestfailed", watched._failed)
        watched.page.on("response", watched._response)
        return watched

    def _console(self, message: ConsoleMessage) -> None:
        if message.type in ("error", "assert"):
            self.problems.append(f"console {message.type}: {message.text} "
                                 f"({message.location.get('url')})")

    def _failed(self, request: Request) -> None:
        # An event stream the page closes (the run stopped, or the page was left) ends as
        # an aborted request: that is the page working, not failing.
        if request.resource_type == "eventsource" and "ABORTED" in (request.failure or ""):
            return
        self.problems.append(f"request failed: {request.method} {request.url}: "
                             f"{request.failure}")

    def _response(self, response: Response) -> None:
        if response.status >= 400 and response.status not in self.allowed_statuses:
            self.problems.append(f"HTTP {response.status}: {response.request.method} "
                                 f"{response.url}")

    def check(self) -> None:
        assert not self.problems, "the page had problems:\n" + "\n".join(self.problems)

    async def visit(self, url: str) -> Response | None:
        response = await self.page.goto(url, wait_until="load")
        self.check()
        return response

    async def shot(self, what: str, *, full_page: bool = True) -> Path:
        """A screenshot kept as a test artifact."""
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{self.name}-{what}.png"
        await self.page.screenshot(path=str(path), full_page=full_page)
        return path

    async def close(self) -> None:
        self.check()
        await self.page.context.close()
