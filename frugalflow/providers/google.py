"""Google Gemini, through `langchain-google-genai`'s ChatGoogleGenerativeAI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ProviderAdapter, SDKError


class GoogleAdapter(ProviderAdapter):
    name = "google"
    extra = "google"
    package = "langchain_google_genai"
    chat_class = "langchain_google_genai:ChatGoogleGenerativeAI"
    base_url_param = "base_url"
    default_key_env = {"google": "GOOGLE_API_KEY"}
    vendor = "google"

    def refusal(self, meta: Mapping[str, Any]) -> str | None:
        # A blocked prompt: no candidates at all, the reason in promptFeedback.blockReason.
        feedback = meta.get("prompt_feedback") or {}
        block = feedback.get("block_reason") if isinstance(feedback, Mapping) else None
        name = str(getattr(block, "value", block) or "")
        if name and name not in ("0", "BLOCKED_REASON_UNSPECIFIED"):
            return f"prompt blocked: {name}"
        return super().refusal(meta)

    def complete(self, meta: Mapping[str, Any]) -> bool:
        # The last candidate chunk carries finishReason (STOP, MAX_TOKENS, SAFETY, ...).
        return bool(meta.get("finish_reason"))

    def read_error(self, error: BaseException) -> SDKError | None:
        try:
            from google.genai import errors
        except ImportError:  # pragma: no cover - the adapter is only used when installed
            return None
        if isinstance(error, errors.APIError):
            code = int(error.code)
            return SDKError(f"HTTP {code}: {str(error)[:300]}", status=code,
                            body=str(error)[:2000])
        return None
