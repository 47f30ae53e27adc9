"""What every run viewer page shares: the runner, the auth, the templates, who is looking, and
how a page is rendered (autoescaped, with security headers)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import jinja2
from fastapi import HTTPException, Request
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute
from starlette.responses import HTMLResponse

from ...flow import CompiledFlow
from ...runner import Runner
from ..auth import CSRF_HEADER, Auth, Principal
from .graph import Drawing

# No inline script or style anywhere: a value that slipped past escaping still cannot run.
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",  # pages show runs' data: not for shared caches
}

RUNS_ROUTE = "frugalflow_ui_runs"
"""The name of the runs page's route: the UI's other paths are derived from its URL."""


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page: a principal, or nobody in particular on an open service."""

    principal: Principal | None

    @property
    def only(self) -> str | None:
        """The principal whose runs alone this viewer may see (None: every run)."""
        p = self.principal
        return None if p is None or p.is_admin else p.name


@dataclass(frozen=True)
class Paths:
    """Where things are for this request: the API's base path and the UI's (both without
    a trailing slash; the API's is "" at the root of the app)."""

    api: str
    ui: str

    @property
    def cookie(self) -> str:
        return self.api or "/"


_RELATIVE: dict[str, str] = {}
"""Each UI route's name -> its path inside the UI router (before any include prefix)."""


def remember_paths(routes: list[BaseRoute]) -> None:
    """Note the UI router's own paths, so `paths` can tell the prefix it is mounted at."""
    for route in routes:
        if isinstance(route, APIRoute):
            _RELATIVE[route.name] = route.path


def paths(request: Request) -> Paths:
    """The request's path less the matched UI route's own path is the prefix the viewer is
    mounted at (with the app's root path). Not `url_for`: an app may mount two viewers, for
    two runners, at two prefixes. The route's own path, as the UI router defined it, comes
    from `remember_paths` (FastAPI versions differ in what `scope["route"].path` holds)."""
    path = request.url.path
    own = _RELATIVE.get(getattr(request.scope.get("route"), "name", ""))
    prefix: str | None = None
    if own is not None and "{" in own:  # up to the first parameter: the run id may hold "/"
        at = path.find(own[:own.index("{")])
        prefix = path[:at] if at >= 0 else None
    elif own is not None and path.endswith(own):
        prefix = path[:len(path) - len(own)]
    if prefix is None:  # not one of the UI's routes: the first viewer mounted in the app
        prefix = request.url_for(RUNS_ROUTE).path.removesuffix("/ui/runs")
    return Paths(api=prefix, ui=f"{prefix}/ui")


def security_headers(response: HTMLResponse) -> HTMLResponse:
    response.headers.update(_HEADERS)
    return response


def usd(value: float | None) -> str:
    """Dollars with enough digits for a cheap call ($0.000042) and few for a dear run."""
    if value is None:
        return "-"
    if value == 0:
        return "$0"
    if abs(value) >= 1:
        return f"${value:,.2f}"
    return f"${value:.6f}".rstrip("0")


def secs(value: float | None) -> str:
    if value is None:
        return "-"
    if value < 1:
        return f"{value * 1000:.0f} ms"
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(int(value), 60)
    if minutes < 60:
        return f"{minutes} min {seconds} s"
    return f"{minutes // 60} h {minutes % 60} min"


def when(value: datetime | None) -> str:
    if value is None:
        return "-"
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class UI:
    """The run viewer's shared parts. Pages call `viewer` (a dependency) and `page`."""

    def __init__(self, runner: Runner, auth: Auth) -> None:
        self.runner = runner
        self.auth = auth
        self.env = jinja2.Environment(
            loader=jinja2.PackageLoader("frugalflow.service.ui", "templates"),
            autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True,
            lstrip_blocks=True, enable_async=False)
        self.env.filters.update(usd=usd, secs=secs, when=when)
        self.drawings: dict[str, tuple[CompiledFlow[Any], Drawing]] = {}
        """Each flow's graph laid out, with the compiled flow it was drawn from."""

    async def viewer(self, request: Request) -> Viewer:
        """FastAPI dependency: who is looking; without a valid token (header or cookie) a
        redirect to the token prompt, which comes back here."""
        if self.auth.open:
            return Viewer(None)
        who = self.auth.identify(request)
        if who is None:
            where = paths(request)
            back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            raise HTTPException(303, detail="a token is required",
                                headers={"Location": f"{where.ui}/login?next={quote(back)}"})
        return Viewer(who)

    def render(self, request: Request, template: str, *, viewer: Viewer | None,
               **values: Any) -> str:
        where = paths(request)
        return self.env.get_template(template).render(
            api=where.api, ui=where.ui, viewer=viewer, auth_open=self.auth.open,
            csrf_header=CSRF_HEADER, **values)

    async def page(self, request: Request, template: str, *, viewer: Viewer | None,
                   status_code: int = 200, **values: Any) -> HTMLResponse:
        """The template rendered (in a thread: runs' stored values may be large)."""
        html = await asyncio.to_thread(self.render, request, template, viewer=viewer,
                                       **values)
        return security_headers(HTMLResponse(html, status_code=status_code))
