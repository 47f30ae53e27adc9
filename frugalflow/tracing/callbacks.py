"""LangChain callbacks of routed calls: each attempt a child run of the routed call's run.

A routed call is one LangChain chat-model run (`ls_provider` "frugalflow", `ls_model_name`
"routed:<node>"). Its attempts run the provider models with no callbacks of their own
(`attempts.INNER_CONFIG`); `AttemptRuns` reports each one to the routed run's inheritable
handlers as a child chat-model run, so LangSmith, Langfuse or any tracer shows the fallback
chain as it happened:

* start (just before the request is sent): the provider model's serialized form and
  invocation parameters (secrets scrubbed), `ls_provider` (LangChain's own value for the
  vendor: openai, anthropic, google_genai, groq, deepseek, mistral, ollama...),
  `ls_model_name` (the provider's model id), `ls_model_type` "chat", `ls_temperature` and
  `ls_max_tokens` when known, and `frugalflow_*` metadata: catalog key, try number, route
  reason, fallback_from, call id, node, expected cost;
* end: `on_llm_end` with the answer (its `usage_metadata` carries the billed tokens and
  `total_cost`, LangSmith's field for a cost computed by the caller) and an `llm_output`
  with `token_usage`, `model_name` and `frugalflow` (cost_usd, usage_estimated, outcome);
* failure: `on_llm_error` with the translated error (`RateLimitError`,
  `ContentFilterError`...: a fresh exception of the same class, its message scrubbed, no
  traceback or cause, so no provider text or key travels), plus what a paid-for answer
  cost (a rejected answer was billed);
* a replayed answer (a resumed run; not paid again): a child run named "replay", with
  `frugalflow_replayed` and no usage, so no tool counts its tokens or cost twice.

Streamed tokens go to the routed call's run only (as before: each attempt's chunks under
their own message id), never to an attempt's run; attempt runs carry the `nostream` tag so
LangGraph's `messages` stream mode does not emit an attempt's answer a second time.
Nothing here runs when no handler listens: `attempt_runs` returns None, and no child
manager is built.

What each tool adds up: costs come from the attempts only (the routed run's provider,
"frugalflow", has no price), so a trace's cost is what the attempts cost, failed but paid
ones included. Tokens are on both: the routed run's output is the answer with its usage (as
every chat model's), and so is the answering attempt's; a tool summing tokens over every
chat-model run of a trace counts the answer's twice. Not covered: `ainvoke(stream=True)` and
the sync `stream()` (LangChain hands those no run manager): their attempts are not shown.
A streamed answer's routed run does not carry `response_metadata["frugalflow"]` (the
chunks were sent before the answer was accepted): its answering attempt's run names it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
    Callbacks,
)
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables import RunnableBinding, RunnableConfig, ensure_config

from ..exceptions import ModelAPIError

if TYPE_CHECKING:
    from ..attempts import CallAttempts, _Try
    from ..usage import Attempt

__all__ = [
    "ATTEMPT_TAG",
    "LS_PROVIDERS",
    "PARENT_KWARG",
    "AttemptRun",
    "AttemptRuns",
    "attempt_runs",
    "routed_ls_params",
    "stream_parent",
]

ATTEMPT_TAG = "frugalflow:attempt"
"""The tag of every attempt's run (with `nostream`, LangGraph's "not a streamed answer")."""
_TAGS = [ATTEMPT_TAG, "nostream"]

PARENT_KWARG = "_frugalflow_attempt_runs"
"""The keyword `RoutedChatModel.astream` hands `_astream` its attempts' parent with
(LangChain gives `_astream` no run manager); never sent to a provider nor traced."""

LS_PROVIDERS: Mapping[str, str] = {
    "openai": "openai", "anthropic": "anthropic", "google": "google_genai",
    "google_genai": "google_genai", "groq": "groq", "deepseek": "deepseek",
    "mistral": "mistral", "mistralai": "mistral", "together": "together",
    "fireworks": "fireworks", "xai": "xai", "ollama": "ollama",
}
"""Catalog provider -> the `ls_provider` LangChain's own integration for that vendor reports
(ChatGroq says "groq" even though frugalflow reaches Groq through ChatOpenAI). Others keep
what their class reports (a proxy speaking OpenAI's API: "openai")."""

AttemptRun = AsyncCallbackManagerForLLMRun | CallbackManagerForLLMRun
"""One attempt's run (sync when the routed call came from `invoke`)."""
_Parent = AsyncCallbackManager | CallbackManager


def routed_ls_params(node: str | None, stop: list[str] | None) -> LangSmithParams:
    """The routed call's own run: provider "frugalflow"; the model that answers is known
    only at the end (the output's `response_metadata["frugalflow"]["model"]`, and the
    answering attempt's run), so the name says which node's routed call this is."""
    params = LangSmithParams(ls_provider="frugalflow", ls_model_type="chat",
                             ls_model_name=f"routed:{node or 'model'}")
    if stop:
        params["ls_stop"] = stop
    if node:
        params["frugalflow_node"] = node  # type: ignore[typeddict-unknown-key]
    return params


def attempt_runs(run_manager: AsyncCallbackManagerForLLMRun | CallbackManagerForLLMRun | None
                 ) -> AttemptRuns | None:
    """The attempts' parent for the routed call's run, or None when no handler would hear
    a child run (nothing is built: no cost without handlers)."""
    if run_manager is None or not run_manager.inheritable_handlers:
        return None
    # As a parent run's `get_child` would (an LLM run's manager has none).
    parent: _Parent = (AsyncCallbackManager(handlers=[], parent_run_id=run_manager.run_id)
                       if isinstance(run_manager, AsyncCallbackManagerForLLMRun)
                       else CallbackManager(handlers=[], parent_run_id=run_manager.run_id))
    parent.set_handlers(run_manager.inheritable_handlers)
    parent.add_tags(run_manager.inheritable_tags)
    parent.add_metadata(run_manager.inheritable_metadata)
    return AttemptRuns(parent)


async def stream_parent(config: RunnableConfig | None, local: Callbacks, verbose: bool
                        ) -> tuple[RunnableConfig, AttemptRuns] | None:
    """For `astream`: the config to stream with (its callbacks configured once, a run id
    chosen) and the attempts' parent under that run id; None when no handler listens.

    LangChain's `astream` configures the same handlers again from this config (the same
    handler objects, so one tracer sees the routed run and its attempts).
    """
    config = ensure_config(config)
    manager = AsyncCallbackManager.configure(
        config.get("callbacks"), local, verbose, config.get("tags"), None,
        config.get("metadata"), None)
    if not manager.inheritable_handlers:
        return None
    from langchain_core.utils.uuid import uuid7

    run_id = config.get("run_id") or uuid7()
    child = AsyncCallbackManager(handlers=[], parent_run_id=run_id)
    child.set_handlers(manager.inheritable_handlers)
    child.add_tags(manager.inheritable_tags)
    child.add_metadata(manager.inheritable_metadata)
    streaming: RunnableConfig = {**config, "callbacks": manager, "run_id": run_id}
    return streaming, AttemptRuns(child)


class AttemptRuns:
    """The child runs of one routed call's attempts, under `parent` (a child manager of the
    routed call's run)."""

    __slots__ = ("parent",)

    def __init__(self, parent: _Parent) -> None:
        self.parent = parent

    async def start(self, call: CallAttempts, t: _Try) -> None:
        """The try of `t.spec` is about to be sent: open its run (kept on `t.traced`)."""
        from ..persistence.scrub import scrub

        spec = t.spec
        model = _chat_model(call.routed._bound(spec, call.ctx))
        kwargs = call.call_kwargs(t)
        ls: dict[str, Any] = {}
        serialized: dict[str, Any] = {"name": spec.key}
        params: dict[str, Any] = {"model": spec.model}
        if model is not None:
            # Each integration's own LangSmith params (temperature, max tokens...).
            ls = dict(model._get_ls_params(stop=call.stop, **kwargs))
            serialized = scrub(model._serialized)
            params = scrub(model._get_invocation_params(stop=call.stop, **kwargs))
        own = spec.provider if spec.simulated else ls.get("ls_provider") or spec.provider
        ls.update(ls_provider=LS_PROVIDERS.get(spec.provider, own),
                  ls_model_name=spec.model, ls_model_type="chat")
        if not call.stop:
            ls.pop("ls_stop", None)
        metadata = {
            **ls,
            "ls_integration": "langchain_chat_model",
            "frugalflow_model": spec.key,
            "frugalflow_node": call.node,
            "frugalflow_try": len(call.attempts) + 1,
            "frugalflow_call_id": call.call_id,
            "frugalflow_fallback_from": call.previous,
            "frugalflow_route_reason": call.reasons.get(spec.key),
            "frugalflow_expected_cost_usd": t.candidate.expected_cost,
        }
        metadata = {k: v for k, v in metadata.items() if v is not None}
        t.traced = await self._open(serialized, call.messages, spec.key, metadata,
                                    {"invocation_params": params,
                                     "options": {"stop": call.stop}})

    async def end(self, t: _Try, attempt: Attempt, message: AIMessage | None,
                  error: BaseException | None = None) -> None:
        """The try ended as `attempt` records it (with `error`: it failed)."""
        run, t.traced = t.traced, None
        if run is None:
            return
        result = _result(attempt, message, t.spec.model)
        if error is None:
            await _call(run.on_llm_end, result)
        else:
            await _call(run.on_llm_error, clean_error(error), response=result)

    async def dropped(self, t: _Try, error: BaseException | None) -> None:
        """The try ended without a verdict (cancelled, or an error that is not the model's)."""
        run, t.traced = t.traced, None
        if run is not None:
            import asyncio

            reason = error if error is not None else asyncio.CancelledError("cancelled")
            await _call(run.on_llm_error, clean_error(reason))

    async def replayed(self, call: CallAttempts, attempt: Attempt, message: AIMessage) -> None:
        """A resumed run's call that had its answer already: shown, not billed again."""
        metadata = {"ls_provider": "frugalflow", "ls_model_name": attempt.model,
                    "ls_model_type": "chat", "frugalflow_model": attempt.model,
                    "frugalflow_node": call.node, "frugalflow_replayed": True,
                    "frugalflow_call_key": attempt.call_key}
        run = await self._open({"name": "replay"}, call.messages, "replay", metadata, {})
        # No usage: the answer was paid for (and traced) by the run that got it.
        shown = message.model_copy(update={"usage_metadata": None})
        await _call(run.on_llm_end, LLMResult(
            generations=[[ChatGeneration(message=shown)]],
            llm_output={"frugalflow": {"model": attempt.model, "cost_usd": 0.0,
                                       "outcome": "replayed"}}))

    async def _open(self, serialized: dict[str, Any], messages: list[BaseMessage], name: str,
                    metadata: dict[str, Any], extra: dict[str, Any]) -> AttemptRun:
        parent = self.parent.copy()
        parent.add_tags(_TAGS, inherit=False)
        parent.add_metadata(metadata, inherit=False)
        from langchain_core.utils.uuid import uuid7

        runs = await _call(parent.on_chat_model_start, serialized, [messages],
                           run_id=uuid7(), name=name, batch_size=1, **extra)
        return cast("list[AttemptRun]", runs)[0]


def clean_error(error: BaseException) -> BaseException:
    """A copy of `error` safe to hand to tracers: same class (its name is what shows), the
    message scrubbed of secrets, no traceback, no cause (a provider's own exception may
    quote a request or a header)."""
    from ..persistence.scrub import scrub_text

    text = scrub_text(str(error))
    try:
        if isinstance(error, ModelAPIError):
            clean: BaseException = type(error)(text, provider=error.provider,
                                               model=error.model,
                                               status_code=error.status_code)
        else:
            clean = type(error)(text)
    except Exception:  # an exception class with its own constructor: its name still shows
        clean = RuntimeError(f"{type(error).__name__}: {text}")
    clean.__cause__ = clean.__context__ = None
    clean.__suppress_context__ = True
    return clean


def _chat_model(model: Any) -> BaseChatModel | None:
    """The chat model behind a candidate (bound tools are a RunnableBinding)."""
    if isinstance(model, RunnableBinding):
        model = model.bound
    return model if isinstance(model, BaseChatModel) else None


def _result(attempt: Attempt, message: AIMessage | None, model_id: str) -> LLMResult:
    """What the try's run ends with: its answer carrying the billed usage and cost."""
    usage, cost = attempt.usage, attempt.cost_usd
    summary: dict[str, Any] = {"model": attempt.model, "cost_usd": cost,
                               "usage_estimated": attempt.usage_estimated,
                               "outcome": str(attempt.outcome),
                               "latency_ms": round(attempt.latency_ms, 1)}
    if attempt.error_class is not None:
        summary.update(error_class=str(attempt.error_class), action=attempt.action)
    llm_output: dict[str, Any] = {"model_name": model_id, "frugalflow": summary}
    generations: list[list[ChatGeneration]] = [[]]
    if usage is not None:
        llm_output["token_usage"] = {"prompt_tokens": usage.input_tokens,
                                     "completion_tokens": usage.output_tokens,
                                     "total_tokens": usage.total_tokens}
    if message is not None:
        shown = message
        if usage is not None:
            # LangSmith reads a caller's cost from usage_metadata (`total_cost`); the user's
            # message is left as it is.
            meta = dict(message.usage_metadata or {
                "input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens,
                "total_tokens": usage.total_tokens})
            meta["total_cost"] = cost
            shown = message.model_copy(update={"usage_metadata": meta})
        generations = [[ChatGeneration(message=shown)]]
    return LLMResult(generations=generations, llm_output=llm_output)


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Call a callback manager's method, sync (from `invoke`) or async."""
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        return await result
    return result

