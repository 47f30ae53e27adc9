"""The provider wire formats the emulator speaks, one module each, by emulator route name."""

from typing import Final

from .anthropic import AnthropicDialect
from .base import (
    Answer,
    Ask,
    Context,
    Dialect,
    dumps,
    pieces,
    rate_message,
    split_even,
    text_of,
    tokens,
)
from .gemini import GeminiDialect
from .ollama import OllamaDialect
from .openai import OpenAIDialect

__all__ = [
    "DIALECTS",
    "AnthropicDialect",
    "Answer",
    "Ask",
    "Context",
    "Dialect",
    "GeminiDialect",
    "OllamaDialect",
    "OpenAIDialect",
    "dumps",
    "pieces",
    "rate_message",
    "split_even",
    "text_of",
    "tokens",
]

DIALECTS: Final[dict[str, Dialect]] = {
    d.name: d for d in (OpenAIDialect(), AnthropicDialect(), GeminiDialect(), OllamaDialect())
}
