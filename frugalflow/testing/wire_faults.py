"""The faults the provider emulator scripts on the wire, what each provider sends for them and
what each client raises.

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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

__all__ = ["FAULT_KINDS", "UNSET", "EmulatedFault", "Unset", "canonical_kind", "fault_supported",
           "unsupported_reason"]

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


def canonical_kind(kind: str) -> str:
    """The fault kind an alias names ("reset" is "connection", "hang" is "timeout", ...)."""
    return _ALIASES.get(kind, kind)


def fault_supported(provider: str, kind: str) -> bool:
    """Whether `emu.fault(provider, kind)` exists (some faults have no counterpart at some
    providers, e.g. Gemini's blocked prompt)."""
    return unsupported_reason(provider, kind) is None


def unsupported_reason(provider: str, kind: str) -> str | None:
    """Why `provider` has no fault `kind`, or None when it has."""
    return _UNSUPPORTED.get((provider, canonical_kind(kind)))


class Unset:
    """The type of UNSET: an argument left out (where None means something)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset()


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

    def matches(self, provider: str, model: str, stream: bool) -> bool:
        """Whether a request to `provider`/`model` (streamed or not) is one this fault counts."""
        return (
            provider == self.provider
            and (self.model is None or self.model == model)
            and (self.stream is None or self.stream == stream)
        )
