"""HTTP/1.1 on asyncio streams for the emulator: read a request, write whole, chunked, cut or
reset responses (no extra dependency: the wire faults need control of every byte)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, NoReturn
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["MAX_BODY", "MAX_HEAD", "Closed", "Connection", "HttpRequest", "has_key",
           "presented_key", "read_request", "response_head"]

MAX_HEAD = 64 * 1024
MAX_BODY = 32 * 1024 * 1024


@dataclass
class HttpRequest:
    """One request as read off the socket (header names lower-case)."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class Closed(Exception):
    """The handler is done with this connection."""


async def read_request(reader: asyncio.StreamReader, idle: float) -> HttpRequest | None:
    """The next request on a connection; None when the client closed it, sent nothing for
    `idle` seconds, sent a head that is not HTTP or a body over MAX_BODY."""
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), idle)
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError:
        return None
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    elif "content-length" in headers:
        length = int(headers["content-length"])
        if length > MAX_BODY:
            return None
        body = await reader.readexactly(length)
    split = urlsplit(target)
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" and (version != "HTTP/1.0" or connection == "keep-alive")
    return HttpRequest(method.upper(), unquote(split.path), parse_qs(split.query), headers,
                        body, keep_alive)


def response_head(status: int, headers: dict[str, str], words: dict[int, str]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = words.get(status, "Unknown")
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def has_key(req: HttpRequest) -> bool:
    for name in ("authorization", "x-api-key", "x-goog-api-key", "api-key"):
        value = req.headers.get(name, "")
        if value and value.lower() not in ("bearer", "bearer none", "bearer "):
            return True
    return bool(req.query.get("key", [""])[0])


def presented_key(req: HttpRequest) -> str:
    """The key a request carries (header or `?key=`), as sent; "" when none."""
    for name in ("authorization", "x-api-key", "x-goog-api-key", "api-key"):
        value = req.headers.get(name, "")
        if value:
            return value.split(" ", 1)[1] if value.lower().startswith("bearer ") else value
    return req.query.get("key", [""])[0]


class Connection:
    """One client connection and the writes every emulated answer and fault is made of.

    `request_id` names each response (its x-request-id header); `stopping` is the server's
    stop signal (sleeps end at once when it is set); `chunk_delay` spaces streamed parts.
    """

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
        request_id: Callable[[], str], stopping: asyncio.Event | None, chunk_delay: float = 0.0,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.request_id = request_id
        self.stopping = stopping
        self.chunk_delay = chunk_delay

    def headers(self, content_type: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        rid = self.request_id()
        return {"content-type": content_type, "server": "frugalflow-emulator",
                "x-request-id": rid, "request-id": f"req_{rid}", **(extra or {})}

    async def send(
        self, status: int, payload: bytes, content_type: str,
        words: dict[int, str] | None = None, extra: dict[str, str] | None = None,
    ) -> bool:
        """A whole response with a Content-Length; True (the connection can be reused)."""
        headers = self.headers(content_type, extra)
        headers["content-length"] = str(len(payload))
        self.writer.write(response_head(status, headers, words or {}) + payload)
        await self.writer.drain()
        return True

    async def send_json(
        self, status: int, payload: dict[str, Any], words: dict[int, str] | None = None,
        extra: dict[str, str] | None = None,
    ) -> bool:
        return await self.send(status, _dumps(payload).encode(), "application/json", words,
                               extra)

    async def send_half(self, payload: bytes, words: dict[int, str]) -> None:
        """A 200 head promising `payload`'s length, then only its first half."""
        headers = self.headers("application/json")
        headers["content-length"] = str(len(payload))
        self.writer.write(response_head(200, headers, words) + payload[: len(payload) // 2])
        await self.writer.drain()

    async def send_chunked(
        self, parts: list[bytes], content_type: str, words: dict[int, str],
        stop_at: int | None = None,
    ) -> bool:
        """A chunked body of `parts`, ended cleanly (True), or only the first `stop_at` parts
        and no end (False: the caller decides how the body breaks)."""
        headers = self.headers(content_type, {"transfer-encoding": "chunked",
                                              "cache-control": "no-cache"})
        self.writer.write(response_head(200, headers, words))
        await self.writer.drain()
        for i, part in enumerate(parts):
            if stop_at is not None and i >= stop_at:
                return False
            if self.chunk_delay > 0 and i > 0:
                await self.sleep(self.chunk_delay)
            self.writer.write(b"%x\r\n%s\r\n" % (len(part), part))
            await self.writer.drain()
        self.writer.write(b"0\r\n\r\n")
        await self.writer.drain()
        return True

    async def end_chunked(self, last: bytes) -> None:
        """One more chunk, then the chunked body's end."""
        self.writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last))
        await self.writer.drain()

    async def send_until_close(
        self, parts: list[bytes], content_type: str, words: dict[int, str],
    ) -> NoReturn:
        """A body with neither Content-Length nor chunked encoding: it ends where the
        connection does. After `parts`, a clean close (FIN, no reset): to the client, the
        body simply ended."""
        headers = self.headers(content_type, {"connection": "close",
                                              "cache-control": "no-cache"})
        self.writer.write(response_head(200, headers, words))
        await self.writer.drain()
        for i, part in enumerate(parts):
            if self.chunk_delay > 0 and i > 0:
                await self.sleep(self.chunk_delay)
            self.writer.write(part)
            await self.writer.drain()
        if self.writer.can_write_eof():
            self.writer.write_eof()
        raise Closed

    def reset(self) -> None:
        """Close with a TCP RST (SO_LINGER 0) and no response at all."""
        sock = self.writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def sleep(self, seconds: float) -> None:
        """Sleep `seconds`; raise Closed at once if the server stops meanwhile."""
        stopping = self.stopping
        if stopping is None:
            raise Closed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)
        if stopping.is_set():
            raise Closed

    async def hang(self, seconds: float) -> None:
        """Send nothing for `seconds`, or until the client gives up or the server aborts."""
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(self.reader.read(1), seconds)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)
