"""Flows compile to LangGraph, route every model node, and reject bad definitions early."""

from __future__ import annotations

import operator
from typing import Annotated, Any, Literal, TypedDict

import pytest
from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command, Send, interrupt

from frugalflow import (
    END,
    START,
    BudgetExceededError,
    Catalog,
    FlowError,
    Needs,
    NoCapableModelError,
    RoutedChatModel,
)
from frugalflow.flow import Flow


class S(TypedDict, total=False):
    text: str
    label: str
    answer: str
    parts: Annotated[list[str], operator.add]
    topics: list[str]


async def _ask(model: RoutedChatModel, text: str) -> str:
    return str((await model.ainvoke([HumanMessage(text)])).content)


def simple_flow() -> Flow[S]:
    flow: Flow[S] = Flow("simple", S)

    @flow.node(needs=Needs(quality={"classification": 0.6}))
    async def classify(state: S, model: RoutedChatModel) -> S:
        return {"label": (await _ask(model, state["text"]))[:12]}

    @flow.node(needs=Needs(quality={"reasoning": 0.8}))
    async def answer(state: S, model: RoutedChatModel) -> S:
        return {"answer": await _ask(model, state["text"])}

    flow.add_edge(START, "classify")
    flow.add_edge("classify", "answer")
    flow.add_edge("answer", END)
    return flow


async def test_each_node_runs_on_its_cheapest_capable_model(catalog: Catalog) -> None:
    app = simple_flow().compile(catalog)
    ctx = app.new_context()
    out = await app.ainvoke({"text": "hello"}, context=ctx)
    assert out["label"] and out["answer"]
    by_node = {a.node: a for a in ctx.usage.attempts}
    # classification is easy: a cheap model; reasoning >= 0.8 needs a stronger, dearer one
    assert by_node["classify"].cost_usd < by_node["answer"].cost_usd
    # explain priced at each call's own input size (the order may depend on it)
    easy = app.explain(by_node["classify"].usage.input_tokens)["classify"]  # type: ignore[union-attr]
    assert easy[0]["model"] == by_node["classify"].model
    hard = app.explain(by_node["answer"].usage.input_tokens)["answer"]  # type: ignore[union-attr]
    assert hard[0]["model"] == by_node["answer"].model
    costs = ctx.usage.cost_by("node")
    assert sum(costs.values()) == pytest.approx(ctx.usage.spent_usd)


async def test_run_budget_stops_with_a_clear_error(catalog: Catalog) -> None:
    app = simple_flow().compile(catalog)
    with pytest.raises(BudgetExceededError) as info:
        await app.ainvoke({"text": "hello"}, budget=1e-6)
    assert info.value.node == "classify"


async def test_sync_nodes_and_plain_python_nodes(catalog: Catalog) -> None:
    flow: Flow[S] = Flow("sync", S)

    @flow.node(needs=Needs())
    def shout(state: S, model: RoutedChatModel) -> S:
        return {"answer": str(model.invoke([HumanMessage(state["text"])]).content).upper()}

    @flow.node()
    def label(state: S) -> S:  # no model: a plain Python step
        return {"label": "done"}

    flow.add_edge(START, "shout")
    flow.add_edge("shout", "label")
    out = await flow.compile(catalog).ainvoke({"text": "hi"})
    assert out["answer"].isupper() and out["label"] == "done"
    assert not flow.nodes["label"].uses_model


async def test_conditional_edges_send_fanout_and_join(catalog: Catalog) -> None:
    flow: Flow[S] = Flow("fanout", S)

    @flow.node()
    def plan(state: S) -> S:
        return {"topics": ["a", "b", "c"]}

    @flow.node(needs=Needs())
    async def research(state: dict[str, Any], model: RoutedChatModel) -> S:
        return {"parts": [f"{state['topic']}:{(await _ask(model, state['topic']))[:5]}"]}

    @flow.node()
    def combine(state: S) -> S:
        return {"answer": "|".join(sorted(state["parts"]))}

    flow.add_edge(START, "plan")
    flow.add_conditional_edges(
        "plan", lambda s: [Send("research", {"topic": t}) for t in s["topics"]], ["research"]
    )
    flow.add_edge("research", "combine")
    flow.add_edge("combine", END)
    app = flow.compile(catalog)
    ctx = app.new_context()
    out = await app.ainvoke({"text": "x"}, context=ctx)
    assert [p.split(":")[0] for p in out["answer"].split("|")] == ["a", "b", "c"]
    assert [a.node for a in ctx.usage.attempts] == ["research"] * 3


async def test_literal_annotation_declares_targets(catalog: Catalog) -> None:
    flow: Flow[S] = Flow("branch", S)
    flow.add_node("start", lambda s: {"label": "x"})
    flow.add_node("yes", lambda s: {"answer": "yes"})
    flow.add_node("no", lambda s: {"answer": "no"})

    def route(state: S) -> Literal["yes", "no"]:
        return "yes" if state["text"] == "y" else "no"

    flow.add_edge(START, "start")
    flow.add_conditional_edges("start", route)
    assert flow.branches[0].targets == ["yes", "no"]
    app = flow.compile(catalog)
    assert (await app.ainvoke({"text": "y"}))["answer"] == "yes"
    assert (await app.ainvoke({"text": "n"}))["answer"] == "no"


async def test_subflow_nodes_get_routed_models(catalog: Catalog) -> None:
    inner: Flow[S] = Flow("inner", S)

    @inner.node(needs=Needs())
    async def summarise(state: S, model: RoutedChatModel) -> S:
        return {"answer": await _ask(model, state["text"])}

    inner.add_edge(START, "summarise")
    outer: Flow[S] = Flow("outer", S)
    outer.add_node("sub", inner)
    outer.add_edge(START, "sub")
    app = outer.compile(catalog)
    ctx = app.new_context()
    out = await app.ainvoke({"text": "hello"}, context=ctx)
    assert out["answer"]
    assert [a.node for a in ctx.usage.attempts] == ["summarise"]


async def test_checkpoints_and_interrupts_keep_working(catalog: Catalog) -> None:
    flow: Flow[S] = Flow("hitl", S)

    @flow.node(needs=Needs())
    async def draft(state: S, model: RoutedChatModel) -> S:
        return {"answer": await _ask(model, state["text"])}

    @flow.node()
    def approve(state: S) -> S:
        verdict = interrupt({"draft": state["answer"]})
        return {"label": verdict}

    flow.add_edge(START, "draft")
    flow.add_edge("draft", "approve")
    app = flow.compile(catalog, checkpointer=InMemorySaver())
    ctx = app.new_context(run_id="thread-1")
    first = await app.ainvoke({"text": "hi"}, context=ctx)
    assert "__interrupt__" in first
    snapshot = await app.graph.aget_state({"configurable": {"thread_id": "thread-1"}})
    assert snapshot.next == ("approve",)
    # resume with a fresh context (as after a restart): the draft is not paid again
    ctx2 = app.new_context(run_id="thread-1")
    out = await app.ainvoke(Command(resume="ok"), context=ctx2)
    assert out["label"] == "ok"
    assert ctx2.usage.attempts == []


async def test_graph_stream_modes_pass_through(catalog: Catalog) -> None:
    app = simple_flow().compile(catalog)
    updates = [u async for u in app.astream({"text": "hi"}, stream_mode="updates")]
    assert [next(iter(u)) for u in updates] == ["classify", "answer"]


# -- compile-time errors -----------------------------------------------------------------


def test_unknown_node_in_edge_suggests_the_name(catalog: Catalog) -> None:
    flow = simple_flow()
    flow.add_edge("answr", END)
    with pytest.raises(FlowError, match="unknown node 'answr'; did you mean 'answer'"):
        flow.compile(catalog)


def test_unreachable_node(catalog: Catalog) -> None:
    flow = simple_flow()
    flow.add_node("orphan", lambda s: {})
    with pytest.raises(FlowError, match="'orphan' can never run"):
        flow.compile(catalog)


def test_no_entry(catalog: Catalog) -> None:
    flow: Flow[S] = Flow("noentry", S)
    flow.add_node("a", lambda s: {})
    with pytest.raises(FlowError, match=r"no entry: add flow.add_edge\(START, 'a'\)"):
        flow.compile(catalog)


def test_empty_flow(catalog: Catalog) -> None:
    with pytest.raises(FlowError, match="has no nodes"):
        Flow("empty", S).compile(catalog)


def test_bad_needs_name_the_node() -> None:
    flow: Flow[S] = Flow("bad", S)
    with pytest.raises(FlowError, match=r"node 'x': bad needs: quality: .*unknown skill 'mathh'"):
        flow.add_node("x", lambda state, model: {}, needs={"quality": {"mathh": 0.5}})


def test_needs_without_model_parameter() -> None:
    flow: Flow[S] = Flow("bad", S)
    with pytest.raises(FlowError, match="takes no `model` parameter"):
        flow.add_node("x", lambda state: {}, needs=Needs(tools=True))


def test_duplicate_and_reserved_names() -> None:
    flow: Flow[S] = Flow("dup", S)
    flow.add_node("a", lambda s: {})
    with pytest.raises(FlowError, match="defined twice"):
        flow.add_node("a", lambda s: {})
    with pytest.raises(FlowError, match="invalid node name"):
        flow.add_node(END, lambda s: {})


def test_node_no_model_can_serve_names_need_and_closest(catalog: Catalog) -> None:
    flow: Flow[S] = Flow("impossible", S)
    flow.add_node("judge", lambda state, model: {}, needs=Needs(quality={"reasoning": 0.99}))
    flow.add_edge(START, "judge")
    with pytest.raises(NoCapableModelError) as info:
        flow.compile(catalog)
    text = str(info.value)
    assert "node 'judge'" in text and "quality.reasoning>=0.99" in text
    assert "Closest models:" in text and "quality.reasoning" in text
    assert info.value.node == "judge"


def test_unknown_provider_in_needs(catalog: Catalog) -> None:
    flow: Flow[S] = Flow("typo", S)
    flow.add_node("a", lambda state, model: {}, needs=Needs(providers=("sim-opnai",)))
    flow.add_edge(START, "a")
    with pytest.raises(FlowError, match="did you mean 'sim-openai'"):
        flow.compile(catalog)


def test_unknown_interrupt_node(catalog: Catalog) -> None:
    with pytest.raises(FlowError, match="interrupt names unknown node"):
        simple_flow().compile(catalog, interrupt_before=["nope"])


def test_node_without_keys_explains_the_fix() -> None:
    flow: Flow[S] = Flow("nokeys", S)
    flow.add_node("a", lambda state, model: {}, needs=Needs(tools=True))
    flow.add_edge(START, "a")
    with pytest.raises(NoCapableModelError, match="set .*_API_KEY"):
        flow.compile(Catalog.builtin())


async def test_messages_stream_restarts_a_broken_stream_coherently(sim: Any) -> None:
    from frugalflow import ModelSpec

    cat = Catalog([
        ModelSpec(provider="sim-a", model="small", simulated=True, input_price=0.1, output_price=0.1),
        ModelSpec(provider="sim-b", model="medium", simulated=True, input_price=1, output_price=1),
    ], name="two")
    flow: Flow[S] = Flow("stream", S)

    @flow.node(needs=Needs())
    async def talk(state: S, model: RoutedChatModel) -> S:
        return {"answer": str((await model.ainvoke([HumanMessage(state["text"])])).content)}

    flow.add_edge(START, "talk")
    sim.fail("sim-a/small", "stream_cut", after_chunks=2)
    app = flow.compile(cat)
    by_id: dict[str, str] = {}
    final: dict[str, Any] = {}
    async for mode, chunk in app.astream({"text": "hello"}, stream_mode=["messages", "values"]):
        if mode == "messages":
            message, _meta = chunk
            by_id[message.id] = by_id.get(message.id, "") + str(message.content)
        else:
            final = chunk
    # Each attempt streams under its own message id: small broke (and broke again on its
    # retry), medium answered in full.
    *broken, restarted = list(by_id.values())
    assert len(broken) == 2 and all(b.startswith("[small]") for b in broken)
    assert restarted.startswith("[medium]")
    assert final["answer"] == restarted  # the state holds one coherent answer
    assert "[small]" not in final["answer"]
