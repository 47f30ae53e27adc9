"""A provider emulator: four LLM provider APIs on 127.0.0.1, with scriptable faults.

`ProviderEmulator` is a small HTTP/1.1 server (asyncio streams, no extra dependency) that
speaks enough of the OpenAI Chat Completions, Anthropic Messages, Gemini generateContent and
Ollama chat APIs for the *real* client libraries and their LangChain integrations to work
against it unmodified. Tests, benchmarks, notebooks and demos use it to prove fallback over
the wire: a fault is a real 429 with a Retry-After header, a real reset socket, a real hang.

    async with ProviderEmulator(seed=0) as emu:
        model = ChatOpenAI(model="gpt-4o-mini", base_url=emu.base_url("openai"),
                           api_key="test-key", max_retries=0)
        emu.fault("openai", "rate_limit", retry_after=2)   # the next call gets a 429
        ...

From sync code or a notebook: `emu.start_in_thread()` / `emu.stop_thread()`, or `with
ProviderEmulator() as emu:`. `emu.chat_model(provider, model)` builds the LangChain model
already pointed at the emulator, SDK retries off.

Routes (`emu.base_url(provider)` is what a client takes as its base URL):

    openai     POST /openai/v1/chat/completions   GET /openai/v1/models[/{id}]
    anthropic  POST /anthropic/v1/messages        GET /anthropic/v1/models
    gemini     POST /gemini/{version}/models/{model}:generateContent
               POST /gemini/{version}/models/{model}:streamGenerateContent?alt=sse
    ollama     POST /ollama/api/chat              GET /ollama/api/tags, /ollama/api/version

Batch APIs (`emu.batches`, a `BatchDesk`: scripted delays, per-item errors, expiry, a
refused batch, cancellation; see frugalflow/testing/batches/):

    openai     /openai/v1/files[/{id}[/content]], /openai/v1/batches[/{id}[/cancel]]
    anthropic  /anthropic/v1/messages/batches[/{id}[/cancel|/results]]
    gemini     POST /gemini/{version}/models/{model}:batchGenerateContent,
               /gemini/{version}/batches[/{id}[:cancel]]

Answers are deterministic for a seed: a few sentences derived from a hash of the provider,
model and last message. When tools are offered the first (or the forced) tool is called with
arguments valid against its JSON schema, unless the last message is a tool result and the
tool choice is not forced (then the answer is text). A requested JSON schema (OpenAI
`response_format`, Anthropic `output_config.format`, Gemini `responseJsonSchema`, Ollama
`format`) yields schema-valid JSON text; a tool or schema a simulator oracle knows (see
`Simulator.oracles`) gets that oracle's right answer instead, so the flows'
validators accept it. Token counts are about len(text) / 4. A `responder`
(provider, model, request_json) -> str | None dictates the text when it returns a string.

Fault kinds: `emu.fault(provider, kind, ...)`; what each provider sends and what each client
raises is in frugalflow.testing.wire_faults (`FAULT_KINDS`).

Every request to a generation route is recorded in `emu.requests` (provider, model, path
without query, stream flag, whether a key was sent - never the key - the fault applied, the
status, and the JSON body).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, NoReturn

from .answers import compose, shape
from .dialects import DIALECTS, Answer, Ask, Context, Dialect, dumps, tokens
from .http1 import (
    MAX_HEAD,
    Closed,
    Connection,
    HttpRequest,
    has_key,
    presented_key,
    read_request,
)
from .wire_faults import (
    FAULT_KINDS,
    UNSET,
    EmulatedFault,
    Unset,
    canonical_kind,
    fault_supported,
    unsupported_reason,
)

if TYPE_CHECKING:
    from types import TracebackType

    from langchain_core.language_models import BaseChatModel

    from ..catalog import Catalog

__all__ = [
    "EMULATED_MODELS",
    "EMULATOR_KEY_ENV",
    "FAULT_KINDS",
    "PROVIDERS",
    "EmulatedFault",
    "ProviderEmulator",
    "RecordedRequest",
    "Responder",
    "emulated_catalog",
    "fault_supported",
]

_log = logging.getLogger(__name__)

PROVIDERS: Final = ("openai", "anthropic", "gemini", "ollama")

Responder = Callable[[str, str, dict[str, Any]], object]
"""(provider, model, request_json) -> the answer's text (a dict or list is sent as JSON text),
or None for the default answer."""

DEFAULT_MODELS: Final[dict[str, tuple[str, ...]]] = {
    "openai": ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"),
    "anthropic": ("claude-haiku-4-5", "claude-sonnet-4-6"),
    "gemini": ("gemini-2.5-flash", "gemini-2.5-flash-lite"),
    "ollama": ("llama3.2", "qwen2.5"),
}

_IDLE_SECONDS = 120.0
"""A keep-alive connection with no new request for this long is closed."""


@dataclass
class RecordedRequest:
    """One request as the emulator saw it (the API key itself is never kept)."""

    provider: str
    model: str
    method: str
    path: str
    stream: bool
    auth: bool
    """Whether an API key or Authorization header was present."""
    fault: str | None
    status: int | None
    """HTTP status sent (None: no response, e.g. a reset or a hang)."""
    body: dict[str, Any] = field(repr=False)
    at: float = field(default_factory=time.time, repr=False)


# Faults each provider answers with a refusal instead of an HTTP error.
_REFUSAL_ANSWERS: Final = frozenset({"anthropic", "gemini"})

_GEMINI_ROUTE = re.compile(
    r"^/gemini/(?P<version>v[^/]+)/(?:models/)?(?P<model>[^/:]+)"
    r":(?P<method>generateContent|streamGenerateContent)$"
)


def _echo_key(payload: dict[str, Any], key: str) -> dict[str, Any]:
    """A 401 body whose message repeats `key` (the `auth_echo` fault)."""
    error = payload.get("error")
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        message = error["message"]
        if message.startswith("Incorrect API key provided."):  # OpenAI's exact wording
            error["message"] = message.replace("provided.", f"provided: {key}.", 1)
        else:
            error["message"] = f"{message} (API key provided: {key})"
    elif isinstance(error, str):  # Ollama: {"error": "..."}
        payload["error"] = f"{error} (API key provided: {key})"
    return payload


# -- the emulator ---------------------------------------------------------------------------


class ProviderEmulator:
    """An HTTP server on 127.0.0.1 speaking four provider APIs, with scriptable faults.

    No I/O happens in the constructor: `await start()` (or `async with`) binds an ephemeral
    port; `start_in_thread()` (or `with`) runs it on its own event loop for sync code.
    `latency` delays every answer; `chunk_delay` spaces stream events; `require_key` answers
    401 to requests without a key.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        responder: Responder | None = None,
        latency: float = 0.0,
        chunk_delay: float = 0.0,
        require_key: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.seed = seed
        self.responder = responder
        self.latency = latency
        self.chunk_delay = chunk_delay
        self.require_key = require_key
        self.host = host
        self.port = port
        self.requests: list[RecordedRequest] = []
        self.faults: list[EmulatedFault] = []
        self.errors: list[BaseException] = []
        """Requests the emulator could not understand or serve (a 400, or a dropped socket)."""
        self._lock = threading.Lock()
        self._server: asyncio.Server | None = None
        self._stopping: asyncio.Event | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._counter = 0
        from .batches import BatchDesk

        self.batches = BatchDesk(self)
        """The batch APIs' state: scripts, batches, uploaded files, paid items."""

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> ProviderEmulator:
        """Bind and start serving; returns self."""
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, limit=MAX_HEAD
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop serving and close every open connection (hangs included)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        if self._stopping is not None:
            self._stopping.set()
        for writer in list(self._writers):
            writer.transport.abort()
        tasks = [t for t in self._tasks if not t.done()]
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=1.0)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5.0)

    async def __aenter__(self) -> ProviderEmulator:
        return await self.start()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start_in_thread(self, timeout: float = 10.0) -> ProviderEmulator:
        """Serve from a daemon thread with its own event loop (for sync code, notebooks)."""
        if self._thread is not None:
            raise RuntimeError("the emulator thread is already running")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=self._run_loop, args=(loop,),
                                  name="frugalflow-emulator", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            asyncio.run_coroutine_threadsafe(self.start(), loop).result(timeout)
        except BaseException:
            self.stop_thread(timeout)
            raise
        return self

    def stop_thread(self, timeout: float = 10.0) -> None:
        """Stop a server started with `start_in_thread` and join its thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if self._server is not None and loop.is_running():
                asyncio.run_coroutine_threadsafe(self.stop(), loop).result(timeout)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout)
            self._loop = self._thread = None

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def __enter__(self) -> ProviderEmulator:
        return self.start_in_thread()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_thread()

    # -- addresses --------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """`http://127.0.0.1:PORT` (only once started)."""
        if self._server is None:
            raise RuntimeError("the emulator is not running: call start() first")
        return f"http://{self.host}:{self.port}"

    def base_url(self, provider: str) -> str:
        """What `provider`'s client takes as its base URL."""
        return provider_base_url(self.url, provider)

    def chat_model(
        self, provider: str, model: str | None = None, *, timeout: float | None = 10.0,
        api_key: str = "test-key", **kwargs: Any,
    ) -> BaseChatModel:
        """The provider's LangChain chat model pointed at the emulator, SDK retries off."""
        model = model or DEFAULT_MODELS[provider][0]
        base = self.base_url(provider)
        if provider == "openai":
            from langchain_openai import ChatOpenAI

            kwargs.setdefault("stream_usage", True)
            return ChatOpenAI(model=model, base_url=base, api_key=api_key,
                              max_retries=0, timeout=timeout, **kwargs)
        if provider == "anthropic":
            from langchain_anthropic import ChatAnthropic

            return ChatAnthropic(model=model, base_url=base, api_key=api_key,
                                 max_retries=0, default_request_timeout=timeout, **kwargs)
        if provider == "gemini":
            from langchain_google_genai import ChatGoogleGenerativeAI

            return ChatGoogleGenerativeAI(model=model, base_url=base, google_api_key=api_key,
                                          max_retries=0, timeout=timeout, **kwargs)
        from langchain_ollama import ChatOllama

        client_kwargs = dict(kwargs.pop("client_kwargs", None) or {})
        if timeout is not None:
            client_kwargs.setdefault("timeout", timeout)
        return ChatOllama(model=model, base_url=base, client_kwargs=client_kwargs, **kwargs)

    # -- faults -----------------------------------------------------------------------------

    def fault(
        self,
        provider: str,
        kind: str,
        *,
        model: str | None = None,
        calls: Iterable[int] | None = None,
        times: int | None | Unset = UNSET,
        retry_after: float | None = 1.0,
        after_chunks: int = 2,
        hang_seconds: float = 5.0,
        status: int | None = None,
        stream: bool | None = None,
        reason: str | None = None,
    ) -> EmulatedFault:
        """Script a fault for `provider` (and `model`); returns it (see `.hits`).

        `calls`: which matching requests (1-based, counted from now) fail; without it, the
        next ones. `times`: how many hits at most, None for every matching call until
        cleared; it defaults to len(calls), or 1. `status` overrides the HTTP status.
        """
        kind = canonical_kind(kind)
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if (why := unsupported_reason(provider, kind)) is not None:
            raise ValueError(f"no fault {kind!r} for {provider}: {why}")
        chosen = frozenset(calls) if calls is not None else None
        if isinstance(times, Unset):
            times = len(chosen) if chosen else 1
        fault = EmulatedFault(provider, kind, model, chosen, times, retry_after,
                              max(0, after_chunks), max(0.0, hang_seconds), status, stream,
                              reason)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self, target: str | EmulatedFault | None = None) -> None:
        """Remove every fault, a provider's faults, or one fault."""
        with self._lock:
            if target is None:
                self.faults.clear()
            elif isinstance(target, EmulatedFault):
                self.faults = [f for f in self.faults if f is not target]
            else:
                self.faults = [f for f in self.faults if f.provider != target]

    def reset(self) -> None:
        """Forget faults and recorded requests."""
        with self._lock:
            self.faults.clear()
            self.requests.clear()

    def requests_for(
        self, provider: str | None = None, model: str | None = None
    ) -> list[RecordedRequest]:
        with self._lock:
            return [r for r in self.requests
                    if (provider is None or r.provider == provider)
                    and (model is None or r.model == model)]

    async def wait_for_requests(self, n: int = 1, timeout: float = 5.0) -> list[RecordedRequest]:
        """Wait until `n` generation requests have arrived (e.g. a hang has begun)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if len(self.requests) >= n:
                    return list(self.requests)
            if time.monotonic() >= deadline:
                raise TimeoutError(f"{len(self.requests)} of {n} requests in {timeout} s")
            await asyncio.sleep(0.005)

    def _take_fault(self, provider: str, model: str, stream: bool) -> EmulatedFault | None:
        with self._lock:
            chosen = None
            for f in self.faults:
                if not f.matches(provider, model, stream):
                    continue
                f.seen += 1
                if chosen is None and not f.exhausted and (f.calls is None or f.seen in f.calls):
                    f.hits += 1
                    chosen = f
            return chosen

    # -- answers ----------------------------------------------------------------------------

    def _rng(self, *parts: str) -> random.Random:
        digest = hashlib.sha256("|".join((str(self.seed), *parts)).encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def _answer(self, ctx: Context, ask: Ask, refused: bool,
                fault: EmulatedFault | None = None) -> Answer:
        rng = self._rng(ctx.provider, ctx.model, ask.last_text)
        said: object = None
        if self.responder is not None and not refused:
            said = self.responder(ctx.provider, ctx.model, ctx.body)
        answer = compose(ask, rng, said, refused)
        if fault is None:
            return answer
        return shape(answer, ctx, fault.kind, fault.reason)

    # -- serving ----------------------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        # drain() then waits until the kernel has every byte: cuts and resets are exact.
        writer.transport.set_write_buffer_limits(high=0)
        conn = Connection(reader, writer, request_id=self._next_id, stopping=self._stopping,
                          chunk_delay=self.chunk_delay)
        try:
            while True:
                req = await read_request(reader, _IDLE_SECONDS)
                if req is None:
                    break
                if not await self._serve(req, conn) or not req.keep_alive:
                    break
        except (Closed, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                ValueError, OSError):
            pass
        except asyncio.CancelledError:
            # stop() cancels stragglers; end quietly (3.11's start_server callback would
            # otherwise log the cancellation as an error).
            pass
        except Exception as e:  # an emulator bug: keep it for inspection, drop the connection
            self.errors.append(e)
            _log.exception("provider emulator: error while serving a request")
        finally:
            self._writers.discard(writer)
            if task is not None:
                self._tasks.discard(task)
            writer.close()

    def _next_id(self) -> str:
        with self._lock:
            self._counter += 1
            n = self._counter
        return f"emu{self.seed:x}{n:08x}"

    def _route(self, req: HttpRequest) -> tuple[str, str, bool] | None:
        """(provider, model, stream) for a generation request, or None."""
        if req.method != "POST":
            return None
        path = req.path.rstrip("/")
        if (m := _GEMINI_ROUTE.match(path)) is not None:
            return "gemini", m["model"], m["method"] == "streamGenerateContent"
        provider = {"/openai/v1/chat/completions": "openai",
                    "/anthropic/v1/messages": "anthropic",
                    "/ollama/api/chat": "ollama", "/api/chat": "ollama"}.get(path)
        return (provider, "", False) if provider else None

    async def _serve(self, req: HttpRequest, conn: Connection) -> bool:
        """Answer one request; False when the connection must not be reused."""
        conn.chunk_delay = self.chunk_delay
        route = self._route(req)
        if route is None:
            return await self._serve_other(req, conn)
        provider, model, stream = route
        dialect = DIALECTS[provider]
        try:
            body = json.loads(req.body or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return await conn.send_json(400, {"error": {
                "message": "the request body is not a JSON object", "code": 400}},
                dialect.status_words)
        if provider != "gemini":
            model = str(body.get("model", ""))
            stream = bool(body.get("stream", provider == "ollama"))
        ctx = Context(provider, model, stream, body, self._next_id(), int(time.time()),
                      include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
                      sse=provider != "gemini" or req.query.get("alt", [""])[0] == "sse")
        auth = has_key(req)
        fault = self._take_fault(provider, model, stream)
        kind = fault.kind if fault is not None else None
        if kind is None and self.require_key and not auth:
            kind = "auth"
        record = RecordedRequest(provider, model, req.method, req.path, stream, auth, kind,
                                 None, body)
        with self._lock:
            self.requests.append(record)
        try:
            ask = dialect.parse(body)
        except (KeyError, TypeError, AttributeError, IndexError) as e:
            status, payload = dialect.error("invalid_request", ctx, None, 0)
            record.status = status
            self.errors.append(e)
            return await conn.send_json(status, payload, dialect.status_words)
        return await self._respond(req, conn, dialect, ctx, ask, record, fault, kind)

    async def _respond(
        self, req: HttpRequest, conn: Connection, dialect: Dialect, ctx: Context, ask: Ask,
        record: RecordedRequest, fault: EmulatedFault | None, kind: str | None,
    ) -> bool:
        """The answer to a well-formed request, or the fault `kind` in its place."""
        if self.latency > 0:
            await conn.sleep(self.latency)
        if kind == "connection":
            conn.reset()
            raise Closed
        if kind == "timeout":
            await conn.hang(fault.hang_seconds if fault else 0.0)
            raise Closed
        if kind == "slow" and fault is not None:
            await conn.sleep(fault.hang_seconds)
        refused = kind == "content_filter" and ctx.provider in _REFUSAL_ANSWERS
        http_error = kind in ("rate_limit", "overloaded", "server_error", "unavailable", "auth",
                              "auth_echo", "context_length", "invalid_request") or (
            kind == "content_filter" and not refused
        ) or (kind == "stream_error" and not ctx.stream)
        if http_error and kind is not None:
            return await self._send_error(req, conn, dialect, ctx, ask, record, fault, kind)
        answer = self._answer(ctx, ask, refused, fault)
        record.status = 200
        if not ctx.stream:
            return await self._send_plain(conn, dialect, ctx, answer, fault)
        return await self._send_stream(conn, dialect, ctx, answer, fault)

    async def _send_error(
        self, req: HttpRequest, conn: Connection, dialect: Dialect, ctx: Context, ask: Ask,
        record: RecordedRequest, fault: EmulatedFault | None, kind: str,
    ) -> bool:
        """The provider's HTTP error for `kind`, in its own words."""
        retry_after = fault.retry_after if fault is not None else None
        status, payload = dialect.error("auth" if kind == "auth_echo" else kind, ctx,
                                        retry_after, tokens(ask.prompt_chars))
        if kind == "auth_echo":
            payload = _echo_key(payload, presented_key(req))
        if fault is not None and fault.status is not None:
            status = fault.status
        record.status = status
        extra = {}
        if kind == "rate_limit" and retry_after is not None:
            extra["retry-after"] = f"{retry_after:g}"
        return await conn.send_json(status, payload, dialect.status_words, extra)

    async def _send_plain(
        self, conn: Connection, dialect: Dialect, ctx: Context, answer: Answer,
        fault: EmulatedFault | None,
    ) -> bool:
        """A whole (non-streamed) answer, or the body fault that breaks it."""
        kind = fault.kind if fault is not None else None
        payload = dumps(dialect.full(ctx, answer)).encode()
        if kind == "malformed":
            payload = payload[: max(1, len(payload) // 2)]
        if kind == "stream_eof":
            await conn.send_until_close([payload[: max(1, len(payload) // 2)]],
                                        "application/json", dialect.status_words)
        if kind in ("stream_cut", "stream_stall", "stream_reset") and fault is not None:
            await conn.send_half(payload, dialect.status_words)
            await self._break(conn, fault)
        return await conn.send(200, payload, "application/json", dialect.status_words)

    async def _send_stream(
        self, conn: Connection, dialect: Dialect, ctx: Context, answer: Answer,
        fault: EmulatedFault | None,
    ) -> bool:
        """A streamed answer in the dialect's events, or the stream fault that breaks it."""
        kind = fault.kind if fault is not None else None
        if not ctx.sse:  # Gemini streamGenerateContent without alt=sse: one JSON array
            chunks = [json.loads(e.decode().removeprefix("data: "))
                      for e in dialect.events(ctx, answer)]
            return await conn.send(200, dumps(chunks).encode(), "application/json",
                                   dialect.status_words)
        events = dialect.events(ctx, answer)
        if kind == "malformed":
            events = [dialect.broken_event(ctx), *events[1:]]
        if kind in ("stream_truncated", "stream_eof") and fault is not None:
            # The events before the finish reason / usage / done, at most after_chunks.
            kept = events[: min(fault.after_chunks, len(events) - dialect.ending(ctx, answer))]
            if kind == "stream_eof":
                await conn.send_until_close(kept, dialect.stream_type, dialect.status_words)
            events, fault, kind = kept, None, None  # then the tail ([DONE]), a clean end
        everything = events + dialect.stream_tail(ctx)
        stop_at = None
        if kind in ("stream_cut", "stream_stall", "stream_error", "stream_reset") \
                and fault is not None:
            # Always before the last event, so the client cannot have finished cleanly.
            stop_at = min(fault.after_chunks, len(everything) - 1)
        if await conn.send_chunked(everything, dialect.stream_type, dialect.status_words,
                                   stop_at):
            return True
        assert fault is not None
        if kind == "stream_error":
            await conn.end_chunked(dialect.stream_error(ctx))
            return True
        await self._break(conn, fault)

    @staticmethod
    async def _break(conn: Connection, fault: EmulatedFault) -> NoReturn:
        """End a response part-way: silence (stream_stall), a reset (stream_reset) or a
        close (stream_cut: the body never ends)."""
        if fault.kind == "stream_stall":
            await conn.hang(fault.hang_seconds)
        if fault.kind == "stream_reset":
            conn.reset()
        raise Closed

    async def _serve_other(self, req: HttpRequest, conn: Connection) -> bool:
        """Batch routes, model listings and the like; 404 for anything unknown."""
        batch = await self.batches.serve(req, conn)
        if batch is not None:
            return batch
        path = req.path.rstrip("/")
        now = int(time.time())
        if req.method == "GET" and path == "/openai/v1/models":
            data = [{"id": m, "object": "model", "created": now, "owned_by": "emulator"}
                    for m in self._models("openai")]
            return await conn.send_json(200, {"object": "list", "data": data})
        if req.method == "GET" and path.startswith("/openai/v1/models/"):
            mid = path.removeprefix("/openai/v1/models/")
            return await conn.send_json(200, {"id": mid, "object": "model", "created": now,
                                              "owned_by": "emulator"})
        if req.method == "GET" and path == "/anthropic/v1/models":
            data = [{"type": "model", "id": m, "display_name": m,
                     "created_at": "2025-01-01T00:00:00Z"} for m in self._models("anthropic")]
            return await conn.send_json(200, {"data": data, "has_more": False,
                                              "first_id": data[0]["id"],
                                              "last_id": data[-1]["id"]})
        if req.method == "GET" and re.fullmatch(r"/gemini/v[^/]+/models", path):
            data = [{"name": f"models/{m}", "displayName": m,
                     "supportedGenerationMethods": ["generateContent"]}
                    for m in self._models("gemini")]
            return await conn.send_json(200, {"models": data})
        if req.method == "GET" and path in ("/ollama/api/tags", "/api/tags"):
            data = [{"name": m, "model": m, "modified_at": "2025-01-01T00:00:00Z", "size": 1,
                     "digest": hashlib.sha256(m.encode()).hexdigest(), "details": {}}
                    for m in self._models("ollama")]
            return await conn.send_json(200, {"models": data})
        if req.method == "GET" and path in ("/ollama/api/version", "/api/version"):
            return await conn.send_json(200, {"version": "0.0.0-emulator"})
        if req.method == "GET" and path in ("", "/ollama"):
            return await conn.send(200, b"Ollama is running", "text/plain")
        return await conn.send_json(404, {"error": {
            "message": f"no route for {req.method} {req.path}", "code": 404,
            "type": "not_found_error"}})

    def _models(self, provider: str) -> list[str]:
        seen = [r.model for r in self.requests_for(provider) if r.model]
        return list(dict.fromkeys([*DEFAULT_MODELS[provider], *seen]))


# -- a catalog of real provider integrations pointed at an emulator ------------------------

EMULATOR_KEY_ENV = "FRUGALFLOW_EMULATOR_KEY"
"""The emulated catalog's models read their (dummy) key from this variable."""

# catalog provider -> emulator API; OpenAI-compatible vendors use the OpenAI route.
_ROUTES = {"openai": "openai", "deepseek": "openai", "groq": "openai", "together": "openai",
           "anthropic": "anthropic", "google": "gemini", "ollama": "ollama"}

EMULATED_MODELS: tuple[str, ...] = (
    "groq/llama-3.1-8b-instant",
    "openai/gpt-4.1-nano",
    "openai/gpt-4o-mini",
    "google/gemini-2.5-flash-lite",
    "google/gemini-2.5-flash",
    "deepseek/deepseek-chat",
    "anthropic/claude-haiku-4-5",
    "openai/gpt-4.1",
    "anthropic/claude-sonnet-4-6",
    "google/gemini-2.5-pro",
    "ollama/llama3.2:3b",
)


def provider_base_url(url: str, provider: str) -> str:
    """What `provider`'s client takes as its base URL, for an emulator serving at `url`."""
    suffix = {"openai": "/openai/v1", "anthropic": "/anthropic", "gemini": "/gemini",
              "ollama": "/ollama"}
    try:
        return url + suffix[provider]
    except KeyError:
        raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}") \
            from None


def emulated_catalog(
    emu: ProviderEmulator | str, models: Iterable[str] = EMULATED_MODELS
) -> Catalog:
    """Built-in catalog entries for `models`, served by `emu` through the real integrations.

    `emu` is a started emulator, or the URL of one another process runs (a worker's view).
    Prices, windows, capabilities and quality are the real models' (genai-prices, profiles,
    quality.toml); only the base URL and the key variable change. Set EMULATOR_KEY_ENV to
    any value to make them available.
    """
    from ..catalog import Catalog

    url = emu if isinstance(emu, str) else emu.url
    builtin = Catalog.builtin()
    specs = []
    for key in models:
        spec = builtin[key]
        update: dict[str, Any] = {"base_url": provider_base_url(url, _ROUTES[spec.provider]),
                                  "api_key_env": EMULATOR_KEY_ENV}
        if spec.provider == "ollama":
            update["local"] = False  # priced 0 anyway; available with the key variable
        specs.append(spec.model_copy(update=update))
    return Catalog(specs, name="emulated")
