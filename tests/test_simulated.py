from __future__ import annotations

import asyncio
from typing import Any, Literal

import pytest
from langchain_core.messages import HumanMessage
from pydantic import BaseModel, Field

from frugalflow import ContextLengthError, ProviderOverloadedError, RateLimitError
from frugalflow.testing import SimulatedChatModel, Simulator

HI = [HumanMessage("hello")]


def test_deterministic_for_a_seed() -> None:
    a = SimulatedChatModel(model_name="m", seed=1).invoke(HI).content
    b = SimulatedChatModel(model_name="m", seed=1).invoke(HI).content
    c = SimulatedChatModel(model_name="m", seed=2).invoke(HI).content
    assert a == b != c


def test_reports_usage() -> None:
    msg = SimulatedChatModel(model_name="m", output_tokens=100).invoke([HumanMessage("x" * 400)])
    usage = msg.usage_metadata
    assert 100 <= usage["input_tokens"] <= 110
    assert 60 <= usage["output_tokens"] <= 140
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]


class Address(BaseModel):
    city: str
    zip_code: str = Field(min_length=5)


class Order(BaseModel):
    id: int = Field(ge=1, le=99)
    status: Literal["open", "shipped"]
    price: float
    rush: bool
    items: list[str]
    ship_to: Address
    note: str | None = None


def test_structured_output_is_schema_valid() -> None:
    model = SimulatedChatModel(model_name="m")
    for seed in range(20):
        order = model.model_copy(update={"seed": seed}).with_structured_output(Order).invoke(HI)
        assert isinstance(order, Order) and 1 <= order.id <= 99


def test_responder_writes_answers() -> None:
    model = SimulatedChatModel(model_name="m", responder=lambda msgs: f"echo: {msgs[-1].content}")
    assert model.invoke(HI).content == "echo: hello"


def test_fault_on_nth_call(sim: Simulator) -> None:
    sim.fail("sim/m", "rate_limit", calls=[2], retry_after=3)
    model = SimulatedChatModel(model_name="m")
    model.invoke(HI)
    with pytest.raises(RateLimitError) as info:
        model.invoke(HI)
    assert info.value.retry_after == 3.0 and info.value.status_code == 429
    model.invoke(HI)


def test_fault_rate_is_seeded(sim: Simulator) -> None:
    def failures(seed: int) -> list[int]:
        sim.reset(seed=seed)
        sim.fail("sim", "server_error", rate=0.3)
        out = []
        model = SimulatedChatModel(model_name="m")
        for i in range(200):
            try:
                model.invoke(HI)
            except ProviderOverloadedError:
                out.append(i)
        return out

    first = failures(5)
    assert failures(5) == first
    assert 30 < len(first) < 90


def test_provider_down_for_a_window(clock) -> None:  # type: ignore[no-untyped-def]
    sim = Simulator(clock=clock)
    model = SimulatedChatModel(model_name="m", provider="sim-x", simulator=sim)
    sim.down("sim-x", seconds=10)
    with pytest.raises(ProviderOverloadedError):
        model.invoke(HI)
    clock.now += 11
    model.invoke(HI)


def test_context_window_is_enforced() -> None:
    model = SimulatedChatModel(model_name="m", context_window=100)
    with pytest.raises(ContextLengthError):
        model.invoke([HumanMessage("word " * 500)])


async def test_latency_is_configurable() -> None:
    model = SimulatedChatModel(model_name="m", latency=0.05)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await model.ainvoke(HI)
    assert loop.time() - t0 >= 0.05


async def test_simulated_judge_checks_answers_against_the_oracle() -> None:
    from flows.document_extraction import Invoice, sample_invoices
    from frugalflow.testing.oracles import read_invoice
    from frugalflow import Judge

    doc = sample_invoices(2, seed=1)[1]
    right = Invoice(**read_invoice([HumanMessage(doc)])[0])
    wrong = right.model_copy(update={"total": right.total + 1})
    sound = SimulatedChatModel(model_name="judge", provider="sim-j", accuracy=1.0)
    judge = Judge("Every field is as printed.")
    for answer, verdict in ((right, True), (wrong, False)):
        reply = await sound.ainvoke(judge.prompt(doc, answer.model_dump_json()))
        assert (Judge.verdict(str(reply.content)) is True) is verdict
    unsound = SimulatedChatModel(model_name="judge", provider="sim-j", accuracy=0.0)
    reply = await unsound.ainvoke(judge.prompt(doc, right.model_dump_json()))
    assert Judge.verdict(str(reply.content)) is not True  # a bad judge gets it wrong


async def test_a_judge_request_is_recognised_by_its_mark_not_its_wording() -> None:
    from langchain_core.messages import SystemMessage

    from frugalflow import Judge
    from frugalflow.testing.simulator import JUDGE_MARK, judge_request

    judge = Judge("Every field is as printed.")
    marked = judge.prompt("Invoice INV-1 from Acme", '{"vendor": "Acme"}')
    unmarked = [type(m)(content=m.content) for m in marked]  # the same words, no mark
    assert JUDGE_MARK == Judge.MARK
    assert judge_request(marked) == ("Invoice INV-1 from Acme", '{"vendor": "Acme"}')
    assert judge_request(unmarked) is None
    model = SimulatedChatModel(model_name="judge", provider="sim-j", accuracy=1.0)
    verdict = str((await model.ainvoke(marked)).content)
    assert verdict.split(":")[0] in ("APPROVE", "REJECT")
    plain = str((await model.ainvoke(unmarked)).content)
    assert plain.startswith("[judge] ")  # the judge's wording alone is an ordinary request
    reworded = [SystemMessage("Grade it."),
                HumanMessage("?", additional_kwargs=marked[-1].additional_kwargs)]
    # marked in other words: still a judge request (no oracle knows the input: a sound
    # judge approves)
    assert Judge.verdict(str((await model.ainvoke(reworded)).content)) is True


async def test_the_judge_mark_reaches_the_model_through_the_routed_model(make_ctx: Any) -> None:
    from frugalflow import Catalog, Judge, ModelSpec, Needs, RoutedChatModel
    from frugalflow.testing.simulator import judge_request

    seen: list[tuple[str, str] | None] = []

    def judge_says(messages: list[Any]) -> str:
        seen.append(judge_request(messages))
        return "APPROVE: fine."

    def spec(name: str, price: float, **update: Any) -> ModelSpec:
        return ModelSpec(provider="sim-a", model=name, simulated=True, input_price=price,
                         output_price=price, context_window=100_000,
                         quality={"writing": 0.9, "reasoning": 0.9}).model_copy(update=update)

    catalog = Catalog([spec("writer", 0.1),
                       spec("judge", 0.5, model_kwargs={"responder": judge_says})], name="j")
    model = RoutedChatModel(context=make_ctx(cat=catalog), node="n",
                            needs=Needs(quality={"writing": 0.4}))
    answer = await model.with_validator(Judge("The answer is specific.")).ainvoke(
        [HumanMessage("hello there")])
    assert len(seen) == 1 and seen[0] is not None
    question, judged_answer = seen[0]
    assert question == "hello there" and str(answer.content) in judged_answer


def test_importing_a_flow_leaves_the_simulator_alone(sim: Any, monkeypatch: Any) -> None:
    from pathlib import Path

    from frugalflow.cli import load_flow

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(sim, "oracles", {})
    for name in ("support_triage", "document_extraction", "research_brief"):
        load_flow(name)  # executes the flow's module afresh
    assert sim.oracles == {}


def test_the_process_wide_simulator_knows_the_flows_oracles(sim: Any) -> None:
    from frugalflow.testing.oracles import FLOW_ORACLES

    assert {name: sim.oracles[name] for name in FLOW_ORACLES} == FLOW_ORACLES
    assert Simulator().oracles == {}  # a simulator of your own knows what you give it
    assert Simulator(oracles=FLOW_ORACLES).oracles == FLOW_ORACLES
