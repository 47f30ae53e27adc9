"""The run viewer as a FastAPI router: its pages under /ui, its static files, its token prompt.

Mounted by `create_app` (and by `create_router(ui=True)`) next to the API, at the same prefix:
the pages call the API (`<prefix>/runs/...`) from the browser with the cookie the token
prompt sets.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.responses import HTMLResponse, Response

from ...runner import Runner
from ..auth import Auth
from .context import UI, Viewer, remember_paths
from .login import add_login_routes
from .pages import add_run_pages

_STATIC_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                 ".svg": "image/svg+xml", ".png": "image/png", ".txt": "text/plain"}


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The package's static files, read once: name -> (content, media type)."""
    out: dict[str, tuple[bytes, str]] = {}
    for item in resources.files("frugalflow.service.ui").joinpath("static").iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in _STATIC_TYPES:
            out[item.name] = (item.read_bytes(), _STATIC_TYPES[suffix])
    return out


def create_ui_router(runner: Runner, auth: Auth) -> APIRouter:
    """The run viewer's routes (paths start with /ui): include it at the same prefix as the
    API's router. Pages need the same tokens as the API (a prompt sets a cookie)."""
    ui = UI(runner, auth)
    router = APIRouter()
    add_login_routes(router, ui)
    add_run_pages(router, ui)
    _add_stub_pages(router, ui)
    files = _static_files()

    @router.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        # Public (the token prompt needs its style): code and style only, no data.
        hit = files.get(name)
        if hit is None:
            raise HTTPException(404, detail="no such file")
        return Response(hit[0], media_type=hit[1], headers={
            "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    remember_paths(router.routes)  # last: every page's path, the stubs' successors' too
    return router


def _add_stub_pages(router: APIRouter, ui: UI) -> None:
    # Costs (by day, model, node and flow, as charts) and Catalog & health (models, prices,
    # breaker states) are built on their own branch; these stubs hold their places in the
    # navigation until then: replace them there.

    @router.get("/ui/costs", include_in_schema=False)
    async def costs_page(request: Request,
                         viewer: Viewer = Depends(ui.viewer)) -> HTMLResponse:
        return await ui.page(request, "stub.html", viewer=viewer, nav="costs", title="Costs")

    @router.get("/ui/catalog", include_in_schema=False)
    async def catalog_page(request: Request,
                           viewer: Viewer = Depends(ui.viewer)) -> HTMLResponse:
        return await ui.page(request, "stub.html", viewer=viewer, nav="catalog",
                             title="Catalog & health")
