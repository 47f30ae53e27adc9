"""The emulator's Gemini batch mode: batchGenerateContent with inlined requests, as the
`google-genai` SDK's `client.aio.batches` speaks it.

    POST /gemini/{v}/models/{model}:batchGenerateContent   a batch (a long-running operation)
    GET  /gemini/{v}/batches/{id}                          the operation, answers inlined
    GET  /gemini/{v}/batches?pageSize=&pageToken=          every batch, newest first
    POST /gemini/{v}/batches/{id}:cancel                   cancel (answers {})

A batch is an Operation whose `metadata` is the GenerateContentBatch: `state`
BATCH_STATE_RUNNING until the desk ends it, then SUCCEEDED, EXPIRED, FAILED or CANCELLED;
`output.inlinedResponses.inlinedResponses` holds one entry per answered request, in request
order, each with its request's `metadata` (frugalflow's item id under `key`) and either the
GenerateContentResponse the synchronous call would get or a google.rpc.Status `error`
(gRPC code and message). Requests never answered (the batch expired or was cancelled
first) have no entry. File (JSONL) input is refused with INVALID_ARGUMENT.
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

__all__ = ["GRPC_CODES", "register"]

_PREFIX = r"/gemini/(?P<version>v[^/]+)"
_BATCH_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1main.GenerateContentBatch"
_OUTPUT_TYPE = ("type.googleapis.com/google.ai.generativelanguage.v1main."
                "GenerateContentBatchOutput")
_STATES = {"in_progress": "BATCH_STATE_RUNNING", "ended": "BATCH_STATE_SUCCEEDED",
           "expired": "BATCH_STATE_EXPIRED", "failed": "BATCH_STATE_FAILED",
           "cancelled": "BATCH_STATE_CANCELLED"}

GRPC_CODES = {"CANCELLED": 1, "UNKNOWN": 2, "INVALID_ARGUMENT": 3, "DEADLINE_EXCEEDED": 4,
              "NOT_FOUND": 5, "PERMISSION_DENIED": 7, "RESOURCE_EXHAUSTED": 8,
              "FAILED_PRECONDITION": 9, "INTERNAL": 13, "UNAVAILABLE": 14,
              "UNAUTHENTICATED": 16}
"""google.rpc.Code by name: a batch item's error carries the number, as the API does."""

_WORDS = {400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 200: "OK"}
_PAGE_SIZE = 50


def _time(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _status(code: int, word: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": word}}


def _item_error(payload: dict[str, Any] | None, status: int) -> dict[str, Any]:
    """A dialect's HTTP error body as the google.rpc.Status a batch item carries."""
    error = (payload or {}).get("error") or {}
    word = str(error.get("status") or ("INTERNAL" if status >= 500 else "INVALID_ARGUMENT"))
    return {"code": GRPC_CODES.get(word, 2), "message": str(error.get("message") or word)}


def operation(b: EmulatedBatch) -> dict[str, Any]:
    """The batch as the long-running operation `batches.get` returns."""
    total, ok, bad = b.counts()
    answered = [r for r in b.results if r.status is not None]
    meta: dict[str, Any] = {
        "@type": _BATCH_TYPE,
        "model": f"models/{b.model}",
        "displayName": b.metadata.get("displayName", ""),
        "createTime": _time(b.created_at),
        "updateTime": _time(b.ended_at or b.created_at),
        "batchStats": {"requestCount": str(total), "successfulRequestCount": str(ok),
                       "failedRequestCount": str(bad),
                       "pendingRequestCount": str(0 if b.done else total)},
        "state": _STATES[b.state],
        "name": f"batches/{b.id}",
    }
    if b.ended_at is not None:
        meta["endTime"] = _time(b.ended_at)
    out: dict[str, Any] = {"name": f"batches/{b.id}", "metadata": meta, "done": b.done}
    if b.state == "failed":
        out["error"] = {"code": 3, "message": "The batch failed validation: the emulator's "
                                              "script refused it."}
        return out
    if answered:
        entries = []
        for r in answered:
            entry: dict[str, Any] = {"metadata": {"key": r.custom_id}}
            if r.status == 200:
                entry["response"] = r.body
            else:
                entry["error"] = _item_error(r.body, r.status or 500)
            entries.append(entry)
        meta["output"] = {"inlinedResponses": {"inlinedResponses": entries}}
    if b.done:
        out["response"] = {"@type": _OUTPUT_TYPE, **meta.get("output", {})}
    return out


async def _refused(desk: BatchDesk, req: HttpRequest, conn: Connection) -> bool | None:
    """The 401 sent for a request without a key (None: it may go on)."""
    if desk.emulator.require_key and not has_key(req):
        return await conn.send_json(401, _status(
            401, "UNAUTHENTICATED", "Request had invalid authentication credentials."), _WORDS)
    return None


async def _named(desk: BatchDesk, req: HttpRequest, conn: Connection,
                 m: re.Match[str]) -> EmulatedBatch | bool:
    """The batch `m` names, or the 401/404 sent in its place."""
    if (refused := await _refused(desk, req, conn)) is not None:
        return refused
    b = desk.get(m["id"])
    if b is None or b.provider != "gemini":
        return await conn.send_json(404, _status(
            404, "NOT_FOUND", f"Batch batches/{m['id']} not found."), _WORDS)
    return b


def register(desk: BatchDesk) -> None:
    """Add the Gemini batch routes to `desk`."""

    @desk.route("POST", _PREFIX + r"/models/(?P<model>[^/:]+):batchGenerateContent",
                op="create")
    async def create(req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        if (refused := await _refused(desk, req, conn)) is not None:
            return refused
        try:
            body = json.loads(req.body or b"{}")
            batch = body["batch"]
            source = batch.get("inputConfig") or {}
            if "fileName" in source:
                return await conn.send_json(400, _status(
                    400, "INVALID_ARGUMENT",
                    "The emulator takes inlined requests only (inputConfig.requests)."),
                    _WORDS)
            lines = source["requests"]["requests"]
            requests: list[tuple[str, dict[str, Any]]] = []
            for i, line in enumerate(lines):
                request = dict(line["request"])
                request.pop("model", None)
                key = (line.get("metadata") or {}).get("key")
                requests.append((str(key) if key is not None else str(i), request))
        except (ValueError, KeyError, TypeError, AttributeError):
            return await conn.send_json(400, _status(
                400, "INVALID_ARGUMENT",
                "Invalid batch: expected batch.inputConfig.requests.requests[]."), _WORDS)
        if not requests:
            return await conn.send_json(400, _status(
                400, "INVALID_ARGUMENT", "A batch needs at least one request."), _WORDS)
        b = desk.create("gemini", m["model"], requests,
                        {"displayName": str(batch.get("displayName") or "")}, prefix="gb")
        return await conn.send_json(200, operation(b), _WORDS)

    @desk.route("GET", _PREFIX + r"/batches/(?P<id>[^/:]+)")
    async def get(req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        b = await _named(desk, req, conn, m)
        if isinstance(b, bool):
            return b
        return await conn.send_json(200, operation(b), _WORDS)

    @desk.route("GET", _PREFIX + r"/batches")
    async def listing(req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        if (refused := await _refused(desk, req, conn)) is not None:
            return refused
        try:
            size = int(req.query.get("pageSize", [str(_PAGE_SIZE)])[0]) or _PAGE_SIZE
            start = int(req.query.get("pageToken", ["0"])[0] or 0)
        except ValueError:
            return await conn.send_json(400, _status(
                400, "INVALID_ARGUMENT", "Invalid pageSize or pageToken."), _WORDS)
        batches = desk.listed("gemini")[::-1]  # newest first
        page = batches[start:start + size]
        out: dict[str, Any] = {"operations": [operation(b) for b in page]}
        if start + size < len(batches):
            out["nextPageToken"] = str(start + size)
        return await conn.send_json(200, out, _WORDS)

    @desk.route("POST", _PREFIX + r"/batches/(?P<id>[^/:]+):cancel")
    async def cancel(req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        b = await _named(desk, req, conn, m)
        if isinstance(b, bool):
            return b
        desk.cancel(b.id)
        return await conn.send_json(200, {}, _WORDS)
