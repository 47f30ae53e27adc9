"""The emulator's Anthropic Message Batches API (create, retrieve, list, cancel, delete,
results as JSONL) on the shared batch desk.

    POST   /anthropic/v1/messages/batches                 {requests: [{custom_id, params}]}
    GET    /anthropic/v1/messages/batches                 ?limit, after_id, before_id
    GET    /anthropic/v1/messages/batches/{id}
    POST   /anthropic/v1/messages/batches/{id}/cancel
    DELETE /anthropic/v1/messages/batches/{id}            (only once it ended)
    GET    /anthropic/v1/messages/batches/{id}/results    one JSON line per request

A batch may mix models: each line is answered as a synchronous call to its `params.model`
would be; a desk script's `model` is matched against the first line's. Anthropic validates
a batch when it is created, so a script with `fail=True` is an HTTP 400 at creation (no
batch is kept), not a failed batch. Cancelling answers `canceling`; the batch then reads
`ended` with every unanswered request `canceled`.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from ..http1 import has_key

if TYPE_CHECKING:
    from ..http1 import Connection, HttpRequest
    from .desk import BatchDesk, EmulatedBatch

__all__ = ["register"]

_ROOT = "/anthropic/v1/messages/batches"
_CUSTOM_ID = re.compile(r"[a-zA-Z0-9_-]{1,64}")
_MAX_REQUESTS = 100_000
_EXPIRES_AFTER = 24 * 3600.0
"""A batch not ended 24 hours after its creation expires (Anthropic's window)."""


def _time(t: float | None) -> str | None:
    """RFC 3339, as Anthropic writes its times."""
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat().replace("+00:00", "Z")


def _error(type_: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


def register(desk: BatchDesk) -> None:
    """Serve this wire format's batch routes from `desk`."""
    api = _AnthropicRoutes(desk)
    desk.route("POST", _ROOT, op="create")(api.create)
    desk.route("GET", _ROOT)(api.listing)
    desk.route("GET", _ROOT + r"/(?P<id>[^/]+)")(api.retrieve)
    desk.route("DELETE", _ROOT + r"/(?P<id>[^/]+)")(api.delete)
    desk.route("POST", _ROOT + r"/(?P<id>[^/]+)/cancel")(api.cancel)
    desk.route("GET", _ROOT + r"/(?P<id>[^/]+)/results")(api.results)


class _AnthropicRoutes:
    """The routes, bound to one desk."""

    def __init__(self, desk: BatchDesk) -> None:
        self.desk = desk


    def batch_object(self, b: EmulatedBatch, *, canceling: bool = False) -> dict[str, Any]:
        counts = {"processing": 0, "succeeded": 0, "errored": 0, "canceled": 0, "expired": 0}
        ended = b.done and not canceling
        if not ended:  # requests count as processing until the whole batch ends
            counts["processing"] = len(b.requests)
        else:
            for r in b.results:
                if r.status is None:
                    counts["canceled" if b.state == "cancelled" else "expired"] += 1
                else:
                    counts["succeeded" if r.status == 200 else "errored"] += 1
        status = "canceling" if canceling else ("ended" if ended else "in_progress")
        url = f"{self.desk.emulator.url}{_ROOT}/{b.id}/results"
        return {
            "id": b.id,
            "type": "message_batch",
            "processing_status": status,
            "request_counts": counts,
            "created_at": _time(b.created_at),
            "expires_at": _time(b.created_at + _EXPIRES_AFTER),
            "ended_at": _time(b.ended_at) if ended else None,
            "cancel_initiated_at": _time(b.extra.get("cancel_initiated_at")),
            "archived_at": None,
            "results_url": url if ended else None,
        }

    async def unauthorised(self, req: HttpRequest, conn: Connection) -> bool | None:
        """A 401 when the emulator requires a key and none was sent; else None."""
        if self.desk.emulator.require_key and not has_key(req):
            return await conn.send_json(401, _error("authentication_error", "invalid x-api-key"))
        return None

    async def named(self, req: HttpRequest, conn: Connection,
                    m: re.Match[str]) -> EmulatedBatch | bool:
        """The batch a route names, or the refusal already sent (401, 404)."""
        if (refused := await self.unauthorised(req, conn)) is not None:
            return refused
        b = self.lookup(m["id"])
        if b is None:
            return await self.not_found(conn, m["id"])
        return b

    async def not_found(self, conn: Connection, batch_id: str) -> bool:
        return await conn.send_json(404, _error(
            "not_found_error", f"No message batch found with id {batch_id!r}."))

    def lookup(self, batch_id: str) -> EmulatedBatch | None:
        b = self.desk.get(batch_id)
        return b if b is not None and b.provider == "anthropic" \
            and not b.extra.get("deleted") else None

    def validate(self, body: object) -> tuple[list[tuple[str, dict[str, Any]]], str | None]:
        """The (custom id, params) lines of a create body, or the 400 message refusing it."""
        if not isinstance(body, dict):
            return [], "request body: Input should be a valid object"
        reqs = body.get("requests")
        if not isinstance(reqs, list):
            return [], "requests: Field required"
        if not reqs:
            return [], "requests: List should have at least 1 item after validation, not 0"
        if len(reqs) > _MAX_REQUESTS:
            return [], f"requests: List should have at most {_MAX_REQUESTS} items"
        lines: list[tuple[str, dict[str, Any]]] = []
        seen: set[str] = set()
        for i, r in enumerate(reqs):
            where = f"requests.{i}"
            if not isinstance(r, dict):
                return [], f"{where}: Input should be a valid object"
            cid, params = r.get("custom_id"), r.get("params")
            if not isinstance(cid, str):
                return [], f"{where}.custom_id: Field required"
            if _CUSTOM_ID.fullmatch(cid) is None:
                return [], (f"{where}.custom_id: String should match pattern "
                            "'^[a-zA-Z0-9_-]{1,64}$'")
            if cid in seen:
                return [], f"{where}: Duplicate custom_id {cid!r}: each must be unique"
            seen.add(cid)
            if not isinstance(params, dict):
                return [], f"{where}.params: Field required"
            for name, kind in (("model", str), ("max_tokens", int), ("messages", list)):
                if name not in params:
                    return [], f"{where}.params.{name}: Field required"
                if not isinstance(params[name], kind) or isinstance(params[name], bool):
                    return [], f"{where}.params.{name}: Input should be a valid {kind.__name__}"
            if params.get("stream"):
                return [], f"{where}.params.stream: streaming is not supported in batches"
            lines.append((cid, params))
        return lines, None

    async def create(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        if (refused := await self.unauthorised(req, conn)) is not None:
            return refused
        try:
            body = json.loads(req.body or b"{}")
        except ValueError:
            body = None
        lines, problem = self.validate(body)
        if problem is not None:
            return await conn.send_json(400, _error("invalid_request_error", problem))
        b = self.desk.create("anthropic", str(lines[0][1]["model"]), lines, prefix="msgbatch_")
        if b.state == "failed":  # a scripted refusal: Anthropic says no at creation
            self.desk.batches.pop(b.id, None)
            return await conn.send_json(400, _error(
                "invalid_request_error",
                "requests: the batch was refused (the emulator's script says fail)"))
        return await conn.send_json(200, self.batch_object(b))

    async def listing(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        if (refused := await self.unauthorised(req, conn)) is not None:
            return refused
        try:
            limit = int(req.query.get("limit", ["20"])[0])
        except ValueError:
            limit = 0
        if not 1 <= limit <= 1000:
            return await conn.send_json(400, _error(
                "invalid_request_error", "limit: Input should be between 1 and 1000"))
        # Newest first; the self.desk keeps creation order.
        ids = [b.id for b in reversed(self.desk.listed("anthropic")) if not b.extra.get("deleted")]
        after, before = req.query.get("after_id", [None])[0], req.query.get("before_id", [None])[0]
        for cursor in (after, before):
            if cursor is not None and cursor not in ids:
                return await self.not_found(conn, cursor)
        if before is not None:
            older_than = ids[: ids.index(before)]
            page, more = older_than[-limit:], len(older_than) > limit
        else:
            rest = ids[ids.index(after) + 1:] if after is not None else ids
            page, more = rest[:limit], len(rest) > limit
        data = [self.batch_object(b) for b in (self.lookup(i) for i in page) if b is not None]
        return await conn.send_json(200, {
            "data": data, "has_more": more,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None})

    async def retrieve(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        b = await self.named(req, conn, m)
        if isinstance(b, bool):
            return b
        return await conn.send_json(200, self.batch_object(b))

    async def delete(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        b = await self.named(req, conn, m)
        if isinstance(b, bool):
            return b
        if not b.done:
            return await conn.send_json(400, _error(
                "invalid_request_error",
                f"Message batch {b.id} is still in progress; cancel it before deleting it."))
        b.extra["deleted"] = True
        return await conn.send_json(200, {"id": b.id, "type": "message_batch_deleted"})

    async def cancel(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        b = await self.named(req, conn, m)
        if isinstance(b, bool):
            return b
        if b.done:  # too late: the batch stays as it ended
            return await conn.send_json(200, self.batch_object(b))
        b.extra["cancel_initiated_at"] = self.desk.clock()
        self.desk.cancel(b.id)
        return await conn.send_json(200, self.batch_object(b, canceling=True))

    async def results(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        b = await self.named(req, conn, m)
        if isinstance(b, bool):
            return b
        if not b.done:
            return await conn.send_json(400, _error(
                "invalid_request_error",
                f"Message batch {b.id} has not finished processing; its results are not "
                "available yet."))
        lines = []
        for r in b.results:
            result: dict[str, Any]
            if r.status is None:
                result = {"type": "canceled" if b.state == "cancelled" else "expired"}
            elif r.status == 200:
                result = {"type": "succeeded", "message": r.body}
            else:
                result = {"type": "errored", "error": r.body}
            lines.append(json.dumps({"custom_id": r.custom_id, "result": result},
                                    separators=(",", ":")) + "\n")
        return await conn.send(200, "".join(lines).encode(), "application/binary")
