"""OpenAI and every OpenAI-compatible API (DeepSeek, Groq, Together, Mistral, OpenRouter, vLLM),
through `langchain-openai`'s ChatOpenAI."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..exceptions import (
    ContentFilterError,
    MalformedResponseError,
    ModelAPIError,
    ModelTimeoutError,
    ProviderConnectionError,
)
from ..fallback import error_from_status
from . import ProviderAdapter, translate_common

if TYPE_CHECKING:
    from ..catalog import ModelSpec

# provider -> (base URL, environment variable holding the key)
OPENAI_COMPATIBLE: dict[str, tuple[str | None, str | None]] = {
    "openai": (None, "OPENAI_API_KEY"),
    "deepseek": ("https://api.deepseek.com/v1", "DEEPSEEK_API_KEY"),
    "groq": ("https://api.groq.com/openai/v1", "GROQ_API_KEY"),
    "together": ("https://api.together.xyz/v1", "TOGETHER_API_KEY"),
    "mistral": ("https://api.mistral.ai/v1", "MISTRAL_API_KEY"),
    "openrouter": ("https://openrouter.ai/api/v1", "OPENROUTER_API_KEY"),
    "fireworks": ("https://api.fireworks.ai/inference/v1", "FIREWORKS_API_KEY"),
    "vllm": ("http://127.0.0.1:8000/v1", None),
}


class OpenAIAdapter(ProviderAdapter):
    name = "openai"
    extra = "openai"
    package = "langchain_openai"
    chat_class = "langchain_openai:ChatOpenAI"
    default_base_url = {p: url for p, (url, _) in OPENAI_COMPATIBLE.items() if url}
    default_key_env = {p: env for p, (_, env) in OPENAI_COMPATIBLE.items() if env}

    def constructor_kwargs(
        self, spec: ModelSpec, *, api_key: str | None, timeout: float | None
    ) -> dict[str, Any]:
        kwargs = super().constructor_kwargs(spec, api_key=api_key, timeout=timeout)
        # ChatOpenAI asks for streamed usage only on OpenAI's own URL; costs need it everywhere.
        kwargs.setdefault("stream_usage", True)
        return kwargs

    async def aclose(self, model: Any) -> None:
        client = getattr(model, "root_async_client", None)
        if client is not None:
            await client.close()
        sync = getattr(model, "root_client", None)
        if sync is not None:
            sync.close()

    def translate(self, error: BaseException, spec: ModelSpec) -> ModelAPIError:
        try:
            import openai
        except ImportError:  # pragma: no cover - the adapter is only used when installed
            return translate_common(error, spec)
        where = {"provider": spec.provider, "model": spec.model}
        if isinstance(error, openai.APIStatusError):
            headers = error.response.headers if error.response is not None else {}
            return error_from_status(
                error.status_code,
                f"{spec.key}: HTTP {error.status_code}: {_message(error)}",
                body=_body(error),
                retry_after=headers.get("retry-after"),
                **where,
            )
        if isinstance(error, openai.APITimeoutError):
            return ModelTimeoutError(f"{spec.key}: request timed out", **where)
        if isinstance(error, openai.APIConnectionError):
            return ProviderConnectionError(f"{spec.key}: connection error: {error}", **where)
        if isinstance(error, openai.ContentFilterFinishReasonError):
            return ContentFilterError(f"{spec.key}: answer stopped by the content filter", **where)
        if isinstance(error, (openai.APIResponseValidationError, openai.LengthFinishReasonError)):
            return MalformedResponseError(f"{spec.key}: {type(error).__name__}", **where)
        return translate_common(error, spec)


def _message(error: BaseException) -> str:
    return str(getattr(error, "message", "") or error)[:300]


def _body(error: BaseException) -> str | None:
    import json

    body = getattr(error, "body", None)
    if body is None:
        return None
    try:
        return json.dumps(body)[:2000]
    except (TypeError, ValueError):
        return str(body)[:2000]
