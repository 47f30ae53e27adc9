"""The OpenAI Chat Completions wire format (also every OpenAI-compatible API)."""

from __future__ import annotations

from typing import Any

from .base import Answer, Ask, Context, Dialect, dumps, pieces, rate_message, split_even, text_of


class OpenAIDialect(Dialect):
    name = "openai"

    def parse(self, body: dict[str, Any]) -> Ask:
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
        return Ask(
            last_text=text_of(last.get("content")),
            after_tool=last.get("role") in ("tool", "function"),
            tools=tools,
            choice=choice,
            json_schema=schema,
            json_mode=fmt.get("type") == "json_object",
            prompt_chars=len(dumps([messages, body.get("tools") or []])),
        )

    def _usage(self, ans: Answer) -> dict[str, Any]:
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

    def _base(self, ctx: Context, obj: str) -> dict[str, Any]:
        # The tier asked for ("flex", "priority") is the tier served; "auto" gets "default".
        tier = ctx.body.get("service_tier")
        return {"id": f"chatcmpl-{ctx.rid}", "object": obj, "created": ctx.created,
                "model": ctx.model,
                "service_tier": tier if tier in ("flex", "priority") else "default",
                "system_fingerprint": "fp_emulator"}

    def full(self, ctx: Context, ans: Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": ans.text, "refusal": None,
                                   "annotations": []}
        if ans.tool_calls:
            message["content"] = None
            message["tool_calls"] = [
                {"id": cid, "type": "function",
                 "function": {"name": name, "arguments": dumps(args)}}
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
    def _finish(ans: Answer) -> str | None:
        if ans.unfinished:
            return None
        if ans.filtered:
            return "content_filter"
        return "tool_calls" if ans.tool_calls else "stop"

    def ending(self, ctx: Context, ans: Answer) -> int:
        return 2 if ctx.include_usage and ans.usage else 1

    def events(self, ctx: Context, ans: Answer) -> list[bytes]:
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
                for part in split_even(dumps(args)):
                    out.append(chunk({"tool_calls": [{"index": i,
                                                      "function": {"arguments": part}}]}))
        else:
            out.extend(chunk({"content": p}) for p in pieces(ans.text))
        out.append(chunk({}, self._finish(ans)))
        if ctx.include_usage and ans.usage:
            out.append(self.frame({**base, "choices": [], "usage": self._usage(ans)}))
        return out

    def stream_tail(self, ctx: Context) -> list[bytes]:
        return [b"data: [DONE]\n\n"]

    def error(
        self, kind: str, ctx: Context, retry_after: float | None, n_in: int
    ) -> tuple[int, dict[str, Any]]:
        def err(status: int, message: str, type_: str | None, code: str | None,
                param: str | None = None) -> tuple[int, dict[str, Any]]:
            return status, {"error": {"message": message, "type": type_, "param": param,
                                      "code": code}}

        if kind == "rate_limit":
            return err(429, f"Rate limit reached for {ctx.model} in organization org-emulator "
                            "on requests per min (RPM): Limit 3, Used 3, Requested 1."
                            + rate_message(retry_after), "requests", "rate_limit_exceeded")
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

    def stream_error(self, ctx: Context) -> bytes:
        return self.frame({"error": {"message": "The server had an error while processing "
                                                "your request. Sorry about that!",
                                     "type": "server_error", "param": None, "code": None}})
