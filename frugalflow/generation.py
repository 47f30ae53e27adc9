"""One try's generation and its bill: the candidate called through its generation hook
(`generate_once`), a stream under a per-chunk timeout (`iter_with_timeout`), the tokens an
answer is billed for (`billed`), and the request of a call as replayable JSON
(`recorded_request`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig

from .exceptions import MalformedResponseError
from .needs import estimate_tokens, tool_schema
from .usage import Usage

if TYPE_CHECKING:
    from .routed import RoutedChatModel

__all__ = ["INNER_CONFIG", "billed", "generate_once", "iter_with_timeout", "recorded_request"]

INNER_CONFIG: RunnableConfig = {"callbacks": [], "tags": ["frugalflow:inner"]}
"""The config of a candidate's own call: the routed model is the run callbacks observe."""


def recorded_request(routed: RoutedChatModel, messages: Sequence[BaseMessage]) -> dict[str, Any]:
    """The request of a call as JSON, replayable to another model: messages (LangChain
    dicts), the bound tools (OpenAI tool dicts, the response schema's own tool apart) and
    the response schema (JSON schema), like `frugalflow.evaluation.cases.Request`."""
    from langchain_core.messages import messages_to_dict

    # A routed model's tools and schema never change (binding makes a copy, reused by
    # every call of the node): converted once per copy, not once per call.
    bound = routed._variants.get(_RECORDED)
    if bound is None:
        bound = routed._variants[_RECORDED] = _bound_json(routed)
    tools, json_schema = bound
    return {"messages": messages_to_dict(list(messages)), "tools": list(tools),
            "schema": json_schema}


_RECORDED = ("frugalflow:recorded-request",)  # the key of `_bound_json` in the variants


def _bound_json(routed: RoutedChatModel) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """The routed model's tools (but its response schema's own) and response schema."""
    from langchain_core.utils.function_calling import convert_to_json_schema

    schema = routed.response_schema
    json_schema: dict[str, Any] | None = None
    if schema is not None:
        try:
            json_schema = convert_to_json_schema(schema)
        except Exception:  # an odd schema must not fail the call it records
            json_schema = {"title": getattr(schema, "__name__", str(schema))}
    return [tool_schema(t) for t in routed.tools if t is not schema], json_schema


async def generate_once(
    model: Runnable[Any, Any], messages: list[BaseMessage], stop: list[str] | None,
    kwargs: dict[str, Any],
) -> tuple[AIMessage, ChatGeneration | None]:
    """One generation from a candidate model: its message, and the candidate's own
    `ChatGeneration` holding it (None when the call went through `ainvoke`).

    The routed model is the LangChain run that callbacks, tracing and streaming observe;
    the candidate is called through its generation hook (`_agenerate`, the method every
    chat model implements) rather than a second, nested `ainvoke` run. A model with a
    cache, a rate limiter or v1 output blocks goes through `ainvoke`, which applies them.
    """
    target, bound_kwargs = model, {}
    if isinstance(model, RunnableBinding) and isinstance(model.bound, BaseChatModel):
        target, bound_kwargs = model.bound, dict(model.kwargs)
    if (
        isinstance(target, BaseChatModel)
        and target.cache is None
        and target.rate_limiter is None
        and getattr(target, "output_version", None) != "v1"
    ):
        result = await target._agenerate(messages, stop=stop, **{**bound_kwargs, **kwargs})
        generation = result.generations[0]
        message = generation.message
        if not isinstance(message, AIMessage):  # pragma: no cover - defensive
            raise MalformedResponseError(f"{type(target).__name__} returned {type(message).__name__}")
        # As `ainvoke` does: the finish/stop reason (and more) that integrations keep in
        # generation_info or llm_output belongs to the message, where adapters check it.
        if result.llm_output or generation.generation_info:
            message.response_metadata = {**(result.llm_output or {}),
                                         **(generation.generation_info or {}),
                                         **message.response_metadata}
        if not isinstance(generation, ChatGeneration):  # pragma: no cover - defensive
            return message, None
        if generation.generation_info is not None:
            # The routed model's generation carries none (it is in the message now).
            generation.generation_info = None
        return message, generation
    message = await model.ainvoke(messages, config=INNER_CONFIG, stop=stop, **kwargs)
    return message, None


def billed(message: AIMessage | None, n_in: int, *, partial: bool) -> tuple[Usage | None, bool]:
    """The tokens an answer is billed for, and whether they are estimated.

    The provider's count when it sent one; for an answer without usage (or with all
    zeros) the estimate: `n_in` input tokens and the answer's own size in output tokens.
    A `partial` answer (cut short) may carry only the counts sent before its end (Gemini's
    prompt count, Anthropic's message_start): its output is at least what arrived.
    """
    if message is None:
        return None, False
    reported = Usage.from_message(message)
    if reported is not None and reported.total_tokens > 0 and not partial:
        return reported, False
    out = max(estimate_tokens([message]) - 4, 1)
    if reported is None or reported.total_tokens == 0:
        return Usage(input_tokens=n_in, output_tokens=out, requests=1), True
    if reported.output_tokens >= out and reported.input_tokens > 0:
        return reported, False
    return Usage(input_tokens=reported.input_tokens or n_in,
                 output_tokens=max(reported.output_tokens, out),
                 cache_read_tokens=reported.cache_read_tokens,
                 cache_write_tokens=reported.cache_write_tokens, requests=1,
                 reasoning_tokens=reported.reasoning_tokens), True


async def iter_with_timeout(it: AsyncIterator[Any], timeout: float | None) -> AsyncIterator[Any]:
    """Iterate with a per-chunk timeout: a stream that stalls counts as a timeout."""
    ait = it.__aiter__()
    try:
        while True:
            try:
                if timeout is None:
                    item = await ait.__anext__()
                else:
                    item = await asyncio.wait_for(ait.__anext__(), timeout)
            except StopAsyncIteration:
                return
            yield item
    finally:
        aclose = getattr(ait, "aclose", None)
        if aclose is not None:
            await aclose()
