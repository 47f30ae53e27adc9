"""Local models through Ollama (`langchain-ollama`'s ChatOllama); free, no key."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .base import ProviderAdapter, SDKError

if TYPE_CHECKING:
    from ..catalog import ModelSpec


class OllamaAdapter(ProviderAdapter):
    name = "ollama"
    extra = "ollama"
    package = "langchain_ollama"
    chat_class = "langchain_ollama:ChatOllama"
    key_param = None
    timeout_param = None
    retries_param = None
    default_base_url = {"ollama": "http://127.0.0.1:11434"}
    vendor = "ollama"
    end_marker = "final message (done: true)"

    def complete(self, meta: Mapping[str, Any]) -> bool:
        # Every Ollama answer, streamed or not, ends with a message that says done: true.
        return meta.get("done") is True

    def key_env(self, spec: ModelSpec) -> str | None:
        # No key, but a host: Ollama models count as configured once OLLAMA_HOST is set,
        # so a machine without a running server never routes to them.
        return spec.api_key_env or "OLLAMA_HOST"

    def base_url(self, spec: ModelSpec) -> str | None:
        import os

        return spec.base_url or os.environ.get("OLLAMA_HOST") or self.default_base_url["ollama"]

    def constructor_kwargs(
        self, spec: ModelSpec, *, api_key: str | None, timeout: float | None
    ) -> dict[str, Any]:
        kwargs = super().constructor_kwargs(spec, api_key=api_key, timeout=timeout)
        if timeout is not None:  # ChatOllama takes its HTTP timeout through client_kwargs
            kwargs.setdefault("client_kwargs", {})["timeout"] = timeout
        return kwargs

    async def aclose(self, model: Any) -> None:
        for name in ("_async_client", "_client"):
            client = getattr(model, name, None)
            inner = getattr(client, "_client", None)  # ollama's client wraps an httpx client
            if inner is None:
                continue
            closing = inner.aclose() if hasattr(inner, "aclose") else None
            if closing is not None:
                await closing
            else:
                inner.close()

    def read_error(self, error: BaseException) -> SDKError | None:
        try:
            import ollama
        except ImportError:  # pragma: no cover - the adapter is only used when installed
            return None
        if isinstance(error, ollama.ResponseError):
            return SDKError(f"HTTP {error.status_code}: {error.error}",
                            status=error.status_code, body=str(error.error))
        return None
