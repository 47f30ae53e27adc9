"""Anthropic, through `langchain-anthropic`'s ChatAnthropic."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ..exceptions import ModelAPIError, ModelTimeoutError, ProviderConnectionError
from ..fallback import error_from_status
from . import ProviderAdapter, translate_common
from .openai import _body, _message

if TYPE_CHECKING:
    from ..catalog import ModelSpec


class AnthropicAdapter(ProviderAdapter):
    name = "anthropic"
    extra = "anthropic"
    package = "langchain_anthropic"
    chat_class = "langchain_anthropic:ChatAnthropic"
    timeout_param = "default_request_timeout"
    default_key_env = {"anthropic": "ANTHROPIC_API_KEY"}

    async def aclose(self, model: Any) -> None:
        # The clients are cached properties: close only those that were created.
        if "_async_client" in model.__dict__:
            await model._async_client.close()
        if "_client" in model.__dict__:
            model._client.close()

    def translate(self, error: BaseException, spec: ModelSpec) -> ModelAPIError:
        try:
            import anthropic
        except ImportError:  # pragma: no cover
            return translate_common(error, spec)
        where = {"provider": spec.provider, "model": spec.model}
        if isinstance(error, anthropic.APIStatusError):
            headers = error.response.headers if error.response is not None else {}
            return error_from_status(
                error.status_code,
                f"{spec.key}: HTTP {error.status_code}: {_message(error)}",
                body=_body(error),
                retry_after=headers.get("retry-after"),
                **where,
            )
        if isinstance(error, anthropic.APITimeoutError):
            return ModelTimeoutError(f"{spec.key}: request timed out", **where)
        if isinstance(error, anthropic.APIConnectionError):
            return ProviderConnectionError(f"{spec.key}: connection error: {error}", **where)
        return translate_common(error, spec)
