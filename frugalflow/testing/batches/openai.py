"""OpenAI's Files and Batches API on the emulator's batch desk, enough for the real `openai`
SDK: upload a JSONL file (multipart), create, retrieve, list (cursor pages) and cancel a
batch, read its output and error files.

    POST /openai/v1/files                 GET /openai/v1/files/{id}[/content]
    POST /openai/v1/batches               GET /openai/v1/batches[/{id}]
    POST /openai/v1/batches/{id}/cancel   DELETE /openai/v1/files/{id}

A batch is validated as OpenAI does (JSONL, one endpoint, one model, unique custom ids);
a file that fails validation makes a `failed` batch with `errors`. Its life (delay,
per-item failures, expiry, whole-batch failure) is the desk's script; its output file
holds the answered lines, its error file the failed ones and those never answered
(`batch_expired` / `batch_cancelled`), each line `{id, custom_id, response, error}`.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING, Any, Final

from ..dialects import dumps
from .desk import EmulatedBatch

if TYPE_CHECKING:
    from ..http1 import Connection, HttpRequest
    from .desk import BatchDesk

__all__ = ["register"]

PROVIDER: Final = "openai"
CHAT: Final = "/v1/chat/completions"
ENDPOINTS: Final = frozenset({"/v1/responses", CHAT, "/v1/embeddings", "/v1/completions",
                              "/v1/moderations", "/v1/images/generations", "/v1/images/edits",
                              "/v1/videos"})
WINDOW_SECONDS: Final = 24 * 3600
_ID = r"(?P<id>[A-Za-z0-9_-]+)"

_UNANSWERED: Final = {
    "expired": ("batch_expired",
                "This request could not be executed before the completion window expired."),
    "cancelled": ("batch_cancelled", "This request was cancelled before it could be executed."),
}


def register(desk: BatchDesk) -> None:
    """Serve this wire format's batch routes from `desk`."""
    api = _OpenAIRoutes(desk)
    desk.route("POST", r"/openai/v1/files", op="upload")(api.upload)
    desk.route("GET", rf"/openai/v1/files/{_ID}")(api.file_info)
    desk.route("DELETE", rf"/openai/v1/files/{_ID}")(api.file_delete)
    desk.route("GET", rf"/openai/v1/files/{_ID}/content")(api.file_content)
    desk.route("POST", r"/openai/v1/batches", op="create")(api.create)
    desk.route("GET", r"/openai/v1/batches")(api.listing)
    desk.route("GET", rf"/openai/v1/batches/{_ID}")(api.retrieve)
    desk.route("POST", rf"/openai/v1/batches/{_ID}/cancel")(api.cancel)


class _OpenAIRoutes:
    """The routes, bound to one desk."""

    def __init__(self, desk: BatchDesk) -> None:
        self.desk = desk

    async def bad(self, conn: Connection, status: int, message: str, code: str | None = None,
                  param: str | None = None) -> bool:
        return await conn.send_json(status, {"error": {
            "message": message, "type": "invalid_request_error", "param": param, "code": code}})

    # -- files -------------------------------------------------------------------------------

    async def upload(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        try:
            fields = _multipart(req.headers.get("content-type", ""), req.body)
        except ValueError as e:
            return await self.bad(conn, 400, f"Could not parse multipart form: {e}")
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if "file" not in fields:
            return await self.bad(conn, 400, "Missing required parameter: 'file'.",
                             "missing_required_parameter", "file")
        if not purpose:
            return await self.bad(conn, 400, "Missing required parameter: 'purpose'.",
                             "missing_required_parameter", "purpose")
        filename, content = fields["file"]
        fid = _new_file(self.desk, purpose, content, filename or "upload")
        return await conn.send_json(200, _file_object(self.desk, fid))

    async def file_info(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        if m["id"] not in self.desk.files:
            return await self.bad(conn, 404, f"No such File object: {m['id']}", None, "id")
        return await conn.send_json(200, _file_object(self.desk, m["id"]))

    async def file_delete(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        if self.desk.files.pop(m["id"], None) is None:
            return await self.bad(conn, 404, f"No such File object: {m['id']}", None, "id")
        return await conn.send_json(200, {"id": m["id"], "object": "file", "deleted": True})

    async def file_content(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        hit = self.desk.files.get(m["id"])
        if hit is None:
            return await self.bad(conn, 404, f"No such File object: {m['id']}", None, "id")
        return await conn.send(200, hit[1], "application/octet-stream")

    # -- batches -----------------------------------------------------------------------------

    async def create(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        try:
            body = json.loads(req.body or b"{}")
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return await self.bad(conn, 400, "We could not parse the JSON body of your request.")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not body.get(name):
                return await self.bad(conn, 400, f"Missing required parameter: '{name}'.",
                                 "missing_required_parameter", name)
        if body["endpoint"] not in ENDPOINTS:
            return await self.bad(conn, 400, f"Invalid value: '{body['endpoint']}'. Supported "
                                        f"values are: {', '.join(sorted(ENDPOINTS))}.",
                             "invalid_value", "endpoint")
        if body["completion_window"] != "24h":
            return await self.bad(conn, 400, f"Invalid value: '{body['completion_window']}'. "
                                        "Supported values are: '24h'.",
                             "invalid_value", "completion_window")
        metadata = body.get("metadata") or {}
        if not isinstance(metadata, dict) or len(metadata) > 16 or not all(
                isinstance(v, str) and len(k) <= 64 and len(v) <= 512
                for k, v in metadata.items()):
            return await self.bad(conn, 400, "Invalid 'metadata': at most 16 string pairs (keys "
                                        "up to 64 characters, values up to 512).",
                             "invalid_value", "metadata")
        fid = str(body["input_file_id"])
        hit = self.desk.files.get(fid)
        if hit is None:
            return await self.bad(conn, 400, f"No such File object: {fid}", None, "input_file_id")
        if hit[0] != "batch":
            return await self.bad(conn, 400, f"File {fid} has purpose '{hit[0]}'; a batch's input "
                                        "file must have purpose 'batch'.",
                             "invalid_value", "input_file_id")
        model, requests, errors = _read_lines(hit[1], str(body["endpoint"]))
        extra = {"endpoint": body["endpoint"], "input_file_id": fid}
        if errors:
            b = _refused(self.desk, model or "", metadata, errors, extra)
        else:
            b = self.desk.create(PROVIDER, model or "", requests, metadata)
            b.extra.update(extra)
        # The answer to the request is the batch as it was just accepted (OpenAI's
        # "validating"); retrieving it later shows where it went.
        return await conn.send_json(200, _batch_object(self.desk, b, status="validating"))

    async def listing(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        try:
            limit = max(1, min(100, int(req.query.get("limit", ["20"])[0])))
        except ValueError:
            return await self.bad(conn, 400, "Invalid value for 'limit': an integer between 1 and "
                                        "100.", "invalid_value", "limit")
        # Newest first, as OpenAI lists them; `after` is the last id of the previous page.
        ordered = sorted(self.desk.listed(PROVIDER), key=lambda b: (b.created_at, b.id),
                         reverse=True)
        after = req.query.get("after", [None])[0]
        if after is not None:
            ids = [b.id for b in ordered]
            ordered = ordered[ids.index(after) + 1:] if after in ids else []
        page = ordered[:limit]
        data = [_batch_object(self.desk, b) for b in page]
        return await conn.send_json(200, {
            "object": "list", "data": data, "has_more": len(ordered) > limit,
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
        })

    async def retrieve(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        b = self.desk.get(m["id"])
        if b is None or b.provider != PROVIDER:
            return await self.bad(conn, 404, f"No batch found with id '{m['id']}'.", None, "id")
        return await conn.send_json(200, _batch_object(self.desk, b))

    async def cancel(self, req: HttpRequest, conn: Connection, m: re.Match[str]) -> bool:
        b = self.desk.get(m["id"])
        if b is None or b.provider != PROVIDER:
            return await self.bad(conn, 404, f"No batch found with id '{m['id']}'.", None, "id")
        if b.done and b.state != "cancelled":
            status = _status(b)
            return await conn.send_json(400, {"error": {
                "message": f"Cannot cancel a batch with status '{status}'.",
                "type": "invalid_request_error", "param": None, "code": None}})
        self.desk.cancel(b.id)
        # OpenAI answers "cancelling"; the self.desk stops it at once, so the next read says
        # "cancelled".
        return await conn.send_json(200, _batch_object(self.desk, b, status="cancelling"))


# -- the batch's JSON ----------------------------------------------------------------------


def _status(b: EmulatedBatch) -> str:
    return {"in_progress": "in_progress", "ended": "completed", "expired": "expired",
            "failed": "failed", "cancelled": "cancelled"}[b.state]


def _batch_object(desk: BatchDesk, b: EmulatedBatch, *,
                  status: str | None = None) -> dict[str, Any]:
    """`b` as OpenAI's Batch object (its output and error files written once it ended)."""
    created = int(b.created_at)
    state = status or _status(b)
    ended = int(b.ended_at) if b.ended_at is not None else None
    total, ok, bad = b.counts()
    out: dict[str, Any] = {
        "id": b.id, "object": "batch", "endpoint": b.extra.get("endpoint", CHAT),
        "model": b.model or None, "errors": None,
        "input_file_id": b.extra.get("input_file_id", ""), "completion_window": "24h",
        "status": state, "output_file_id": None, "error_file_id": None,
        "created_at": created, "in_progress_at": None, "expires_at": created + WINDOW_SECONDS,
        "finalizing_at": None, "completed_at": None, "failed_at": None, "expired_at": None,
        "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": total if b.state != "failed" else 0,
                           "completed": ok, "failed": bad},
        "usage": None, "metadata": dict(b.metadata) or None,
    }
    if state == "validating":
        out["request_counts"] = {"total": 0, "completed": 0, "failed": 0}
        return out
    if b.state == "failed":
        out["failed_at"] = ended
        errors = b.extra.get("errors") or [_refusal(b)]
        out["errors"] = {"object": "list", "data": errors}
        return out
    out["in_progress_at"] = created
    if b.state == "cancelled":
        out["cancelling_at"] = ended
        if state == "cancelled":
            out["cancelled_at"] = ended
    if b.state in ("ended", "expired"):
        out["finalizing_at"] = ended
        out["completed_at" if b.state == "ended" else "expired_at"] = ended
    if b.done and state == _status(b):
        out["output_file_id"], out["error_file_id"] = _result_files(desk, b)
        out["usage"] = _usage(b)
    return out


def _refusal(b: EmulatedBatch) -> dict[str, Any]:
    """Why a scripted whole-batch failure failed: OpenAI's enqueued-token limit."""
    return {"code": "token_limit_exceeded", "line": None, "param": None,
            "message": f"Enqueued token limit reached for {b.model or 'the model'} in "
                       "organization org-emulator. Limit: 90,000 enqueued tokens. Please try "
                       "submitting your requests in batches or again later."}


def _result_files(desk: BatchDesk, b: EmulatedBatch) -> tuple[str | None, str | None]:
    """The ids of `b`'s output and error files (written the first time they are asked for)."""
    if "output_file_id" in b.extra:
        return b.extra["output_file_id"], b.extra["error_file_id"]
    ok: list[str] = []
    bad: list[str] = []
    unanswered = _UNANSWERED.get(b.state, ("batch_expired", "This request was not executed."))
    for i, r in enumerate(b.results):
        line: dict[str, Any] = {"id": f"batch_req_{b.id}_{i:06d}", "custom_id": r.custom_id}
        if r.status is None:
            code, message = unanswered
            line.update(response=None, error={"code": code, "message": message})
            bad.append(dumps(line))
            continue
        line.update(response={"status_code": r.status, "request_id": f"req_{b.id}{i:06d}",
                              "body": r.body}, error=None)
        (ok if r.status == 200 else bad).append(dumps(line))
    out_id = _new_file(desk, "batch_output", _jsonl(ok), "batch_output.jsonl") if ok else None
    err_id = _new_file(desk, "batch_output", _jsonl(bad), "batch_errors.jsonl") if bad else None
    b.extra["output_file_id"], b.extra["error_file_id"] = out_id, err_id
    return out_id, err_id


def _usage(b: EmulatedBatch) -> dict[str, Any]:
    """The tokens of every answered item (what the batch was billed for)."""
    n_in = n_out = 0
    for r in b.results:
        usage = (r.body or {}).get("usage") if r.status == 200 else None
        if isinstance(usage, dict):
            n_in += int(usage.get("prompt_tokens") or 0)
            n_out += int(usage.get("completion_tokens") or 0)
    return {"input_tokens": n_in, "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": n_out, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": n_in + n_out}


def _jsonl(lines: list[str]) -> bytes:
    return ("\n".join(lines) + "\n").encode()


# -- files -------------------------------------------------------------------------------


def _new_file(desk: BatchDesk, purpose: str, content: bytes, filename: str) -> str:
    fid = desk.new_id("file-")
    desk.files[fid] = (purpose, content, {"filename": filename,
                                          "created_at": int(desk.clock())})
    return fid


def _file_object(desk: BatchDesk, fid: str) -> dict[str, Any]:
    purpose, content, meta = desk.files[fid]
    created = int(meta.get("created_at", desk.clock()))
    return {"id": fid, "object": "file", "bytes": len(content), "created_at": created,
            "filename": meta.get("filename", "upload"), "purpose": purpose,
            "status": "processed", "status_details": None,
            "expires_at": created + 30 * 24 * 3600 if purpose.startswith("batch") else None}


def _multipart(content_type: str, body: bytes) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body's fields: name -> (filename, content)."""
    found = re.search(r'boundary="?([^";]+)"?', content_type)
    if not content_type.lower().startswith("multipart/form-data") or found is None:
        raise ValueError("expected multipart/form-data with a boundary")
    delimiter = b"--" + found[1].encode()
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(delimiter)[1:]:
        if part.startswith(b"--"):  # the closing delimiter
            break
        head, sep, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        if not sep:
            raise ValueError("a part without headers")
        disposition = next((line for line in head.decode("utf-8", "replace").split("\r\n")
                            if line.lower().startswith("content-disposition:")), "")
        name = re.search(r'\bname="([^"]*)"', disposition)
        if name is None:
            raise ValueError("a part without a name")
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        fields[name[1]] = (filename[1] if filename else None, content.removesuffix(b"\r\n"))
    return fields


# -- validation ----------------------------------------------------------------------------


def _read_lines(content: bytes, endpoint: str
                ) -> tuple[str | None, list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """(model, [(custom id, body)], errors) of an input file, checked as OpenAI checks it."""
    errors: list[dict[str, Any]] = []
    requests: list[tuple[str, dict[str, Any]]] = []
    model: str | None = None
    seen: set[str] = set()

    def error(line: int, code: str, message: str, param: str | None = None) -> None:
        errors.append({"code": code, "message": message, "param": param, "line": line})

    if endpoint != CHAT:
        error(1, "invalid_url", f"The emulator's batches answer only {CHAT}, not {endpoint}.",
              "url")
        return None, [], errors
    lines = [(n, raw) for n, raw in enumerate(content.decode("utf-8", "replace").splitlines(), 1)
             if raw.strip()]
    if not lines:
        error(1, "empty_file", "The batch input file is empty. Please ensure that the batch "
                               "contains at least one request.")
    for n, raw in lines:
        try:
            item = json.loads(raw)
            if not isinstance(item, dict):
                raise ValueError
        except ValueError:
            error(n, "invalid_json_line", "This line is not parseable as valid JSON.")
            continue
        cid, body = item.get("custom_id"), item.get("body")
        if not isinstance(cid, str) or not cid:
            error(n, "missing_required_parameter", "Missing required parameter: 'custom_id'.",
                  "custom_id")
            continue
        if item.get("method") != "POST":
            error(n, "invalid_method", "The method for this request must be POST.", "method")
            continue
        if item.get("url") != endpoint:
            error(n, "invalid_url", "The URL provided for this request does not match the "
                                    "batch endpoint.", "url")
            continue
        if not isinstance(body, dict) or not isinstance(body.get("model"), str):
            error(n, "missing_required_parameter", "Missing required parameter: 'body.model'.",
                  "body.model")
            continue
        if cid in seen:
            error(n, "duplicate_custom_id", "The custom_id for this request is a duplicate of "
                                            "another request. The custom_id parameter must be "
                                            "unique for each request in a batch.", "custom_id")
            continue
        if body.get("stream"):
            error(n, "invalid_value", "Streaming is not supported in the Batch API.",
                  "body.stream")
            continue
        if model is None:
            model = body["model"]
        elif body["model"] != model:
            error(n, "mismatched_model", "The provided model does not match the model of the "
                                         "other requests in this batch. A batch may only use "
                                         "one model.", "body.model")
            continue
        seen.add(cid)
        requests.append((cid, body))
    return model, requests, errors


def _refused(desk: BatchDesk, model: str, metadata: dict[str, Any],
             errors: list[dict[str, Any]], extra: dict[str, Any]) -> EmulatedBatch:
    """A batch whose input file failed validation: failed at once, nothing answered (no
    script is used up: it never ran)."""
    with desk._lock:
        now = desk.clock()
        b = EmulatedBatch(desk.new_id("batch_"), PROVIDER, model, [], dict(metadata), None,
                          now, state="failed", ended_at=now)
        b.extra.update(extra, errors=errors)
        desk.batches[b.id] = b
    return b
