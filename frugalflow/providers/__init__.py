"""Provider adapters: how to build each provider's LangChain chat model and read its errors.

One module per integration. OpenAI-compatible vendors (DeepSeek, Groq, Together, Mistral,
OpenRouter, vLLM) share the OpenAI adapter with their own base URL and key variable.
Each adapter translates its SDK's exceptions into frugalflow's, in one place; what they
share is in `base`. This module is the registry: which adapter serves which catalog entry.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exceptions import CatalogError
from .base import ProviderAdapter

if TYPE_CHECKING:
    from ..catalog import ModelSpec

__all__ = ["ProviderAdapter", "adapter_for", "register_adapter"]


_ADAPTERS: dict[str, ProviderAdapter] = {}
_REGISTERED: set[str] = set()  # providers registered by the user: their adapter always wins
_WIRE_FORMATS: dict[str, ProviderAdapter] = {}  # integration module -> its adapter

# The built-in integrations and the adapter (wire format) each speaks.
_INTEGRATION_ADAPTER = {"langchain_openai": "openai", "langchain_anthropic": "anthropic",
                        "langchain_google_genai": "google", "langchain_ollama": "ollama"}


def register_adapter(provider: str, adapter: ProviderAdapter) -> None:
    """Serve catalog entries whose `provider` is `provider` with `adapter`."""
    _ADAPTERS[provider] = adapter
    _REGISTERED.add(provider)


def adapter_for(spec: ModelSpec) -> ProviderAdapter:
    """The adapter for an entry: chosen by its wire format, not its provider's name.

    A provider registered with `register_adapter` gets its adapter; an entry whose
    `integration` is one of the built-in ones (langchain_openai, langchain_anthropic,
    langchain_google_genai, langchain_ollama) gets that integration's adapter, whatever its
    provider is called (an Anthropic-compatible proxy gets Anthropic's error handling);
    other integrations get the provider's adapter if it has one, else a generic one; an
    entry without an integration gets its provider's.
    """
    _register_builtins()
    if spec.simulated or spec.provider.startswith("sim-"):
        return _ADAPTERS["simulated"]
    if spec.provider in _REGISTERED:
        return _ADAPTERS[spec.provider]
    if spec.integration:
        module = spec.integration.partition(":")[0].split(".")[0]
        wire = _WIRE_FORMATS.get(module)
        if wire is not None:
            return wire
        return _ADAPTERS.get(spec.provider) or _GenericAdapter()
    try:
        return _ADAPTERS[spec.provider]
    except KeyError:
        import difflib

        close = difflib.get_close_matches(spec.provider, list(_ADAPTERS), n=3)

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
    from ..testing.simulator import SimulatedAdapter  # the simulated provider (offline)

    openai = OpenAIAdapter()
    for provider in OPENAI_COMPATIBLE:
        _ADAPTERS.setdefault(provider, openai)
    anthropic, google, ollama = AnthropicAdapter(), GoogleAdapter(), OllamaAdapter()
    _ADAPTERS.setdefault("anthropic", anthropic)
    _ADAPTERS.setdefault("google", google)
    _ADAPTERS.setdefault("ollama", ollama)
    _ADAPTERS.setdefault("simulated", SimulatedAdapter())
    builtin = {"openai": openai, "anthropic": anthropic, "google": google, "ollama": ollama}
    for module, name in _INTEGRATION_ADAPTER.items():
        _WIRE_FORMATS[module] = builtin[name]
