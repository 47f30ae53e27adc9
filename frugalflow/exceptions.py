"""Every error frugalflow raises, under one root.

    FrugalflowError
    ├── UserError                      the caller's mistake: fix the input, not the provider
    │   ├── CatalogError               a bad catalog file or model spec
    │   ├── MissingIntegrationError    a provider package (extra) is not installed
    │   ├── FlowError                  a bad flow definition (found at compile time)
    │   └── NoCapableModelError        no available model meets a node's needs
    ├── ModelAPIError                  one model call failed (provider or runtime side)
    │   ├── RateLimitError             429; carries retry_after
    │   ├── ProviderOverloadedError    5xx, 529 overloaded
    │   ├── ModelTimeoutError          no answer within the timeout
    │   ├── ProviderConnectionError    reset, refused, broken stream
    │   ├── IncompleteResponseError    an answer that ended cleanly without its end marker
    │   ├── AuthenticationError        401/403: the provider is disabled for the process
    │   ├── ContextLengthError         the prompt does not fit this model's window
    │   ├── ContentFilterError         the provider refused the content
    │   ├── MalformedResponseError     unparseable answer, or output that fails its schema
    │   │   └── ValidationFailedError  an answer the node's validator rejected: escalate
    │   ├── UnansweredError            a batch ended before answering the request (not paid)
    │   └── InvalidRequestError        400 that is the caller's bug: raised at once, no fallback
    ├── AllModelsFailedError           (also an ExceptionGroup) every candidate failed
    ├── BudgetExceededError            the run's budget cannot pay for the next call
    └── StoreError                     persistence problems
        ├── StoreUnavailableError      the database cannot be reached
        ├── SchemaVersionError         the database was written by a newer frugalflow
        ├── RunNotFoundError           no run with that id
        ├── RunStateError              the run cannot do that now (e.g. resume a finished run)
        └── LeaseError                 another process holds the run's lease, or ours was lost

Every exception pickles (runs cross process boundaries): constructors take the message
positionally and everything else as keywords with defaults.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

from .statuses import ErrorClass

if TYPE_CHECKING:
    from .usage import Attempt

__all__ = [
    "AllModelsFailedError",
    "AuthenticationError",
    "BudgetExceededError",
    "LeaseError",
    "RunNotFoundError",
    "RunStateError",
    "SchemaVersionError",
    "StoreError",
    "StoreUnavailableError",
    "CatalogError",
    "ErrorClass",
    "ContentFilterError",
    "ContextLengthError",
    "FlowError",
    "FrugalflowError",
    "IncompleteResponseError",
    "InvalidRequestError",
    "UnansweredError",
    "MalformedResponseError",
    "MissingIntegrationError",
    "ModelAPIError",
    "ModelTimeoutError",
    "NoCapableModelError",
    "ProviderConnectionError",
    "ProviderOverloadedError",
    "RateLimitError",
    "UserError",
    "ValidationFailedError",
]


class FrugalflowError(Exception):
    """Root of every frugalflow error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuild from the message, then restore attributes: subclasses need no pickling code.
        return (self.__class__, (self.message,), self.__dict__)

    def __str__(self) -> str:
        return self.message


class UserError(FrugalflowError):
    """The caller's mistake: a bad catalog, flow, needs or argument."""


class CatalogError(UserError):
    """A catalog file or model spec is invalid."""


class MissingIntegrationError(UserError):
    """A provider's LangChain integration package is not installed."""

    package: str
    extra: str

    def __init__(self, message: str, *, package: str = "", extra: str = "") -> None:
        super().__init__(message)
        self.package = package
        self.extra = extra


class FlowError(UserError):
    """A flow definition is invalid; raised when the flow is compiled."""

    node: str | None

    def __init__(self, message: str, *, node: str | None = None) -> None:
        super().__init__(message)
        self.node = node


class NoCapableModelError(UserError):
    """No available model in the catalog meets a node's needs."""

    node: str | None
    rejected: list[tuple[str, list[str]]]

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        rejected: Sequence[tuple[str, Sequence[str]]] = (),
    ) -> None:
        super().__init__(message)
        self.node = node
        self.rejected = [(m, list(r)) for m, r in rejected]


class ErrorSource(TypedDict):
    """Which model a `ModelAPIError` came from, passed on as `**where`."""

    provider: str
    model: str


class ModelAPIError(FrugalflowError):
    """A model call failed. Its type says how frugalflow reacts; `error_class` is the name
    the ledger stores."""

    error_class: ClassVar[ErrorClass] = ErrorClass.UNKNOWN
    provider: str
    model: str
    status_code: int | None
    retry_after: float | None
    body: str | None

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        model: str = "",
        status_code: int | None = None,
        retry_after: float | None = None,
        body: str | None = None,
    ) -> None:
        super().__init__(message)
        self.provider = provider
        self.model = model
        self.status_code = status_code
        self.retry_after = retry_after
        self.body = body


class RateLimitError(ModelAPIError):
    error_class = ErrorClass.RATE_LIMIT


class ProviderOverloadedError(ModelAPIError):
    error_class = ErrorClass.OVERLOADED


class ModelTimeoutError(ModelAPIError):
    error_class = ErrorClass.TIMEOUT


class ProviderConnectionError(ModelAPIError):
    error_class = ErrorClass.CONNECTION


class IncompleteResponseError(ModelAPIError):
    """The answer ended without its end marker (no finish reason, stop reason or `done`):
    a stream or body the server or a proxy closed cleanly part-way. Retried like a broken
    connection, then the next candidate."""

    error_class = ErrorClass.INCOMPLETE


class AuthenticationError(ModelAPIError):
    error_class = ErrorClass.AUTH


class ContextLengthError(ModelAPIError):
    error_class = ErrorClass.CONTEXT_LENGTH


class ContentFilterError(ModelAPIError):
    error_class = ErrorClass.CONTENT_FILTER


class MalformedResponseError(ModelAPIError):
    error_class = ErrorClass.MALFORMED


class ValidationFailedError(MalformedResponseError):
    """The node's validator rejected the answer; the call escalates to a stronger model."""

    error_class = ErrorClass.VALIDATION


class UnansweredError(ModelAPIError):
    """A batch ended (expired, failed or cancelled) before answering this request: it was
    not paid; the call goes to the next candidate (another batch, or a synchronous call)."""

    error_class = ErrorClass.UNANSWERED


class InvalidRequestError(ModelAPIError):
    error_class = ErrorClass.INVALID_REQUEST


class BudgetExceededError(FrugalflowError):
    """The run's remaining budget cannot pay for the cheapest capable call."""

    node: str | None
    budget_usd: float
    spent_usd: float
    needed_usd: float | None

    def __init__(
        self,
        message: str,
        *,
        node: str | None = None,
        budget_usd: float = 0.0,
        spent_usd: float = 0.0,
        needed_usd: float | None = None,
    ) -> None:
        super().__init__(message)
        self.node = node
        self.budget_usd = budget_usd
        self.spent_usd = spent_usd
        self.needed_usd = needed_usd


class StoreError(FrugalflowError):
    """A persistence problem."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached or opened."""

    retryable: bool
    """False when waiting cannot help (the store does not retry it)."""
    missing: bool
    """The database does not exist (or holds no frugalflow tables) and the store was asked
    not to create it (`Store(url, create=False)`, read-only commands)."""

    def __init__(self, message: str, *, retryable: bool = True, missing: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.missing = missing


class SchemaVersionError(StoreError):
    """The database schema is newer than this frugalflow knows."""


class RunNotFoundError(StoreError):
    """No run with that id."""

    run_id: str

    def __init__(self, message: str, *, run_id: str = "") -> None:
        super().__init__(message)
        self.run_id = run_id


class RunStateError(StoreError):
    """The run is in a state that does not allow the operation."""

    run_id: str
    status: str

    def __init__(self, message: str, *, run_id: str = "", status: str = "") -> None:
        super().__init__(message)
        self.run_id = run_id
        self.status = status


class LeaseError(StoreError):
    """Another executor holds the run's lease, or this executor lost it."""

    run_id: str
    holder: str

    def __init__(self, message: str, *, run_id: str = "", holder: str = "") -> None:
        super().__init__(message)
        self.run_id = run_id
        self.holder = holder


# ExceptionGroup's `message` is a read-only property, FrugalflowError's a plain attribute;
# at runtime ExceptionGroup's wins (it comes first in the MRO) and nothing assigns it here.
class AllModelsFailedError(ExceptionGroup, FrugalflowError):  # type: ignore[override]
    """Every candidate model failed; `.exceptions` holds each failure, `.attempts` each try."""

    node: str | None
    attempts: list[Attempt]

    def __new__(
        cls,
        message: str,
        exceptions: Sequence[Exception],
        *,
        node: str | None = None,
        attempts: Sequence[Attempt] = (),
    ) -> AllModelsFailedError:
        self = super().__new__(cls, message, list(exceptions))
        self.node = node
        self.attempts = list(attempts)
        return self

    def __init__(
        self,
        message: str,
        exceptions: Sequence[Exception],
        *,
        node: str | None = None,
        attempts: Sequence[Attempt] = (),
    ) -> None:
        # ExceptionGroup keeps `message` and `exceptions` itself (set in __new__).
        pass

    # typeshed's derive is generic over the group's exception type; ours keeps node and attempts
    def derive(self, excs: Sequence[Exception]) -> AllModelsFailedError:  # type: ignore[override]
        return AllModelsFailedError(self.message, excs, node=self.node, attempts=self.attempts)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_group,
            (self.message, list(self.exceptions), self.node, self.attempts),
        )

    def __str__(self) -> str:
        lines = [self.message]
        for a in self.attempts:
            lines.append(f"  - {a.describe()}")
        return "\n".join(lines)


def _rebuild_group(
    message: str, exceptions: list[Exception], node: str | None, attempts: list[Attempt]
) -> AllModelsFailedError:
    return AllModelsFailedError(message, exceptions, node=node, attempts=attempts)


def short_error(error: BaseException, limit: int = 300) -> str:
    """The first line of an error's message (its class name when it has none), cut to `limit`."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:limit]
