"""What every provider adapter shares: the adapter base class, HTTP status -> error class,
and the one translator of SDK and transport exceptions into frugalflow's errors."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, cast

from ..exceptions import (
    AuthenticationError,
    CatalogError,
    ContentFilterError,
    ContextLengthError,
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
    from langchain_core.messages import BaseMessage

    from ..catalog import ModelSpec

__all__ = [
    "ProviderAdapter",
    "SDKError",
    "error_from_status",
    "read_stainless_error",
    "read_transport",
    "translate_error",
]


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
    cls = _status_class(status, (body or "").lower() + " " + message.lower())
    return cls(message, provider=provider, model=model, status_code=status, body=body,
               retry_after=parse_retry_after(retry_after) if cls is RateLimitError else None)


def _status_class(status: int, text: str) -> type[ModelAPIError]:
    if status == 429:
        return RateLimitError
    if status in (401, 403):
        return AuthenticationError
    if status == 408:
        return ModelTimeoutError
    if status == 413 or (400 <= status < 500 and any(m in text for m in _CONTEXT_MARKERS)):
        return ContextLengthError
    if 400 <= status < 500 and any(m in text for m in _FILTER_MARKERS):
        return ContentFilterError
    if status in (400, 422):
        return InvalidRequestError
    if status >= 500:  # includes Anthropic's 529 overloaded
        return ProviderOverloadedError
    # 404 (model gone at this provider) and other codes: this model failed, others may not.
    return ModelAPIError


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
        return translate_error(error, spec, self.read_error)

    def read_error(self, error: BaseException) -> SDKError | None:
        """What an exception of this adapter's SDK says, or None for one it does not know
        (the shared translator then reads it as a transport error, or reads its cause)."""
        return None

    async def aclose(self, model: BaseChatModel) -> None:
        """Close the HTTP clients `model` holds (adapters know where their SDK keeps them)."""
        closer = getattr(model, "aclose", None)
        if callable(closer):
            await closer()

    def check(self, message: BaseMessage, spec: ModelSpec) -> None:
        """Raise for an answer (HTTP 200) that is not a whole answer: a refusal or block
        (ContentFilterError: try another provider), or one that ended without its end
        marker (IncompleteResponseError: a stream or body closed cleanly part-way)."""
        meta = message.response_metadata or {}
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


@dataclass(frozen=True, slots=True)
class SDKError:
    """What one exception of a provider's SDK (or of the transport) says; `translate_error`
    turns it into frugalflow's error class."""

    message: str
    """The error message after the model's key."""
    status: int | None = None
    """The HTTP status of the provider's answer, classified by `error_from_status`."""
    kind: type[ModelAPIError] = ModelAPIError
    """The error class when there is no status (a timeout, a broken connection, ...)."""
    body: str | None = None
    retry_after: str | float | None = None
    """The answer's Retry-After header, as sent."""

    def error(self, spec: ModelSpec) -> ModelAPIError:
        message = f"{spec.key}: {self.message}"
        if self.status is None:
            return self.kind(message, provider=spec.provider, model=spec.model)
        return error_from_status(self.status, message, body=self.body,
                                 retry_after=self.retry_after, provider=spec.provider,
                                 model=spec.model)


def _unknown(error: BaseException) -> SDKError | None:
    return None


def translate_error(
    error: BaseException,
    spec: ModelSpec,
    read: Callable[[BaseException], SDKError | None] = _unknown,
) -> ModelAPIError:
    """The one translator of what a model call raised into frugalflow's error: `read` (an
    adapter's `read_error`) knows its SDK's exceptions, `read_transport` what every SDK
    shares (timeouts, transport failures, httpx status errors, a body that is not JSON).
    A wrapper neither knows (an integration's own class) is read through its causes."""
    seen: set[int] = set()
    exc: BaseException | None = error
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, ModelAPIError):
            if type(exc) is not ModelAPIError:
                return exc  # already translated
        else:
            said = read(exc) or read_transport(exc)
            if said is not None:
                return said.error(spec)
        exc = exc.__cause__ or exc.__context__
    if isinstance(error, ModelAPIError):
        return error
    return ModelAPIError(f"{spec.key} failed: {type(error).__name__}: {error}",
                         provider=spec.provider, model=spec.model)


def read_transport(error: BaseException) -> SDKError | None:
    """Errors that look the same whatever the SDK: timeouts and transport failures."""
    if isinstance(error, (ConnectionError, BrokenPipeError)):
        # Before TimeoutError: both are OSErrors, and a reset is not a timeout.
        return SDKError(f"{type(error).__name__}: {error}", kind=ProviderConnectionError)
    if isinstance(error, (TimeoutError, asyncio.TimeoutError)):
        return SDKError("did not answer in time", kind=ModelTimeoutError)
    # httpx and its successor httpx2 (used by some SDKs) share the exception names.
    for module in _http_modules():
        if isinstance(error, module.TimeoutException):
            return SDKError(f"timed out: {type(error).__name__}", kind=ModelTimeoutError)
        if isinstance(error, module.HTTPStatusError):
            resp = error.response
            return SDKError(f"answered HTTP {resp.status_code}", status=resp.status_code,
                            body=_safe_text(resp), retry_after=resp.headers.get("retry-after"))
        if isinstance(error, module.TransportError):
            return SDKError(f"connection failed ({type(error).__name__})",
                            kind=ProviderConnectionError)
    if isinstance(error, json.JSONDecodeError):
        return SDKError("sent a body that is not JSON", kind=MalformedResponseError)
    if isinstance(error, OSError):
        return SDKError(f"{type(error).__name__}: {error}", kind=ProviderConnectionError)
    return None


def read_stainless_error(sdk: ModuleType, error: BaseException) -> SDKError | None:
    """HTTP status, timeout and connection errors of the OpenAI and Anthropic SDKs (both
    generated by Stainless: same class names), or None for anything else."""
    if isinstance(error, sdk.APIStatusError):
        headers = error.response.headers if error.response is not None else {}
        return SDKError(f"HTTP {error.status_code}: {_sdk_message(error)}",
                        status=error.status_code, body=_sdk_body(error),
                        retry_after=headers.get("retry-after"))
    if isinstance(error, sdk.APITimeoutError):  # before its base, APIConnectionError
        return SDKError("request timed out", kind=ModelTimeoutError)
    if isinstance(error, sdk.APIConnectionError):
        return SDKError(f"connection error: {error}", kind=ProviderConnectionError)
    return None


def _sdk_message(error: BaseException) -> str:
    return str(getattr(error, "message", "") or error)[:300]


def _sdk_body(error: BaseException) -> str | None:
    body = getattr(error, "body", None)
    if body is None:
        return None
    try:
        return json.dumps(body)[:2000]
    except (TypeError, ValueError):
        return str(body)[:2000]


@lru_cache(maxsize=1)
def _http_modules() -> tuple[ModuleType, ...]:
    modules: list[ModuleType] = []
    for name in ("httpx", "httpx2"):
        try:
            modules.append(importlib.import_module(name))
        except ImportError:
            continue
    return tuple(modules)


class _HasText(Protocol):
    @property
    def text(self) -> str: ...


def _safe_text(resp: _HasText) -> str | None:
    try:
        return resp.text[:2000]
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
