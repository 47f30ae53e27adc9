"""Anthropic, through `langchain-anthropic`'s ChatAnthropic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import ProviderAdapter, SDKError, read_stainless_error


class AnthropicAdapter(ProviderAdapter):
    name = "anthropic"
    extra = "anthropic"
    package = "langchain_anthropic"
    chat_class = "langchain_anthropic:ChatAnthropic"
    timeout_param = "default_request_timeout"
    default_key_env = {"anthropic": "ANTHROPIC_API_KEY"}
    vendor = "anthropic"
    end_marker = "stop_reason (no message_delta/message_stop)"

    def complete(self, meta: Mapping[str, Any]) -> bool:
        # message_delta carries stop_reason (end_turn, max_tokens, tool_use, refusal, ...);
        # a stream that ends after message_start and some deltas has none.
        return bool(meta.get("stop_reason"))

    async def aclose(self, model: Any) -> None:
        # The clients are cached properties: close only those that were created.
        if "_async_client" in model.__dict__:
            await model._async_client.close()
        if "_client" in model.__dict__:
            model._client.close()

    def read_error(self, error: BaseException) -> SDKError | None:
        try:
            import anthropic
        except ImportError:  # pragma: no cover - the adapter is only used when installed
            return None
        return read_stainless_error(anthropic, error)
