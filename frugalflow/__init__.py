"""frugalflow: agentic workflows whose every step runs on the cheapest capable model.

The public API is what `__all__` lists; everything else is internal.
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
    MalformedResponseError,
    MissingIntegrationError,
    ModelAPIError,
    ModelTimeoutError,
    NoCapableModelError,
    ProviderConnectionError,
    ProviderOverloadedError,
    RateLimitError,
    UserError,
)
from .fallback import BreakerRegistry, BreakerState, CircuitBreaker, FallbackPolicy
from .usage import Attempt
from .flow import END, START, Agent, CompiledFlow, Flow
from .providers.simulated import SimulatedChatModel, Simulator
from .judge import Judge
from .needs import Needs, estimate_tokens
from .ranking import explain, rank
from .routed import RoutedChatModel, RunContext
from .usage import RunUsage, Usage

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
    "BreakerState",
    "BudgetExceededError",
    "Capabilities",
    "Catalog",
    "CatalogError",
    "CircuitBreaker",
    "CompiledFlow",
    "ContentFilterError",
    "ContextLengthError",
    "FallbackPolicy",
    "Flow",
    "FlowError",
    "FrugalflowError",
    "IncompleteResponseError",
    "InvalidRequestError",
    "Judge",
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
    "RunUsage",
    "SimulatedChatModel",
    "Simulator",
    "Usage",
    "UserError",
    "__version__",
    "estimate_tokens",
    "explain",
    "rank",
]
