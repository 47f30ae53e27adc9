"""What frugalflow asks of a provider's batch API, whatever its wire format.

A `BatchClient` turns one routed call into the body of one batch line (`request_body`: the
body the synchronous call would send, made by the same LangChain integration), sends many
such lines as one provider batch (`submit`, with frugalflow's batch id in the batch's
metadata or display name so `find` can tell whether a batch was already sent), follows it
(`progress`), reads its answers (`results`: each parsed into the `AIMessage` the
synchronous call would have returned, or a translated per-item error) and cancels it.

Each provider's client lives in its own module (`openai`, `anthropic`, `gemini`) and is
made by `batch_client(spec)`; it talks to the provider with the vendor's own SDK.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ..statuses import BatchStatus

if TYPE_CHECKING:
    from datetime import datetime

    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.runnables import Runnable

    from ..catalog import ModelSpec
    from ..exceptions import ModelAPIError
    from ..usage import Usage

__all__ = ["BatchClient", "BatchProgress", "BatchRequest", "ItemResult"]


@dataclass(frozen=True, slots=True)
class BatchRequest:
    """One line of a batch: frugalflow's item id (the provider's `custom_id` / key) and the
    request body `request_body` made."""

    custom_id: str
    body: dict[str, Any]


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """Where a provider batch stands.

    `status` is SUBMITTED while the provider works on it (validating, in progress,
    finalizing, cancelling), then ENDED (results readable, some items may have failed),
    FAILED (the whole batch was refused: `error` says why), EXPIRED (its completion window
    passed; results of the items it finished are still readable) or CANCELLED (likewise).
    """

    status: BatchStatus
    total: int = 0
    succeeded: int = 0
    failed: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class ItemResult:
    """One item's outcome: its answer (and what it was billed for), or its error.

    An item the provider did not answer because the batch expired or was cancelled has an
    error (an `ItemExpiredError` / `ItemCancelledError`) and no usage: it was not paid.
    """

    custom_id: str
    message: AIMessage | None = None
    usage: Usage | None = None
    error: ModelAPIError | None = field(default=None)


class BatchClient(Protocol):
    """A provider's batch API (see the module's documentation). Implementations are safe
    to share between tasks of one event loop; `aclose` releases their HTTP client."""

    provider: str

    def request_body(self, model: Runnable[Any, Any], messages: Sequence[BaseMessage],
                     stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The body of one batch line for this call: what the synchronous call with
        `model` (a built chat model, perhaps bound to tools) would send, as JSON."""
        ...

    async def submit(self, spec: ModelSpec, requests: Sequence[BatchRequest], *,
                     batch_id: str) -> str:
        """Send `requests` as one batch for `spec`'s model; the provider's batch id.
        `batch_id` (frugalflow's) goes into the batch's metadata or display name."""
        ...

    async def find(self, spec: ModelSpec, batch_id: str, *, since: datetime | None = None,
                   items: int | None = None) -> str | None:
        """The provider's id of a batch sent earlier with frugalflow's `batch_id`, or None
        when there is none (a process died between sending and recording it). `since`
        (when the batch was written down) and `items` (how many it holds) narrow the search
        where the provider keeps no metadata. Raises a `ModelAPIError` when it cannot tell
        yet (the caller asks again later rather than send the batch twice)."""
        ...

    async def progress(self, spec: ModelSpec, provider_batch_id: str) -> BatchProgress:
        ...

    async def results(self, spec: ModelSpec, provider_batch_id: str) -> list[ItemResult]:
        """Every item's outcome, once `progress` says the batch stopped."""
        ...

    async def cancel(self, spec: ModelSpec, provider_batch_id: str) -> None:
        """Ask the provider to stop the batch (items it already answered are still paid)."""
        ...

    async def aclose(self) -> None:
        ...
