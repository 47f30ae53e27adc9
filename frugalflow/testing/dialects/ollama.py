"""The Ollama /api/chat wire format (newline-delimited JSON streams)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .base import Answer, Ask, Context, Dialect, dumps, pieces, rate_message, text_of


class OllamaDialect(Dialect):
    name = "ollama"
    stream_type = "application/x-ndjson"

    def frame(self, obj: dict[str, Any], event: str | None = None) -> bytes:
        return (dumps(obj) + "\n").encode()

    def broken_event(self, ctx: Context) -> bytes:
        return f'{{"model":"{ctx.model}","message":{{"role":"assis\n'.encode()

    def parse(self, body: dict[str, Any]) -> Ask:
        messages = body.get("messages") or []
        last = messages[-1] if messages else {}
        tools = [
            (t["function"]["name"], t["function"].get("parameters") or {})
            for t in body.get("tools") or []
            if isinstance(t, dict) and "function" in t
        ]
        fmt = body.get("format")
        return Ask(
            last_text=text_of(last.get("content")),
            after_tool=last.get("role") == "tool",
            tools=tools,
            choice=None,
            json_schema=fmt if isinstance(fmt, dict) else None,
            json_mode=fmt == "json",
            prompt_chars=len(dumps([messages, body.get("tools") or []])),
        )

    def _created(self, ctx: Context) -> str:
        return datetime.fromtimestamp(ctx.created, timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S.000000Z")

    def _done(self, ctx: Context, ans: Answer, message: dict[str, Any]) -> dict[str, Any]:
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

    def _tool_calls(self, ans: Answer) -> list[dict[str, Any]]:
        return [{"function": {"name": name, "arguments": args}}
                for _, name, args in ans.tool_calls]

    def full(self, ctx: Context, ans: Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": ans.text}
        if ans.tool_calls:
            message["content"] = ""
            message["tool_calls"] = self._tool_calls(ans)
        return self._done(ctx, ans, message)

    def events(self, ctx: Context, ans: Answer) -> list[bytes]:
        def part(message: dict[str, Any]) -> bytes:
            return self.frame({"model": ctx.model, "created_at": self._created(ctx),
                               "message": message, "done": False})

        if ans.tool_calls:
            out = [part({"role": "assistant", "content": "",
                         "tool_calls": self._tool_calls(ans)})]
        else:
            out = [part({"role": "assistant", "content": p}) for p in pieces(ans.text)]
        out.append(self.frame(self._done(ctx, ans, {"role": "assistant", "content": ""})))
        return out

    def error(
        self, kind: str, ctx: Context, retry_after: float | None, n_in: int
    ) -> tuple[int, dict[str, Any]]:
        table: dict[str, tuple[int, str]] = {
            "rate_limit": (429, "too many requests" + rate_message(retry_after)),
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

    def stream_error(self, ctx: Context) -> bytes:
        return self.frame({"error": "an error was encountered while running the model: "
                                    "unexpected EOF"})
