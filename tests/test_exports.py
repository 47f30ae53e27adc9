"""The flat public API: `frugalflow.__all__` is exactly the list below, and exactly what the
package module offers.

In the spirit of httpx's tests/test_exported_members.py: the public names are written out here
(adding or dropping one is a decision this test makes visible), every public name bound in
`frugalflow/__init__.py` is listed, nothing else is, nothing twice, and every listed name imports.
"""

import __future__
import types

import pytest

import frugalflow

# dunder names that are part of the API on purpose
INCLUDED_PRIVATE = {"__version__"}

PUBLIC_API = [
    # writing a flow
    "END", "START", "Agent", "Flow", "CompiledFlow", "Needs", "Judge", "RoutedChatModel",
    "RunContext",
    # what it runs against
    "SKILLS", "Capabilities", "Catalog", "ModelSpec", "FallbackPolicy", "BreakerRegistry",
    "Tier",
    # durable runs
    "Runner", "RunResult", "RunStatus",
    # what it reports
    "Usage", "RunUsage", "Attempt",
    # errors a caller catches (the tree in frugalflow/exceptions.py)
    "FrugalflowError", "UserError", "CatalogError", "MissingIntegrationError", "FlowError",
    "NoCapableModelError", "ModelAPIError", "RateLimitError", "ProviderOverloadedError",
    "ModelTimeoutError", "ProviderConnectionError", "IncompleteResponseError",
    "AuthenticationError", "ContextLengthError", "ContentFilterError", "MalformedResponseError",
    "ValidationFailedError", "InvalidRequestError", "UnansweredError", "AllModelsFailedError",
    "BudgetExceededError", "StoreError", "StoreUnavailableError", "SchemaVersionError",
    "RunNotFoundError", "RunStateError", "LeaseError", "InputError",
    "__version__",
]

# internals that live in their modules, not in the flat API
INTERNAL = ["CircuitBreaker", "BreakerState", "rank", "explain", "estimate_tokens",
            "SimulatedChatModel", "Simulator", "Lease", "EventBus", "Store", "Ledger"]


def _namespace_public_names() -> set[str]:
    """Public names bound in the package module, minus submodules and `from __future__` flags.

    Submodules appear in the namespace as soon as anything imports them (``frugalflow.cli``...),
    so they are recognised by type, not listed by hand: a new submodule cannot break this test,
    but a new public function or class that is not exported does.
    """
    return {
        name
        for name, value in vars(frugalflow).items()
        if (not name.startswith("_") or name in INCLUDED_PRIVATE)
        and not isinstance(value, types.ModuleType)
        and not isinstance(value, __future__._Feature)
    }


def _isort_key(name: str) -> tuple[int, str]:
    """CONSTANTS, then Classes, then everything else (ruff RUF022's isort-style order)."""
    if name.isupper():
        return (0, name)
    if name[0].isupper():
        return (1, name)
    return (2, name)


def test_all_is_the_public_api() -> None:
    assert sorted(frugalflow.__all__) == sorted(PUBLIC_API)
    assert len(PUBLIC_API) == len(set(PUBLIC_API))


def test_internals_stay_out() -> None:
    assert [name for name in INTERNAL if hasattr(frugalflow, name)] == []


def test_every_exception_in_the_tree_is_public() -> None:
    from frugalflow import exceptions

    raised = {name for name, value in vars(exceptions).items()
              if isinstance(value, type) and issubclass(value, exceptions.FrugalflowError)}
    assert sorted(raised - set(frugalflow.__all__)) == []


def test_all_lists_exactly_the_public_names() -> None:
    public = _namespace_public_names()
    listed = set(frugalflow.__all__)
    assert sorted(public - listed) == [], "public in frugalflow but missing from __all__"
    assert sorted(listed - public) == [], "in __all__ but not defined in frugalflow"


def test_all_has_no_duplicates_and_is_sorted() -> None:
    assert len(frugalflow.__all__) == len(set(frugalflow.__all__))
    assert list(frugalflow.__all__) == sorted(frugalflow.__all__, key=_isort_key)


def test_every_listed_name_imports() -> None:
    for name in frugalflow.__all__:
        exec(f"from frugalflow import {name}", {})  # raises ImportError if it is not there
    star: dict[str, object] = {}
    exec("from frugalflow import *", star)
    assert set(star) - {"__builtins__"} == set(frugalflow.__all__)


def test_the_check_recognises_an_unexported_name(monkeypatch: pytest.MonkeyPatch) -> None:
    # the comparison can fail: a public name added to the package but not to __all__ is caught
    monkeypatch.setattr(frugalflow, "forgotten_helper", lambda: None, raising=False)
    assert "forgotten_helper" in _namespace_public_names() - set(frugalflow.__all__)
