"""Stored node policies: versions of a named `Policy` (the newest is the one runs use)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select

from ..exceptions import UserError
from ..policies import Policy
from .store import Store
from .tables import PolicyRow, utcnow

__all__ = ["PolicyStore", "StoredPolicy"]

_POLICIES = PolicyRow.__table__  # type: ignore[attr-defined]


@dataclass(frozen=True, slots=True)
class StoredPolicy:
    """One stored version of a named policy."""

    name: str
    version: int
    flow: str
    policy: Policy
    source: str | None
    created_at: datetime


class PolicyStore:
    """Save and load versions of named node policies in the run database."""

    def __init__(self, store: Store) -> None:
        self.store = store

    async def save(self, name: str, policy: Policy, *, source: str | None = None) -> int:
        """Store `policy` as the next version of `name`; returns the version."""
        if not name or not name.strip():
            raise UserError("a policy needs a name (e.g. --save-policy triage-2026-11)")
        await self.store.setup()
        async with self.store.write() as conn:
            current = (await conn.execute(
                select(func.max(_POLICIES.c.version)).where(_POLICIES.c.name == name))).scalar()
            version = int(current or 0) + 1
            await conn.execute(_POLICIES.insert().values(
                name=name, version=version, flow=policy.flow,
                body=policy.model_dump(mode="json"), source=source or policy.source,
                created_at=utcnow()))
        return version

    async def version(self, name: str) -> int | None:
        """The newest stored version of `name` (None: none stored)."""
        await self.store.setup()
        async with self.store.read() as conn:
            v = (await conn.execute(
                select(func.max(_POLICIES.c.version)).where(_POLICIES.c.name == name))).scalar()
        return int(v) if v is not None else None

    async def load(self, name: str, version: int | None = None) -> StoredPolicy | None:
        """Version `version` (default: the newest) of `name`, or None when none is stored."""
        await self.store.setup()
        q = select(_POLICIES).where(_POLICIES.c.name == name)
        q = (q.where(_POLICIES.c.version == version) if version is not None
             else q.order_by(_POLICIES.c.version.desc()).limit(1))
        async with self.store.read() as conn:
            row = (await conn.execute(q)).first()
        if row is None:
            return None
        return StoredPolicy(name=row.name, version=row.version, flow=row.flow,
                            policy=Policy.model_validate(row.body), source=row.source,
                            created_at=row.created_at)

    async def list(self) -> list[StoredPolicy]:
        """Every stored version, by name then version."""
        await self.store.setup()
        async with self.store.read() as conn:
            rows = (await conn.execute(
                select(_POLICIES).order_by(_POLICIES.c.name, _POLICIES.c.version))).all()
        return [StoredPolicy(name=r.name, version=r.version, flow=r.flow,
                             policy=Policy.model_validate(r.body), source=r.source,
                             created_at=r.created_at) for r in rows]
