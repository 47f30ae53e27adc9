"""The candidate loop of a routed call, and the pieces each try is made of.

One try of one candidate: generate (or stream) under the policy's timeout, check the answer
(the adapter's end markers, the schema, the node's validator), bill it (reported or
estimated tokens) and record it as an `Attempt`.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig

from .exceptions import MalformedResponseError
from .needs import estimate_tokens
from .usage import Usage

if TYPE_CHECKING:
    from .catalog import ModelSpec
    from .routed import RoutedChatModel

__all__ = [
    "INNER_CONFIG",
    "ModelJudge",
    "billed",
    "generate_once",
    "iter_with_timeout",
    "new_call_id",
    "short_error",
]

INNER_CONFIG: RunnableConfig = {"callbacks": [], "tags": ["frugalflow:inner"]}
"""The config of a candidate's own call: the routed model is the run callbacks observe."""

# Call ids: a random per-process prefix and a counter (uuid4 costs a syscall per call).
_ID_PREFIX = uuid.uuid4().hex[:16]
_call_counter = itertools.count(1)


def new_call_id() -> str:
    """An id shared by every attempt of one routed call."""
    return f"{_ID_PREFIX}{next(_call_counter):08x}"


class ModelJudge(ABC):
    """A validator that is itself a model call (`Judge` registers here): it is given the
    routed model that asked, the model that answered, the prompt and the answer."""

    @abstractmethod
    async def check(self, routed: RoutedChatModel, spec: ModelSpec,
                    messages: Sequence[BaseMessage], subject: Any) -> bool | str:
        """True to accept; False or a reason to reject."""


async def generate_once(
    model: Runnable[Any, Any], messages: list[BaseMessage], stop: list[str] | None,
    kwargs: dict[str, Any],
) -> AIMessage:
    """One generation from a candidate model.

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
        message.response_metadata = {**(result.llm_output or {}),
                                     **(generation.generation_info or {}),
                                     **message.response_metadata}
        return message
    return await model.ainvoke(messages, config=INNER_CONFIG, stop=stop, **kwargs)  # type: ignore[no-any-return]


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
                 cache_write_tokens=reported.cache_write_tokens, requests=1), True


def short_error(error: BaseException, limit: int = 300) -> str:
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:limit]


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
