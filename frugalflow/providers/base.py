"""What every provider adapter shares: the adapter base class, HTTP status -> error class,
and the one translator of SDK and transport exceptions into frugalflow's errors."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any, ClassVar, cast

from ..exceptions import (
    AuthenticationError,
    CatalogError,
    ContentFilterError,
    ContextLengthError,
    ErrorSource,
    IncompleteResponseError,
    InvalidRequestError,
    MalformedResponseError,
    MissingIntegrationError,
    ModelAPIError,
    ModelTimeoutError,
    ProviderConnectionError,
    ProviderOverloadedError,
    RateLimitError,
)
from ..resilience import parse_retry_after

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from ..catalog import ModelSpec

__all__ = ["ProviderAdapter", "error_from_status", "translate_common"]


_CONTEXT_MARKERS = (
    "context_length",
    "context length",
    "context window",
    "maximum context",
    "prompt is too long",
    "too many tokens",
    "input is too long",
    "exceeds the maximum number of tokens",
)
_FILTER_MARKERS = ("content_filter", "content filter", "content management policy", "safety")


def error_from_status(
    status: int,
    message: str,
    *,
    body: str | None = None,
    retry_after: str | float | None = None,
    provider: str = "",
    model: str = "",
) -> ModelAPIError:
    """The frugalflow error for an HTTP error answer from a provider."""
    text = (body or "").lower() + " " + message.lower()
    kw: dict[str, Any] = {"provider": provider, "model": model, "status_code": status, "body": body}
    if status == 429:
        return RateLimitError(message, retry_after=parse_retry_after(retry_after), **kw)
    if status in (401, 403):
        return AuthenticationError(message, **kw)
    if status == 408:
        return ModelTimeoutError(message, **kw)
    if status == 413 or (400 <= status < 500 and any(m in text for m in _CONTEXT_MARKERS)):
        return ContextLengthError(message, **kw)
    if 400 <= status < 500 and any(m in text for m in _FILTER_MARKERS):
        return ContentFilterError(message, **kw)
    if status in (400, 422):
        return InvalidRequestError(message, **kw)
    if status >= 500:  # includes Anthropic's 529 overloaded
        return ProviderOverloadedError(message, **kw)
    # 404 (model gone at this provider) and other codes: this model failed, others may not.
    return ModelAPIError(message, **kw)



_REFUSALS = frozenset({"content_filter", "refusal", "safety", "prohibited_content", "blocklist",
                       "spii", "recitation", "image_safety", "image_prohibited_content"})

# Constructor arguments through which an entry may name its endpoint instead of base_url.
_ENDPOINT_KWARGS = ("base_url", "azure_endpoint", "openai_api_base", "anthropic_api_url",
                    "client_options", "host")

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
    vendor: ClassVar[str] = ""
    """The provider whose own API this wire format is. The client's default URL is that
    vendor's: an entry under another provider name must name its endpoint."""

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

    def validate(self, spec: ModelSpec) -> None:
        """Raise CatalogError for an entry this adapter cannot serve safely: one that is not
        the vendor's own but names no endpoint, whose client would send its key to the
        vendor's default URL."""
        if not self.vendor or spec.provider == self.vendor or self.base_url(spec):
            return
        if any(spec.model_kwargs.get(k) for k in _ENDPOINT_KWARGS):
            return
        raise CatalogError(
            f"{spec.key}: provider {spec.provider!r} speaks the {self.name} API "
            f"({spec.integration or self.chat_class}) but names no endpoint; set base_url to "
            f"its API's URL (without it, the client would send its key to {self.vendor}'s "
            "own API)"
        )

    def build(self, spec: ModelSpec, *, timeout: float | None = None) -> BaseChatModel:
        import os

        self.validate(spec)  # also for specs used outside a Catalog
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
        """Raise for an answer (HTTP 200) that is not a whole answer: a refusal or block
        (ContentFilterError: try another provider), or one that ended without its end
        marker (IncompleteResponseError: a stream or body closed cleanly part-way)."""
        meta = getattr(message, "response_metadata", None) or {}
        reason = self.refusal(meta)
        if reason:
            raise ContentFilterError(
                f"{spec.key} refused to answer ({reason})", provider=spec.provider,
                model=spec.model,
            )
        if not self.complete(meta):
            raise IncompleteResponseError(
                f"{spec.key}: the answer ended without its {self.end_marker} (a truncated "
                "response)", provider=spec.provider, model=spec.model,
            )

    end_marker: ClassVar[str] = "finish reason"

    def refusal(self, meta: Mapping[str, Any]) -> str | None:
        """The refusal or block reason in an answer's response_metadata, or None.

        OpenAI reports finish_reason "content_filter", Anthropic stop_reason "refusal",
        Gemini finish_reason "SAFETY"/"PROHIBITED_CONTENT"/"BLOCKLIST"/"RECITATION".
        """
        reason = str(meta.get("finish_reason") or meta.get("stop_reason") or "")
        return reason if reason.lower() in _REFUSALS else None

    def complete(self, meta: Mapping[str, Any]) -> bool:
        """Whether an answer's response_metadata carries its wire format's end marker.

        Adapters that know their wire format say; an unknown integration is taken as
        complete. A length stop (finish_reason "length", stop_reason "max_tokens", ...) is a
        complete answer: the caller's own output limit ended it, it was reported and billed
        in full, and another model with the same limit would stop the same way.
        """
        return True


def translate_common(error: BaseException, spec: ModelSpec) -> ModelAPIError:
    """Errors that look the same whatever the SDK: timeouts and transport failures."""
    mapped = _translate_common(error, spec)
    if type(mapped) is ModelAPIError:
        # A wrapper we do not know (an integration's own class): what it wraps may say more.
        seen: set[int] = {id(error)}
        inner = error.__cause__ or error.__context__
        while inner is not None and id(inner) not in seen:
            seen.add(id(inner))
            deeper = _translate_common(inner, spec)
            if type(deeper) is not ModelAPIError:
                return deeper
            inner = inner.__cause__ or inner.__context__
    return mapped


def _translate_common(error: BaseException, spec: ModelSpec) -> ModelAPIError:
    if isinstance(error, ModelAPIError):
        return error
    where: ErrorSource = {"provider": spec.provider, "model": spec.model}
    if isinstance(error, (ConnectionError, BrokenPipeError)):
        # Before TimeoutError: both are OSErrors, and a reset is not a timeout.
        return ProviderConnectionError(f"{spec.key}: {type(error).__name__}: {error}", **where)
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
        return cast("type[BaseChatModel]", getattr(module, attr))
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
