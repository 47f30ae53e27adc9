"""Production traffic as evaluation cases: durable runs record each answered call's request
(scrubbed), `cases_from_ledger` draws them with the answer production accepted, and
`replay_request` sends them to another model as they were sent."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, TypedDict

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from pydantic import BaseModel

from frugalflow import END, START, Catalog, Flow, Needs, RoutedChatModel, UserError
from frugalflow.evaluation.cases import EvalCase, Score
from frugalflow.evaluation.from_ledger import cases_from_ledger, replay_request
from frugalflow.evaluation.scorers import ReferenceScorer, ValidatorScorer, output_value
from frugalflow.persistence import Store
from frugalflow.persistence.ledger import Ledger
from frugalflow.persistence.scrub import REDACTED
from frugalflow.resilience import BreakerRegistry
from frugalflow.runner import Runner
from frugalflow.usage import Attempt, RunUsage, Usage

SECRET = "sk-proj-evalcore0123456789abcdefghijklmnopqrstu"


class Invoice(BaseModel):
    """The fields of an invoice (the simulated providers have an oracle for this schema)."""

    invoice_number: str
    vendor: str
    currency: str
    subtotal: float
    tax: float
    total: float


class DocState(TypedDict, total=False):
    document: str
    fields: dict[str, Any]
    note: str


def adds_up(invoice: Invoice) -> bool | str:
    return abs(invoice.subtotal + invoice.tax - invoice.total) < 0.01 or "totals do not add up"


def invoice_flow() -> Flow[DocState]:
    flow: Flow[DocState] = Flow("invoices", DocState)

    @flow.node(needs=Needs(quality={"extraction": 0.2}), validator=adds_up)
    async def extract(state: DocState, model: RoutedChatModel) -> DocState:
        reader = model.with_structured_output(Invoice)
        invoice = await reader.ainvoke([SystemMessage("Extract the invoice fields."),
                                        HumanMessage(state["document"])])
        return {"fields": invoice.model_dump()}

    @flow.node(needs=Needs())
    async def note(state: DocState, model: RoutedChatModel) -> DocState:
        answer = await model.ainvoke([HumanMessage(f"Thank {state['fields']['vendor']}")])
        return {"note": str(answer.content)}

    flow.add_edge(START, "extract")
    flow.add_edge("extract", "note")
    flow.add_edge("note", END)
    return flow


def document(i: int) -> str:
    return (f"Invoice INV-{1000 + i}\nFrom: Vendor {i}\nCurrency: EUR\n"
            f"Subtotal: {100 + i}.00\nTax: 19.00\nTotal: {119 + i}.00")


@pytest.fixture
async def recorded(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A ledger (SQLite, then PostgreSQL) holding six durable runs of the invoice flow, one
    of them with a key in its document."""
    monkeypatch.setenv("OPENAI_API_KEY", SECRET)
    runner = Runner(db_url, flows=[invoice_flow()],
                    catalog=Catalog.simulated(), breakers=BreakerRegistry())
    for i in range(6):
        text = document(i) + (f"\nPaid with key {SECRET}" if i == 0 else "")
        result = await runner.start("invoices", {"document": text}, budget=1.0)
        assert result.ok, result.error
    yield runner
    await runner.close()


async def test_durable_runs_record_the_request_of_each_answered_call(recorded: Runner) -> None:
    attempts = await recorded.ledger.all_attempts()
    ok = [a for a in attempts if a.outcome == "ok"]
    assert {a.node for a in ok} == {"extract", "note"} and len(ok) == 12
    assert all(a.request is not None for a in ok)
    assert all(a.request is None for a in attempts if a.outcome != "ok")  # rows stay small
    extract = next(a for a in ok if a.node == "extract")
    assert extract.request is not None
    schema = extract.request["schema"]
    assert schema["title"] == "Invoice" and set(schema["properties"]) == set(Invoice.model_fields)
    assert extract.request["tools"] == []  # the schema's own tool is the schema
    kinds = [m["type"] for m in extract.request["messages"]]
    assert kinds == ["system", "human"]
    # the key in the document never reaches the database; the rest of the message does
    raw = " ".join(str(a.request) for a in ok)
    assert SECRET not in raw and REDACTED in raw and "Invoice INV-1000" in raw
    plain = next(a for a in ok if a.node == "note")
    assert plain.request is not None and plain.request["schema"] is None


async def test_cases_carry_the_request_and_the_accepted_answer(recorded: Runner) -> None:
    ledger = recorded.ledger
    extracts = [a for a in await ledger.all_attempts()
                if a.node == "extract" and a.outcome == "ok"]
    await ledger.feedback(extracts[1].call_id, False)
    await ledger.feedback(extracts[2].call_id, True)
    cases = await cases_from_ledger(ledger, flow="invoices", node="extract")
    assert [c.id for c in cases] == [f"attempt-{a.id}" for a in extracts]
    first = cases[0]
    assert first.request is not None and first.request.schema is not None
    assert first.inputs == {}
    # the answer production accepted, as scorers read an output
    answer = extracts[0].response
    assert answer is not None
    assert first.expected == answer["data"]["tool_calls"][0]["args"]
    assert set(first.expected) == set(Invoice.model_fields)
    assert first.metadata["model"] == extracts[0].model
    assert first.metadata["call_id"] == extracts[0].call_id and "feedback" not in first.metadata
    # negative feedback: still a case, without a reference
    assert cases[1].expected is None and cases[1].metadata["feedback"] is False
    assert cases[2].expected is not None and cases[2].metadata["feedback"] is True


async def test_samples_are_seeded_and_filters_apply(recorded: Runner) -> None:
    ledger = recorded.ledger
    everything = await cases_from_ledger(ledger, flow="invoices", node="extract")
    ids = [c.id for c in everything]
    three = await cases_from_ledger(ledger, flow="invoices", node="extract", limit=3, seed=7)
    again = await cases_from_ledger(ledger, flow="invoices", node="extract", limit=3, seed=7)
    assert [c.id for c in three] == [c.id for c in again] and len(three) == 3
    assert set(c.id for c in three) <= set(ids)
    samples = {tuple(c.id for c in await cases_from_ledger(
        ledger, flow="invoices", node="extract", limit=3, seed=s)) for s in range(6)}
    assert len(samples) > 1  # a seeded random draw, not the first three
    assert [c.id for c in await cases_from_ledger(ledger, flow="invoices", node="extract",
                                                  limit=100)] == ids
    now = datetime.now(timezone.utc)
    window = await cases_from_ledger(ledger, flow="invoices", node="extract",
                                     since=now - timedelta(hours=1), until=now + timedelta(1))
    assert [c.id for c in window] == ids


async def test_nothing_found_says_which_filter_and_how_to_widen_it(recorded: Runner) -> None:
    ledger = recorded.ledger
    later = datetime.now(timezone.utc) + timedelta(days=1)
    with pytest.raises(UserError, match=r"none of the 6 replayable calls of invoices/extract "
                                        r"\(recorded from .* to .*\) started between .* and "
                                        r"now; widen or drop since/until"):
        await cases_from_ledger(ledger, flow="invoices", node="extract", since=later)
    with pytest.raises(UserError, match=r"flow 'invoices' has no successful calls of node "
                                        r"'extrct' in this ledger; nodes with calls: extract, "
                                        r"note"):
        await cases_from_ledger(ledger, flow="invoices", node="extrct")
    with pytest.raises(UserError, match=r"no successful calls of flow 'invoice' in this "
                                        r"ledger \(flows recorded: invoices\)"):
        await cases_from_ledger(ledger, flow="invoice", node="extract")
    with pytest.raises(UserError, match=r"limit must be at least 1"):
        await cases_from_ledger(ledger, flow="invoices", node="extract", limit=0)
    # calls recorded before requests were kept
    await ledger.create_run("old-run", "old", {})
    await ledger.record_attempt(Attempt(node="n", model="m", provider="p", outcome="ok",
                                        call_id="old-1", run_id="old-run"), flow="old")
    with pytest.raises(UserError, match=r"the 1 recorded calls of old/n carry no request .* "
                                        r"run the flow durably"):
        await cases_from_ledger(ledger, flow="old", node="n")


async def test_a_recorded_request_replays_to_another_model(recorded: Runner) -> None:
    cases = await cases_from_ledger(recorded.ledger, flow="invoices", node="extract")
    catalog = Catalog.simulated()
    strong = catalog.built(catalog["sim-google/gemini-2.5-pro"])
    scorer = ReferenceScorer("exact")
    # the node's validator takes an Invoice: the replayed JSON is parsed into it first
    validator = ValidatorScorer(adds_up)
    assert validator.schema is Invoice
    for case in cases:
        assert case.request is not None
        answer = await replay_request(strong, case.request)
        assert isinstance(answer, AIMessage) and answer.tool_calls[0]["name"] == "Invoice"
        fields = output_value(answer, case.request)
        assert set(fields) == set(Invoice.model_fields)
        assert await validator.score(case, answer) == Score(True, 1.0)
        if case.expected is not None:  # easy invoices: a strong model agrees with production
            assert (await scorer.score(case, answer)).passed
    broken = AIMessage(content="", tool_calls=[{"name": "Invoice", "args": {"total": "x"},
                                                "id": "1", "type": "tool_call"}])
    failed = await validator.score(cases[0], broken)
    assert not failed.passed and (failed.reason or "").startswith("the output fails schema "
                                                                  "Invoice: ")
    # a plain call replays as text
    (note,) = await cases_from_ledger(recorded.ledger, flow="invoices", node="note", limit=1)
    assert note.request is not None
    text = await replay_request(strong, note.request, key="sim-google/gemini-2.5-pro")
    assert isinstance(output_value(text, note.request), str) and text.content
    assert text.response_metadata["frugalflow"] == {"model": "sim-google/gemini-2.5-pro"}


async def test_replay_refuses_a_schema_it_cannot_bind() -> None:
    from frugalflow.evaluation.cases import Request

    model = Catalog.simulated().built(Catalog.simulated()["sim-google/gemini-2.5-pro"])
    with pytest.raises(UserError, match="no title"):
        await replay_request(model, Request(messages=[], schema={"type": "object"}))


async def test_calls_outside_a_durable_run_keep_no_request() -> None:
    usage = RunUsage()
    from frugalflow import RunContext

    model = RoutedChatModel(context=RunContext(catalog=Catalog.simulated(), usage=usage),
                            needs=Needs())
    await model.ainvoke([HumanMessage("hi")])
    assert usage.attempts[-1].outcome == "ok" and usage.attempts[-1].request is None


async def test_reasoning_tokens_are_read_added_and_written(tmp_path: Path) -> None:
    message = AIMessage(content="x", usage_metadata={
        "input_tokens": 10, "output_tokens": 50, "total_tokens": 60,
        "output_token_details": {"reasoning": 38}})
    usage = Usage.from_message(message)
    assert usage is not None and usage.reasoning_tokens == 38
    assert (usage + usage).reasoning_tokens == 76 and (usage + Usage()).reasoning_tokens == 38
    plain = Usage.from_message(AIMessage(content="x", usage_metadata={
        "input_tokens": 1, "output_tokens": 2, "total_tokens": 3}))
    assert plain is not None and plain.reasoning_tokens == 0
    store = Store(f"sqlite:///{tmp_path / 'l.db'}")
    ledger = Ledger(store)
    await ledger.create_run("r", "f", {})
    await ledger.record_attempt(Attempt(node="n", model="m", provider="p", outcome="ok",
                                        call_id="c", run_id="r", usage=usage))
    (row,) = await ledger.all_attempts()
    assert row.reasoning_tokens == 38 and row.output_tokens == 50
    await store.close()


def test_a_case_from_the_ledger_is_an_eval_case() -> None:
    assert EvalCase("attempt-1").request is None  # the dataclass default stays
