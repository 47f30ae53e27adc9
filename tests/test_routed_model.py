"""The routed chat model: fallback order, failure classes, budgets, tools, structured output."""

from __future__ import annotations

from typing import Any, Literal

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from pydantic import BaseModel

from frugalflow import (
    AllModelsFailedError,
    BudgetExceededError,
    Catalog,
    FallbackPolicy,
    InvalidRequestError,
    ModelSpec,
    Needs,
    NoCapableModelError,
    ProviderConnectionError,
    RoutedChatModel,
)
from frugalflow.resilience import BreakerState


def spec(provider: str, model: str, price: float, window: int = 100_000, **kw: Any) -> ModelSpec:
    return ModelSpec(
        provider=provider, model=model, simulated=True, input_price=price, output_price=price,
        context_window=window, capabilities={"tool_calling": True, "structured_output": True},
        quality={"writing": 0.8, "classification": 0.8}, **kw,
    )


@pytest.fixture
def cat() -> Catalog:
    return Catalog(
        [
            spec("sim-a", "small", 0.1, window=2_000),
            spec("sim-a", "medium", 0.5),
            spec("sim-b", "medium", 1.0),
            spec("sim-c", "large", 5.0, window=1_000_000),
        ],
        name="test",
    )


@pytest.fixture
def routed(cat: Catalog, make_ctx: Any) -> Any:
    def make(needs: Needs | None = None, **ctx_kw: Any) -> RoutedChatModel:
        return RoutedChatModel(needs=needs or Needs(), node="n", context=make_ctx(cat=cat, **ctx_kw))

    return make


HI = [HumanMessage("hello there")]


async def test_cheapest_capable_model_answers(routed: Any) -> None:
    model = routed()
    answer = await model.ainvoke(HI)
    assert model.last_model == "sim-a/small"
    assert answer.response_metadata["frugalflow"]["model"] == "sim-a/small"
    (attempt,) = model.context.usage.attempts
    assert attempt.outcome == "ok" and attempt.cost_usd > 0
    assert attempt.usage.input_tokens == answer.usage_metadata["input_tokens"]
    assert attempt.cost_usd == pytest.approx(
        (attempt.usage.input_tokens * 0.1 + attempt.usage.output_tokens * 0.1) / 1e6)


async def test_overloaded_retries_then_moves_to_next(routed: Any, sim: Any, clock: Any) -> None:
    sim.fail("sim-a/small", "overloaded")
    model = routed()
    await model.ainvoke(HI)
    tried = [(a.model, a.outcome, a.action) for a in model.context.usage.attempts]
    assert tried == [
        ("sim-a/small", "error", "retry"),
        ("sim-a/small", "error", "next"),
        ("sim-a/medium", "ok", None),
    ]
    assert len(clock.sleeps) == 1 and 0.125 <= clock.sleeps[0] <= 0.25
    assert model.context.usage.attempts[-1].fallback_from == "sim-a/small"


async def test_rate_limit_honours_retry_after(routed: Any, sim: Any, clock: Any) -> None:
    sim.fail("sim-a/small", "rate_limit", calls=[1], retry_after=2.0)
    model = routed()
    await model.ainvoke(HI)
    assert clock.sleeps == [2.0]
    assert model.last_model == "sim-a/small"


async def test_rate_limit_beyond_cap_moves_on_at_once(routed: Any, sim: Any, clock: Any) -> None:
    sim.fail("sim-a/small", "rate_limit", calls=[1], retry_after=120.0)
    model = routed()
    await model.ainvoke(HI)
    assert clock.sleeps == []
    assert model.last_model == "sim-a/medium"


async def test_auth_failure_disables_the_provider(routed: Any, sim: Any) -> None:
    sim.fail("sim-a", "auth")
    model = routed()
    await model.ainvoke(HI)
    assert model.last_model == "sim-b/medium"
    assert [a.model for a in model.context.usage.attempts] == ["sim-a/small", "sim-b/medium"]
    assert await model.context.breakers.astate("sim-a") is BreakerState.DISABLED
    # later calls skip the whole provider without a wasted call
    before = sim.calls["sim-a"]
    await model.ainvoke(HI)
    assert sim.calls["sim-a"] == before


async def test_context_length_moves_to_a_larger_window(routed: Any, sim: Any) -> None:
    sim.fail("sim-a/medium", "context_length")
    sim.fail("sim-b/medium", "context_length")
    model = routed()
    # 2k-window model is filtered by the estimate; the two 100k models fail with context
    # length (the estimate was wrong), so the 1M-window model gets it.
    await model.ainvoke([HumanMessage("word " * 2_000)])
    assert [a.model for a in model.context.usage.attempts] == [
        "sim-a/medium", "sim-c/large"]  # sim-b/medium (same window) is skipped


async def test_content_filter_tries_another_provider(routed: Any, sim: Any) -> None:
    sim.fail("sim-a/small", "content_filter")
    model = routed()
    await model.ainvoke(HI)
    assert [a.model for a in model.context.usage.attempts] == ["sim-a/small", "sim-b/medium"]


async def test_invalid_request_raises_without_fallback(routed: Any, sim: Any) -> None:
    sim.fail("sim-a/small", "invalid_request")
    model = routed()
    with pytest.raises(InvalidRequestError):
        await model.ainvoke(HI)
    assert sim.calls["sim-a/medium"] == 0 and sim.calls["sim-b/medium"] == 0


async def test_timeout_moves_on(routed: Any, sim: Any) -> None:
    sim.fail("sim-a/small", "timeout")
    model = routed(policy=FallbackPolicy(timeout=0.05, max_retries=0))
    await model.ainvoke(HI)
    first, second = model.context.usage.attempts
    assert first.error_class == "timeout" and second.outcome == "ok"


async def test_all_candidates_fail_lists_every_attempt(routed: Any, sim: Any) -> None:
    for p in ("sim-a", "sim-b", "sim-c"):
        sim.fail(p, "server_error")
    model = routed(policy=FallbackPolicy(max_retries=0))
    with pytest.raises(AllModelsFailedError) as info:
        await model.ainvoke(HI)
    err = info.value
    assert [a.model for a in err.attempts] == [
        "sim-a/small", "sim-a/medium", "sim-b/medium", "sim-c/large"]
    assert all(a.error_class == "overloaded" for a in err.attempts)
    assert len(err.exceptions) == 4
    text = str(err)
    assert "node 'n'" in text and "sim-c/large (sim-c): overloaded" in text


async def test_breaker_opens_and_half_open_probe_closes_it(
    routed: Any, sim: Any, clock: Any
) -> None:
    policy = FallbackPolicy(max_retries=0, breaker_threshold=2, breaker_cooldown=30)
    from frugalflow import BreakerRegistry

    breakers = BreakerRegistry(threshold=2, cooldown=30, clock=clock)
    fault = sim.fail("sim-a", "unavailable")
    model = routed(policy=policy, breakers=breakers)
    await model.ainvoke(HI)  # small fails (1), medium fails (2): breaker opens
    assert await breakers.astate("sim-a") is BreakerState.OPEN
    calls = sim.calls["sim-a"]
    for _ in range(3):
        await model.ainvoke(HI)
    assert sim.calls["sim-a"] == calls  # no call wasted on the open provider
    sim.faults.remove(fault)  # the provider recovers
    clock.now += 31
    await model.ainvoke(HI)  # the half-open probe goes through and closes the breaker
    assert model.last_model == "sim-a/small"
    assert await breakers.astate("sim-a") is BreakerState.CLOSED


async def test_budget_skips_expensive_candidates_and_then_stops(routed: Any, sim: Any) -> None:
    # small's expected call costs ~4e-5 (404 tokens at $0.1/M); medium's ~2e-4. Admission
    # reserves the p90 of the output estimate (2.5x the 400 tokens): ~1e-4 and ~5e-4.
    model = routed(budget=3e-4, policy=FallbackPolicy(max_retries=0))
    await model.ainvoke(HI)
    spent = model.context.usage.spent_usd
    assert 0 < spent < 1e-4
    sim.fail("sim-a/small", "server_error")
    with pytest.raises(BudgetExceededError) as info:
        await model.ainvoke(HI)  # small fails; the rest cost more than what is left
    assert isinstance(info.value.__cause__, AllModelsFailedError)
    assert sim.calls["sim-a/medium"] == 0
    assert "Resume the run with a larger budget" in str(info.value)
    assert info.value.node == "n"
    model.context.usage.spent_usd = 3e-4
    with pytest.raises(BudgetExceededError):
        await model.ainvoke(HI)  # nothing fits: stops before any call


async def test_no_capable_model_names_the_need(routed: Any) -> None:
    model = routed(Needs(quality={"math": 0.5}))
    with pytest.raises(NoCapableModelError) as info:
        await model.ainvoke(HI)
    assert "quality.math>=0.5" in str(info.value) and "unscored for math (rule: reject" in str(info.value)


class Ticket(BaseModel):
    category: Literal["billing", "shipping"]
    urgent: bool
    tags: list[str]


async def test_structured_output_is_schema_valid(routed: Any) -> None:
    model = routed()
    result = await model.with_structured_output(Ticket).ainvoke(HI)
    assert isinstance(result, Ticket)
    raw = await model.with_structured_output(Ticket, include_raw=True).ainvoke(HI)
    assert isinstance(raw["parsed"], Ticket) and raw["parsing_error"] is None


async def test_malformed_structured_output_moves_to_next(routed: Any, sim: Any) -> None:
    sim.fail("sim-a/small", "malformed")
    model = routed()
    structured = model.with_structured_output(Ticket)
    assert isinstance(await structured.ainvoke(HI), Ticket)
    attempts = structured.first.context.usage.attempts  # type: ignore[attr-defined]
    assert [(a.model, a.error_class) for a in attempts] == [
        ("sim-a/small", "malformed"), ("sim-a/medium", None)]


async def test_structured_output_and_tools_add_needs(cat: Catalog, make_ctx: Any) -> None:
    no_tools = Catalog(
        [ModelSpec(provider="sim-x", model="plain", simulated=True, input_price=0.01,
                   output_price=0.01, capabilities={"tool_calling": False,
                                                    "structured_output": False}),
         *cat], name="t")
    model = RoutedChatModel(context=make_ctx(cat=no_tools), node="n")
    await model.ainvoke(HI)
    assert model.last_model == "sim-x/plain"
    bound = model.bind_tools([add])
    assert bound.needs.tools
    await bound.ainvoke(HI)
    assert bound.last_model == "sim-a/small"


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


async def test_tool_calling_agent_loop_through_langgraph(routed: Any) -> None:
    from langgraph.prebuilt import ToolNode, tools_condition
    from langgraph.graph import END, START, MessagesState, StateGraph

    model = routed().bind_tools([add])

    async def agent(state: MessagesState) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    g = StateGraph(MessagesState)
    g.add_node("agent", agent)
    g.add_node("tools", ToolNode([add]))
    g.add_edge(START, "agent")
    g.add_conditional_edges("agent", tools_condition)
    g.add_edge("tools", "agent")
    out = await g.compile().ainvoke({"messages": [HumanMessage("what is 2 + 3?")]})
    kinds = [type(m).__name__ for m in out["messages"]]
    assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]
    assert out["messages"][1].tool_calls[0]["name"] == "add"
    tool_msg = out["messages"][2]
    assert isinstance(tool_msg, ToolMessage) and tool_msg.content.lstrip("-").isdigit()
    assert isinstance(out["messages"][3], AIMessage) and not out["messages"][3].tool_calls


async def test_streaming_falls_back_before_the_first_chunk(routed: Any, sim: Any) -> None:
    sim.fail("sim-a/small", "unavailable")
    model = routed(policy=FallbackPolicy(max_retries=0))
    chunks = [c async for c in model.astream(HI)]
    text = "".join(str(c.content) for c in chunks)
    assert len(chunks) > 1 and text.startswith("[medium]")
    assert model.last_model == "sim-a/medium"
    assert chunks[-1].usage_metadata["output_tokens"] > 0


async def test_stream_cut_after_tokens_never_glues_two_answers(routed: Any, sim: Any) -> None:
    sim.fail("sim-a/small", "stream_cut", after_chunks=2)
    model = routed()
    received: list[str] = []
    with pytest.raises(ProviderConnectionError):
        async for chunk in model.astream(HI):
            received.append(str(chunk.content))
    assert "".join(received).startswith("[small]")
    assert sim.calls["sim-a/medium"] == 0  # no second answer appended to the first


def test_sync_invoke_and_stream(routed: Any) -> None:
    model = routed()
    assert model.invoke(HI).content.startswith("[small]")
    assert "".join(str(c.content) for c in model.stream(HI)).startswith("[small]")


async def test_cancellation_propagates_and_frees_the_probe(routed: Any, sim: Any, clock: Any) -> None:
    import asyncio

    from frugalflow import BreakerRegistry

    breakers = BreakerRegistry(threshold=1, cooldown=1, clock=clock)
    model = routed(breakers=breakers, policy=FallbackPolicy(timeout=None))
    small = model.context.catalog["sim-a/small"]
    await breakers.arecord(small, ProviderConnectionError("x"))
    clock.now += 5  # cooldown over: the next call is the half-open probe
    sim.fail("sim-a/small", "timeout")  # it hangs
    task = asyncio.create_task(model.ainvoke(HI))
    while sim.calls["sim-a/small"] == 0:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await breakers.ablocked_reason(small) is None  # no probe in flight
    assert await breakers.aacquire(small)  # the probe slot was released


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_prebuilt_agents_accept_the_routed_model(routed: Any) -> None:
    from langchain.agents import create_agent
    from langgraph.prebuilt import create_react_agent

    for agent in (create_agent(routed(), [add]), create_react_agent(routed(), [add])):
        out = await agent.ainvoke({"messages": [HumanMessage("what is 2 + 3?")]})
        kinds = [type(m).__name__ for m in out["messages"]]
        assert kinds == ["HumanMessage", "AIMessage", "ToolMessage", "AIMessage"]


async def test_validator_rejection_escalates_to_a_stronger_model(cat: Catalog, make_ctx: Any) -> None:
    graded = Catalog(
        [spec("sim-a", "weak", 0.1).model_copy(update={"quality": {"writing": 0.5}}),
         spec("sim-b", "same", 0.2).model_copy(update={"quality": {"writing": 0.5}}),
         spec("sim-c", "strong", 1.0).model_copy(update={"quality": {"writing": 0.9}})],
        name="graded")
    seen: list[str] = []

    def only_strong(message: AIMessage) -> bool | str:
        seen.append(str(message.content))
        return True if message.content.startswith("[strong]") else "too vague"

    model = RoutedChatModel(context=make_ctx(cat=graded), node="n",
                            needs=Needs(quality={"writing": 0.4})).with_validator(only_strong)
    answer = await model.ainvoke(HI)
    assert answer.content.startswith("[strong]")
    attempts = model.context.usage.attempts
    # weak is rejected; "same" is no more capable, so it is skipped; strong answers
    assert [(a.model, a.error_class) for a in attempts] == [
        ("sim-a/weak", "validation"), ("sim-c/strong", None)]
    assert attempts[0].cost_usd > 0  # the rejected answer was paid for, and recorded
    assert "too vague" in attempts[0].error


def _graded() -> Catalog:
    return Catalog(
        [spec("sim-a", "weak", 0.1).model_copy(update={"quality": {"writing": 0.5}}),
         spec("sim-b", "same", 0.2).model_copy(update={"quality": {"writing": 0.5}}),
         spec("sim-c", "strong", 1.0).model_copy(update={"quality": {"writing": 0.9}})],
        name="graded")


async def test_async_judge_on_structured_output(make_ctx: Any) -> None:
    verdicts = iter([False, True])
    judged: list[Ticket] = []

    async def judge(ticket: Ticket) -> bool:
        judged.append(ticket)
        return next(verdicts)

    model = RoutedChatModel(context=make_ctx(cat=_graded()), node="n",
                            needs=Needs(quality={"writing": 0.4})).with_validator(judge)
    result = await model.with_structured_output(Ticket).ainvoke(HI)
    assert isinstance(result, Ticket) and all(isinstance(t, Ticket) for t in judged)
    assert [a.model for a in model.context.usage.attempts] == ["sim-a/weak", "sim-c/strong"]


async def test_pydantic_validator_checks_text_answers(make_ctx: Any) -> None:
    class Fields(BaseModel):
        category: Literal["billing", "shipping"]

    model = RoutedChatModel(context=make_ctx(cat=_graded()), node="n",
                            needs=Needs(quality={"writing": 0.4})).with_validator(Fields)
    with pytest.raises(AllModelsFailedError) as info:
        await model.ainvoke(HI)  # simulated prose is never that JSON
    assert [a.error_class for a in info.value.attempts] == ["validation", "validation"]


async def test_rate_limited_model_is_skipped_without_a_call(cat: Catalog, make_ctx: Any, sim: Any) -> None:
    from frugalflow.limits import RateLimiter

    limited = Catalog([s.model_copy(update={"rpm": 1}) if s.key == "sim-a/small" else s
                       for s in cat], name="limited")
    ctx = make_ctx(cat=limited)
    ctx.limiter = RateLimiter()
    model = RoutedChatModel(context=ctx, node="n")
    await model.ainvoke(HI)
    await model.ainvoke(HI)  # small's one request this minute is used: medium answers
    assert [a.model for a in ctx.usage.attempts] == ["sim-a/small", "sim-a/medium"]
    assert sim.calls["sim-a/small"] == 1


def _judged_catalog(judge_says: Any) -> Catalog:
    return Catalog(
        [spec("sim-a", "weak", 0.1).model_copy(update={"quality": {"writing": 0.5}}),
         spec("sim-c", "strong", 1.0).model_copy(update={"quality": {"writing": 0.9}}),
         spec("sim-j", "judge", 0.5).model_copy(update={
             "quality": {"reasoning": 0.9}, "model_kwargs": {"responder": judge_says}})],
        name="judged")


async def test_judge_model_rejects_and_the_answer_escalates(make_ctx: Any) -> None:
    from frugalflow import Judge

    shown: list[str] = []

    def judge_says(messages: list[Any]) -> str:
        shown.append(str(messages[-1].content))
        return "APPROVE: clear." if "[strong]" in shown[-1] else "REJECT: too vague."

    model = RoutedChatModel(context=make_ctx(cat=_judged_catalog(judge_says)), node="n",
                            needs=Needs(quality={"writing": 0.4}))
    answer = await model.with_validator(Judge("The answer is specific.")).ainvoke(HI)
    assert answer.content.startswith("[strong]")
    assert all("hello there" in s for s in shown)  # the judge sees the input and the answer
    calls = [(a.node, a.model, a.error_class) for a in model.context.usage.attempts]
    # Each answer is recorded once judged: the judge's call comes first.
    assert calls == [("n:judge", "sim-j/judge", None), ("n", "sim-a/weak", "validation"),
                     ("n:judge", "sim-j/judge", None), ("n", "sim-c/strong", None)]
    rejected = model.context.usage.attempts[1]
    assert "the judge rejected it: too vague" in (rejected.error or "")


async def test_judge_never_judges_its_own_answer(make_ctx: Any) -> None:
    from frugalflow import Judge

    only = Catalog([spec("sim-j", "judge", 0.5).model_copy(update={
        "quality": {"reasoning": 0.9, "writing": 0.9},
        "model_kwargs": {"responder": lambda m: "APPROVE"}})], name="alone")
    model = RoutedChatModel(context=make_ctx(cat=only), node="n", needs=Needs())
    with pytest.raises(NoCapableModelError, match="n:judge"):
        await model.with_validator(Judge("Be right.")).ainvoke(HI)


def test_judge_verdicts_are_read_strictly() -> None:
    from frugalflow import Judge, UserError

    assert Judge.verdict("APPROVE") is True and Judge.verdict("**Approve.** fine") is True
    assert Judge.verdict("REJECT: wrong total") == "the judge rejected it: wrong total"
    assert "unreadable" in str(Judge.verdict("Looks good to me"))
    with pytest.raises(UserError, match="criteria"):
        Judge("  ")
