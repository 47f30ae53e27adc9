"""The run viewer as a FastAPI router: its pages under /ui, its static files, its token prompt.

Mounted by `create_app` (and by `create_router(ui=True)`) next to the API, at the same prefix:
the pages call the API (`<prefix>/runs/...`) from the browser with the cookie the token
prompt sets.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, HTTPException
from starlette.responses import Response

from ...runner import Runner
from ..auth import Auth
from .catalog_page import add_catalog_page
from .context import UI, remember_paths
from .costs_page import add_costs_page
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
    add_costs_page(router, ui)
    add_catalog_page(router, ui)
    files = _static_files()

    @router.get("/ui/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        # Public (the token prompt needs its style): code and style only, no data.
        hit = files.get(name)
        if hit is None:
            raise HTTPException(404, detail="no such file")
        return Response(hit[0], media_type=hit[1], headers={
            "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"})

    remember_paths(router.routes)  # last: every page's path
    return router
