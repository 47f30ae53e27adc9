"""The simulated provider: offline chat models with realistic usage and scriptable faults.

`SimulatedChatModel` is a real LangChain chat model that never touches the network. It is
deterministic for a seed, answers tool calls and structured output with schema-valid
arguments, reports `usage_metadata`, sleeps a configurable latency, and fails on demand
through a `Simulator`: the n-th call, a fraction of calls, a provider down for a window.
The demo, the tests and the notebooks use it when no API keys are set; so can yours.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    HumanMessage,
    ToolMessage,
)
from langchain_core.messages.tool import tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import ConfigDict, Field

from ..exceptions import (
    ErrorSource,
    ContextLengthError,
    MalformedResponseError,
    ModelAPIError,
    ProviderConnectionError,
)
from ..providers.base import ProviderAdapter, error_from_status
from .fake_json import fake_json
from .oracles import FLOW_ORACLES, Oracle

if TYPE_CHECKING:
    from ..catalog import ModelSpec

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "SimulatedAdapter",
    "SimulatedChatModel",
    "Simulator",
    "oracle_success",
    "simulator",
]

# Fault kinds and the HTTP answer each imitates (None: not an HTTP answer).
FAULT_KINDS: dict[str, tuple[int | None, str]] = {
    "rate_limit": (429, "rate limit exceeded"),
    "overloaded": (529, "overloaded_error: the provider is overloaded"),
    "server_error": (500, "internal server error"),
    "unavailable": (503, "service unavailable"),
    "auth": (401, "invalid api key"),
    "context_length": (400, "context_length_exceeded: maximum context length exceeded"),
    "invalid_request": (400, "invalid_request_error: bad parameter"),
    "content_filter": (400, "content_filter: the prompt was flagged by the safety system"),
    "connection": (None, "connection reset by peer"),
    "timeout": (None, "the call hangs until the client gives up"),
    "malformed": (None, "the answer cannot be parsed"),
    "stream_cut": (None, "the stream breaks after some chunks"),
}


@dataclass
class Fault:
    """Fail calls to `target` (a provider like "sim-openai", or a model key) with `kind`.

    Which calls: `calls` (1-based call numbers to that target), `rate` (a seeded fraction),
    or a window `[start, end)` on the simulator's clock; with none of those, every call.
    `times` caps how many calls the fault hits.
    """

    target: str
    kind: str = "overloaded"
    calls: frozenset[int] | None = None
    rate: float = 0.0
    start: float | None = None
    end: float | None = None
    times: int | None = None
    retry_after: float | None = None
    after_chunks: int = 2
    hits: int = 0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(FAULT_KINDS)}")


class Simulator:
    """Fault plan, call counters and latency scale shared by simulated models."""

    def __init__(
        self, *, seed: int = 0, clock: Callable[[], float] = time.monotonic,
        oracles: Mapping[str, Oracle] | None = None,
    ) -> None:
        self.seed = seed
        self.clock = clock
        self.latency_scale = 0.0
        """Each model sleeps its catalog `latency_ms` times this (0: instant)."""
        self.faults: list[Fault] = []
        self.calls: Counter[str] = Counter()
        self.oracles: dict[str, Oracle] = dict(oracles or {})
        """Tool/schema name -> (right answer, difficulty 0..1) for the messages: simulated
        models answer that tool call correctly with a probability set by their quality."""
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def reset(self, *, seed: int | None = None) -> None:
        with self._lock:
            self.faults.clear()
            self.calls.clear()
            self.latency_scale = 0.0
            if seed is not None:
                self.seed = seed
            self._rng = random.Random(self.seed)

    def fail(
        self,
        target: str,
        kind: str = "overloaded",
        *,
        calls: Iterable[int] | None = None,
        rate: float = 0.0,
        times: int | None = None,
        retry_after: float | None = None,
        after_chunks: int = 2,
    ) -> Fault:
        """Script a fault; returns it so a test can inspect `hits`."""
        fault = Fault(
            target, kind, frozenset(calls) if calls is not None else None, rate,
            times=times, retry_after=retry_after, after_chunks=after_chunks,
        )
        with self._lock:
            self.faults.append(fault)
        return fault

    def down(
        self, target: str, *, seconds: float | None = None, kind: str = "unavailable"
    ) -> Fault:
        """`target` fails every call from now for `seconds` (None: until `clear`)."""
        now = self.clock()
        fault = Fault(target, kind, start=now, end=None if seconds is None else now + seconds)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear(self, target: str | None = None) -> None:
        with self._lock:
            self.faults = [f for f in self.faults if target is not None and f.target != target]

    def _next_fault(self, provider: str, key: str) -> tuple[Fault | None, int]:
        with self._lock:
            self.calls[provider] += 1
            self.calls[key] += 1
            now = self.clock()
            for f in self.faults:
                if f.target not in (provider, key):
                    continue
                n = self.calls[f.target]
                if f.times is not None and f.hits >= f.times:
                    continue
                if f.start is not None and not (f.start <= now and (f.end is None or now < f.end)):
                    continue
                if f.calls is not None and n not in f.calls:
                    continue
                if f.rate and self._rng.random() >= f.rate:
                    continue
                f.hits += 1
                return f, n
            return None, self.calls[key]


simulator = Simulator(oracles=FLOW_ORACLES)
"""The process-wide simulator that catalog-built simulated models (and the provider emulator)
use. It knows the ready-made flows' oracles (frugalflow.testing.oracles), so that they run
offline as written: the demo, `frugalflow run` without keys, the notebooks and the tests."""


def _error(kind: str, fault: Fault, provider: str, model: str) -> ModelAPIError:
    status, text = FAULT_KINDS[kind]
    where: ErrorSource = {"provider": provider, "model": model}
    if status is not None:
        body = json.dumps({"error": {"message": text, "type": kind}})
        return error_from_status(
            status, f"{provider}/{model}: HTTP {status}: {text}", body=body,
            retry_after=fault.retry_after, **where,
        )
    if kind == "connection":
        return ProviderConnectionError(f"{provider}/{model}: {text}", **where)
    return MalformedResponseError(f"{provider}/{model}: {text}", **where)


_WORDS = (
    "the request was reviewed and the relevant details are summarised below with a clear "
    "next step for the customer including account status billing history and timing"
).split()


def oracle_success(ability: float, difficulty: float) -> float:
    """P(a simulated model answers an oracle task right): an item-response curve.

    Success is likely while a model's ability (its mean quality score) is above the input's
    difficulty threshold ``0.45 + 0.4 * difficulty`` and falls steeply below it (slope 30):
    every model reads a tidy invoice, only strong ones a messy one. This is the shape of
    item response theory's two-parameter model; the constants are the simulation's own.
    """
    d = max(0.0, min(1.0, difficulty))
    return 1.0 / (1.0 + math.exp(-30.0 * (ability - (0.45 + 0.4 * d))))


JUDGE_MARK = "frugalflow_judge"
"""`Judge.MARK`: the key a judge request carries in `additional_kwargs` (spelt out here so
the test doubles do not import the routing stack; tests/test_simulated.py checks they agree)."""


def judge_request(messages: Sequence[BaseMessage]) -> tuple[str, str] | None:
    """(input, answer) of a judge request, recognised by `Judge`'s mark (never its wording)."""
    for m in messages:
        mark = m.additional_kwargs.get(JUDGE_MARK)
        if isinstance(mark, dict):
            return str(mark.get("input", "")), str(mark.get("answer", ""))
    return None


class SimulatedChatModel(BaseChatModel):
    """An offline chat model for demos and tests: deterministic, priced, fault-injectable.

    `responder`, if given, writes the answer (a string or an AIMessage) from the messages;
    otherwise the text is seeded filler sized by `output_tokens`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_name: str = "sim-model"
    provider: str = "sim"
    seed: int = 0
    latency: float = 0.0
    """Seconds per call (added to the simulator's scaled catalog latency)."""
    scaled_latency: float = 0.0
    """Seconds multiplied by the simulator's `latency_scale` (the catalog's latency_ms)."""
    output_tokens: int = 60
    accuracy: float = 1.0
    """How often answers from a simulator oracle are right (the catalog sets its quality)."""
    timeout: float | None = None
    """Like an SDK's read timeout: a hanging call raises TimeoutError after this long."""
    context_window: int | None = None
    responder: Callable[[list[BaseMessage]], str | AIMessage] | None = Field(
        default=None, exclude=True
    )
    simulator: Simulator | None = Field(default=None, exclude=True)
    bound_tools: list[dict[str, Any]] = Field(default_factory=list)
    tool_choice: Any = None

    @property
    def _llm_type(self) -> str:
        return "frugalflow-simulated"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "provider": self.provider}

    @property
    def key(self) -> str:
        return f"{self.provider}/{self.model_name}"

    def bind_tools(
        self, tools: Sequence[Any], *, tool_choice: Any = None, **kwargs: Any
    ) -> Runnable[LanguageModelInput, AIMessage]:
        return self.model_copy(
            update={
                "bound_tools": [convert_to_openai_tool(t) for t in tools],
                "tool_choice": tool_choice,
            }
        )

    # -- behaviour -------------------------------------------------------------------

    def _sim(self) -> Simulator:
        return self.simulator if self.simulator is not None else simulator

    def _rng(self, messages: Sequence[BaseMessage]) -> random.Random:
        digest = hashlib.sha256(
            f"{self.seed}|{self.key}|{[m.content for m in messages]}".encode()
        ).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def _input_tokens(self, messages: Sequence[BaseMessage]) -> int:
        from ..needs import estimate_tokens

        return estimate_tokens(messages) + sum(
            len(json.dumps(t)) // 4 for t in self.bound_tools
        )

    def _fault(self, messages: Sequence[BaseMessage]) -> Fault | None:
        n_in = self._input_tokens(messages)
        fault, _ = self._sim()._next_fault(self.provider, self.key)
        if fault is None and self.context_window is not None and n_in > self.context_window:
            raise ContextLengthError(
                f"{self.key}: {n_in} tokens exceed the context window of {self.context_window}",
                provider=self.provider, model=self.model_name, status_code=400,
            )
        return fault

    def _answer(self, messages: list[BaseMessage], malformed: bool = False,
                max_tokens: int | None = None) -> AIMessage:
        rng = self._rng(messages)
        if self.responder is not None and not self.bound_tools:
            out = self.responder(messages)
            msg = out if isinstance(out, AIMessage) else AIMessage(content=str(out))
        elif self.bound_tools and self._wants_tool(messages):
            tool = self._pick_tool()
            fn = tool["function"]
            if malformed:
                args: Any = {"__not_the_schema__": True}
            elif self.responder is not None:
                out = self.responder(messages)
                args = out if isinstance(out, dict) else fake_json(fn.get("parameters", {}), rng)
            elif fn["name"] in self._sim().oracles:
                args = self._oracle_answer(fn["name"], messages, rng)
            else:
                args = fake_json(fn.get("parameters", {}), rng)
            msg = AIMessage(
                content="",
                tool_calls=[{"name": fn["name"], "args": args,
                             "id": f"call_{rng.getrandbits(48):012x}", "type": "tool_call"}],
            )
        else:
            if self.responder is not None:
                out = self.responder(messages)
                msg = out if isinstance(out, AIMessage) else AIMessage(content=str(out))
            elif (judged := judge_request(messages)) is not None:
                msg = AIMessage(content=self._judge(*judged, rng))
            else:
                n = max(1, self.output_tokens * 3 // 4)
                words = [rng.choice(_WORDS) for _ in range(n)]
                msg = AIMessage(content=f"[{self.model_name}] " + " ".join(words) + ".")
        n_in = self._input_tokens(messages)
        n_out = max(1, (len(str(msg.content)) + len(json.dumps([c["args"] for c in msg.tool_calls]))) // 4)
        stopped = "stop"
        if max_tokens is not None and n_out > max_tokens:
            # As a provider does: the answer stops at the caller's max output (billed so).
            msg = AIMessage(content=str(msg.content)[: max_tokens * 4])
            n_out, stopped = max_tokens, "length"
        msg.usage_metadata = {
            "input_tokens": n_in, "output_tokens": n_out, "total_tokens": n_in + n_out,
        }
        msg.response_metadata = {"model_name": self.model_name, "model_provider": self.provider}
        if stopped != "stop":
            msg.response_metadata["finish_reason"] = stopped
        return msg

    def _judge(self, question: str, answer: str, rng: random.Random) -> str:
        """A `Judge` verdict on `answer` to `question`: right (by an oracle that knows the
        input) with probability `accuracy`, else the opposite; with no oracle for the input,
        APPROVE that often."""
        truth: bool | None = None
        try:
            given = json.loads(answer)
        except ValueError:
            given = None
        if isinstance(given, dict):
            for read in self._sim().oracles.values():
                right, _ = read([HumanMessage(question)])
                if right and set(right) <= set(given):
                    truth = all(given[k] == v for k, v in right.items())
                    break
        sound = rng.random() < self.accuracy  # a sound judgment this time
        approve = sound if truth is None else (truth if sound else not truth)
        return "APPROVE: it holds up." if approve else "REJECT: a field does not match the input."

    def _oracle_answer(
        self, name: str, messages: Sequence[BaseMessage], rng: random.Random
    ) -> dict[str, Any]:
        """The oracle's right answer with probability `p_right(accuracy, difficulty)`, else a
        copy with one field wrong: weaker models fail more, and more on hard inputs."""
        answer, difficulty = self._sim().oracles[name](list(messages))
        p_right = oracle_success(self.accuracy, difficulty)
        if rng.random() < p_right or not answer:
            return dict(answer)
        wrong = dict(answer)
        key = rng.choice(sorted(wrong))
        value = wrong[key]
        if isinstance(value, bool):
            wrong[key] = not value
        elif isinstance(value, (int, float)):
            wrong[key] = type(value)(value * 1.1 + 1)
        elif isinstance(value, str):
            wrong[key] = value[::-1] if len(value) > 1 else value + "?"
        else:
            wrong[key] = None
        return wrong

    def _wants_tool(self, messages: Sequence[BaseMessage]) -> bool:
        if self.tool_choice not in (None, "auto", "none"):
            return True
        if self.tool_choice == "none":
            return False
        # An agent loop: call a tool first, answer once a tool result is in.
        return not (messages and isinstance(messages[-1], ToolMessage))

    def _pick_tool(self) -> dict[str, Any]:
        choice = self.tool_choice
        if isinstance(choice, str) and choice not in ("any", "required", "auto"):
            for t in self.bound_tools:
                if t["function"]["name"] == choice:
                    return t
        if isinstance(choice, dict):
            name = choice.get("function", {}).get("name") or choice.get("name")
            for t in self.bound_tools:
                if t["function"]["name"] == name:
                    return t
        return self.bound_tools[0]

    def _seconds(self) -> float:
        return self.latency + self.scaled_latency * self._sim().latency_scale

    async def _delay(self) -> None:
        seconds = self._seconds()
        if seconds > 0:
            await asyncio.sleep(seconds)

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        fault = self._fault(messages)
        seconds = self._seconds()
        if seconds > 0:
            time.sleep(seconds)
        if fault is not None:
            if fault.kind == "timeout":
                if self.timeout is None:
                    raise TimeoutError(f"{self.key}: timed out (sync calls cannot hang here)")
                time.sleep(self.timeout)
                raise TimeoutError(f"{self.key}: no answer within {self.timeout} s")
            self._raise(fault)
        return ChatResult(generations=[ChatGeneration(
            message=self._answer(messages, max_tokens=kwargs.get("max_tokens")))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        fault = self._fault(messages)
        await self._delay()
        malformed = False
        if fault is not None:
            if fault.kind == "timeout":
                await self._hang()
            if fault.kind == "malformed" and self.bound_tools:
                malformed = True
            elif fault.kind != "stream_cut":
                self._raise(fault)
        return ChatResult(generations=[ChatGeneration(
            message=self._answer(messages, malformed, max_tokens=kwargs.get("max_tokens")))])

    async def _hang(self) -> None:
        """The provider never answers: give up after `timeout`, as an HTTP client would."""
        if self.timeout is None:
            await asyncio.Event().wait()  # until cancelled
        else:
            await asyncio.sleep(self.timeout)
        raise TimeoutError(f"{self.key}: no answer within {self.timeout} s")

    def _raise(self, fault: Fault) -> None:
        raise _error(fault.kind, fault, self.provider, self.model_name)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        result = self._generate(messages, stop, run_manager, **kwargs)
        yield from _chunks(cast(AIMessage, result.generations[0].message))  # _generate's own

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        fault = self._fault(messages)
        await self._delay()
        if fault is not None and fault.kind == "timeout":
            await self._hang()
        if fault is not None and fault.kind not in ("stream_cut", "malformed"):
            self._raise(fault)
        message = self._answer(messages, malformed=fault is not None and fault.kind == "malformed",
                               max_tokens=kwargs.get("max_tokens"))
        for i, chunk in enumerate(_chunks(message)):
            if fault is not None and fault.kind == "stream_cut" and i >= fault.after_chunks:
                raise ProviderConnectionError(
                    f"{self.key}: stream broken after {i} chunks",
                    provider=self.provider, model=self.model_name,
                )
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
            await asyncio.sleep(0)


def _chunks(message: AIMessage) -> Iterator[ChatGenerationChunk]:
    text = str(message.content)
    pieces = [text[i : i + 16] for i in range(0, len(text), 16)] or [""]
    for i, piece in enumerate(pieces):
        last = i == len(pieces) - 1
        yield ChatGenerationChunk(
            message=AIMessageChunk(
                content=piece,
                tool_call_chunks=[
                    tool_call_chunk(name=c["name"], args=json.dumps(c["args"]), id=c["id"], index=j)
                    for j, c in enumerate(message.tool_calls)
                ] if last else [],
                usage_metadata=message.usage_metadata if last else None,
                response_metadata=message.response_metadata if last else {},
                chunk_position="last" if last else None,
            )
        )


class SimulatedAdapter(ProviderAdapter):
    """Catalog entries with `simulated = true` or a provider named `sim-*`."""

    name = "simulated"
    timeout_param = "timeout"
    extra = ""
    package = "langchain_core"

    def installed(self) -> bool:
        return True

    def key_env(self, spec: ModelSpec) -> str | None:
        return None

    def build(self, spec: ModelSpec, *, timeout: float | None = None) -> BaseChatModel:
        kwargs = dict(spec.model_kwargs)
        # A catalog entry may state the simulation's accuracy (simulated.toml does), so that
        # simulated outcomes do not move with the scale of the routing prior's scores.
        kwargs.setdefault("accuracy", spec.mean_quality() if spec.quality else 1.0)
        model = SimulatedChatModel(
            model_name=spec.model,
            provider=spec.provider,
            context_window=spec.window,
            profile=self.profile(spec),
            scaled_latency=spec.latency_ms / 1000.0,
            timeout=timeout,
            **kwargs,
        )
        return model

    def profile(self, spec: ModelSpec) -> dict[str, Any] | None:
        caps = spec.capabilities
        return {
            "max_input_tokens": spec.context_window or 128_000,
            "max_output_tokens": spec.max_output_tokens or 8_192,
            "tool_calling": caps.get("tool_calling", True),
            "structured_output": caps.get("structured_output", True),
            "image_inputs": caps.get("vision", False),
            "reasoning_output": caps.get("reasoning", False),
        }

    def check(self, message: Any, spec: ModelSpec) -> None:
        """Simulated refusals are raised as errors (fault kind content_filter), never
        disguised as answers: nothing to inspect."""
