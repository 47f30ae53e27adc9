"""The token prompt: a form that checks a token and keeps it in an HttpOnly cookie, and logout.

The cookie is the token itself (the API's `Auth` accepts it in place of the Authorization
header): HttpOnly (no script reads it), SameSite=Strict (no other site's page sends it),
Secure on https, and scoped to the service's path.
"""

from __future__ import annotations

from urllib.parse import parse_qs

from fastapi import APIRouter, Depends, HTTPException, Request
from starlette.responses import RedirectResponse, Response

from ..auth import COOKIE, same_origin
from .context import UI, paths

_MAX_FORM_BYTES = 8192  # a token and a path


async def _form(request: Request) -> dict[str, str]:
    """The urlencoded form's first value per field (no multipart dependency for one field)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > _MAX_FORM_BYTES:
            raise HTTPException(413, detail="the form is larger than a token prompt's")
    fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
    return {k: v[0] for k, v in fields.items()}


def _next(request: Request, wanted: str | None) -> str:
    """Where to go after logging in: a path inside the UI, else the runs page (never
    another site: `//evil.example` and `/ui/../x` are refused)."""
    ui = paths(request).ui
    if (wanted and wanted.startswith(ui + "/") and not wanted.startswith("//")
            and "\\" not in wanted and "/.." not in wanted and "/login" not in wanted):
        return wanted
    return f"{ui}/runs"


def _refuse_cross_site(request: Request) -> None:
    if not same_origin(request):
        raise HTTPException(403, detail="refused: the form was sent from another site")


def add_login_routes(router: APIRouter, ui: UI) -> None:
    """GET/POST /ui/login (the prompt), POST /ui/logout."""

    @router.get("/ui/login", include_in_schema=False)
    async def login_page(request: Request, next: str | None = None) -> Response:
        if ui.auth.open:
            return RedirectResponse(_next(request, next), status_code=303)
        return await ui.page(request, "login.html", viewer=None, next=_next(request, next),
                             error=None)

    @router.post("/ui/login", include_in_schema=False)
    async def login(request: Request) -> Response:
        _refuse_cross_site(request)  # no one logs a visitor into their own account
        form = await _form(request)
        target = _next(request, form.get("next"))
        if ui.auth.open:
            return RedirectResponse(target, status_code=303)
        token = form.get("token", "").strip()
        if not token or ui.auth.lookup(token) is None:
            return await ui.page(request, "login.html", viewer=None, next=target,
                                 error="That token is not valid: check it and try again.")
        response = RedirectResponse(target, status_code=303)
        response.set_cookie(COOKIE, token, path=paths(request).cookie, httponly=True,
                            samesite="strict", secure=request.url.scheme == "https")
        return response

    @router.post("/ui/logout", include_in_schema=False,
                 dependencies=[Depends(_refuse_cross_site)])
    async def logout(request: Request) -> Response:
        where = paths(request)
        response = RedirectResponse(f"{where.ui}/login", status_code=303)
        response.delete_cookie(COOKIE, path=where.cookie, httponly=True, samesite="strict",
                               secure=request.url.scheme == "https")
        return response
