"""frugalflow: agentic workflows whose every step runs on the cheapest capable model.

The public API is what `__all__` lists: what a flow is written with (Flow, Agent, Needs,
Judge, RoutedChatModel), what it runs against (Catalog, ModelSpec, FallbackPolicy,
BreakerRegistry), how it runs durably (Runner, RunResult, RunStatus), what it reports
(Usage, RunUsage, Attempt) and the errors a caller catches. Everything else lives in its
module (`frugalflow.ranking.rank`, `frugalflow.resilience.CircuitBreaker`, ...); test doubles
in `frugalflow.testing`, scale-out in `frugalflow.scale`.
"""

# private aliases: the stdlib helpers are not part of the flat API (tests/test_exports.py)
from importlib.metadata import PackageNotFoundError as _PackageNotFoundError
from importlib.metadata import version as _version

from .catalog import SKILLS, Capabilities, Catalog, ModelSpec
from .exceptions import (
    AllModelsFailedError,
    AuthenticationError,
    BudgetExceededError,
    CatalogError,
    ContentFilterError,
    ContextLengthError,
    FlowError,
    FrugalflowError,
    IncompleteResponseError,
    InvalidRequestError,
    UnansweredError,
    LeaseError,
    MalformedResponseError,
    MissingIntegrationError,
    ModelAPIError,
    ModelTimeoutError,
    NoCapableModelError,
    ProviderConnectionError,
    ProviderOverloadedError,
    RateLimitError,
    RunNotFoundError,
    RunStateError,
    SchemaVersionError,
    StoreError,
    StoreUnavailableError,
    UserError,
    ValidationFailedError,
)
from .resilience import BreakerRegistry, FallbackPolicy
from .flow import END, START, Agent, CompiledFlow, Flow
from .inputs import InputError
from .judge import Judge
from .needs import Needs
from .routed import RoutedChatModel, RunContext
from .runner import RunResult, Runner
from .statuses import RunStatus
from .tiers import Tier
from .usage import Attempt, RunUsage, Usage

try:
    __version__ = _version("frugalflow")
except _PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "END",
    "SKILLS",
    "START",
    "Agent",
    "AllModelsFailedError",
    "Attempt",
    "AuthenticationError",
    "BreakerRegistry",
    "BudgetExceededError",
    "Capabilities",
    "Catalog",
    "CatalogError",
    "CompiledFlow",
    "ContentFilterError",
    "ContextLengthError",
    "FallbackPolicy",
    "Flow",
    "FlowError",
    "FrugalflowError",
    "IncompleteResponseError",
    "InputError",
    "InvalidRequestError",
    "Judge",
    "LeaseError",
    "MalformedResponseError",
    "MissingIntegrationError",
    "ModelAPIError",
    "ModelSpec",
    "ModelTimeoutError",
    "Needs",
    "NoCapableModelError",
    "ProviderConnectionError",
    "ProviderOverloadedError",
    "RateLimitError",
    "RoutedChatModel",
    "RunContext",
    "RunNotFoundError",
    "RunResult",
    "RunStateError",
    "RunStatus",
    "RunUsage",
    "Runner",
    "SchemaVersionError",
    "StoreError",
    "StoreUnavailableError",
    "Tier",
    "UnansweredError",
    "Usage",
    "UserError",
    "ValidationFailedError",
    "__version__",
]
