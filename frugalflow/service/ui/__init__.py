"""The run viewer: server-rendered pages under /ui (runs, a run, costs, catalog and health).

`create_app` serves it at /ui; `create_router(ui=True)` adds it to the API's router (at the
same prefix). It needs the API's tokens: a prompt keeps the token in an HttpOnly cookie,
which the API accepts too (so the page's live EventSource can follow a run's events);
cookie-authenticated writes need the page's CSRF header and a same-origin request.
"""

from __future__ import annotations

from .router import create_ui_router

__all__ = ["create_ui_router"]
