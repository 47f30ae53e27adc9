"""The Gemini generateContent wire format (plain, SSE and JSON-array streams)."""

from __future__ import annotations

import json
from typing import Any

from .base import Answer, Ask, Context, Dialect, dumps, pieces, rate_message, text_of


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


class GeminiDialect(Dialect):
    name = "gemini"

    def frame(self, obj: dict[str, Any], event: str | None = None) -> bytes:
        return f"data: {dumps(obj)}\r\n\r\n".encode()

    def broken_event(self, ctx: Context) -> bytes:
        return f'data: {{"candidates": [{{"content": {{"parts": [{{"text": "{ctx.rid}'.encode() \
            + b"\r\n\r\n"

    def parse(self, body: dict[str, Any]) -> Ask:
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
        return Ask(
            last_text=" ".join(text_of([p]) for p in parts if isinstance(p, dict)),
            after_tool=after_tool,
            tools=tools,
            choice=choice,
            json_schema=_lower_types(schema) if schema else None,
            json_mode=json_mime and not schema,
            prompt_chars=len(dumps([body.get("systemInstruction") or {}, contents,
                                     body.get("tools") or []])),
        )

    def _usage(self, ans: Answer, final: bool) -> dict[str, Any]:
        usage: dict[str, Any] = {
            "promptTokenCount": ans.input_tokens,
            "totalTokenCount": ans.total_tokens if final else ans.input_tokens,
            "promptTokensDetails": [{"modality": "TEXT", "tokenCount": ans.input_tokens}],
        }
        if final:
            usage["candidatesTokenCount"] = ans.output_tokens
        return usage

    def _chunk(self, ctx: Context, ans: Answer, parts: list[dict[str, Any]] | None,
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

    def _parts(self, ans: Answer) -> list[dict[str, Any]]:
        if ans.tool_calls:
            return [{"functionCall": {"name": name, "args": args}}
                    for _, name, args in ans.tool_calls]
        return [{"text": ans.text}]

    def _blocked(self, ctx: Context, ans: Answer) -> dict[str, Any]:
        """A blocked prompt: no candidates, the reason in promptFeedback."""
        out: dict[str, Any] = {
            "promptFeedback": {"blockReason": ans.blocked, "safetyRatings": [
                {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH",
                 "blocked": True}]},
            "modelVersion": ctx.model, "responseId": ctx.rid}
        if ans.usage:
            out["usageMetadata"] = self._usage(ans, False)
        return out

    def full(self, ctx: Context, ans: Answer) -> dict[str, Any]:
        out = self._full(ctx, ans)
        if not ans.usage:
            out.pop("usageMetadata", None)
        return out

    def _full(self, ctx: Context, ans: Answer) -> dict[str, Any]:
        if ans.blocked:
            return self._blocked(ctx, ans)
        if ans.refused or ans.filtered:
            return self._chunk(ctx, ans, None, ans.filtered or "SAFETY")
        if ans.unfinished:
            return self._chunk(ctx, ans, self._parts(ans), None)
        return self._chunk(ctx, ans, self._parts(ans), "STOP")

    def events(self, ctx: Context, ans: Answer) -> list[bytes]:
        if ans.usage:
            return self._events(ctx, ans)
        out = []
        for event in self._events(ctx, ans):
            obj = json.loads(event.decode().removeprefix("data: "))
            obj.pop("usageMetadata", None)
            out.append(self.frame(obj))
        return out

    def _events(self, ctx: Context, ans: Answer) -> list[bytes]:
        if ans.blocked:
            return [self.frame(self._blocked(ctx, ans))]
        if ans.refused or ans.filtered:
            return [self.frame(self._chunk(ctx, ans, None, ans.filtered or "SAFETY"))]
        if ans.tool_calls:
            return [self.frame(self._chunk(ctx, ans, self._parts(ans), "STOP"))]
        texts = pieces(ans.text)
        return [
            self.frame(self._chunk(ctx, ans, [{"text": p}],
                                   "STOP" if i == len(texts) - 1 else None))
            for i, p in enumerate(texts)
        ]

    def error(
        self, kind: str, ctx: Context, retry_after: float | None, n_in: int
    ) -> tuple[int, dict[str, Any]]:
        table: dict[str, tuple[int, str, str]] = {
            "rate_limit": (429, "RESOURCE_EXHAUSTED",
                           "You exceeded your current quota, please check your plan and "
                           "billing details." + rate_message(retry_after)),
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
        if kind == "rate_limit" and retry_after is not None:
            error["details"] = [{"@type": "type.googleapis.com/google.rpc.RetryInfo",
                                 "retryDelay": f"{retry_after:g}s"}]
        return status, {"error": error}

    def stream_error(self, ctx: Context) -> bytes:
        return self.frame({"error": {"code": 503, "status": "UNAVAILABLE",
                                     "message": "The model is overloaded. Please try again "
                                                "later."}})
