"""A compiled flow under LangGraph's server / Studio: the graph `langgraph.json` names, loaded
from its path and invoked the way the server does (its own checkpointer, a config with a
thread, no frugalflow context), and the typed API a user's type checker sees."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, TypedDict

import pytest
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.store.memory import InMemoryStore

from frugalflow import END, START, Catalog, Flow, RoutedChatModel, UserError
from frugalflow.exceptions import BudgetExceededError
from frugalflow.persistence.policy_store import PolicyStore
from frugalflow.persistence.store import Store
from frugalflow.policies import Choice, Evidence, NodePolicy, Policy
from frugalflow.routed import RunContext
from frugalflow.runner import RunResult
from frugalflow.statuses import RunStatus

ROOT = Path(__file__).resolve().parents[1]
TICKET = "Hi, I'm Dana Reyes. Order #A-1001 arrived broken. Please refund me."


def _load(spec: str) -> Any:
    """What the server does with a `"./path.py:attr"` entry of `langgraph.json`."""
    path, attr = spec.rsplit(":", 1)
    module_spec = importlib.util.spec_from_file_location("lg_app_under_test", ROOT / path)
    assert module_spec is not None and module_spec.loader is not None
    module: ModuleType = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return getattr(module, attr)


@pytest.fixture
def graphs() -> dict[str, Any]:
    config = json.loads((ROOT / "langgraph.json").read_text())
    return {name: _load(spec) for name, spec in config["graphs"].items()}


def _as_served(graph: Any) -> Any:
    """The server's per-run copy: its checkpointer and store attached with `copy(update=)`."""
    return graph.copy(update={"checkpointer": InMemorySaver(), "store": InMemoryStore()})


def test_langgraph_json_names_a_compiled_graph_per_ready_made_flow(
        graphs: dict[str, Any]) -> None:
    assert set(graphs) == {"support_triage", "document_extraction", "research_brief"}
    for graph in graphs.values():
        assert isinstance(graph, CompiledStateGraph)
        assert graph.checkpointer is None  # the server refuses graphs with their own
        # Studio's assistant form: the plain context a run may set, not the RunContext object.
        schema = graph.get_context_jsonschema()
        assert set(schema["properties"]) == {"budget", "policy", "run_id"}


async def test_served_graph_runs_without_a_frugalflow_context(graphs: dict[str, Any]) -> None:
    assert Catalog.default().name == Catalog.simulated().name  # no keys: simulated models
    graph = _as_served(graphs["support_triage"])
    config: Any = {"configurable": {"thread_id": "studio-thread-1"}}
    out = await graph.ainvoke({"ticket": TICKET}, config=config)
    assert out["category"] and out["draft"] and out["review"]
    saved = await graph.aget_state(config)  # checkpointed on the server's saver
    assert saved.values["draft"] == out["draft"] and not saved.next


async def test_served_graph_streams_values_and_updates(graphs: dict[str, Any]) -> None:
    graph = _as_served(graphs["support_triage"])
    parts = [part async for part in graph.astream(
        {"ticket": TICKET}, config={"configurable": {"thread_id": "studio-thread-2"}},
        stream_mode=["values", "updates"])]
    updates = [next(iter(chunk)) for mode, chunk in parts if mode == "updates"]
    assert updates == ["classify", "extract", "draft", "review"]
    values = [chunk for mode, chunk in parts if mode == "values"]
    assert values[0] == {"ticket": TICKET} and values[-1]["review"]


def _probe_flow() -> Flow[Any]:
    """Two model nodes that record the context they ran with."""

    class State(TypedDict, total=False):
        text: str
        seen: list[int]

    flow: Flow[Any] = Flow("probe", State)

    def node(key: str) -> Any:
        async def run(state: State, model: RoutedChatModel, runtime: Runtime[RunContext]) -> State:
            await model.ainvoke(state["text"])
            seen.append(runtime.context)
            return {"text": state["text"] + key}
        return run

    seen: list[RunContext] = []
    flow.add_node("a", node("a"), needs={"quality": {"writing": 0.1}})
    flow.add_node("b", node("b"), needs={"quality": {"writing": 0.1}})
    flow.add_edge(START, "a")
    flow.add_edge("a", "b")
    flow.add_edge("b", END)
    flow.seen = seen  # type: ignore[attr-defined]
    return flow


async def test_each_run_shares_one_context_with_the_configured_budget(
        monkeypatch: pytest.MonkeyPatch) -> None:
    flow = _probe_flow()
    graph = _as_served(flow.compile(Catalog.simulated()).graph)
    seen: list[RunContext] = flow.seen  # type: ignore[attr-defined]
    await graph.ainvoke({"text": "hi"}, config={"configurable": {
        "thread_id": "t1", "budget": "0.5", "run_id": "server-run-1"}})
    first, second = seen
    assert first is second and first.usage.budget_usd == 0.5
    assert first.usage.run_id == "server-run-1" and first.usage.spent_usd > 0

    monkeypatch.setenv("FRUGALFLOW_BUDGET", "0.25")
    await graph.ainvoke({"text": "hi"}, config={"configurable": {"thread_id": "t2"}})
    assert seen[2] is seen[3] and seen[2] is not first and seen[2].usage.budget_usd == 0.25

    # An assistant's plain `context` wins over configurable and environment.
    await graph.ainvoke({"text": "hi"}, config={"configurable": {"thread_id": "t3"}},
                        context={"budget": 0.125})
    assert seen[4].usage.budget_usd == 0.125


async def test_a_graph_called_inside_a_flow_run_uses_that_runs_context(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FRUGALFLOW_POLICY", "never-loaded")  # the run's own context wins
    inner = _probe_flow()
    inner_graph = inner.compile(Catalog.simulated()).graph

    class Outer(TypedDict, total=False):
        text: str

    async def call_inner(state: Outer) -> Outer:
        return {"text": (await inner_graph.ainvoke({"text": state["text"]}))["text"]}

    outer: Flow[Outer] = Flow("outer", Outer)
    outer.add_node("call_inner", call_inner)
    outer.add_edge(START, "call_inner")
    app = outer.compile(Catalog.simulated())
    ctx = app.new_context(budget=0.75)
    assert (await app.ainvoke({"text": "x"}, context=ctx))["text"] == "xab"
    assert inner.seen == [ctx, ctx]  # type: ignore[attr-defined]


async def test_a_configured_budget_stops_the_served_run() -> None:
    graph = _as_served(_probe_flow().compile(Catalog.simulated()).graph)
    with pytest.raises(BudgetExceededError):
        await graph.ainvoke({"text": "hi"}, config={"configurable": {
            "thread_id": "t", "budget": 1e-12}})


@pytest.mark.parametrize("config, context, problem", [
    ({"budget": "abc"}, None, "configurable budget"),
    ({"budget": -1}, None, "configurable budget"),
    ({}, {"budgte": 1}, "unknown context key(s) budgte; expected: budget, policy, run_id"),
])
async def test_bad_configuration_is_one_clear_line(config: dict[str, Any],
                                                   context: dict[str, Any] | None,
                                                   problem: str) -> None:
    graph = _probe_flow().compile(Catalog.simulated()).graph
    with pytest.raises(UserError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        await graph.ainvoke({"text": "hi"}, config={"configurable": config}, context=context)


STRONG = "sim-openai/gpt-4.1"


async def test_a_stored_policy_named_in_configuration_routes_the_served_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    flow = _probe_flow()
    graph = _as_served(flow.compile(Catalog.simulated()).graph)
    seen: list[RunContext] = flow.seen  # type: ignore[attr-defined]
    config: Any = {"configurable": {"thread_id": "t", "policy": "probe-policy"}}
    with pytest.raises(UserError, match="set FRUGALFLOW_DATABASE_URL"):
        await graph.ainvoke({"text": "hi"}, config=config)

    url = f"sqlite:///{tmp_path / 'policies.db'}"
    monkeypatch.setenv("FRUGALFLOW_DATABASE_URL", url)
    store = Store(url)
    try:
        with pytest.raises(UserError, match="unknown policy 'probe-policy'"):
            await graph.ainvoke({"text": "hi"}, config=config)
        node = NodePolicy(models={STRONG: Evidence(n=60, passes=60)},
                          choice=Choice(models=(STRONG,)))
        await PolicyStore(store).save("probe-policy", Policy(flow="probe", nodes={"a": node}))
    finally:
        await store.close()
    await graph.ainvoke({"text": "hi"}, config=config)
    ctx = seen[-1]
    assert ctx.measured is not None
    first = ctx.usage.attempts[0]
    assert (first.node, first.model, first.route_reason) == ("a", STRONG, "policy probe-policy v1")

    with pytest.raises(UserError, match="async"):  # the sync API cannot read the database
        graph.invoke({"text": "hi"}, config=config)


def test_sync_invoke_of_the_graph_builds_a_context_too() -> None:
    class State(TypedDict, total=False):
        text: str

    flow: Flow[State] = Flow("sync_probe", State)

    def shout(state: State, model: RoutedChatModel, runtime: Runtime[RunContext]) -> State:
        assert isinstance(runtime.context, RunContext)
        return {"text": str(model.invoke(state["text"]).content)}

    flow.add_node("shout", shout, needs={"quality": {"writing": 0.1}})
    flow.add_edge(START, "shout")
    out = flow.compile(Catalog.simulated()).graph.invoke({"text": "x"})
    assert out["text"]


def test_run_result_status_is_the_enum() -> None:
    result = RunResult("r1", "failed")  # type: ignore[arg-type]  # a ledger row's string
    assert result.status is RunStatus.FAILED and not result.ok
    with pytest.raises(ValueError):
        RunResult("r2", "succeded")  # type: ignore[arg-type]


SNIPPET = '''
from typing import TypedDict
from frugalflow import Flow
from frugalflow.runner import RunResult

class Ticket(TypedDict, total=False):
    ticket: str
    draft: str

flow: Flow[Ticket] = Flow("t", Ticket)

async def main(result: RunResult) -> None:
    app = flow.compile()
    reveal_type(app)
    out = await app.ainvoke({"ticket": "x"})
    reveal_type(out)
    words: int = out["draft"]
    reveal_type(result.status)
    result.status = "done"
'''


@pytest.mark.slow
def test_a_type_checker_sees_the_state_type_and_the_status_enum(tmp_path: Path) -> None:
    snippet = tmp_path / "user_code.py"
    snippet.write_text(SNIPPET)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
         "--no-error-summary", str(snippet)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
        env={**os.environ, "MYPYPATH": str(ROOT)},
    )
    out = proc.stdout
    assert 'Revealed type is "frugalflow.flow.CompiledFlow[TypedDict(' in out, out
    assert 'Revealed type is "TypedDict(user_code.Ticket, {' in out, out
    assert 'Revealed type is "frugalflow.statuses.RunStatus"' in out, out
    assert 'Incompatible types in assignment (expression has type "str", variable has type "int")' \
        in out, out
    assert 'expression has type "str", variable has type "RunStatus"' in out, out
