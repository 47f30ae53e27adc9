"""Forget the HTTP clients langchain-openai and -anthropic cache per base URL: each test's
emulator has a new port, and a closed client must not be handed out again."""

from __future__ import annotations


def forget_provider_clients() -> None:
    from langchain_anthropic import _client_utils as anthropic_clients
    from langchain_openai.chat_models import _client_utils as openai_clients

    openai_clients._cached_async_httpx_client.cache_clear()
    openai_clients._cached_sync_httpx_client.cache_clear()
    anthropic_clients._get_default_async_httpx_client.cache_clear()
    anthropic_clients._get_default_httpx_client.cache_clear()
