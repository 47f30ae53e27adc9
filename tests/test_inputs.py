"""A run's input is checked against its flow's input fields before anything is written."""

from __future__ import annotations

import dataclasses
import operator
from pathlib import Path
from typing import Annotated, Any, Required, TypedDict

import httpx
import pytest
from pydantic import BaseModel
from served import served

from frugalflow import Catalog, Flow, UserError
from frugalflow.inputs import InputError, check_input, describe_fields, input_fields
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.service import create_app

ROOT = Path(__file__).resolve().parents[1]


class State(TypedDict, total=False):
    ticket: Required[str]
    customer_tier: str
    notes: Annotated[list[str], operator.add]
    answer: str


class TicketIn(TypedDict, total=False):
    ticket: Required[str]
    customer_tier: str


def _flow(state: Any = State, input_schema: Any = None) -> Flow[Any]:
    flow: Flow[Any] = Flow("support", state, input_schema=input_schema)

    async def answer(s: dict[str, Any]) -> dict[str, Any]:
        return {"answer": s["ticket"].upper()}

    flow.add_node("answer", answer)
    flow.add_edge("__start__", "answer")
    flow.add_edge("answer", "__end__")
    return flow


def _error(flow: Flow[Any], value: Any) -> str:
    with pytest.raises(InputError) as caught:
        check_input(flow, value)
    assert isinstance(caught.value, UserError) and "\n" not in str(caught.value)
    return str(caught.value)


def test_declared_input_names_missing_unknown_and_mistyped_fields_in_one_line() -> None:
    flow = _flow(input_schema=TicketIn)
    expected = "expected fields: ticket (str), customer_tier (str, optional)"
    assert _error(flow, {}) == f"input for support: missing required field 'ticket'; {expected}"
    assert _error(flow, {"tiket": "x"}) == (
        "input for support: missing required field 'ticket'; unknown field 'tiket' "
        f"(did you mean 'ticket'?); {expected}")
    assert "field 'ticket' should be str, got int" in _error(flow, {"ticket": 3})
    # a state field the declared input does not take is unknown too
    assert "unknown field 'answer'" in _error(flow, {"ticket": "t", "answer": "a"})
    assert "must be an object of fields, not list" in _error(flow, ["ticket"])
    check_input(flow, {"ticket": "t", "customer_tier": "gold"})


def test_state_schema_requires_only_what_it_marks_required() -> None:
    flow = _flow()
    assert "missing required field 'ticket'" in _error(flow, {"answer": "x"})
    assert "did you mean 'notes'?" in _error(flow, {"ticket": "t", "note": []})
    # a reducer's field is converted by its reducer: not type-checked
    check_input(flow, {"ticket": "t", "notes": [1, 2]})

    class Total(TypedDict):  # totality alone: nodes fill the other keys
        ticket: str
        answer: str

    check_input(_flow(Total), {"ticket": "t"})
    assert "should be str, got int" in _error(_flow(Total), {"ticket": 1})


def test_pydantic_and_dataclass_states() -> None:
    class Model(BaseModel):
        ticket: str
        tier: str = "free"
        count: int = 0

    @dataclasses.dataclass
    class Data:
        ticket: str
        tier: str = "free"

    for schema in (Model, Data):
        flow = _flow(schema)
        assert describe_fields(input_fields(flow) or []).startswith(
            "ticket (str), tier (str, optional)")
        assert "missing required field 'ticket'" in _error(flow, {"tier": "x"})
        check_input(flow, {"ticket": "t"})
    assert "field 'count' should be int, got str" in _error(_flow(Model),
                                                            {"ticket": "t", "count": "3"})
    check_input(_flow(Model), Model(ticket="an instance is its own proof"))


def test_unreadable_schema_checks_nothing() -> None:
    flow = _flow(dict)
    assert input_fields(flow) is None
    check_input(flow, {"anything": 1})


async def test_runner_start_refuses_before_writing_anything(tmp_path: Path) -> None:
    runner = Runner(f"sqlite:///{tmp_path / 'r.db'}", flows=[_flow()],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry())
    try:
        with pytest.raises(InputError, match="did you mean 'ticket'"):
            await runner.start("support", {"tiket": "x"})
        assert await runner.ledger.list_runs() == []
        ok = await runner.start("support", {"ticket": "x"})
        assert ok.ok and ok.state is not None and ok.state["answer"] == "X"
    finally:
        await runner.close()


async def test_service_answers_422_and_lists_input_fields(tmp_path: Path) -> None:
    runner = Runner(f"sqlite:///{tmp_path / 's.db'}", flows=[_flow(input_schema=TicketIn)],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry())
    async with served(create_app(runner)) as url, httpx.AsyncClient(base_url=url) as client:
        flows = (await client.get("/flows")).json()
        assert flows[0]["input"] == [
            {"name": "ticket", "type": "str", "required": True},
            {"name": "customer_tier", "type": "str", "required": False}]
        r = await client.post("/runs", json={"flow": "support", "input": {"tiket": "x"}})
        assert r.status_code == 422
        assert r.json()["detail"] == {
            "error": "InputError",
            "message": "input for support: missing required field 'ticket'; unknown field "
                       "'tiket' (did you mean 'ticket'?); expected fields: ticket (str), "
                       "customer_tier (str, optional)"}
        assert (await client.get("/runs")).json() == []
        r = await client.post("/runs", json={"flow": "support", "input": {"ticket": "x"},
                                             "wait": True})
        assert r.status_code == 200 and r.json()["state"]["answer"] == "X"


def test_ready_made_flows_declare_their_input(monkeypatch: pytest.MonkeyPatch) -> None:
    from frugalflow.cli import load_all_flows

    monkeypatch.chdir(ROOT)
    required = {f.name: [x.name for x in input_fields(f) or [] if x.required]
                for f in load_all_flows()}
    assert required == {"support_triage": ["ticket"], "document_extraction": ["document"],
                        "research_brief": ["topic"], "nightly_enrichment": ["docs"]}


async def test_a_compiled_flow_checks_its_input_before_any_call() -> None:
    from frugalflow import Catalog, InputError

    import flows.support_triage as triage

    compiled = triage.flow.compile(Catalog.simulated())
    ctx = compiled.new_context()
    with pytest.raises(InputError, match="missing required field 'ticket'"):
        await compiled.ainvoke({}, context=ctx)
    assert ctx.usage.recorded == 0  # refused before any call
    with pytest.raises(InputError, match="unknown field 'tiket'.*did you mean 'ticket'"):
        await compiled.ainvoke({"tiket": "hello"})
    with pytest.raises(InputError, match="missing required field 'ticket'"):
        compiled.invoke({})
    with pytest.raises(InputError, match="unknown field"):
        async for _ in compiled.astream({"tiket": "x"}):
            pass
    # On a thread that already has state, an update need not repeat the required fields.
    from langgraph.checkpoint.memory import InMemorySaver

    threaded = triage.flow.compile(Catalog.simulated(), checkpointer=InMemorySaver())
    config: Any = {"configurable": {"thread_id": "t-1"}}
    await threaded.ainvoke({"ticket": "Order 7 is late, I am Bo"}, config)
    await threaded.ainvoke({"category": "shipping"}, config)  # accepted: an update
