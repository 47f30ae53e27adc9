"""frugalflow inside an existing FastAPI app: one lifespan, one database for both.

    FRUGALFLOW_TOKEN=... uvicorn examples.service.app:app --port 8000   # from the repo root

frugalflow's router takes the bearer token from FRUGALFLOW_TOKEN (without one it warns:
anyone who reaches the app could use it).

The app owns its SQLAlchemy engine (here for its own `notes` table); frugalflow's Store
shares the same database URL, and the Runner starts and stops with the app's lifespan:
on shutdown, running runs stop as `paused` and can be resumed by the next process.
"""

from __future__ import annotations

import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from sqlalchemy import text

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # flows/, agents/, tools/

from frugalflow import Catalog  # noqa: E402
from frugalflow.cli import load_all_flows  # noqa: E402
from frugalflow.persistence import Store  # noqa: E402
from frugalflow.runner import Runner  # noqa: E402
from frugalflow.service import create_router  # noqa: E402

DATABASE_URL = os.environ.get("FRUGALFLOW_DATABASE_URL", f"sqlite:///{ROOT / 'service.db'}")
store = Store(DATABASE_URL)  # one Store (engines, pool) for the app and frugalflow
runner = Runner(store, flows=load_all_flows(str(ROOT / "flows")), catalog=Catalog.default())


@asynccontextmanager
async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
    await runner.setup()
    async with store.write() as conn:  # the app's own table, in the same database
        await conn.execute(text("CREATE TABLE IF NOT EXISTS notes (id INTEGER PRIMARY KEY, body TEXT)"))
    yield
    await runner.close()


app = FastAPI(title="support desk", lifespan=lifespan)
app.include_router(create_router(runner, token=os.environ.get("FRUGALFLOW_TOKEN")),
                   prefix="/frugalflow", tags=["frugalflow"])


@app.post("/tickets")
async def new_ticket(ticket: dict[str, str]) -> dict[str, object]:
    """The app's own endpoint: store a note and triage the ticket with frugalflow."""
    async with store.write() as conn:
        await conn.execute(text("INSERT INTO notes (body) VALUES (:b)"), {"b": ticket.get("text", "")})
    result = await runner.start("support_triage", {"ticket": ticket.get("text", "")}, budget=0.05)
    return {"run_id": result.run_id, "status": result.status, "cost_usd": result.cost_usd,
            "category": (result.state or {}).get("category")}
