"""Durable state: the database (SQLite or PostgreSQL), LangGraph checkpoints and the run ledger."""

from .store import MIGRATIONS, SCHEMA_VERSION, Store, default_url

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "Store", "default_url"]
