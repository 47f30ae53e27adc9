"""Gemini batch mode (batchGenerateContent, inlined requests) through google-genai's async
client, each line and answer made and read by langchain-google-genai itself.

`request_body` is the GenerateContent request ChatGoogleGenerativeAI would POST for the
call (its `_prepare_request`, turned into REST JSON by the SDK's own converter), so a
batched call asks exactly what the synchronous one would. `submit` sends the lines as one
batch named by frugalflow's batch id (its display name), each line's item id in its
`metadata.key`; `results` reads each inlined answer through the integration's own
response conversion, so content, tool calls, usage and response metadata are what the
synchronous call returns.

Gemini reports no entry for a request it never answered (the batch expired or was
cancelled first): this client knows the item ids of the batches it sent and reports those
as `UnansweredError`; after a restart, an item missing from `results` is unanswered too.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..exceptions import (
    AuthenticationError,
    InvalidRequestError,
    MalformedResponseError,
    ModelAPIError,
    UnansweredError,
)
from ..statuses import BatchStatus
from ..usage import Usage
from .wire import BatchProgress, BatchRequest, ItemResult

if TYPE_CHECKING:
    from google.genai import types
    from google.genai._api_client import BaseApiClient
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.runnables import Runnable

    from ..catalog import ModelSpec

__all__ = ["GeminiBatchClient", "client"]

# google.rpc.Code -> the HTTP status the synchronous call would have answered with.
_GRPC_HTTP = {1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400,
              10: 409, 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}

# Request fields the REST body keeps beside generationConfig that GenerateContentConfig
# holds flat (the SDK moves them out again when it sends the batch).
_BESIDE_CONFIG = ("systemInstruction", "tools", "toolConfig", "safetySettings",
                  "cachedContent", "labels", "serviceTier", "store", "continuationToken")

_RUNNING = {"JOB_STATE_UNSPECIFIED", "JOB_STATE_QUEUED", "JOB_STATE_PENDING",
            "JOB_STATE_RUNNING", "JOB_STATE_CANCELLING", "JOB_STATE_PAUSED",
            "JOB_STATE_UPDATING"}
_STOPPED = {"JOB_STATE_SUCCEEDED": BatchStatus.ENDED,
            "JOB_STATE_PARTIALLY_SUCCEEDED": BatchStatus.ENDED,
            "JOB_STATE_FAILED": BatchStatus.FAILED,
            "JOB_STATE_EXPIRED": BatchStatus.EXPIRED,
            "JOB_STATE_CANCELLED": BatchStatus.CANCELLED}

_TIMEOUT_MS = 60_000


def client(spec: ModelSpec) -> GeminiBatchClient:
    """The batch client for `spec`'s endpoint and key."""
    return GeminiBatchClient(spec)


class GeminiBatchClient:
    """Gemini batch mode for one endpoint and key (see the module's documentation)."""

    provider = "google"

    def __init__(self, spec: ModelSpec) -> None:
        from google import genai
        from google.genai import types

        from ..providers import adapter_for

        self._adapter = adapter_for(spec)
        env = self._adapter.key_env(spec) or "GOOGLE_API_KEY"
        key = os.environ.get(env)
        if not key:
            raise AuthenticationError(f"{spec.key}: no API key in ${env}",
                                      provider=spec.provider, model=spec.model)
        self._key = key
        # One attempt: the batch poller retries on its own schedule, and an error must
        # surface at once (the SDK's default retries would hide it for seconds).
        options = types.HttpOptions(base_url=spec.base_url, timeout=_TIMEOUT_MS,
                                    retry_options=types.HttpRetryOptions(attempts=1))
        self._client = genai.Client(api_key=key, http_options=options)
        self._items: dict[str, list[str]] = {}
        """Item ids, in order, of the batches this client sent (provider id -> ids)."""

    # -- one line ----------------------------------------------------------------------------

    def request_body(self, model: Runnable[Any, Any], messages: Sequence[BaseMessage],
                     stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        from google.genai import _common
        from google.genai import models as genai_models
        from google.genai import types
        from langchain_core.runnables import RunnableBinding
        from langchain_google_genai import ChatGoogleGenerativeAI

        target: Runnable[Any, Any] = model
        merged: dict[str, Any] = {}
        while isinstance(target, RunnableBinding):  # bind_tools / bind(...): its kwargs
            merged = {**target.kwargs, **merged}
            target = target.bound
        if not isinstance(target, ChatGoogleGenerativeAI):
            raise InvalidRequestError(
                f"the Gemini batch API takes ChatGoogleGenerativeAI calls, not "
                f"{type(target).__name__}", provider=self.provider)
        merged = {**merged, **kwargs}
        # Tracing-only keys ainvoke drops before the integration sees them.
        merged.pop("ls_structured_output_format", None)
        # As `_agenerate` does: the model's own cached content unless the call names one.
        merged["cached_content"] = merged.get("cached_content") or target.cached_content
        prepared = target._prepare_request(list(messages), stop=stop, **merged)
        params = types._GenerateContentParameters(**prepared)
        body = genai_models._GenerateContentParameters_to_mldev(self._api, params)
        body = _common.encode_unserializable_types(_common.convert_to_dict(body))
        body.pop("_url", None)
        body.pop("_query", None)
        return dict(body)

    @property
    def _api(self) -> BaseApiClient:
        return self._client._api_client

    def _inlined(self, spec: ModelSpec, request: BatchRequest) -> types.InlinedRequest:
        """One REST request body as the SDK's inlined request (it sends it back as REST)."""
        from google.genai import types

        body = request.body
        config = dict(body.get("generationConfig") or {})
        for name in _BESIDE_CONFIG:
            if name in body:
                config[name] = body[name]
        return types.InlinedRequest(
            model=spec.model,
            contents=[types.Content.model_validate(c) for c in body.get("contents") or []],
            config=types.GenerateContentConfig.model_validate(config) if config else None,
            metadata={"key": request.custom_id})

    # -- batches ---------------------------------------------------------------------------

    async def submit(self, spec: ModelSpec, requests: Sequence[BatchRequest], *,
                     batch_id: str) -> str:
        from google.genai import types

        try:
            src: list[types.InlinedRequest] = [self._inlined(spec, r) for r in requests]
        except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
            raise InvalidRequestError(
                f"{spec.key}: a batch line is not a GenerateContent request: "
                f"{self._scrub(str(e).splitlines()[0])}",
                provider=spec.provider, model=spec.model) from None
        try:
            job = await self._client.aio.batches.create(
                model=spec.model, src=src,
                config=types.CreateBatchJobConfig(display_name=batch_id))
        except Exception as e:
            raise self._error(e, spec) from None
        if not job.name:
            raise MalformedResponseError(f"{spec.key}: the batch came back without a name",
                                         provider=spec.provider, model=spec.model)
        self._items[job.name] = [r.custom_id for r in requests]
        return job.name

    async def find(self, spec: ModelSpec, batch_id: str, *, since: datetime | None = None,
                   items: int | None = None) -> str | None:
        try:
            async for job in await self._client.aio.batches.list(config={"page_size": 100}):
                if job.display_name == batch_id and job.name:
                    return job.name
        except Exception as e:
            raise self._error(e, spec) from None
        return None

    async def _job(self, spec: ModelSpec, name: str) -> types.BatchJob:
        try:
            return await self._client.aio.batches.get(name=name)
        except Exception as e:
            raise self._error(e, spec) from None

    async def progress(self, spec: ModelSpec, provider_batch_id: str) -> BatchProgress:
        job = await self._job(spec, provider_batch_id)
        state = _state(job)
        answers = list(job.dest.inlined_responses or []) if job.dest else []
        failed = sum(1 for a in answers if a.error is not None)
        total = len(self._items.get(provider_batch_id) or answers)
        if state in _RUNNING:
            return BatchProgress(BatchStatus.SUBMITTED, total, len(answers) - failed, failed)
        status = _STOPPED.get(state)
        if status is None:
            raise MalformedResponseError(f"{spec.key}: batch {provider_batch_id} is in an "
                                         f"unknown state {state}", provider=spec.provider,
                                         model=spec.model)
        error = None
        if status is BatchStatus.FAILED:
            why = job.error.message if job.error is not None and job.error.message else ""
            error = self._scrub(" ".join(
                f"Gemini batch {provider_batch_id} failed{': ' + why if why else ''}".split()))
        return BatchProgress(status, total, len(answers) - failed, failed, error)

    async def results(self, spec: ModelSpec, provider_batch_id: str) -> list[ItemResult]:
        job = await self._job(spec, provider_batch_id)
        # Turning thousands of answers into AIMessages is CPU work: off the event loop.
        return await asyncio.to_thread(self._read, spec, provider_batch_id, job)

    def _read(self, spec: ModelSpec, provider_batch_id: str,
              job: types.BatchJob) -> list[ItemResult]:
        """Each item's outcome from the ended (or still running) `job`."""
        state = _state(job)
        answers = list(job.dest.inlined_responses or []) if job.dest else []
        known = self._items.get(provider_batch_id, [])
        out: list[ItemResult] = []
        seen: set[str] = set()
        for i, answer in enumerate(answers):
            key = (answer.metadata or {}).get("key")
            if key is None and i < len(known):  # no metadata echoed: request order
                key = known[i]
            if key is None:
                continue
            seen.add(key)
            if answer.error is not None:
                out.append(ItemResult(key, error=self._item_error(spec, answer.error)))
            elif answer.response is not None:
                message = _message(answer.response)
                out.append(ItemResult(key, message=message, usage=Usage.from_message(message)))
            else:
                out.append(ItemResult(key, error=MalformedResponseError(
                    f"{spec.key}: batch item {key} has neither an answer nor an error",
                    provider=spec.provider, model=spec.model)))
        if state in _RUNNING:  # asked too early: nothing is unanswered yet
            return out
        why = {"JOB_STATE_EXPIRED": "expired", "JOB_STATE_CANCELLED": "was cancelled",
               "JOB_STATE_FAILED": "failed"}.get(state, "ended")
        for key in known:
            if key not in seen:
                out.append(ItemResult(key, error=UnansweredError(
                    f"{spec.key}: batch {provider_batch_id} {why} before answering item "
                    f"{key}", provider=spec.provider, model=spec.model)))
        return out

    async def cancel(self, spec: ModelSpec, provider_batch_id: str) -> None:
        try:
            await self._client.aio.batches.cancel(name=provider_batch_id)
        except Exception as e:
            raise self._error(e, spec) from None

    async def aclose(self) -> None:
        await self._client.aio.aclose()
        self._client.close()

    # -- errors ----------------------------------------------------------------------------

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text

    def _error(self, error: BaseException, spec: ModelSpec) -> ModelAPIError:
        from ..providers.base import translate_error

        e = translate_error(error, spec, self._adapter.read_error)
        e.message = self._scrub(e.message)
        e.args = (e.message,)
        if e.body is not None:
            e.body = self._scrub(e.body)
        return e

    def _item_error(self, spec: ModelSpec, error: types.JobError) -> ModelAPIError:
        """A batch item's google.rpc.Status as the error the synchronous call raises."""
        from ..providers.base import error_from_status

        code = int(error.code or 2)
        status = code if code >= 100 else _GRPC_HTTP.get(code, 500)
        text = " ".join(self._scrub(error.message or f"error {code}").split())[:300]
        body = self._scrub(json.dumps(error.model_dump(mode="json", exclude_none=True)))
        return error_from_status(status, f"{spec.key}: HTTP {status}: {text}", body=body,
                                 provider=spec.provider, model=spec.model)


def _state(job: types.BatchJob) -> str:
    state = job.state
    return str(getattr(state, "value", state) or "JOB_STATE_UNSPECIFIED")


def _message(response: types.GenerateContentResponse) -> AIMessage:
    """The AIMessage ChatGoogleGenerativeAI returns for `response` (as frugalflow's
    synchronous call reads it: generation info in the response metadata)."""
    from langchain_core.messages import AIMessage
    from langchain_google_genai.chat_models import _response_to_result

    result = _response_to_result(response)
    generation = result.generations[0]
    message = generation.message
    if not isinstance(message, AIMessage):  # pragma: no cover - defensive
        raise MalformedResponseError(f"Gemini answered a {type(message).__name__}")
    if result.llm_output or generation.generation_info:
        message.response_metadata = {**(result.llm_output or {}),
                                     **(generation.generation_info or {}),
                                     **message.response_metadata}
    return message
