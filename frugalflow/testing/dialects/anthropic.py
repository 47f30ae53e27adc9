"""The Anthropic Messages wire format."""

from __future__ import annotations

from typing import Any

from .base import Answer, Ask, Context, Dialect, dumps, pieces, rate_message, split_even, text_of


class AnthropicDialect(Dialect):
    name = "anthropic"
    status_words = {529: "Overloaded"}

    def parse(self, body: dict[str, Any]) -> Ask:
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
        return Ask(
            last_text=text_of(content),
            after_tool=after_tool,
            tools=tools,
            choice=choice,
            json_schema=schema,
            json_mode=False,
            prompt_chars=len(dumps([body.get("system") or "", messages,
                                     body.get("tools") or []])),
        )

    def _usage(self, ans: Answer, output: int) -> dict[str, Any]:
        return {"input_tokens": ans.input_tokens, "output_tokens": output,
                "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0,
                "service_tier": "standard"}

    def _blocks(self, ans: Answer) -> list[dict[str, Any]]:
        if ans.refused:
            return []
        if ans.tool_calls:
            return [{"type": "tool_use", "id": cid, "name": name, "input": args}
                    for cid, name, args in ans.tool_calls]
        return [{"type": "text", "text": ans.text}]

    def _stop(self, ans: Answer) -> str | None:
        if ans.unfinished:
            return None
        if ans.refused or ans.filtered:
            return "refusal"
        return "tool_use" if ans.tool_calls else "end_turn"

    def ending(self, ctx: Context, ans: Answer) -> int:
        return 2  # message_delta (stop_reason, usage) and message_stop

    def full(self, ctx: Context, ans: Answer) -> dict[str, Any]:
        return {"id": f"msg_{ctx.rid}", "type": "message", "role": "assistant",
                "model": ctx.model, "content": self._blocks(ans),
                "stop_reason": self._stop(ans), "stop_sequence": None,
                "usage": self._usage(ans, ans.output_tokens)}

    def events(self, ctx: Context, ans: Answer) -> list[bytes]:
        start: dict[str, Any] = {"id": f"msg_{ctx.rid}", "type": "message", "role": "assistant",
                 "model": ctx.model, "content": [], "stop_reason": None,
                 "stop_sequence": None, "usage": self._usage(ans, 1)}
        out = [self.frame({"type": "message_start", "message": start}, "message_start")]
        for index, block in enumerate(self._blocks(ans)):
            if block["type"] == "tool_use":
                opening = {**block, "input": {}}
                deltas = [{"type": "input_json_delta", "partial_json": p}
                          for p in split_even(dumps(block["input"]))]
            else:
                opening = {"type": "text", "text": ""}
                deltas = [{"type": "text_delta", "text": p} for p in pieces(block["text"])]
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
        self, kind: str, ctx: Context, retry_after: float | None, n_in: int
    ) -> tuple[int, dict[str, Any]]:
        table: dict[str, tuple[int, str, str]] = {
            "rate_limit": (429, "rate_limit_error",
                           "This request would exceed the rate limit for your organization "
                           "of 50 requests per minute." + rate_message(retry_after)),
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

    def broken_event(self, ctx: Context) -> bytes:
        return b'event: message_start\ndata: {"type": "message_start", "message": {"id": "' \
            + ctx.rid.encode() + b"\n\n"

    def stream_error(self, ctx: Context) -> bytes:
        return self.frame({"type": "error", "error": {"type": "overloaded_error",
                                                      "message": "Overloaded"}}, "error")
