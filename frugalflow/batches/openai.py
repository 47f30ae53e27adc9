"""OpenAI's Batch API (Files + Batches, `/v1/chat/completions` lines) as a `BatchClient`,
with the `openai` SDK; each line's body is made, and each answer read, by ChatOpenAI itself.

A batch is one uploaded JSONL file (one line per request: `custom_id`, `method`, `url`,
`body`) and one batch object whose metadata carries frugalflow's batch id (`find` lists
batches to look for it). Answers come back in two files: the output file (answered lines)
and the error file (lines answered with an HTTP error, and lines never answered because
the batch expired or was cancelled: `batch_expired` / `batch_cancelled`).
"""

from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

from ..exceptions import (
    AuthenticationError,
    ErrorSource,
    InvalidRequestError,
    MalformedResponseError,
    ModelAPIError,
    UnansweredError,
)
from ..providers.base import error_from_status
from ..providers.openai import OpenAIAdapter
from ..statuses import BatchStatus
from ..usage import Usage
from .wire import BatchProgress, BatchRequest, ItemResult

if TYPE_CHECKING:
    from langchain_core.messages import AIMessage, BaseMessage
    from langchain_core.runnables import Runnable
    from langchain_openai.chat_models.base import BaseChatOpenAI
    from openai import AsyncOpenAI
    from openai.types import Batch

    from ..catalog import ModelSpec

__all__ = ["METADATA_KEY", "OpenAIBatchClient", "client"]

METADATA_KEY: Final = "frugalflow_batch"
"""The batch metadata key holding frugalflow's batch id."""
ENDPOINT: Final = "/v1/chat/completions"

_STATUSES: Final = {
    "validating": BatchStatus.SUBMITTED, "in_progress": BatchStatus.SUBMITTED,
    "finalizing": BatchStatus.SUBMITTED, "cancelling": BatchStatus.SUBMITTED,
    "completed": BatchStatus.ENDED, "expired": BatchStatus.EXPIRED,
    "cancelled": BatchStatus.CANCELLED, "failed": BatchStatus.FAILED,
}
# Sent by the sync call's client, not part of a batch line's body (or not JSON at all).
_NOT_IN_BODY: Final = ("stream", "stream_options", "ls_structured_output_format")
_ADAPTER: Final = OpenAIAdapter()


def client(spec: ModelSpec) -> OpenAIBatchClient:
    """The batch client for an OpenAI-format catalog entry (its key from the environment)."""
    return OpenAIBatchClient(spec)


class OpenAIBatchClient:
    """OpenAI's Batch API through one `AsyncOpenAI` client (see the module's documentation)."""

    provider = "openai"

    page_size = 100
    """Batches per page when `find` lists them (OpenAI's maximum)."""

    def __init__(self, spec: ModelSpec, *, max_retries: int = 2,
                 timeout: float | None = 60.0) -> None:
        from openai import AsyncOpenAI

        env = _ADAPTER.key_env(spec)
        key = os.environ.get(env) if env else None
        if not key:
            raise AuthenticationError(
                f"{spec.key}: no API key for its batch API (set {env or 'its key variable'})",
                provider=spec.provider, model=spec.model)
        self._key = key
        self.base_url = _ADAPTER.base_url(spec)
        self._client: AsyncOpenAI = AsyncOpenAI(api_key=key, base_url=self.base_url,
                                                max_retries=max_retries, timeout=timeout)
        # The calls that create something are made once: OpenAI takes no idempotency key,
        # so a retry after a reset or a timeout (the provider may have created it) would
        # make a second batch, paid in full. The poller's next tick is the retry, after
        # `find` looked for the first one.
        self._once: AsyncOpenAI = self._client.with_options(max_retries=0)

    # -- requests ----------------------------------------------------------------------------

    def request_body(self, model: Runnable[Any, Any], messages: Sequence[BaseMessage],
                     stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        """What ChatOpenAI would send for this call (`_get_request_payload` on the bound
        model, its bound arguments such as tools merged), as the JSON of a batch line."""
        from langchain_core.runnables import RunnableBinding
        from langchain_openai.chat_models.base import BaseChatOpenAI

        target: Any = model
        bound: dict[str, Any] = {}
        while isinstance(target, RunnableBinding):  # bind_tools(...).bind(...): outer wins
            bound = {**target.kwargs, **bound}
            target = target.bound
        if not isinstance(target, BaseChatOpenAI):
            raise InvalidRequestError(
                f"OpenAI batches take requests of a ChatOpenAI model, not {type(target).__name__}",
                provider=self.provider)
        merged = {k: v for k, v in {**bound, **kwargs}.items() if k not in _NOT_IN_BODY}
        payload: dict[str, Any] = target._get_request_payload(list(messages), stop=stop,
                                                               **merged)
        where = ErrorSource(provider=self.provider, model=target.model_name)
        if target._use_responses_api(payload) or "input" in payload:
            raise InvalidRequestError(
                f"{target.model_name}: this call needs the Responses API; OpenAI batches "
                f"are sent to {ENDPOINT}", **where)
        for k in _NOT_IN_BODY:
            payload.pop(k, None)
        payload.update(payload.pop("extra_body", None) or {})  # the SDK merges it the same way
        if isinstance(payload.get("response_format"), type):
            from openai.lib._parsing._completions import type_to_response_format_param

            payload["response_format"] = type_to_response_format_param(payload["response_format"])
        try:
            return json.loads(json.dumps(payload))  # type: ignore[no-any-return]
        except (TypeError, ValueError) as e:
            raise InvalidRequestError(f"{target.model_name}: a request that is not JSON ({e})",
                                      **where) from None

    async def submit(self, spec: ModelSpec, requests: Sequence[BatchRequest], *,
                     batch_id: str) -> str:
        if not requests:
            raise ValueError("a batch needs at least one request")
        lines = [json.dumps({"custom_id": r.custom_id, "method": "POST", "url": ENDPOINT,
                             "body": r.body}, separators=(",", ":"), ensure_ascii=False)
                 for r in requests]
        data = ("\n".join(lines) + "\n").encode()
        try:
            uploaded = await self._once.files.create(
                file=(f"frugalflow-{batch_id}.jsonl", data, "application/jsonl"),
                purpose="batch")
            batch = await self._once.batches.create(
                input_file_id=uploaded.id, endpoint=ENDPOINT, completion_window="24h",
                metadata={METADATA_KEY: batch_id})
        except Exception as e:
            raise self._translate(e, spec) from None
        return batch.id

    async def find(self, spec: ModelSpec, batch_id: str, *, since: datetime | None = None,
                   items: int | None = None) -> str | None:
        """The newest batch whose metadata names `batch_id`. Every page is read: a batch
        sent long ago and not found would be sent (and paid) again."""
        try:
            async for b in self._client.batches.list(limit=self.page_size):
                if (b.metadata or {}).get(METADATA_KEY) == batch_id:
                    return b.id
        except Exception as e:
            raise self._translate(e, spec) from None
        return None

    async def progress(self, spec: ModelSpec, provider_batch_id: str) -> BatchProgress:
        b = await self._batch(spec, provider_batch_id)
        counts = b.request_counts
        error = None
        if b.status == "failed":
            error = _errors(b) or "the batch failed"
        return BatchProgress(_STATUSES.get(b.status, BatchStatus.SUBMITTED),
                             total=counts.total if counts else 0,
                             succeeded=counts.completed if counts else 0,
                             failed=counts.failed if counts else 0,
                             error=self._scrub(error) if error else None)

    async def results(self, spec: ModelSpec, provider_batch_id: str) -> list[ItemResult]:
        """Every item's outcome, in the input file's order: an answer, a translated error,
        or UnansweredError (expired, cancelled, failed batch, or absent from both files).
        RuntimeError while the batch still runs: its items are not unanswered yet (reading
        them as such would send them elsewhere and pay them twice)."""
        b = await self._batch(spec, provider_batch_id)
        if _STATUSES.get(b.status, BatchStatus.SUBMITTED) == BatchStatus.SUBMITTED:
            raise RuntimeError(f"batch {provider_batch_id} has not stopped ({b.status})")
        texts = await asyncio.gather(*(self._text(spec, f) for f in
                                       (b.input_file_id, b.output_file_id, b.error_file_id)))
        # Parsing thousands of answers is CPU work: off the event loop.
        return await asyncio.to_thread(self._read, spec, b.status, *texts)

    async def cancel(self, spec: ModelSpec, provider_batch_id: str) -> None:
        import openai

        try:
            await self._client.batches.cancel(provider_batch_id)
        except (openai.ConflictError, openai.BadRequestError) as e:
            # Already stopped (completed, failed, expired, cancelled): nothing to cancel.
            b = await self._batch(spec, provider_batch_id)
            if b.status not in ("completed", "failed", "expired", "cancelled", "cancelling"):
                raise self._translate(e, spec) from None
        except Exception as e:
            raise self._translate(e, spec) from None

    async def aclose(self) -> None:
        await self._client.close()

    # -- helpers -----------------------------------------------------------------------------

    async def _batch(self, spec: ModelSpec, provider_batch_id: str) -> Batch:
        try:
            return await self._client.batches.retrieve(provider_batch_id)
        except Exception as e:
            raise self._translate(e, spec) from None

    async def _text(self, spec: ModelSpec, file_id: str | None) -> str:
        if not file_id:
            return ""
        try:
            return (await self._client.files.content(file_id)).text
        except Exception as e:
            raise self._translate(e, spec) from None

    def _read(self, spec: ModelSpec, status: str, inputs: str, output: str,
              errors: str) -> list[ItemResult]:
        where = ErrorSource(provider=spec.provider, model=spec.model)
        shell = _chat_model(spec)
        asked = {str(line.get("custom_id", "")): line.get("body") for line in _lines(inputs)}
        outcomes: dict[str, ItemResult] = {}
        for text in (output, errors):
            for line in _lines(text):
                cid = str(line.get("custom_id", ""))
                outcomes[cid] = self._item(spec, shell, cid, line, asked.get(cid), where)
        order = list(asked)
        for cid in outcomes:
            if cid not in order:
                order.append(cid)
        why = {"expired": "its batch expired", "cancelled": "its batch was cancelled",
               "failed": "its batch failed"}.get(status, "its batch ended")
        return [outcomes.get(cid) or ItemResult(cid, error=UnansweredError(
                    f"{spec.key}: not answered ({why}; absent from its results)", **where))
                for cid in order]

    def _item(self, spec: ModelSpec, shell: BaseChatOpenAI, cid: str, line: dict[str, Any],
              request: object, where: ErrorSource) -> ItemResult:
        response = line.get("response") or {}
        status = response.get("status_code")
        body = response.get("body")
        if not isinstance(status, int) or status == 0:
            error = line.get("error") or {}
            code = str(error.get("code") or "unanswered")
            said = self._scrub(str(error.get("message") or "not answered"))
            return ItemResult(cid, error=UnansweredError(
                f"{spec.key}: not answered ({code}: {said})", **where))
        if status != 200:
            return ItemResult(cid, error=self._item_error(spec, status, body))
        if not isinstance(body, dict):
            return ItemResult(cid, error=MalformedResponseError(
                f"{spec.key}: a batch answer without a body", **where))
        try:
            message = _message(shell, body, request if isinstance(request, dict) else {})
        except Exception as e:
            return ItemResult(cid, error=self._translate(e, spec))
        return ItemResult(cid, message=message, usage=Usage.from_message(message))

    def _item_error(self, spec: ModelSpec, status: int, body: object) -> ModelAPIError:
        """An item answered with an HTTP error, classified as the synchronous call's would
        be (`error_from_status`, the adapter's rule)."""
        error = body.get("error") if isinstance(body, dict) else None
        text = str(error.get("message") if isinstance(error, dict) else body)[:300]
        raw = self._scrub(json.dumps(body)[:2000]) if body is not None else None
        return error_from_status(status, f"{spec.key}: HTTP {status}: {self._scrub(text)}",
                                 body=raw, provider=spec.provider, model=spec.model)

    def _translate(self, error: BaseException, spec: ModelSpec) -> ModelAPIError:
        out = _ADAPTER.translate(error, spec)
        if self._key in out.message or (out.body and self._key in out.body):
            clean = type(out)(self._scrub(out.message), provider=out.provider, model=out.model,
                              status_code=out.status_code, retry_after=out.retry_after,
                              body=self._scrub(out.body) if out.body else None)
            return clean
        return out

    def _scrub(self, text: str) -> str:
        return text.replace(self._key, "***") if self._key else text


def _chat_model(spec: ModelSpec) -> BaseChatOpenAI:
    """A ChatOpenAI (the entry's own class) holding no HTTP client: only its answer
    parsing is used."""
    from langchain_openai import ChatOpenAI
    from langchain_openai.chat_models.base import BaseChatOpenAI

    cls: type[BaseChatOpenAI] = ChatOpenAI
    try:
        own = _ADAPTER.model_class(spec)
        if isinstance(own, type) and issubclass(own, BaseChatOpenAI):
            cls = own
    except Exception:  # an integration that is not installed: ChatOpenAI reads the same JSON
        pass
    return cls.model_construct(model_name=spec.model)


def _message(shell: BaseChatOpenAI, body: dict[str, Any], request: dict[str, Any]) -> AIMessage:
    """The AIMessage ChatOpenAI returns for this response body, as the synchronous call
    gets it: the SDK's typed completion (parsed, as `.parse` does, when the request asked
    for a response format; a JSON schema's answer parsed to JSON), ChatOpenAI's
    `_create_chat_result`, then its output and
    generation info in the message's response_metadata (as `ainvoke` puts them)."""
    from langchain_core.messages import AIMessage
    from openai.types.chat import ChatCompletion

    completion: Any = ChatCompletion.construct(**body)
    if "response_format" in request:
        from openai.lib._parsing._completions import parse_chat_completion

        completion = parse_chat_completion(response_format=request["response_format"],
                                           input_tools=request.get("tools") or [],
                                           chat_completion=completion)
    result = shell._create_chat_result(completion, {})
    generation = result.generations[0]
    message = generation.message
    if not isinstance(message, AIMessage):
        raise MalformedResponseError(f"a batch answer read as {type(message).__name__}")
    fmt = request.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema" \
            and message.additional_kwargs.get("parsed") is None \
            and isinstance(message.content, str) and message.content:
        # The synchronous call parses into the Pydantic class it was given; a batch line
        # carries only its JSON schema, so the answer is parsed to JSON (ChatOpenAI's
        # structured-output parser builds the class from it).
        try:
            message.additional_kwargs["parsed"] = json.loads(message.content)
        except ValueError:
            pass
    message.response_metadata = {**(result.llm_output or {}),
                                 **(generation.generation_info or {}),
                                 **message.response_metadata}
    return message


def _lines(text: str) -> list[dict[str, Any]]:
    out = []
    for raw in text.splitlines():
        if raw.strip():
            try:
                item = json.loads(raw)
            except ValueError:
                continue  # a broken line: its item is reported unanswered
            if isinstance(item, dict):
                out.append(item)
    return out


def _errors(b: Batch) -> str:
    """The batch's errors on one line."""
    data = b.errors.data if b.errors and b.errors.data else []
    parts = []
    for e in data:
        where = f"line {e.line}: " if e.line is not None else ""
        parts.append(f"{where}{e.code or 'error'}: {e.message or ''}".strip())
    return "; ".join(parts).replace("\n", " ").replace("\r", " ")
