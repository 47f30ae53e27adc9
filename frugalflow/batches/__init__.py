"""Provider batches: parked requests of many runs sent together at a batch tier's price.

`wire` says what frugalflow asks of a provider's batch API; `openai`, `anthropic` and
`gemini` speak it with the vendors' SDKs; `batch_client(spec)` gives the client for a
catalog entry (None: its provider has no batch API frugalflow speaks).
"""

from __future__ import annotations

import asyncio
import importlib
from typing import TYPE_CHECKING

from .wire import BatchClient, BatchProgress, BatchRequest, ItemResult

if TYPE_CHECKING:
    from ..catalog import ModelSpec

__all__ = ["BatchClient", "BatchProgress", "BatchRequest", "ItemResult", "batch_client",
           "batch_wire_format"]

# The adapter (wire format) of a catalog entry -> the module whose `client(spec)` speaks
# its batch API.
_FORMATS = {"openai": "openai", "anthropic": "anthropic", "google": "gemini"}
_clients: dict[tuple[str, str | None, str | None, int], BatchClient] = {}


def batch_wire_format(spec: ModelSpec) -> str | None:
    """`openai`, `anthropic` or `gemini`: the batch API `spec`'s wire format speaks."""
    return _FORMATS.get(spec.adapter.name)


def batch_client(spec: ModelSpec) -> BatchClient | None:
    """The batch client for `spec` (shared per wire format, base URL and key variable), or
    None when frugalflow speaks no batch API for its wire format."""
    fmt = batch_wire_format(spec)
    if fmt is None:
        return None
    try:  # an SDK's async HTTP client belongs to one event loop
        loop = id(asyncio.get_running_loop())
    except RuntimeError:
        loop = 0
    key = (fmt, spec.base_url, spec.api_key_env, loop)
    hit = _clients.get(key)
    if hit is None:
        module = importlib.import_module(f"{__name__}.{fmt}")
        hit = _clients[key] = module.client(spec)
    return hit


async def close_batch_clients() -> None:
    """Close every batch client made so far (their HTTP connections)."""
    clients = list(_clients.values())
    _clients.clear()
    for c in clients:
        await c.aclose()
