"""What every emulated provider API shares: a request read in neutral terms (`Ask`), the answer
to write (`Answer`), and the `Dialect` base class each wire format implements."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["Answer", "Ask", "Context", "Dialect", "dumps", "pieces", "rate_message",
           "split_even", "text_of", "tokens"]


@dataclass
class Ask:
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
class Answer:
    """What to answer, in provider-neutral terms: each dialect writes it in its own format."""

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
class Context:
    """The request being answered: route, model, stream flag, body and response id."""

    provider: str
    model: str
    stream: bool
    body: dict[str, Any]
    rid: str
    created: int
    include_usage: bool = False
    sse: bool = True


def tokens(chars: int) -> int:
    """About one token per four characters."""
    return max(1, round(chars / 4))


def text_of(content: Any) -> str:
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
                        out.append(text_of(part["content"]))
        return " ".join(out)
    return "" if content is None else json.dumps(content, sort_keys=True)


def dumps(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False)


def pieces(text: str, words: int = 2) -> list[str]:
    """`text` in stream-sized pieces (a few words each) that concatenate back to it."""
    bits = re.findall(r"\S+\s*|\s+", text)
    return ["".join(bits[i : i + words]) for i in range(0, len(bits), words)] or [""]


def split_even(s: str, n: int = 3) -> list[str]:
    size = max(1, -(-len(s) // n))
    return [s[i : i + size] for i in range(0, len(s), size)] or [""]


class Dialect:
    """One provider's wire format: how to read a request and write answers and errors."""

    name: ClassVar[str]
    stream_type: ClassVar[str] = "text/event-stream"
    status_words: ClassVar[dict[int, str]] = {}

    def parse(self, body: dict[str, Any]) -> Ask:
        raise NotImplementedError

    def full(self, ctx: Context, ans: Answer) -> dict[str, Any]:
        raise NotImplementedError

    def events(self, ctx: Context, ans: Answer) -> list[bytes]:
        raise NotImplementedError

    def error(
        self, kind: str, ctx: Context, retry_after: float | None, n_in: int
    ) -> tuple[int, dict[str, Any]]:
        raise NotImplementedError

    def stream_error(self, ctx: Context) -> bytes:
        raise NotImplementedError

    def broken_event(self, ctx: Context) -> bytes:
        return self.frame({"id": ctx.rid})[:-6] + b"\n\n"

    def frame(self, obj: dict[str, Any], event: str | None = None) -> bytes:
        head = f"event: {event}\n" if event else ""
        return f"{head}data: {dumps(obj)}\n\n".encode()

    def stream_tail(self, ctx: Context) -> list[bytes]:
        return []

    def ending(self, ctx: Context, ans: Answer) -> int:
        """How many of `events(ctx, ans)`, at the end, carry the finish reason or usage: a
        truncated stream stops before them."""
        return 1


def rate_message(retry_after: float | None) -> str:
    """The "try again in" sentence of a 429 message."""
    return f" Please try again in {retry_after:g}s." if retry_after is not None else ""
