"""Google Gemini, through `langchain-google-genai`'s ChatGoogleGenerativeAI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..exceptions import ErrorSource, ModelAPIError
from .base import ProviderAdapter, error_from_status, translate_common

if TYPE_CHECKING:
    from ..catalog import ModelSpec


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

    def translate(self, error: BaseException, spec: ModelSpec) -> ModelAPIError:
        where: ErrorSource = {"provider": spec.provider, "model": spec.model}
        # langchain-google-genai may wrap the SDK's error; look at the cause chain once.
        for exc in (error, error.__cause__):
            code = _status(exc)
            if code is not None:
                return error_from_status(
                    code, f"{spec.key}: HTTP {code}: {str(exc)[:300]}", body=str(exc)[:2000],
                    **where,
                )
        return translate_common(error, spec)


def _status(error: BaseException | None) -> int | None:
    try:
        from google.genai import errors
    except ImportError:  # pragma: no cover
        return None
    if isinstance(error, errors.APIError):
        return int(error.code)
    return None
