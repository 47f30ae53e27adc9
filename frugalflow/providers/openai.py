"""OpenAI and every OpenAI-compatible API (DeepSeek, Groq, Together, Mistral, OpenRouter, vLLM),
through `langchain-openai`'s ChatOpenAI."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..exceptions import ContentFilterError, MalformedResponseError
from .base import ProviderAdapter, SDKError, read_stainless_error

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
    vendor = "openai"

    def complete(self, meta: Mapping[str, Any]) -> bool:
        # Chat Completions: the last chunk (or the body) carries finish_reason (stop,
        # length, tool_calls, content_filter); a stream closed before it has none, even
        # when the server still sent `data: [DONE]`. The Responses API reports a status.
        if meta.get("finish_reason"):
            return True
        return meta.get("status") in ("completed", "incomplete")

    def refusal(self, meta: Mapping[str, Any]) -> str | None:
        details = meta.get("incomplete_details") or {}
        if isinstance(details, Mapping) and details.get("reason") == "content_filter":
            return "content_filter"
        return super().refusal(meta)

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

    def read_error(self, error: BaseException) -> SDKError | None:
        try:
            import openai
        except ImportError:  # pragma: no cover - the adapter is only used when installed
            return None
        said = read_stainless_error(openai, error)
        if said is not None:
            return said
        if isinstance(error, openai.ContentFilterFinishReasonError):
            return SDKError("answer stopped by the content filter", kind=ContentFilterError)
        if isinstance(error, (openai.APIResponseValidationError, openai.LengthFinishReasonError)):
            return SDKError(type(error).__name__, kind=MalformedResponseError)
        return None
