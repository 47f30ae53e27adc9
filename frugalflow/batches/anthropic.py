"""Anthropic's Message Batches API spoken with the `anthropic` SDK: frugalflow's `BatchClient`
for catalog entries whose wire format is Anthropic's.

Lines are made by ChatAnthropic itself (`_get_request_payload`) and answers are read by it
(`_format_output`), so a batch answer is the `AIMessage` a synchronous call would return.

Anthropic batches carry no metadata, so each line's `custom_id` on the wire is frugalflow's
item id behind a tag derived from frugalflow's batch id (`wire_custom_id`, `item_id`):
`find` recognises a batch by that tag (see its documentation for what it can and cannot
promise). The emulator's `desk.paid` counts the wire ids: map them with `item_id`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import anthropic
from anthropic.types.beta import BetaMessage
from langchain_anthropic import ChatAnthropic
from langchain_core.language_models._utils import _update_message_content_to_blocks
from langchain_core.language_models.chat_models import _gen_info_and_msg_metadata
from langchain_core.messages import AIMessage
from langchain_core.runnables import RunnableBinding, RunnableSequence
from pydantic import BaseModel

from ..exceptions import (
    AuthenticationError,
    InvalidRequestError,
    ModelAPIError,
    UnansweredError,
)
from ..providers.base import error_from_status
from ..statuses import BatchStatus
from ..usage import Usage
from .wire import BatchProgress, BatchRequest, ItemResult

if TYPE_CHECKING:
    from anthropic.types.messages import MessageBatch, MessageBatchIndividualResponse
    from langchain_core.messages import BaseMessage
    from langchain_core.runnables import Runnable

    from ..catalog import ModelSpec

__all__ = ["AnthropicBatchClient", "client", "item_id", "wire_custom_id"]

_TAGGED = re.compile(r"f(?P<beta>[fb])(?P<hash>[0-9a-f]{10})-(?P<item>.+)")
"""A wire custom id: `ff` (or `fb`: a beta batch, read back as beta messages), a hash of
frugalflow's batch id, and the item id."""
_ITEM_ID = re.compile(r"[a-zA-Z0-9_-]{1,51}")
"""What an item id may be: Anthropic's custom id pattern, less the tag's 13 characters."""

# An errored line's `error.type` -> the HTTP status the same error has on a synchronous
# call, so it is classified exactly as the synchronous path classifies it.
_ERROR_STATUS = {
    "invalid_request_error": 400, "authentication_error": 401, "billing_error": 402,
    "permission_error": 403, "not_found_error": 404, "request_too_large": 413,
    "rate_limit_error": 429, "api_error": 500, "timeout_error": 504, "overloaded_error": 529,
}


def _hash(batch_id: str) -> str:
    return hashlib.blake2b(batch_id.encode(), digest_size=5).hexdigest()


def wire_custom_id(batch_id: str, item: str, *, beta: bool = False) -> str:
    """The `custom_id` an item of frugalflow's batch `batch_id` has at Anthropic."""
    return f"f{'b' if beta else 'f'}{_hash(batch_id)}-{item}"


def item_id(custom_id: str) -> str:
    """frugalflow's item id of a wire `custom_id` (itself when it carries no tag)."""
    m = _TAGGED.fullmatch(custom_id)
    return m["item"] if m else custom_id


def _json_default(value: object) -> object:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json", exclude_none=True)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _chat_model(model: Runnable[Any, Any], kwargs: dict[str, Any]) -> tuple[ChatAnthropic,
                                                                            dict[str, Any]]:
    """The ChatAnthropic under bindings (tools, output format), with every bound keyword
    merged as a call would merge them: outer bindings over inner, the call's over all."""
    merged = dict(kwargs)
    seen: Runnable[Any, Any] = model
    while True:
        if isinstance(seen, RunnableSequence):  # with_structured_output: model | parser
            seen = seen.first
        elif isinstance(seen, RunnableBinding):
            merged = {**seen.kwargs, **merged}
            seen = seen.bound
        else:
            break
    if not isinstance(seen, ChatAnthropic):
        raise TypeError(f"an Anthropic batch line needs a ChatAnthropic model, got "
                        f"{type(seen).__name__}")
    return seen, merged


class AnthropicBatchClient:
    """Anthropic's Message Batches through one `AsyncAnthropic` client (see the module)."""

    provider = "anthropic"
    lookback = timedelta(days=29)
    """How far back `find` looks without `since` (Anthropic keeps results 29 days)."""

    def __init__(self, spec: ModelSpec, *, max_retries: int = 2, timeout: float = 60.0) -> None:
        env = spec.adapter.key_env(spec)
        key = os.environ.get(env) if env else None
        if not key:
            raise AuthenticationError(
                f"{spec.key}: no API key for Anthropic's batch API: set {env or 'its key'}",
                provider=spec.provider, model=spec.model)
        self._key = key  # only to scrub it from error text the provider might echo
        self._client = anthropic.AsyncAnthropic(
            api_key=key, base_url=spec.adapter.base_url(spec), max_retries=max_retries,
            timeout=timeout)
        # Batches are created once: Anthropic takes no idempotency key, so a retry after a
        # reset or a timeout (the batch may exist) would make a second one, paid in full.
        # The poller's next tick is the retry, after `find` looked for the first one.
        self._once = self._client.with_options(max_retries=0)
        self._chats: dict[str, ChatAnthropic] = {}
        self._sent: dict[str, str] = {}
        """frugalflow batch id -> Anthropic's, for batches this process sent."""

    def __repr__(self) -> str:
        return f"AnthropicBatchClient(base_url={str(self._client.base_url)!r})"

    # -- lines -----------------------------------------------------------------------------

    def request_body(self, model: Runnable[Any, Any], messages: Sequence[BaseMessage],
                     stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The Messages API params the synchronous call would send (without `stream`)."""
        chat, merged = _chat_model(model, kwargs)
        merged.pop("ls_structured_output_format", None)  # tracing only: never sent
        merged.pop("stream", None)
        payload = chat._get_request_payload(list(messages), stop=stop, **merged)
        payload.pop("stream", None)
        body: dict[str, Any] = json.loads(json.dumps(payload, default=_json_default))
        return body

    # -- batches ---------------------------------------------------------------------------

    async def submit(self, spec: ModelSpec, requests: Sequence[BatchRequest], *,
                     batch_id: str) -> str:
        """Create the batch; each line's custom id is tagged with `batch_id` (see `find`).
        Lines that asked for beta features go through the beta endpoint with their betas."""
        lines: list[dict[str, Any]] = []
        betas: set[str] = set()
        for r in requests:
            if _ITEM_ID.fullmatch(r.custom_id) is None:
                raise InvalidRequestError(
                    f"{spec.key}: item id {r.custom_id[:80]!r} cannot be an Anthropic custom "
                    "id (1-51 letters, digits, '_' or '-')",
                    provider=spec.provider, model=spec.model)
            params = dict(r.body)
            betas.update(params.pop("betas", None) or ())
            lines.append({"custom_id": r.custom_id, "params": params})
        for one in lines:
            one["custom_id"] = wire_custom_id(batch_id, one["custom_id"], beta=bool(betas))
        try:
            if betas:
                made: Any = await self._once.beta.messages.batches.create(
                    requests=lines,  # type: ignore[arg-type]  # JSON bodies, not TypedDicts
                    betas=sorted(betas))
            else:
                made = await self._once.messages.batches.create(
                    requests=lines)  # type: ignore[arg-type]
        except Exception as e:
            raise self._error(e, spec, f"batch {batch_id} refused") from None
        provider_id = str(made.id)
        self._sent[batch_id] = provider_id
        return provider_id

    async def find(self, spec: ModelSpec, batch_id: str, *, since: datetime | None = None,
                   items: int | None = None) -> str | None:
        """Anthropic's id of the batch sent for frugalflow's `batch_id`, or None.

        What it can promise: a batch this process sent is known at once; a batch that has
        ended (results readable, up to 29 days) is recognised by the tag in its lines'
        custom ids. What it cannot: Anthropic shows no line of a batch still in progress,
        so such a batch cannot be told apart from another. When one created since `since`
        (the row's creation time; default: `lookback` ago), with `items` requests when
        given, is still in progress, `find` raises a `ModelAPIError` rather than answer
        None (which would send the items a second time): ask again once it has ended.
        None therefore means no batch of `batch_id` exists within the window looked at.
        """
        known = self._sent.get(batch_id)
        if known is not None:
            return known
        mine = _hash(batch_id)
        # A little slack: the row's clock and Anthropic's are not the same clock.
        horizon = (since - timedelta(minutes=10)) if since is not None \
            else datetime.now(UTC) - self.lookback
        if horizon.tzinfo is None:
            horizon = horizon.replace(tzinfo=UTC)
        unreadable: list[str] = []
        try:
            async for b in self._client.messages.batches.list(limit=100):
                if b.created_at < horizon:
                    break  # newest first: the rest are older still
                if b.processing_status != "ended":
                    total = sum(b.request_counts.model_dump().values())
                    if items is None or total == items:
                        unreadable.append(b.id)
                    continue
                first = _TAGGED.fullmatch(await self._first_custom_id(b) or "")
                if first is not None and first["hash"] == mine:
                    self._sent[batch_id] = b.id
                    return b.id
        except ModelAPIError:
            raise
        except Exception as e:
            raise self._error(e, spec, f"looking for batch {batch_id}") from None
        if unreadable:
            raise ModelAPIError(
                f"{spec.key}: cannot tell yet whether batch {batch_id} was sent: "
                f"{len(unreadable)} batch(es) created since are still in progress and "
                "Anthropic shows their lines only once they end; ask again later",
                provider=spec.provider, model=spec.model)
        return None

    async def _first_custom_id(self, b: MessageBatch) -> str | None:
        """The custom id of an ended batch's first result line (None: none readable)."""
        if not b.results_url:
            return None
        try:
            lines = await self._client.messages.batches.results(b.id)
        except anthropic.NotFoundError:  # archived or deleted
            return None
        try:
            async for line in lines:
                return line.custom_id
            return None
        finally:
            await lines.close()

    async def progress(self, spec: ModelSpec, provider_batch_id: str) -> BatchProgress:
        """in_progress and canceling: SUBMITTED; ended: CANCELLED when requests were
        cancelled, EXPIRED when requests expired, else ENDED."""
        try:
            b = await self._client.messages.batches.retrieve(provider_batch_id)
        except Exception as e:
            raise self._error(e, spec, f"batch {provider_batch_id}") from None
        c = b.request_counts
        total = c.processing + c.succeeded + c.errored + c.canceled + c.expired
        if b.processing_status != "ended":
            status = BatchStatus.SUBMITTED
        elif c.canceled:
            status = BatchStatus.CANCELLED
        elif c.expired:
            status = BatchStatus.EXPIRED
        else:
            status = BatchStatus.ENDED
        return BatchProgress(status, total=total, succeeded=c.succeeded, failed=c.errored)

    async def results(self, spec: ModelSpec, provider_batch_id: str) -> list[ItemResult]:
        """Each line's outcome (read as a stream): the AIMessage ChatAnthropic would return
        and its usage, or a frugalflow error (errored: by its type; canceled and expired:
        UnansweredError, not paid)."""
        received: list[MessageBatchIndividualResponse] = []
        try:
            lines = await self._client.messages.batches.results(provider_batch_id)
            try:
                async for line in lines:
                    received.append(line)
            finally:
                await lines.close()
        except Exception as e:
            raise self._error(e, spec, f"results of batch {provider_batch_id}") from None
        # Turning thousands of answers into AIMessages is CPU work: off the event loop.
        return await asyncio.to_thread(
            lambda: [self._item(spec, provider_batch_id, line) for line in received])

    async def cancel(self, spec: ModelSpec, provider_batch_id: str) -> None:
        try:
            await self._client.messages.batches.cancel(provider_batch_id)
        except Exception as e:
            raise self._error(e, spec, f"cancelling batch {provider_batch_id}") from None

    async def aclose(self) -> None:
        await self._client.close()

    # -- reading answers -------------------------------------------------------------------

    def _item(self, spec: ModelSpec, batch: str,
              line: MessageBatchIndividualResponse) -> ItemResult:
        cid = item_id(line.custom_id)
        result = line.result
        if result.type == "succeeded":
            sent: Any = result.message
            tagged = _TAGGED.fullmatch(line.custom_id)
            if tagged is not None and tagged["beta"] == "b":
                # The synchronous call went through the beta endpoint: read what was
                # received as the beta message it would have parsed.
                sent = BetaMessage.model_validate(sent.to_dict())
            message = self._message(spec, sent)
            return ItemResult(cid, message=message, usage=Usage.from_message(message))
        if result.type == "errored":
            err = result.error.error
            kind, said = str(err.type), self._scrub(str(getattr(err, "message", "")))
            status = _ERROR_STATUS.get(kind, 500)
            error = error_from_status(
                status, " ".join(f"{spec.key}: batch item {cid}: {kind}: {said}".split())[:300],
                body=self._scrub(json.dumps(result.error.model_dump(mode="json")))[:2000],
                provider=spec.provider, model=spec.model)
            return ItemResult(cid, error=error)
        word = "was cancelled" if result.type == "canceled" else "expired"
        return ItemResult(cid, error=UnansweredError(
            f"{spec.key}: batch {batch} {word} before answering item {cid} (not paid)",
            provider=spec.provider, model=spec.model))

    def _message(self, spec: ModelSpec, message: Any) -> AIMessage:
        """What ChatAnthropic's `ainvoke` returns for `message`: its own `_format_output`,
        then what langchain-core adds (v1 content blocks, llm_output in response_metadata)."""
        chat = self._chats.get(spec.key)
        if chat is None:
            built = spec.build()
            if not isinstance(built, ChatAnthropic):
                raise TypeError(f"{spec.key} is not built as ChatAnthropic")
            chat = self._chats[spec.key] = built
        result = chat._format_output(message)
        generation = result.generations[0]
        if chat.output_version == "v1":
            generation.message = _update_message_content_to_blocks(generation.message, "v1")
        generation.message.response_metadata = _gen_info_and_msg_metadata(generation)
        if result.llm_output is not None:
            generation.message.response_metadata = {
                **result.llm_output, **generation.message.response_metadata}
        answer = generation.message
        if not isinstance(answer, AIMessage):  # pragma: no cover - _format_output's type
            raise TypeError(f"ChatAnthropic gave a {type(answer).__name__}")
        return answer

    # -- errors ----------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "[redacted]") if self._key else text

    def _error(self, e: Exception, spec: ModelSpec, what: str) -> ModelAPIError:
        """One line, classified as the synchronous path classifies it, without the key."""
        err = spec.adapter.translate(e, spec)
        if isinstance(e, anthropic.APIStatusError):
            body: dict[str, Any] = e.body if isinstance(e.body, dict) else {}
            nested = body.get("error")
            inner: dict[str, Any] = nested if isinstance(nested, dict) else body
            detail = f"{inner.get('type', 'error')}: {inner.get('message', e.message)}"
            text = f"{spec.key}: {what}: HTTP {e.status_code} {detail}"
        else:
            text = f"{spec.key}: {what}: {str(err).removeprefix(spec.key + ': ')}"
        return type(err)(self._scrub(" ".join(text.split()))[:300], provider=spec.provider,
                         model=spec.model, status_code=err.status_code,
                         retry_after=err.retry_after,
                         body=self._scrub(err.body) if err.body else None)


def client(spec: ModelSpec) -> AnthropicBatchClient:
    """The batch client for an Anthropic catalog entry (its key and base URL)."""
    return AnthropicBatchClient(spec)
