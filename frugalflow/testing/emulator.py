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

Answers are deterministic for a seed: a few sentences derived from a hash of the provider,
model and last message. When tools are offered the first (or the forced) tool is called with
arguments valid against its JSON schema, unless the last message is a tool result and the
tool choice is not forced (then the answer is text). A requested JSON schema (OpenAI
`response_format`, Anthropic `output_config.format`, Gemini `responseJsonSchema`, Ollama
`format`) yields schema-valid JSON text; a tool or schema a simulator oracle knows (flows
register theirs in `simulator.oracles`) gets that oracle's right answer instead, so the flows'
validators accept it. Token counts are about len(text) / 4. A `responder`
(provider, model, request_json) -> str | None dictates the text when it returns a string.

Fault kinds (`emu.fault(provider, kind, ...)`), what each provider sends, and what the client
raises - as observed (tests/test_emulator.py) with langchain-openai 1.7 / openai 3.x,
langchain-anthropic 1.7 / anthropic 2.x, langchain-google-genai 4.4 / google-genai 3.x and
langchain-ollama 1.1 / ollama 0.6. The LangChain classes subclass the SDK's (OpenAIRateLimitError
is an openai.RateLimitError); langchain-google-genai's 4xx classes keep the genai error as
`__cause__` instead. ChatOllama streams even for invoke, so its "plain" call is a stream.

    rate_limit      429 + Retry-After header (each provider's body; Gemini adds a RetryInfo
                    retryDelay): openai/anthropic RateLimitError, GoogleRateLimitError (cause:
                    genai ClientError 429), ollama.ResponseError 429 (headers not exposed)
    overloaded      anthropic 529 overloaded_error -> anthropic.OverloadedError; openai 503
                    -> InternalServerError; gemini 503 UNAVAILABLE "The model is overloaded"
                    -> GoogleAPIError (a genai ServerError); ollama 503 "server busy"
    server_error    500 -> openai/anthropic InternalServerError, GoogleAPIError, ResponseError
    unavailable     503 -> openai/anthropic InternalServerError (langchain-anthropic re-raises
                    the SDK's ServiceUnavailableError as one), GoogleAPIError, ResponseError
    auth            401 -> openai/anthropic AuthenticationError, GoogleAuthenticationError
                    (UNAUTHENTICATED; the real Gemini answers 400 API_KEY_INVALID to a bad
                    key), ResponseError 401
    auth_echo       401 as `auth`, whose message repeats the key the request presented, in
                    full: "Incorrect API key provided: <key>. ..." (OpenAI's own wording: it
                    echoes keys it does not recognise, e.g. "YOUR_API_KEY"; OpenAI-compatible
                    servers and proxies echo them too); the other dialects append
                    "(API key provided: <key>)" to their 401 message, so each client's
                    error path carries the key. Exceptions as for `auth`
    context_length  400 in each provider's words: OpenAI code context_length_exceeded,
                    Anthropic "prompt is too long: N tokens > M maximum", Gemini
                    INVALID_ARGUMENT "The input token count (N) exceeds the maximum number of
                    tokens allowed (M)", Ollama "the input length exceeds the context length"
                    -> openai.BadRequestError (error.code says it; langchain-openai does not
                    spot it since openai 3.x left the body out of str(error)),
                    AnthropicContextOverflowError, GoogleContextOverflowError, ResponseError
    invalid_request 400 -> openai/anthropic BadRequestError, GoogleInvalidRequestError,
                    ResponseError
    content_filter  openai: 400 code content_filter (Azure's wording) -> BadRequestError;
                    anthropic: 200, stop_reason "refusal", no content -> an empty answer with
                    response_metadata["stop_reason"] == "refusal"; gemini: 200, finishReason
                    SAFETY, no parts -> an empty answer with response_metadata
                    ["finish_reason"] == "SAFETY"; ollama (no such thing upstream): 400
                    "content_filter: ..." -> ResponseError
    connection      the socket is reset (RST) before any response byte ("reset" is an alias)
                    -> openai/anthropic APIConnectionError; genai and ollama let the raw
                    httpx2.ReadError / httpx.ReadError through
    timeout         the connection stays open and silent for `hang_seconds` (or until the
                    client gives up), then closes ("hang" is an alias) -> openai/anthropic
                    APITimeoutError; raw httpx2.ReadTimeout (genai), httpx.ReadTimeout (ollama)
    slow            silence for `hang_seconds`, then the normal answer
    malformed       200 with a truncated JSON body (streams: the first event broken) -> a bare
                    json.JSONDecodeError from every client, but genai's streams raise
                    UnknownApiResponseError (a ValueError)
    stream_cut      streams: `after_chunks` events, then the connection closes without ending
                    the chunked body (always before the last event); plain calls: half of a
                    longer Content-Length -> openai APIConnectionError, anthropic
                    APIConnectionError (plain) but a raw httpx2.RemoteProtocolError (stream),
                    raw httpx2/httpx RemoteProtocolError from genai and ollama
    stream_stall    like stream_cut, but silence for `hang_seconds` instead of the close
                    -> openai APITimeoutError, anthropic APITimeoutError (plain) / raw
                    httpx2.ReadTimeout (stream), raw httpx2/httpx ReadTimeout otherwise
    stream_error    streams: `after_chunks` events, then the provider's in-stream error
                    (OpenAI `data: {"error": ...}`, Anthropic `event: error` overloaded_error,
                    Gemini `{"error": 503 UNAVAILABLE}`, Ollama `{"error": ...}`) -> openai
                    APIError, anthropic APIStatusError (status 200), GoogleAPIError,
                    ResponseError (status -1); plain calls get the provider's 500
    stream_reset    like stream_cut, but the connection is reset (RST) instead of closed
                    -> openai/anthropic APIConnectionError (anthropic streams: a raw
                    httpx2.ReadError), raw httpx2/httpx ReadError from genai and ollama

Answers that look fine but are not - no client raises anything for these; frugalflow's
adapters catch them (tests/test_wire_faults.py):

    stream_truncated  streams: at most `after_chunks` events, never the ones that end the
                    answer (OpenAI's chunk with finish_reason and its usage chunk,
                    Anthropic's message_delta/message_stop, Gemini's chunk with
                    finishReason, Ollama's done: true), then a clean end of the chunked body
                    (OpenAI: after `data: [DONE]`, as proxies that end a stream early send);
                    plain calls: a whole body without the end marker (finish_reason null,
                    stop_reason null, no finishReason, done: false)
    stream_eof      the same events in a body delimited by the connection's close (no
                    Content-Length, no chunked encoding), then a clean close (FIN): to the
                    client the body simply ended; plain calls: half the body, then the close
                    -> a bare json.JSONDecodeError
    filtered        200, the answer stopped by the provider's filter part-way: OpenAI
                    finish_reason "content_filter", Anthropic stop_reason "refusal", Gemini
                    a candidate with finishReason `reason` (SAFETY, PROHIBITED_CONTENT,
                    BLOCKLIST, RECITATION) and no parts; streamed and plain (not Ollama)
    prompt_blocked  Gemini only: 200 with no candidates and promptFeedback.blockReason
                    `reason` (default SAFETY); langchain-google-genai returns an empty answer
    no_usage        200, a complete answer without token usage: OpenAI no `usage` (plain) or
                    no usage chunk (stream), Gemini no usageMetadata, Ollama's last message
                    without prompt_eval_count/eval_count (not Anthropic: it always reports)

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
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, ClassVar, Final
from urllib.parse import parse_qs, unquote, urlsplit

from .fake_json import fake_json

if TYPE_CHECKING:
    from types import TracebackType

    from langchain_core.language_models import BaseChatModel

__all__ = [
    "FAULT_KINDS",
    "PROVIDERS",
    "EmulatedFault",
    "ProviderEmulator",
    "RecordedRequest",
    "Responder",
    "fault_supported",
]

_log = logging.getLogger(__name__)

PROVIDERS: Final = ("openai", "anthropic", "gemini", "ollama")

FAULT_KINDS: Final[dict[str, str]] = {
    "rate_limit": "429 with a Retry-After header",
    "overloaded": "Anthropic 529 overloaded_error; 503 elsewhere",
    "server_error": "500 internal error",
    "unavailable": "503 service unavailable",
    "auth": "401 invalid key",
    "auth_echo": "401 whose message repeats the presented key",
    "context_length": "400 context length exceeded, in the provider's words",
    "invalid_request": "400 invalid request",
    "content_filter": "a refusal: an error or a refusal answer, per provider",
    "connection": "the socket is reset before any response",
    "timeout": "no response for hang_seconds, then the connection closes",
    "slow": "no response for hang_seconds, then a normal answer",
    "malformed": "200 with a broken JSON body (or one broken stream event)",
    "stream_cut": "after_chunks stream events, then the connection closes mid-body",
    "stream_stall": "after_chunks stream events, then silence for hang_seconds",
    "stream_error": "after_chunks stream events, then the provider's in-stream error",
    "stream_reset": "after_chunks stream events, then the connection is reset (RST)",
    "stream_truncated": "after_chunks stream events, then a clean end of the body: no finish "
                        "reason, no usage; plain calls: an answer without its finish reason",
    "stream_eof": "after_chunks stream events in a body delimited by the connection's close, "
                  "then a clean close",
    "filtered": "200: an answer stopped by the provider's content filter",
    "prompt_blocked": "Gemini: 200 with no candidates and promptFeedback.blockReason",
    "no_usage": "200: a complete answer that reports no token usage",
}

# Faults a provider has no such thing for (emu.fault refuses them, saying why; see
# `fault_supported`).
_UNSUPPORTED: Final[dict[tuple[str, str], str]] = {
    ("ollama", "filtered"): "Ollama has no content filter",
    ("openai", "prompt_blocked"): "OpenAI answers a filtered prompt with a 400: use "
                                  "'content_filter'",
    ("anthropic", "prompt_blocked"): "Anthropic does not block prompts with a 200",
    ("ollama", "prompt_blocked"): "Ollama has no content filter",
    ("anthropic", "no_usage"): "Anthropic always reports usage",
}

_ALIASES: Final = {"reset": "connection", "hang": "timeout", "refusal": "content_filter",
                   "context_length_exceeded": "context_length"}



def fault_supported(provider: str, kind: str) -> bool:
    """Whether `emu.fault(provider, kind)` exists (some faults have no counterpart at some
    providers, e.g. Gemini's blocked prompt)."""
    return (provider, _ALIASES.get(kind, kind)) not in _UNSUPPORTED


Responder = Callable[[str, str, dict[str, Any]], Any]
"""(provider, model, request_json) -> the answer's text (a dict or list is sent as JSON text),
or None for the default answer."""

DEFAULT_MODELS: Final[dict[str, tuple[str, ...]]] = {
    "openai": ("gpt-4o-mini", "gpt-4.1-mini", "gpt-4o"),
    "anthropic": ("claude-haiku-4-5", "claude-sonnet-4-6"),
    "gemini": ("gemini-2.5-flash", "gemini-2.5-flash-lite"),
    "ollama": ("llama3.2", "qwen2.5"),
}

_MAX_HEAD = 64 * 1024
_MAX_BODY = 32 * 1024 * 1024
_IDLE_SECONDS = 120.0
"""A keep-alive connection with no new request for this long is closed."""


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = _Unset()


@dataclass
class EmulatedFault:
    """A scripted fault: `kind` for `provider` (and `model`, if set).

    `calls`: which matching requests fail, numbered from 1 since the fault was scripted
    (None: the next ones). `times`: at most this many hits (None: until cleared).
    `stream`: only streaming (True) or only plain (False) requests; None for both.
    """

    provider: str
    kind: str
    model: str | None = None
    calls: frozenset[int] | None = None
    times: int | None = 1
    retry_after: float | None = 1.0
    after_chunks: int = 2
    hang_seconds: float = 5.0
    status: int | None = None
    stream: bool | None = None
    reason: str | None = None
    """`filtered`: Gemini's finishReason (default SAFETY); `prompt_blocked`: the blockReason."""
    hits: int = 0
    seen: int = 0
    """Requests that matched the provider/model/stream filter so far."""

    @property
    def exhausted(self) -> bool:
        return self.times is not None and self.hits >= self.times

    def _matches(self, provider: str, model: str, stream: bool) -> bool:
        return (
            provider == self.provider
            and (self.model is None or self.model == model)
            and (self.stream is None or self.stream == stream)
        )


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


# -- requests and answers -----------------------------------------------------------------


@dataclass
class _Ask:
    """What a request asks for, in provider-neutral terms."""

    last_text: str
    after_tool: bool
    tools: list[tuple[str, dict[str, Any]]]
    choice: str | None
    """None/"auto": free; "none": no tool; "any": some tool; else the forced tool's name."""
    json_schema: dict[str, Any] | None
    json_mode: bool
    prompt_chars: int


@dataclass
class _Answer:
    text: str
    tool_calls: list[tuple[str, str, dict[str, Any]]]  # (id, name, args)
    input_tokens: int
    output_tokens: int
    refused: bool = False
    unfinished: bool = False
    """No finish reason (stream_truncated on a plain call)."""
    filtered: str | None = None
    """The content filter's reason (fault `filtered`): the answer stops early with it."""
    blocked: str | None = None
    """Gemini's promptFeedback.blockReason (fault `prompt_blocked`): no candidates at all."""
    usage: bool = True
    """Whether token usage is reported (False: fault `no_usage`)."""

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class _Ctx:
    provider: str
    model: str
    stream: bool
    body: dict[str, Any]
    rid: str
    created: int
    include_usage: bool = False
    sse: bool = True


_VOCAB = (
    "the customer asked about their account and the team reviewed recent billing history "
    "before proposing a clear next step with a short summary of timing options risks and "
    "costs so that everyone understands what happens after the refund is processed today"
).split()


def _tokens(chars: int) -> int:
    return max(1, round(chars / 4))


def _text_of(content: Any) -> str:
    """The text in a message's content (a string or a list of parts/blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for part in content:
            if isinstance(part, str):
                out.append(part)
            elif isinstance(part, dict):
                for key in ("text", "content", "output"):
                    if isinstance(part.get(key), str):
                        out.append(part[key])
                        break
                else:
                    if isinstance(part.get("content"), list):
                        out.append(_text_of(part["content"]))
        return " ".join(out)
    return "" if content is None else json.dumps(content, sort_keys=True)


def _oracle(name: str, ask: _Ask) -> dict[str, Any] | None:
    """The right answer when a simulator oracle knows this schema (flows register theirs),
    so validators in flows accept the emulator's answers; else None (a fake is generated)."""
    from .simulator import simulator

    read = simulator.oracles.get(name)
    if read is None:
        return None
    from langchain_core.messages import HumanMessage

    answer, _difficulty = read([HumanMessage(ask.last_text)])
    return dict(answer) if answer else None


def _lower_types(schema: Any) -> Any:
    """A JSON schema with Gemini's upper-case OpenAPI types ("STRING") made lower-case."""
    if isinstance(schema, dict):
        out = {k: _lower_types(v) for k, v in schema.items()}
        if isinstance(out.get("type"), str):
            out["type"] = out["type"].lower()
            if out["type"] == "type_unspecified":
                out.pop("type")
        return out
    if isinstance(schema, list):
        return [_lower_types(s) for s in schema]
    return schema


def _dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def _pieces(text: str, words: int = 2) -> list[str]:
    """`text` in stream-sized pieces (a few words each) that concatenate back to it."""
    tokens = re.findall(r"\S+\s*|\s+", text)
    return ["".join(tokens[i : i + words]) for i in range(0, len(tokens), words)] or [""]


def _split(s: str, n: int = 3) -> list[str]:
    size = max(1, -(-len(s) // n))
    return [s[i : i + size] for i in range(0, len(s), size)] or [""]


# -- provider dialects ----------------------------------------------------------------------


class _Dialect:
    """One provider's wire format: how to read a request and write answers and errors."""

    name: ClassVar[str]
    stream_type: ClassVar[str] = "text/event-stream"
    status_words: ClassVar[dict[int, str]] = {}

    def parse(self, body: dict[str, Any]) -> _Ask:
        raise NotImplementedError

    def full(self, ctx: _Ctx, ans: _Answer) -> dict[str, Any]:
        raise NotImplementedError

    def events(self, ctx: _Ctx, ans: _Answer) -> list[bytes]:
        raise NotImplementedError

    def error(
        self, kind: str, ctx: _Ctx, fault: EmulatedFault | None, n_in: int
    ) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def stream_error(self, ctx: _Ctx) -> bytes:
        raise NotImplementedError

    def broken_event(self, ctx: _Ctx) -> bytes:
        return self.frame({"id": ctx.rid})[:-6] + b"\n\n"

    def frame(self, obj: dict[str, Any], event: str | None = None) -> bytes:
        head = f"event: {event}\n" if event else ""
        return f"{head}data: {_dumps(obj)}\n\n".encode()

    def stream_tail(self, ctx: _Ctx) -> list[bytes]:
        return []

    def ending(self, ctx: _Ctx, ans: _Answer) -> int:
        """How many of `events(ctx, ans)`, at the end, carry the finish reason or usage: a
        truncated stream stops before them."""
        return 1


def _rate_message(fault: EmulatedFault | None) -> str:
    ra = fault.retry_after if fault is not None else None
    return f" Please try again in {ra:g}s." if ra is not None else ""


class _OpenAI(_Dialect):
    name = "openai"

    def parse(self, body: dict[str, Any]) -> _Ask:
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        tools = [
            (t["function"]["name"], t["function"].get("parameters") or {})
            for t in body.get("tools") or []
            if isinstance(t, dict) and t.get("type", "function") == "function" and "function" in t
        ]
        choice = body.get("tool_choice")
        if isinstance(choice, dict):
            choice = (choice.get("function") or {}).get("name") or choice.get("name")
        elif choice == "required":
            choice = "any"
        fmt = body.get("response_format") or {}
        schema = None
        if fmt.get("type") == "json_schema":
            schema = (fmt.get("json_schema") or {}).get("schema") or {}
        return _Ask(
            last_text=_text_of(last.get("content")),
            after_tool=last.get("role") in ("tool", "function"),
            tools=tools,
            choice=choice,
            json_schema=schema,
            json_mode=fmt.get("type") == "json_object",
            prompt_chars=len(_dumps([messages, body.get("tools") or []])),
        )

    def _usage(self, ans: _Answer) -> dict[str, Any]:
        return {
            "prompt_tokens": ans.input_tokens,
            "completion_tokens": ans.output_tokens,
            "total_tokens": ans.total_tokens,
            "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
            "completion_tokens_details": {
                "reasoning_tokens": 0, "audio_tokens": 0,
                "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0,
            },
        }

    def _base(self, ctx: _Ctx, obj: str) -> dict[str, Any]:
        return {"id": f"chatcmpl-{ctx.rid}", "object": obj, "created": ctx.created,
                "model": ctx.model, "service_tier": "default",
                "system_fingerprint": "fp_emulator"}

    def full(self, ctx: _Ctx, ans: _Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": ans.text, "refusal": None,
                                   "annotations": []}
        if ans.tool_calls:
            message["content"] = None
            message["tool_calls"] = [
                {"id": cid, "type": "function",
                 "function": {"name": name, "arguments": _dumps(args)}}
                for cid, name, args in ans.tool_calls
            ]
        out = {
            **self._base(ctx, "chat.completion"),
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": self._finish(ans)}],
        }
        if ans.usage:
            out["usage"] = self._usage(ans)
        return out

    @staticmethod
    def _finish(ans: _Answer) -> str | None:
        if ans.unfinished:
            return None
        if ans.filtered:
            return "content_filter"
        return "tool_calls" if ans.tool_calls else "stop"

    def ending(self, ctx: _Ctx, ans: _Answer) -> int:
        return 2 if ctx.include_usage and ans.usage else 1

    def events(self, ctx: _Ctx, ans: _Answer) -> list[bytes]:
        base = self._base(ctx, "chat.completion.chunk")
        extra = {"usage": None} if ctx.include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return self.frame({**base, "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            ], **extra})

        out = [chunk({"role": "assistant", "content": "", "refusal": None})]
        if ans.tool_calls:
            for i, (cid, name, args) in enumerate(ans.tool_calls):
                out.append(chunk({"tool_calls": [{"index": i, "id": cid, "type": "function",
                                                  "function": {"name": name, "arguments": ""}}]}))
                for part in _split(_dumps(args)):
                    out.append(chunk({"tool_calls": [{"index": i,
                                                      "function": {"arguments": part}}]}))
        else:
            out.extend(chunk({"content": p}) for p in _pieces(ans.text))
        out.append(chunk({}, self._finish(ans)))
        if ctx.include_usage and ans.usage:
            out.append(self.frame({**base, "choices": [], "usage": self._usage(ans)}))
        return out

    def stream_tail(self, ctx: _Ctx) -> list[bytes]:
        return [b"data: [DONE]\n\n"]

    def error(
        self, kind: str, ctx: _Ctx, fault: EmulatedFault | None, n_in: int
    ) -> tuple[int, dict[str, Any]]:
        def err(status: int, message: str, type_: str | None, code: str | None,
                param: str | None = None) -> tuple[int, dict[str, Any]]:
            return status, {"error": {"message": message, "type": type_, "param": param,
                                      "code": code}}

        if kind == "rate_limit":
            return err(429, f"Rate limit reached for {ctx.model} in organization org-emulator "
                            "on requests per min (RPM): Limit 3, Used 3, Requested 1."
                            + _rate_message(fault), "requests", "rate_limit_exceeded")
        if kind == "overloaded":
            return err(503, "The engine is currently overloaded, please try again later.",
                       "server_error", None)
        if kind in ("server_error", "stream_error"):
            return err(500, "The server had an error while processing your request. "
                            "Sorry about that!", "server_error", None)
        if kind == "unavailable":
            return err(503, "The server is overloaded or not ready yet.", "server_error", None)
        if kind == "auth":
            return err(401, "Incorrect API key provided. You can find your API key at "
                            "https://platform.openai.com/account/api-keys.",
                       "invalid_request_error", "invalid_api_key")
        if kind == "context_length":
            return err(400, "This model's maximum context length is 128000 tokens. However, "
                            f"your messages resulted in {max(n_in, 128001)} tokens. Please "
                            "reduce the length of the messages.",
                       "invalid_request_error", "context_length_exceeded", "messages")
        if kind == "content_filter":
            status, body = err(400, "The response was filtered due to the prompt triggering "
                                    "Azure OpenAI's content management policy. Please modify "
                                    "your prompt and retry.", None, "content_filter", "prompt")
            body["error"]["status"] = 400
            return status, body
        return err(400, "Invalid value for 'temperature': expected a number between 0 and 2.",
                   "invalid_request_error", "invalid_value", "temperature")

    def stream_error(self, ctx: _Ctx) -> bytes:
        return self.frame({"error": {"message": "The server had an error while processing "
                                                "your request. Sorry about that!",
                                     "type": "server_error", "param": None, "code": None}})


class _Anthropic(_Dialect):
    name = "anthropic"
    status_words = {529: "Overloaded"}

    def parse(self, body: dict[str, Any]) -> _Ask:
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        content = last.get("content")
        after_tool = isinstance(content, list) and any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in content
        )
        tools = [(t["name"], t.get("input_schema") or {}) for t in body.get("tools") or []
                 if isinstance(t, dict) and "name" in t and "input_schema" in t]
        tc: dict[str, Any] = body.get("tool_choice") or {}
        choice = {"tool": tc.get("name"), "any": "any", "none": "none"}.get(tc.get("type", ""))
        fmt = (body.get("output_config") or {}).get("format") or body.get("output_format") or {}
        schema = fmt.get("schema") if fmt.get("type") == "json_schema" else None
        return _Ask(
            last_text=_text_of(content),
            after_tool=after_tool,
            tools=tools,
            choice=choice,
            json_schema=schema,
            json_mode=False,
            prompt_chars=len(_dumps([body.get("system") or "", messages,
                                     body.get("tools") or []])),
        )

    def _usage(self, ans: _Answer, output: int) -> dict[str, Any]:
        return {"input_tokens": ans.input_tokens, "output_tokens": output,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                "service_tier": "standard"}

    def _blocks(self, ans: _Answer) -> list[dict[str, Any]]:
        if ans.refused:
            return []
        if ans.tool_calls:
            return [{"type": "tool_use", "id": cid, "name": name, "input": args}
                    for cid, name, args in ans.tool_calls]
        return [{"type": "text", "text": ans.text}]

    def _stop(self, ans: _Answer) -> str | None:
        if ans.unfinished:
            return None
        if ans.refused or ans.filtered:
            return "refusal"
        return "tool_use" if ans.tool_calls else "end_turn"

    def ending(self, ctx: _Ctx, ans: _Answer) -> int:
        return 2  # message_delta (stop_reason, usage) and message_stop

    def full(self, ctx: _Ctx, ans: _Answer) -> dict[str, Any]:
        return {"id": f"msg_{ctx.rid}", "type": "message", "role": "assistant",
                "model": ctx.model, "content": self._blocks(ans),
                "stop_reason": self._stop(ans), "stop_sequence": None,
                "usage": self._usage(ans, ans.output_tokens)}

    def events(self, ctx: _Ctx, ans: _Answer) -> list[bytes]:
        start: dict[str, Any] = {"id": f"msg_{ctx.rid}", "type": "message", "role": "assistant",
                 "model": ctx.model, "content": [], "stop_reason": None,
                 "stop_sequence": None, "usage": self._usage(ans, 1)}
        out = [self.frame({"type": "message_start", "message": start}, "message_start")]
        for index, block in enumerate(self._blocks(ans)):
            if block["type"] == "tool_use":
                opening = {**block, "input": {}}
                deltas = [{"type": "input_json_delta", "partial_json": p}
                          for p in _split(_dumps(block["input"]))]
            else:
                opening = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": p} for p in _pieces(block["text"])]
            out.append(self.frame({"type": "content_block_start", "index": index,
                                   "content_block": opening}, "content_block_start"))
            if index == 0:
                out.append(self.frame({"type": "ping"}, "ping"))
            out.extend(self.frame({"type": "content_block_delta", "index": index, "delta": d},
                                  "content_block_delta") for d in deltas)
            out.append(self.frame({"type": "content_block_stop", "index": index},
                                  "content_block_stop"))
        out.append(self.frame({"type": "message_delta",
                               "delta": {"stop_reason": self._stop(ans), "stop_sequence": None},
                               "usage": self._usage(ans, ans.output_tokens)}, "message_delta"))
        out.append(self.frame({"type": "message_stop"}, "message_stop"))
        return out

    def error(
        self, kind: str, ctx: _Ctx, fault: EmulatedFault | None, n_in: int
    ) -> tuple[int, dict[str, Any]]:
        table: dict[str, tuple[int, str, str]] = {
            "rate_limit": (429, "rate_limit_error",
                           "This request would exceed the rate limit for your organization "
                           "of 50 requests per minute." + _rate_message(fault)),
            "overloaded": (529, "overloaded_error", "Overloaded"),
            "server_error": (500, "api_error", "Internal server error"),
            "stream_error": (500, "api_error", "Internal server error"),
            "unavailable": (503, "api_error", "Service unavailable"),
            "auth": (401, "authentication_error", "invalid x-api-key"),
            "context_length": (400, "invalid_request_error",
                               f"prompt is too long: {max(n_in, 200001)} tokens > 200000 "
                               "maximum"),
            "content_filter": (400, "invalid_request_error",
                               "Output blocked by content filtering policy"),
            "invalid_request": (400, "invalid_request_error",
                                "max_tokens: Input should be a valid integer"),
        }
        status, type_, message = table.get(kind, table["invalid_request"])
        return status, {"type": "error", "error": {"type": type_, "message": message},
                        "request_id": f"req_{ctx.rid}"}

    def broken_event(self, ctx: _Ctx) -> bytes:
        return b'event: message_start\ndata: {"type": "message_start", "message": {"id": "' \
            + ctx.rid.encode() + b"\n\n"

    def stream_error(self, ctx: _Ctx) -> bytes:
        return self.frame({"type": "error", "error": {"type": "overloaded_error",
                                                      "message": "Overloaded"}}, "error")


class _Gemini(_Dialect):
    name = "gemini"

    def frame(self, obj: dict[str, Any], event: str | None = None) -> bytes:
        return f"data: {_dumps(obj)}\r\n\r\n".encode()

    def broken_event(self, ctx: _Ctx) -> bytes:
        return f'data: {{"candidates": [{{"content": {{"parts": [{{"text": "{ctx.rid}'.encode() \
            + b"\r\n\r\n"

    def parse(self, body: dict[str, Any]) -> _Ask:
        contents = body.get("contents") or []
        last = contents[-1] if contents else {}
        parts = last.get("parts") or []
        after_tool = any(isinstance(p, dict) and "functionResponse" in p for p in parts)
        tools: list[tuple[str, dict[str, Any]]] = []
        for tool in body.get("tools") or []:
            for fn in (tool or {}).get("functionDeclarations") or []:
                schema = fn.get("parametersJsonSchema") or fn.get("parameters") or {}
                tools.append((fn["name"], _lower_types(schema)))
        fcc = (body.get("toolConfig") or {}).get("functionCallingConfig") or {}
        mode = str(fcc.get("mode", "AUTO")).upper()
        allowed = fcc.get("allowedFunctionNames") or []
        choice: str | None = None
        if mode == "NONE":
            choice = "none"
        elif mode in ("ANY", "VALIDATED"):
            choice = allowed[0] if allowed else "any"
        gen = body.get("generationConfig") or {}
        schema = gen.get("responseJsonSchema") or gen.get("responseSchema")
        json_mime = gen.get("responseMimeType") == "application/json"
        return _Ask(
            last_text=" ".join(_text_of([p]) for p in parts if isinstance(p, dict)),
            after_tool=after_tool,
            tools=tools,
            choice=choice,
            json_schema=_lower_types(schema) if schema else None,
            json_mode=json_mime and not schema,
            prompt_chars=len(_dumps([body.get("systemInstruction") or {}, contents,
                                     body.get("tools") or []])),
        )

    def _usage(self, ans: _Answer, final: bool) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "promptTokenCount": ans.input_tokens,
            "totalTokenCount": ans.total_tokens if final else ans.input_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": ans.input_tokens}],
        }
        if final:
            usage["candidatesTokenCount"] = ans.output_tokens
        return usage

    def _chunk(self, ctx: _Ctx, ans: _Answer, parts: list[dict[str, Any]] | None,
               finish: str | None) -> dict[str, Any]:
        candidate: dict[str, Any] = {"index": 0}
        if parts is not None:
            candidate["content"] = {"parts": parts, "role": "model"}
        if finish:
            candidate["finishReason"] = finish
        if finish == "SAFETY":
            candidate["safetyRatings"] = [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
                 "blocked": True},
            ]
        return {"candidates": [candidate], "usageMetadata": self._usage(ans, bool(finish)),
                "modelVersion": ctx.model, "responseId": ctx.rid}

    def _parts(self, ans: _Answer) -> list[dict[str, Any]]:
        if ans.tool_calls:
            return [{"functionCall": {"name": name, "args": args}}
                    for _, name, args in ans.tool_calls]
        return [{"text": ans.text}]

    def _blocked(self, ctx: _Ctx, ans: _Answer) -> dict[str, Any]:
        """A blocked prompt: no candidates, the reason in promptFeedback."""
        out: dict[str, Any] = {
            "promptFeedback": {"blockReason": ans.blocked, "safetyRatings": [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
                 "blocked": True}]},
            "modelVersion": ctx.model, "responseId": ctx.rid}
        if ans.usage:
            out["usageMetadata"] = self._usage(ans, False)
        return out

    def full(self, ctx: _Ctx, ans: _Answer) -> dict[str, Any]:
        out = self._full(ctx, ans)
        if not ans.usage:
            out.pop("usageMetadata", None)
        return out

    def _full(self, ctx: _Ctx, ans: _Answer) -> dict[str, Any]:
        if ans.blocked:
            return self._blocked(ctx, ans)
        if ans.refused or ans.filtered:
            return self._chunk(ctx, ans, None, ans.filtered or "SAFETY")
        if ans.unfinished:
            return self._chunk(ctx, ans, self._parts(ans), None)
        return self._chunk(ctx, ans, self._parts(ans), "STOP")

    def events(self, ctx: _Ctx, ans: _Answer) -> list[bytes]:
        if ans.usage:
            return self._events(ctx, ans)
        out = []
        for event in self._events(ctx, ans):
            obj = json.loads(event.decode().removeprefix("data: "))
            obj.pop("usageMetadata", None)
            out.append(self.frame(obj))
        return out

    def _events(self, ctx: _Ctx, ans: _Answer) -> list[bytes]:
        if ans.blocked:
            return [self.frame(self._blocked(ctx, ans))]
        if ans.refused or ans.filtered:
            return [self.frame(self._chunk(ctx, ans, None, ans.filtered or "SAFETY"))]
        if ans.tool_calls:
            return [self.frame(self._chunk(ctx, ans, self._parts(ans), "STOP"))]
        pieces = _pieces(ans.text)
        return [
            self.frame(self._chunk(ctx, ans, [{"text": p}],
                                   "STOP" if i == len(pieces) - 1 else None))
            for i, p in enumerate(pieces)
        ]

    def error(
        self, kind: str, ctx: _Ctx, fault: EmulatedFault | None, n_in: int
    ) -> tuple[int, dict[str, Any]]:
        table: dict[str, tuple[int, str, str]] = {
            "rate_limit": (429, "RESOURCE_EXHAUSTED",
                           "You exceeded your current quota, please check your plan and "
                           "billing details." + _rate_message(fault)),
            "overloaded": (503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
            "server_error": (500, "INTERNAL", "An internal error has occurred. Please retry or "
                                              "report in https://developers.generativeai.google"
                                              "/guide/troubleshooting"),
            "stream_error": (500, "INTERNAL", "An internal error has occurred."),
            "unavailable": (503, "UNAVAILABLE", "The service is currently unavailable."),
            "auth": (401, "UNAUTHENTICATED", "Request had invalid authentication credentials. "
                                             "Expected OAuth 2 access token, login cookie or "
                                             "other valid authentication credential."),
            "context_length": (400, "INVALID_ARGUMENT",
                               f"The input token count ({max(n_in, 1048577)}) exceeds the "
                               "maximum number of tokens allowed (1048576)."),
            "content_filter": (400, "INVALID_ARGUMENT",
                               "The request was blocked by the safety filters."),
            "invalid_request": (400, "INVALID_ARGUMENT",
                                "Request contains an invalid argument."),
        }
        status, word, message = table.get(kind, table["invalid_request"])
        error: dict[str, Any] = {"code": status, "message": message, "status": word}
        if kind == "rate_limit" and fault is not None and fault.retry_after is not None:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                 "retryDelay": f"{fault.retry_after:g}s"}]
        return status, {"error": error}

    def stream_error(self, ctx: _Ctx) -> bytes:
        return self.frame({"error": {"code": 503, "status": "UNAVAILABLE",
                                     "message": "The model is overloaded. Please try again "
                                                "later."}})


class _Ollama(_Dialect):
    name = "ollama"
    stream_type = "application/x-ndjson"

    def frame(self, obj: dict[str, Any], event: str | None = None) -> bytes:
        return (_dumps(obj) + "\n").encode()

    def broken_event(self, ctx: _Ctx) -> bytes:
        return f'{{"model":"{ctx.model}","message":{{"role":"assis\n'.encode()

    def parse(self, body: dict[str, Any]) -> _Ask:
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        tools = [
            (t["function"]["name"], t["function"].get("parameters") or {})
            for t in body.get("tools") or []
            if isinstance(t, dict) and "function" in t
        ]
        fmt = body.get("format")
        return _Ask(
            last_text=_text_of(last.get("content")),
            after_tool=last.get("role") == "tool",
            tools=tools,
            choice=None,
            json_schema=fmt if isinstance(fmt, dict) else None,
            json_mode=fmt == "json",
            prompt_chars=len(_dumps([messages, body.get("tools") or []])),
        )

    def _created(self, ctx: _Ctx) -> str:
        return datetime.fromtimestamp(ctx.created, timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S.000000Z")

    def _done(self, ctx: _Ctx, ans: _Answer, message: dict[str, Any]) -> dict[str, Any]:
        if ans.unfinished:
            return {"model": ctx.model, "created_at": self._created(ctx), "message": message,
                    "done": False}
        out = {"model": ctx.model, "created_at": self._created(ctx), "message": message,
               "done": True, "done_reason": "stop", "total_duration": 1_000_000,
               "load_duration": 100_000, "prompt_eval_count": ans.input_tokens,
               "prompt_eval_duration": 200_000, "eval_count": ans.output_tokens,
               "eval_duration": 700_000}
        if not ans.usage:  # e.g. a prompt served from Ollama's cache: no counts at all
            for key in ("prompt_eval_count", "prompt_eval_duration", "eval_count",
                        "eval_duration"):
                del out[key]
        return out

    def _tool_calls(self, ans: _Answer) -> list[dict[str, Any]]:
        return [{"function": {"name": name, "arguments": args}}
                for _, name, args in ans.tool_calls]

    def full(self, ctx: _Ctx, ans: _Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": ans.text}
        if ans.tool_calls:
            message["content"] = ""
            message["tool_calls"] = self._tool_calls(ans)
        return self._done(ctx, ans, message)

    def events(self, ctx: _Ctx, ans: _Answer) -> list[bytes]:
        def part(message: dict[str, Any]) -> bytes:
            return self.frame({"model": ctx.model, "created_at": self._created(ctx),
                               "message": message, "done": False})

        if ans.tool_calls:
            out = [part({"role": "assistant", "content": "",
                         "tool_calls": self._tool_calls(ans)})]
        else:
            out = [part({"role": "assistant", "content": p}) for p in _pieces(ans.text)]
        out.append(self.frame(self._done(ctx, ans, {"role": "assistant", "content": ""})))
        return out

    def error(
        self, kind: str, ctx: _Ctx, fault: EmulatedFault | None, n_in: int
    ) -> tuple[int, dict[str, Any]]:
        table: dict[str, tuple[int, str]] = {
            "rate_limit": (429, "too many requests" + _rate_message(fault)),
            "overloaded": (503, "server busy, please try again.  maximum pending requests "
                                "exceeded"),
            "server_error": (500, "llama runner process has terminated: exit status 2"),
            "stream_error": (500, "llama runner process has terminated: exit status 2"),
            "unavailable": (503, "service unavailable"),
            "auth": (401, "unauthorized"),
            "context_length": (400, "the input length exceeds the context length"),
            "content_filter": (400, "content_filter: the request was blocked by a content "
                                    "filter"),
            "invalid_request": (400, "json: cannot unmarshal string into Go struct field "
                                     "ChatRequest.messages of type api.Message"),
        }
        status, message = table.get(kind, table["invalid_request"])
        return status, {"error": message}

    def stream_error(self, ctx: _Ctx) -> bytes:
        return self.frame({"error": "an error was encountered while running the model: "
                                    "unexpected EOF"})


_DIALECTS: Final[dict[str, _Dialect]] = {
    d.name: d for d in (_OpenAI(), _Anthropic(), _Gemini(), _Ollama())
}

# Faults each provider answers with a refusal instead of an HTTP error.
_REFUSAL_ANSWERS: Final = frozenset({"anthropic", "gemini"})

_GEMINI_ROUTE = re.compile(
    r"^/gemini/(?P<version>v[^/]+)/(?:models/)?(?P<model>[^/:]+)"
    r":(?P<method>generateContent|streamGenerateContent)$"
)


# -- HTTP plumbing --------------------------------------------------------------------------


@dataclass
class _HttpRequest:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


class _Closed(Exception):
    """The handler is done with this connection."""


async def _read_request(reader: asyncio.StreamReader, idle: float) -> _HttpRequest | None:
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
        if length > _MAX_BODY:
            return None
        body = await reader.readexactly(length)
    split = urlsplit(target)
    connection = headers.get("connection", "").lower()
    keep_alive = connection != "close" and (version != "HTTP/1.0" or connection == "keep-alive")
    return _HttpRequest(method.upper(), unquote(split.path), parse_qs(split.query), headers,
                        body, keep_alive)


def _head(status: int, headers: dict[str, str], words: dict[int, str]) -> bytes:
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = words.get(status, "Unknown")
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _has_key(req: _HttpRequest) -> bool:
    for name in ("authorization", "x-api-key", "x-goog-api-key", "api-key"):
        value = req.headers.get(name, "")
        if value and value.lower() not in ("bearer", "bearer none", "bearer "):
            return True
    return bool(req.query.get("key", [""])[0])


def _presented_key(req: _HttpRequest) -> str:
    """The key a request carries (header or `?key=`), as sent; "" when none."""
    for name in ("authorization", "x-api-key", "x-goog-api-key", "api-key"):
        value = req.headers.get(name, "")
        if value:
            return value.split(" ", 1)[1] if value.lower().startswith("bearer ") else value
    return req.query.get("key", [""])[0]


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

    # -- lifecycle --------------------------------------------------------------------------

    async def start(self) -> ProviderEmulator:
        """Bind and start serving; returns self."""
        if self._server is not None:
            raise RuntimeError("the emulator is already running")
        self._stopping = asyncio.Event()
        self._server = await asyncio.start_server(
            self._on_connection, self.host, self.port, limit=_MAX_HEAD
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
        suffix = {"openai": "/openai/v1", "anthropic": "/anthropic", "gemini": "/gemini",
                  "ollama": "/ollama"}
        try:
            return self.url + suffix[provider]
        except KeyError:
            raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}") \
                from None

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
        times: int | None | _Unset = UNSET,
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
        kind = _ALIASES.get(kind, kind)
        if provider not in PROVIDERS:
            raise ValueError(f"unknown provider {provider!r}; known: {', '.join(PROVIDERS)}")
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}; known: {', '.join(FAULT_KINDS)}")
        if (provider, kind) in _UNSUPPORTED:
            raise ValueError(f"no fault {kind!r} for {provider}: "
                             f"{_UNSUPPORTED[provider, kind]}")
        chosen = frozenset(calls) if calls is not None else None
        if isinstance(times, _Unset):
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
                if not f._matches(provider, model, stream):
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

    def _answer(self, ctx: _Ctx, ask: _Ask, refused: bool,
                fault: EmulatedFault | None = None) -> _Answer:
        kind = fault.kind if fault is not None else None
        answer = self._answer_text(ctx, ask, refused)
        if kind == "stream_truncated" and not ctx.stream:
            answer.unfinished = True
        elif kind == "filtered":
            # The filter stops the answer part-way (Gemini's blocked candidate has no parts).
            answer.filtered = (fault.reason if fault is not None and fault.reason
                               else "SAFETY") if ctx.provider == "gemini" else "content_filter"
            answer.text = "".join(_pieces(answer.text)[:2]) if not answer.tool_calls else ""
            answer.tool_calls = []
            answer.output_tokens = _tokens(len(answer.text))
        elif kind == "prompt_blocked":
            answer.blocked = fault.reason if fault is not None and fault.reason else "SAFETY"
            answer.text, answer.tool_calls, answer.output_tokens = "", [], 0
        elif kind == "no_usage":
            answer.usage = False
        return answer

    def _answer_text(self, ctx: _Ctx, ask: _Ask, refused: bool) -> _Answer:
        rng = self._rng(ctx.provider, ctx.model, ask.last_text)
        n_in = _tokens(ask.prompt_chars)
        if refused:
            return _Answer("", [], n_in, 1, refused=True)
        said: Any = self.responder(ctx.provider, ctx.model, ctx.body) if self.responder else None
        text = said if said is None or isinstance(said, str) else _dumps(said)
        calls: list[tuple[str, str, dict[str, Any]]] = []
        if text is None:
            forced = ask.choice not in (None, "auto", "none")
            if ask.tools and ask.choice != "none" and (forced or not ask.after_tool):
                name, schema = next(((n, s) for n, s in ask.tools if n == ask.choice),
                                    ask.tools[0])
                args = _oracle(name, ask)
                if args is None:
                    args = fake_json(schema, rng)
                calls.append((f"call_{rng.getrandbits(64):016x}", name,
                              args if isinstance(args, dict) else {}))
                text = ""
            elif ask.json_schema is not None:
                known = _oracle(str(ask.json_schema.get("title", "")), ask)
                text = _dumps(known if known is not None else fake_json(ask.json_schema, rng))
            else:
                sentences = []
                for _ in range(rng.randint(2, 3)):
                    words = [rng.choice(_VOCAB) for _ in range(rng.randint(6, 11))]
                    sentences.append(" ".join(words).capitalize() + ".")
                text = " ".join(sentences)
                if ask.json_mode:
                    text = _dumps({"answer": text})
        n_out = _tokens(len(text) + sum(len(_dumps(a)) + len(n) for _, n, a in calls))
        return _Answer(text, calls, n_in, n_out)

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
        try:
            while True:
                req = await _read_request(reader, _IDLE_SECONDS)
                if req is None:
                    break
                if not await self._serve(req, reader, writer) or not req.keep_alive:
                    break
        except (_Closed, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
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

    def _route(self, req: _HttpRequest) -> tuple[str, str, bool] | None:
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

    async def _serve(
        self, req: _HttpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        """Answer one request; False when the connection must not be reused."""
        route = self._route(req)
        if route is None:
            return await self._serve_other(req, writer)
        provider, model, stream = route
        dialect = _DIALECTS[provider]
        try:
            body = json.loads(req.body or b"{}")
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            return await self._send_json(writer, 400, {"error": {
                "message": "the request body is not a JSON object", "code": 400}}, dialect)
        if provider != "gemini":
            model = str(body.get("model", ""))
            stream = bool(body.get("stream", provider == "ollama"))
        ctx = _Ctx(provider, model, stream, body, self._next_id(), int(time.time()),
                   include_usage=bool((body.get("stream_options") or {}).get("include_usage")),
                   sse=provider != "gemini" or req.query.get("alt", [""])[0] == "sse")
        auth = _has_key(req)
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
            return await self._send_json(writer, status, payload, dialect)
        n_in = _tokens(ask.prompt_chars)

        if self.latency > 0:
            await self._sleep(self.latency)
        if kind == "connection":
            self._reset(writer)
            raise _Closed
        if kind == "timeout":
            await self._hang(reader, fault.hang_seconds if fault else 0.0)
            raise _Closed
        if kind == "slow" and fault is not None:
            await self._sleep(fault.hang_seconds)
        refused = kind == "content_filter" and provider in _REFUSAL_ANSWERS
        http_error = kind in ("rate_limit", "overloaded", "server_error", "unavailable", "auth",
                              "auth_echo", "context_length", "invalid_request") or (
            kind == "content_filter" and not refused
        ) or (kind == "stream_error" and not stream)
        if http_error and kind is not None:
            status, payload = dialect.error("auth" if kind == "auth_echo" else kind, ctx,
                                            fault, n_in)
            if kind == "auth_echo":
                payload = _echo_key(payload, _presented_key(req))
            if fault is not None and fault.status is not None:
                status = fault.status
            record.status = status
            extra = {}
            if kind == "rate_limit" and fault is not None and fault.retry_after is not None:
                extra["retry-after"] = f"{fault.retry_after:g}"
            return await self._send_json(writer, status, payload, dialect, extra)

        answer = self._answer(ctx, ask, refused, fault)
        record.status = 200
        if not stream:
            payload_bytes = _dumps(dialect.full(ctx, answer)).encode()
            if kind == "malformed":
                payload_bytes = payload_bytes[: max(1, len(payload_bytes) // 2)]
            if kind == "stream_eof":
                return await self._send_until_close(
                    writer, [payload_bytes[: max(1, len(payload_bytes) // 2)]],
                    "application/json", dialect)
            if kind in ("stream_cut", "stream_stall", "stream_reset") and fault is not None:
                return await self._send_cut_body(writer, reader, payload_bytes, dialect, fault)
            return await self._send_bytes(writer, 200, payload_bytes, "application/json",
                                          dialect)
        if not ctx.sse:  # Gemini streamGenerateContent without alt=sse: one JSON array
            chunks = [json.loads(e.decode().removeprefix("data: "))
                      for e in dialect.events(ctx, answer)]
            return await self._send_bytes(writer, 200, _dumps(chunks).encode(),
                                          "application/json", dialect)
        events = dialect.events(ctx, answer)
        tail = dialect.stream_tail(ctx)
        if kind == "malformed":
            events = [dialect.broken_event(ctx), *events[1:]]
        if kind in ("stream_truncated", "stream_eof") and fault is not None:
            # The events before the finish reason / usage / done, at most after_chunks.
            kept = events[: min(fault.after_chunks, len(events) - dialect.ending(ctx, answer))]
            if kind == "stream_eof":
                return await self._send_until_close(writer, kept, dialect.stream_type, dialect)
            events, fault = kept, None  # then the tail ([DONE]) and a clean end of the body
        return await self._stream(writer, reader, dialect, ctx, events, tail, fault)

    async def _serve_other(self, req: _HttpRequest, writer: asyncio.StreamWriter) -> bool:
        """Model listings and the like; 404 for anything unknown."""
        path = req.path.rstrip("/")
        now = int(time.time())
        if req.method == "GET" and path == "/openai/v1/models":
            data = [{"id": m, "object": "model", "created": now, "owned_by": "emulator"}
                    for m in self._models("openai")]
            return await self._send_json(writer, 200, {"object": "list", "data": data})
        if req.method == "GET" and path.startswith("/openai/v1/models/"):
            mid = path.removeprefix("/openai/v1/models/")
            return await self._send_json(writer, 200, {"id": mid, "object": "model",
                                                       "created": now, "owned_by": "emulator"})
        if req.method == "GET" and path == "/anthropic/v1/models":
            data = [{"type": "model", "id": m, "display_name": m,
                     "created_at": "2025-01-01T00:00:00Z"} for m in self._models("anthropic")]
            return await self._send_json(writer, 200, {"data": data, "has_more": False,
                                                       "first_id": data[0]["id"],
                                                       "last_id": data[-1]["id"]})
        if req.method == "GET" and re.fullmatch(r"/gemini/v[^/]+/models", path):
            data = [{"name": f"models/{m}", "displayName": m,
                     "supportedGenerationMethods": ["generateContent"]}
                    for m in self._models("gemini")]
            return await self._send_json(writer, 200, {"models": data})
        if req.method == "GET" and path in ("/ollama/api/tags", "/api/tags"):
            data = [{"name": m, "model": m, "modified_at": "2025-01-01T00:00:00Z", "size": 1,
                     "digest": hashlib.sha256(m.encode()).hexdigest(), "details": {}}
                    for m in self._models("ollama")]
            return await self._send_json(writer, 200, {"models": data})
        if req.method == "GET" and path in ("/ollama/api/version", "/api/version"):
            return await self._send_json(writer, 200, {"version": "0.0.0-emulator"})
        if req.method == "GET" and path in ("", "/ollama"):
            return await self._send_bytes(writer, 200, b"Ollama is running", "text/plain")
        return await self._send_json(writer, 404, {"error": {
            "message": f"no route for {req.method} {req.path}", "code": 404,
            "type": "not_found_error"}})

    def _models(self, provider: str) -> list[str]:
        seen = [r.model for r in self.requests_for(provider) if r.model]
        return list(dict.fromkeys([*DEFAULT_MODELS[provider], *seen]))

    # -- writing ----------------------------------------------------------------------------

    def _headers(self, content_type: str, extra: dict[str, str] | None = None) -> dict[str, str]:
        rid = self._next_id()
        return {"content-type": content_type, "server": "frugalflow-emulator",
                "x-request-id": rid, "request-id": f"req_{rid}", **(extra or {})}

    async def _send_bytes(
        self, writer: asyncio.StreamWriter, status: int, payload: bytes, content_type: str,
        dialect: _Dialect | None = None, extra: dict[str, str] | None = None,
    ) -> bool:
        headers = self._headers(content_type, extra)
        headers["content-length"] = str(len(payload))
        words = dialect.status_words if dialect else {}
        writer.write(_head(status, headers, words) + payload)
        await writer.drain()
        return True

    async def _send_json(
        self, writer: asyncio.StreamWriter, status: int, payload: dict[str, Any],
        dialect: _Dialect | None = None, extra: dict[str, str] | None = None,
    ) -> bool:
        return await self._send_bytes(writer, status, _dumps(payload).encode(),
                                      "application/json", dialect, extra)

    async def _send_cut_body(
        self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader, payload: bytes,
        dialect: _Dialect, fault: EmulatedFault,
    ) -> bool:
        """Half of a plain body, then a close (stream_cut) or silence (stream_stall)."""
        headers = self._headers("application/json")
        headers["content-length"] = str(len(payload))
        writer.write(_head(200, headers, dialect.status_words) + payload[: len(payload) // 2])
        await writer.drain()
        if fault.kind == "stream_stall":
            await self._hang(reader, fault.hang_seconds)
        if fault.kind == "stream_reset":
            self._reset(writer)
        raise _Closed

    async def _stream(
        self, writer: asyncio.StreamWriter, reader: asyncio.StreamReader, dialect: _Dialect,
        ctx: _Ctx, events: list[bytes], tail: list[bytes], fault: EmulatedFault | None,
    ) -> bool:
        headers = self._headers(dialect.stream_type, {"transfer-encoding": "chunked",
                                                       "cache-control": "no-cache"})
        writer.write(_head(200, headers, dialect.status_words))
        await writer.drain()
        kind = fault.kind if fault is not None else None
        everything = events + tail
        stop_at = None
        if kind in ("stream_cut", "stream_stall", "stream_error", "stream_reset") \
                and fault is not None:
            # Always before the last event, so the client cannot have finished cleanly.
            stop_at = min(fault.after_chunks, len(everything) - 1)
        for i, event in enumerate(everything):
            if stop_at is not None and i >= stop_at:
                break
            if self.chunk_delay > 0 and i > 0:
                await self._sleep(self.chunk_delay)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
        else:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
            return True
        assert fault is not None
        if kind == "stream_error":
            err = dialect.stream_error(ctx)
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(err), err))
            await writer.drain()
            return True
        if kind == "stream_stall":
            await self._hang(reader, fault.hang_seconds)
        if kind == "stream_reset":
            self._reset(writer)
        raise _Closed  # stream_cut: the chunked body never ends

    async def _send_until_close(
        self, writer: asyncio.StreamWriter, parts: list[bytes], content_type: str,
        dialect: _Dialect,
    ) -> bool:
        """A body with neither Content-Length nor chunked encoding: it ends where the
        connection does. After `parts`, a clean close (FIN, no reset): to the client, the
        body simply ended."""
        headers = self._headers(content_type, {"connection": "close",
                                               "cache-control": "no-cache"})
        writer.write(_head(200, headers, dialect.status_words))
        await writer.drain()
        for i, part in enumerate(parts):
            if self.chunk_delay > 0 and i > 0:
                await self._sleep(self.chunk_delay)
            writer.write(part)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        raise _Closed

    @staticmethod
    def _reset(writer: asyncio.StreamWriter) -> None:
        """Close with a TCP RST (SO_LINGER 0) and no response at all."""
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async def _sleep(self, seconds: float) -> None:
        """Sleep `seconds`; raise _Closed at once if the emulator stops meanwhile."""
        stopping = self._stopping
        if stopping is None:
            raise _Closed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), seconds)
        if stopping.is_set():
            raise _Closed

    @staticmethod
    async def _hang(reader: asyncio.StreamReader, seconds: float) -> None:
        """Send nothing for `seconds`, or until the client gives up or stop() aborts."""
        with contextlib.suppress(TimeoutError, ConnectionError):
            await asyncio.wait_for(reader.read(1), seconds)


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


def emulated_catalog(emu: ProviderEmulator, models: Iterable[str] = EMULATED_MODELS) -> Any:
    """Built-in catalog entries for `models`, served by `emu` through the real integrations.

    Prices, windows, capabilities and quality are the real models' (genai-prices, profiles,
    quality.toml); only the base URL and the key variable change. Set EMULATOR_KEY_ENV to
    any value to make them available.
    """
    from ..catalog import Catalog

    builtin = Catalog.builtin()
    specs = []
    for key in models:
        spec = builtin[key]
        route = _ROUTES[spec.provider]
        update: dict[str, Any] = {"base_url": emu.base_url(route), "api_key_env": EMULATOR_KEY_ENV}
        if spec.provider == "ollama":
            update["local"] = False  # priced 0 anyway; available with the key variable
        specs.append(spec.model_copy(update=update))
    return Catalog(specs, name="emulated")
