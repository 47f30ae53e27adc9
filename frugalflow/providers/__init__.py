"""Provider adapters: how to build each provider's LangChain chat model and read its errors.

One module per integration. OpenAI-compatible vendors (DeepSeek, Groq, Together, Mistral,
OpenRouter, vLLM) share the OpenAI adapter with their own base URL and key variable.
Each adapter translates its SDK's exceptions into frugalflow's, in one place.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import importlib.util
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar

from ..exceptions import (
    ContentFilterError,
    MalformedResponseError,
    MissingIntegrationError,
    ModelAPIError,
    ModelTimeoutError,
    ProviderConnectionError,
)
from ..fallback import error_from_status

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from ..catalog import ModelSpec

__all__ = ["ProviderAdapter", "adapter_for", "register_adapter"]

_REFUSALS = frozenset({"content_filter", "refusal", "safety", "prohibited_content", "blocklist",
                       "spii"})

# A stand-in key used only to construct a model for reading its profile; never sent anywhere.
_PROFILE_PROBE_KEY = "frugalflow-profile-probe"


class ProviderAdapter:
    """Builds chat models for a family of providers and translates their errors."""

    name: ClassVar[str] = ""
    extra: ClassVar[str] = ""
    package: ClassVar[str] = ""
    chat_class: ClassVar[str] = ""
    key_param: ClassVar[str | None] = "api_key"
    base_url_param: ClassVar[str | None] = "base_url"
    timeout_param: ClassVar[str | None] = "timeout"
    retries_param: ClassVar[str | None] = "max_retries"
    default_key_env: ClassVar[Mapping[str, str]] = {}
    default_base_url: ClassVar[Mapping[str, str]] = {}

    def installed(self) -> bool:
        return _installed(self.package)

    def key_env(self, spec: ModelSpec) -> str | None:
        return spec.api_key_env or self.default_key_env.get(spec.provider)

    def base_url(self, spec: ModelSpec) -> str | None:
        return spec.base_url or self.default_base_url.get(spec.provider)

    def model_class(self, spec: ModelSpec) -> type[BaseChatModel]:
        return _import_class(spec.integration or self.chat_class, self.extra)

    def constructor_kwargs(
        self, spec: ModelSpec, *, api_key: str | None, timeout: float | None
    ) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": spec.model}
        if self.key_param and api_key is not None:
            kwargs[self.key_param] = api_key
        url = self.base_url(spec)
        if self.base_url_param and url:
            kwargs[self.base_url_param] = url
        if self.timeout_param and timeout is not None:
            kwargs[self.timeout_param] = timeout
        if self.retries_param:
            # frugalflow's retry/fallback policy is in charge: no hidden SDK retry loops.
            kwargs[self.retries_param] = 0
        kwargs.update(spec.model_kwargs)
        return kwargs

    def build(self, spec: ModelSpec, *, timeout: float | None = None) -> BaseChatModel:
        import os

        env = self.key_env(spec)
        api_key = os.environ.get(env) if env else None
        cls = self.model_class(spec)
        return cls(**self.constructor_kwargs(spec, api_key=api_key, timeout=timeout))

    def profile(self, spec: ModelSpec) -> Mapping[str, Any] | None:
        """The integration's model profile for this model (no network, no real key)."""
        target = spec.profile_from or spec.integration or self.chat_class
        if not _installed(target.partition(":")[0].split(".")[0]):
            return None
        return _profile(target, spec.model, self.key_param)

    def translate(self, error: BaseException, spec: ModelSpec) -> ModelAPIError:
        """Map an exception raised by this provider's client to a frugalflow error."""
        return translate_common(error, spec)

    async def aclose(self, model: BaseChatModel) -> None:
        """Close the HTTP clients `model` holds (adapters know where their SDK keeps them)."""
        closer = getattr(model, "aclose", None)
        if callable(closer):
            await closer()

    def check(self, message: Any, spec: ModelSpec) -> None:
        """Raise for an answer that is a refusal in disguise (HTTP 200, nothing usable).

        OpenAI reports finish_reason "content_filter", Anthropic stop_reason "refusal",
        Gemini finish_reason "SAFETY"/"PROHIBITED_CONTENT"; all mean: try another provider.
        """
        meta = getattr(message, "response_metadata", None) or {}
        reason = str(meta.get("finish_reason") or meta.get("stop_reason") or "")
        if reason.lower() in _REFUSALS:
            raise ContentFilterError(
                f"{spec.key} refused to answer ({reason})", provider=spec.provider,
                model=spec.model,
            )


def translate_common(error: BaseException, spec: ModelSpec) -> ModelAPIError:
    """Errors that look the same whatever the SDK: timeouts and transport failures."""
    if isinstance(error, ModelAPIError):
        return error
    where = {"provider": spec.provider, "model": spec.model}
    if isinstance(error, (TimeoutError, asyncio.TimeoutError)):
        return ModelTimeoutError(f"{spec.key} did not answer in time", **where)
    # httpx and its successor httpx2 (used by some SDKs) share the exception names.
    for module in _http_modules():
        if isinstance(error, module.TimeoutException):
            return ModelTimeoutError(f"{spec.key} timed out: {type(error).__name__}", **where)
        if isinstance(error, module.HTTPStatusError):
            resp = error.response
            return error_from_status(
                resp.status_code,
                f"{spec.key} answered HTTP {resp.status_code}",
                body=_safe_text(resp),
                retry_after=resp.headers.get("retry-after"),
                **where,
            )
        if isinstance(error, module.TransportError):
            return ProviderConnectionError(
                f"{spec.key}: connection failed ({type(error).__name__})", **where
            )
    if isinstance(error, json.JSONDecodeError):
        return MalformedResponseError(f"{spec.key} sent a body that is not JSON", **where)
    if isinstance(error, (ConnectionError, OSError)):
        return ProviderConnectionError(f"{spec.key}: {type(error).__name__}: {error}", **where)
    return ModelAPIError(f"{spec.key} failed: {type(error).__name__}: {error}", **where)


@lru_cache(maxsize=1)
def _http_modules() -> tuple[Any, ...]:
    modules = []
    for name in ("httpx", "httpx2"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return tuple(modules)


def _safe_text(resp: Any) -> str | None:
    try:
        return str(resp.text)[:2000]
    except Exception:  # a streamed body may be unreadable here
        return None


@lru_cache(maxsize=None)
def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def _import_class(path: str, extra: str) -> type[BaseChatModel]:
    module_name, _, attr = path.partition(":")
    if not attr:
        raise MissingIntegrationError(
            f"integration {path!r} must be written 'module:Class' (e.g. langchain_openai:ChatOpenAI)"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        hint = f"pip install 'frugalflow[{extra}]'" if extra else f"install {module_name}"
        raise MissingIntegrationError(
            f"{module_name} is not installed: {hint}", package=module_name, extra=extra
        ) from e
    try:
        return getattr(module, attr)  # type: ignore[no-any-return]
    except AttributeError:
        raise MissingIntegrationError(f"{module_name} has no class {attr!r}") from None


@lru_cache(maxsize=512)
def _profile(class_path: str, model: str, key_param: str | None) -> Mapping[str, Any] | None:
    cls = _import_class(class_path, "")
    kwargs: dict[str, Any] = {"model": model}
    if key_param:
        kwargs[key_param] = _PROFILE_PROBE_KEY
    instance = cls(**kwargs)
    profile = getattr(instance, "profile", None)
    return dict(profile) if profile else None


_ADAPTERS: dict[str, ProviderAdapter] = {}


def register_adapter(provider: str, adapter: ProviderAdapter) -> None:
    """Serve catalog entries whose `provider` is `provider` with `adapter`."""
    _ADAPTERS[provider] = adapter


def adapter_for(spec: ModelSpec) -> ProviderAdapter:
    _register_builtins()
    if spec.simulated or spec.provider.startswith("sim-"):
        return _ADAPTERS["simulated"]
    try:
        return _ADAPTERS[spec.provider]
    except KeyError:
        if spec.integration:
            return _ADAPTERS["openai"] if "openai" in spec.integration else _GenericAdapter()
        import difflib

        close = difflib.get_close_matches(spec.provider, list(_ADAPTERS), n=3)
        from ..exceptions import CatalogError

        raise CatalogError(
            f"{spec.key}: unknown provider {spec.provider!r}"
            + (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "")
            + "; or set 'integration' (module:Class) and 'base_url' in its entry"
        ) from None


class _GenericAdapter(ProviderAdapter):
    """Any LangChain chat model named by `integration`; errors translated generically."""

    name = "generic"
    package = "langchain_core"

    def installed(self) -> bool:
        return True


_BUILTINS_LOADED = False


def _register_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    _BUILTINS_LOADED = True
    from .anthropic import AnthropicAdapter
    from .google import GoogleAdapter
    from .ollama import OllamaAdapter
    from .openai import OPENAI_COMPATIBLE, OpenAIAdapter
    from .simulated import SimulatedAdapter

    openai = OpenAIAdapter()
    for provider in OPENAI_COMPATIBLE:
        _ADAPTERS.setdefault(provider, openai)
    _ADAPTERS.setdefault("anthropic", AnthropicAdapter())
    _ADAPTERS.setdefault("google", GoogleAdapter())
    _ADAPTERS.setdefault("ollama", OllamaAdapter())
    _ADAPTERS.setdefault("simulated", SimulatedAdapter())
