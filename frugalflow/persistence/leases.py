"""Run leases: who may execute a run until when, and the fence every write of the run checks.

Whoever holds a run's lease (`acquire_lease`) may execute it; `epoch` grows with every new
holder. The holder's writes carry a `Fence` (set with `fenced` around the run): each write
checks it in its own transaction, and with a TTL also renews the lease there, so a stale
executor writes nothing once another one took the run over. The Store's writes apply the
fence with `check_fence`, the checkpoint saver's plans with `fence_plan`: one rule.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator
from contextlib import asynccontextmanager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from ..exceptions import LeaseError
from .plans import Op, Plan, lean_op
from .tables import LeaseHistoryRow, LeaseRow, utcnow

if TYPE_CHECKING:
    from .store import Store

__all__ = [
    "Fence",
    "Lease",
    "acquire_lease",
    "afenced",
    "check_fence",
    "check_lease",
    "current_fence",
    "fence_check",
    "fence_checks",
    "fence_plan",
    "fenced",
    "holder_id",
    "renew_statement",
    "unfenced",
]

T = TypeVar("T")

# SQLModel sets `__table__` on table classes at class creation but does not declare it.
_LEASES = LeaseRow.__table__  # type: ignore[attr-defined]
_HISTORY = LeaseHistoryRow.__table__  # type: ignore[attr-defined]


# -- the fence ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fence:
    """Writes made under this fence commit only while (run_id, holder, epoch) holds the lease.

    With `ttl` (the Runner's fences), each write also renews the lease for `ttl` seconds in
    its own transaction, even past its expiry as long as nobody took it over (holder and
    epoch unchanged): a merely slow executor keeps its run; only a takeover fences it off.
    Without `ttl`, an expired lease rejects the write."""

    run_id: str
    holder: str
    epoch: int
    ttl: float | None = None


_FENCE: ContextVar[Fence | None] = ContextVar("frugalflow_fence", default=None)


@contextmanager
def fenced(fence: Fence | None) -> Iterator[None]:
    """Fence every Store write of this context (and of tasks it starts) with `fence`."""
    token = _FENCE.set(fence)
    try:
        yield
    finally:
        _FENCE.reset(token)


@asynccontextmanager
async def afenced(fence: Fence | None) -> AsyncIterator[None]:
    """`fenced`, for `async with` lines that enter other async contexts too."""
    with fenced(fence):
        yield


def unfenced() -> Any:
    """A context for writes that must go through whatever the lease says (lease bookkeeping)."""
    return fenced(None)


def current_fence() -> Fence | None:
    """The fence of this context's writes (None: unfenced)."""
    return _FENCE.get()


def check_lease(fence: Fence, row: Any, what: str = "write") -> None:
    """Raise LeaseError unless `row` (the run's lease row: holder, epoch, expires_at, or
    None) says `fence` still holds its run. The one rule every fenced write applies."""
    now = datetime.now(timezone.utc)
    if row is None or row.holder != fence.holder or row.epoch != fence.epoch \
            or _aware(row.expires_at) <= now:
        raise LeaseError(
            f"run {fence.run_id!r}: this executor ({fence.holder}, epoch {fence.epoch}) no "
            f"longer holds the lease; the {what} was rejected",
            run_id=fence.run_id, holder=row.holder if row is not None else "",
        )


def renew_statement(fence: Fence) -> Any:
    """UPDATE extending the lease by `fence.ttl` if `fence` still names its holder and epoch
    (RETURNING the epoch: one row when renewed). Takes the row lock as SELECT FOR UPDATE."""
    return (update(_LEASES)
            .where(_LEASES.c.run_id == fence.run_id, _LEASES.c.holder == fence.holder,
                   _LEASES.c.epoch == fence.epoch)
            .values(expires_at=utcnow() + timedelta(seconds=fence.ttl or 0.0))
            .returning(_LEASES.c.epoch))


def _renew_prebuilt() -> Any:
    """`renew_statement` with its values as parameters (compiled once: see `lean_op`)."""
    return (update(_LEASES)
            .where(_LEASES.c.run_id == bindparam("f_run"),
                   _LEASES.c.holder == bindparam("f_holder"),
                   _LEASES.c.epoch == bindparam("f_epoch"))
            .returning(_LEASES.c.epoch))


def _lease_query(fence: Fence, *, lock: bool) -> Any:
    q = select(_LEASES.c.holder, _LEASES.c.epoch, _LEASES.c.expires_at).where(
        _LEASES.c.run_id == fence.run_id)
    # PostgreSQL: a takeover waits until this write commits (SQLite's write lock is held).
    return q.with_for_update() if lock else q


async def check_fence(conn: AsyncConnection, fence: Fence, *, sqlite: bool) -> None:
    """Check `fence` in the writing transaction `conn` (renewing the lease with a TTL)."""
    if fence.ttl is not None and (await conn.execute(renew_statement(fence))).first():
        return  # still the holder: the write renewed the lease
    check_lease(fence, (await conn.execute(_lease_query(fence, lock=not sqlite))).first())


def fence_plan(fence: Fence | None, plan: Plan[T], *, pg: bool) -> Plan[T]:
    """`plan`, after checking in its transaction that `fence` still holds its run's
    lease (the rule of `check_fence`): a stale executor writes nothing."""
    if fence is not None:
        yield from _check_plan(fence, pg=pg)
    return (yield from plan)


def fence_check(fence: Fence, *, pg: bool) -> Plan[LeaseError | None]:
    """Check `fence` in the plan's transaction: the LeaseError (not raised) if it failed."""
    try:
        yield from _check_plan(fence, pg=pg)
    except LeaseError as error:
        return error
    return None


def fence_checks(fences: Iterable[Fence], *, pg: bool) -> Plan[dict[Fence, LeaseError | None]]:
    """`fence_check` for several fences in one transaction (in run order). PostgreSQL: the
    leases that hold are renewed by ONE statement (a round trip per fence saved); the
    others are checked one by one (their LeaseError)."""
    ordered = sorted(fences, key=lambda f: (f.run_id, f.holder, f.epoch))
    outcome: dict[Fence, LeaseError | None] = {}
    renewable = [f for f in ordered if f.ttl is not None]
    if pg and len(renewable) > 1:
        now = utcnow()
        rows = yield lean_op("lease.renew_many", _renew_many_prebuilt, {
            "runs": [f.run_id for f in renewable], "holders": [f.holder for f in renewable],
            "epochs": [f.epoch for f in renewable],
            "expires": [now + timedelta(seconds=f.ttl or 0.0) for f in renewable],
        }, pg=True, fetch=True)
        held = {(r[0], r[1], r[2]) for r in rows}
        outcome.update((f, None) for f in renewable if (f.run_id, f.holder, f.epoch) in held)
    for fence in ordered:
        if fence not in outcome:
            outcome[fence] = yield from fence_check(fence, pg=pg)
    return outcome


def _renew_many_prebuilt() -> Any:
    """Renew the leases still held by the (run, holder, epoch) triples given as arrays."""
    return text(
        "UPDATE ff_leases SET expires_at = v.expires FROM unnest("
        "CAST(:runs AS VARCHAR[]), CAST(:holders AS VARCHAR[]), CAST(:epochs AS INTEGER[]), "
        "CAST(:expires AS TIMESTAMP WITH TIME ZONE[])) AS v(run_id, holder, epoch, expires) "
        "WHERE ff_leases.run_id = v.run_id AND ff_leases.holder = v.holder "
        "AND ff_leases.epoch = v.epoch "
        "RETURNING ff_leases.run_id, ff_leases.holder, ff_leases.epoch")


def _check_plan(fence: Fence, *, pg: bool) -> Plan[None]:
    if fence.ttl is not None:
        renewed = yield lean_op("lease.renew", _renew_prebuilt, {
            "expires_at": utcnow() + timedelta(seconds=fence.ttl), "f_run": fence.run_id,
            "f_holder": fence.holder, "f_epoch": fence.epoch}, pg=pg, columns=("expires_at",),
            fetch=True)
        if renewed:  # still the holder: the write renews the lease (Fence.ttl)
            return
    rows = yield Op(_lease_query(fence, lock=pg), fetch=True)
    check_lease(fence, rows[0] if rows else None, "write")


# -- the lease ------------------------------------------------------------------------------


def holder_id() -> str:
    """A name for this executor, unique per process: host:pid:random."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


@dataclass
class Lease:
    """The right to execute one run until `expires_at`; `epoch` fences stale holders."""

    run_id: str
    holder: str
    epoch: int
    ttl: float
    store: Store
    lost: bool = False
    stop: str | None = None  # why the lease keeper stopped the run: "lost" | "cancel"

    @property
    def fence(self) -> Fence:
        """The fence of this lease's writes; each of them renews the lease (Fence.ttl)."""
        return Fence(self.run_id, self.holder, self.epoch, self.ttl)

    async def renew(self) -> bool:
        """Extend the lease; False when it was lost (expired and taken by someone else)."""
        def plan() -> Plan[bool]:
            renewed = yield Op(update(_LEASES)
                               .where(_LEASES.c.run_id == self.run_id,
                                      _LEASES.c.holder == self.holder,
                                      _LEASES.c.epoch == self.epoch)
                               .values(expires_at=utcnow() + timedelta(seconds=self.ttl))
                               .returning(_LEASES.c.epoch), fetch=True)
            return bool(renewed)

        return await self.store.run_write(plan, key=self.run_id, fence=None,
                                          what=f"lease renewal of {self.run_id}")

    async def release(self) -> None:
        def plan() -> Plan[None]:
            # Expire rather than delete: the row keeps the epoch, so the next holder's is
            # higher.
            yield Op(update(_LEASES).where(_LEASES.c.run_id == self.run_id,
                                           _LEASES.c.holder == self.holder,
                                           _LEASES.c.epoch == self.epoch)
                     .values(expires_at=utcnow()))
            yield Op(update(_HISTORY).where(_HISTORY.c.run_id == self.run_id,
                                            _HISTORY.c.epoch == self.epoch,
                                            _HISTORY.c.holder == self.holder)
                     .values(released_at=utcnow()))

        await self.store.run_write(plan, key=self.run_id, fence=None,
                                   what=f"lease release of {self.run_id}")


async def acquire_lease(store: Store, run_id: str, holder: str, ttl: float) -> Lease:
    """Take the run's lease, or raise LeaseError naming the current holder."""
    def plan() -> Plan[int]:
        return _acquire_plan(run_id, holder, ttl, lock=not store.is_sqlite)

    try:
        epoch = await store.run_write(plan, key=run_id, retry=False)
    except IntegrityError:  # another process inserted the lease first
        raise LeaseError(
            f"run {run_id!r} was just taken by another executor", run_id=run_id
        ) from None
    return Lease(run_id, holder, epoch, ttl, store)


def _acquire_plan(run_id: str, holder: str, ttl: float, *, lock: bool) -> Plan[int]:
    """Take the lease (a new row, or the next epoch of an expired or own one): its epoch."""
    now = utcnow()
    expires = now + timedelta(seconds=ttl)
    q = select(_LEASES).where(_LEASES.c.run_id == run_id)
    rows = yield Op(q.with_for_update() if lock else q, fetch=True)
    if not rows:
        yield Op(_LEASES.insert().values(run_id=run_id, holder=holder, epoch=1,
                                         expires_at=expires, acquired_at=now))
        yield Op(_HISTORY.insert().values(run_id=run_id, holder=holder, epoch=1,
                                          acquired_at=now))
        return 1
    current = LeaseRow.model_validate(dict(rows[0]._mapping))
    if current.holder != holder and _aware(current.expires_at) > now:
        left = (_aware(current.expires_at) - now).total_seconds()
        raise LeaseError(
            f"run {run_id!r} is being executed by {current.holder} (lease valid for "
            f"{left:.1f} s more); wait for it to finish, or resume after the lease expires",
            run_id=run_id, holder=current.holder,
        )
    epoch = current.epoch + 1
    yield Op(update(_LEASES).where(_LEASES.c.run_id == run_id).values(
        holder=holder, epoch=epoch, expires_at=expires, acquired_at=now))
    yield Op(_HISTORY.insert().values(run_id=run_id, holder=holder, epoch=epoch,
                                      acquired_at=now))
    return epoch


def _aware(dt: datetime) -> datetime:
    """SQLite returns naive datetimes (stored as UTC)."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=timezone.utc)
