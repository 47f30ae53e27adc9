"""The stand-alone service app: the router, the body limit, docs behind the token."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from os import PathLike
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from starlette.responses import Response

from ..exceptions import UserError
from ..runner import Runner
from .auth import Auth, Principal
from .bodies import MAX_BODY_BYTES, MAX_JSON_DEPTH, BodyLimitMiddleware
from .routes import create_router

if TYPE_CHECKING:
    from ..batches.poller import BatchPoller

Docs = Literal["token", "public", "off"]


def is_loopback(host: str) -> bool:
    """True for hosts only this machine reaches. An empty host binds every interface."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False



def create_app(
    runner: Runner,
    *,
    token: str | None = None,
    tokens: Mapping[str, Principal] | str | PathLike[str] | None = None,
    host: str = "127.0.0.1",
    max_body_bytes: int = MAX_BODY_BYTES,
    max_json_depth: int = MAX_JSON_DEPTH,
    docs: Docs = "token",
    ui: bool = True,
    heartbeat: float = 15.0,
    poll_batches: bool | BatchPoller = True,
) -> FastAPI:
    """A stand-alone app around `runner`. Refuses to serve off loopback (any other address,
    a wildcard such as 0.0.0.0 or ::, or an empty host) without a token. `docs`: "token"
    (the OpenAPI schema and /docs need a token, when the API has one), "public" or "off".
    `ui`: serve the run viewer at /ui (same tokens; a prompt keeps the token in a cookie).
    `heartbeat`: seconds of silence after which an event stream sends a keep-alive.
    `poll_batches`: run a batch poller beside the app (parked requests sent, waiting runs
    woken; see `frugalflow.batches.poller`): True for the default one, or a configured
    `runner.batch_poller(gather=..., max_items=...)`."""
    auth = Auth(token, tokens)  # refuses empty and malformed tokens
    if auth.open and not is_loopback(host):
        where = host or "every interface (an empty host)"
        raise UserError(f"refusing to serve on {where} without a bearer token: set "
                        "FRUGALFLOW_TOKEN or --tokens, or bind to 127.0.0.1")
    if docs not in ("token", "public", "off"):
        raise UserError(f"docs={docs!r}: use 'token', 'public' or 'off'")

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await runner.setup()
        poller = (poll_batches if not isinstance(poll_batches, bool)
                  else runner.batch_poller() if poll_batches else None)
        if poller is not None:
            poller.start()
        yield
        if poller is not None:
            await poller.stop()
        await runner.close()  # running runs stop as `paused`, resumable later

    public = docs == "public"
    app = FastAPI(title="frugalflow", version="1", lifespan=lifespan,
                  openapi_url="/openapi.json" if public else None,
                  docs_url="/docs" if public else None, redoc_url=None)
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_body_bytes)
    app.include_router(create_router(runner, token=token, tokens=tokens,
                                     allow_unauthenticated=True, max_body_bytes=max_body_bytes,
                                     max_json_depth=max_json_depth, ui=ui,
                                     heartbeat=heartbeat))
    if docs == "token":
        guarded = [Depends(auth.require)]

        @app.get("/openapi.json", include_in_schema=False, dependencies=guarded)
        async def openapi() -> dict[str, Any]:
            return app.openapi()

        @app.get("/docs", include_in_schema=False, dependencies=guarded)
        async def swagger() -> Response:
            return get_swagger_ui_html(openapi_url="/openapi.json", title="frugalflow")
    return app
