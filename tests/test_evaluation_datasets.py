"""Evaluation data sets: JSONL, CSV and pydantic-evals files in and out, and every bad input
caught before anything is paid."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypedDict

import pytest
from langgraph.graph.message import add_messages
from pydantic import BaseModel
from pydantic_evals import Case, Dataset

from frugalflow import END, START, Flow, Needs, RoutedChatModel, UserError
from frugalflow.evaluation.cases import EvalCase, Request
from frugalflow.evaluation.datasets import aload_cases, check_cases, load_cases, save_cases


class TicketState(TypedDict, total=False):
    ticket: str
    priority: int
    tags: list[str]
    label: str
    messages: Annotated[list[Any], add_messages]


def ticket_flow() -> Flow[TicketState]:
    flow: Flow[TicketState] = Flow("tickets", TicketState)

    @flow.node(needs=Needs())
    async def classify(state: TicketState, model: RoutedChatModel) -> TicketState:
        return {"label": "billing"}

    flow.add_edge(START, "classify")
    flow.add_edge("classify", END)
    return flow


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# -- reading -------------------------------------------------------------------------------


def test_jsonl_reads_pydantic_evals_cases_and_flat_objects(tmp_path: Path) -> None:
    f = write(tmp_path / "cases.jsonl", "\n".join([
        json.dumps({"name": "refund", "inputs": {"ticket": "refund me"},
                    "expected_output": {"label": "billing"}, "metadata": {"lang": "en"}}),
        "",  # blank lines are skipped
        json.dumps({"ticket": "where is my parcel", "priority": 2, "expected": "shipping"}),
        json.dumps({"id": "t3", "ticket": "login broken"}),
        json.dumps({"id": "t4", "name": "Dana", "ticket": "hi"}),  # with an id, name is input
    ]) + "\n")
    cases = load_cases(f)
    assert [c.id for c in cases] == ["refund", "row-2", "t3", "t4"]
    assert cases[0].inputs == {"ticket": "refund me"}
    assert cases[0].expected == {"label": "billing"} and cases[0].metadata == {"lang": "en"}
    assert cases[1].inputs == {"ticket": "where is my parcel", "priority": 2}
    assert cases[1].expected == "shipping"
    assert cases[2].inputs == {"ticket": "login broken"} and cases[2].expected is None
    assert cases[3].id == "t4" and cases[3].inputs == {"name": "Dana", "ticket": "hi"}


def test_csv_decodes_json_cells_and_keeps_the_rest_as_text(tmp_path: Path) -> None:
    f = write(tmp_path / "cases.csv",
              'name,ticket,priority,tags,expected_output\n'
              'a,"refund, please",3,"[""billing""]","{""label"": ""billing""}"\n'
              ',007 agent,1.5,plain,\n')
    first, second = load_cases(f)
    assert first.id == "a" and first.inputs == {"ticket": "refund, please", "priority": 3,
                                                 "tags": ["billing"]}
    assert first.expected == {"label": "billing"}
    # "007" is not a JSON number, "1.5" is; an empty expected cell means none
    assert second.id == "row-2" and second.inputs == {"ticket": "007 agent", "priority": 1.5,
                                                      "tags": "plain"}
    assert second.expected is None


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_pydantic_evals_files_round_trip_both_ways(tmp_path: Path, suffix: str) -> None:
    cases = [
        EvalCase("refund", {"ticket": "refund me", "priority": 1}, {"label": "billing"},
                 {"lang": "en"}),
        EvalCase("parcel", {"ticket": "where is it"}),
        EvalCase("replayed", {}, "ok", request=Request(
            messages=[{"type": "human", "data": {"content": "hi"}}],
            tools=[{"type": "function", "function": {"name": "f"}}], schema={"title": "A"})),
    ]
    path = tmp_path / f"set{suffix}"
    save_cases(cases, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no stray schema file
    # pydantic-evals reads what we wrote
    dataset = Dataset[Any, Any, Any].from_file(path)
    assert [c.name for c in dataset.cases] == ["refund", "parcel", "replayed"]
    assert dataset.cases[0].inputs == {"ticket": "refund me", "priority": 1}
    assert dataset.cases[0].expected_output == {"label": "billing"}
    # and we read it back as it was, the recorded request included
    assert load_cases(path) == cases
    # a file pydantic-evals wrote, with its evaluators (ours is given apart), reads too
    theirs = Dataset[Any, Any, Any](name="theirs", cases=[
        Case(name="x", inputs={"ticket": "t"}, expected_output="billing")])
    theirs.to_file(tmp_path / f"theirs{suffix}", schema_path=None)
    (case,) = load_cases(tmp_path / f"theirs{suffix}")
    assert case == EvalCase("x", {"ticket": "t"}, "billing")


def test_a_pydantic_evals_file_with_custom_evaluators_still_gives_its_cases(
        tmp_path: Path) -> None:
    f = write(tmp_path / "custom.yaml",
              "cases:\n- name: a\n  inputs: {ticket: t}\n  evaluators: [MyOwnEvaluator]\n"
              "evaluators: [EqualsExpected, SomethingCustom]\n")
    assert load_cases(f) == [EvalCase("a", {"ticket": "t"})]


async def test_aload_reads_off_the_event_loop(tmp_path: Path) -> None:
    f = write(tmp_path / "c.jsonl", '{"ticket": "x"}\n')
    assert await aload_cases(f) == [EvalCase("row-1", {"ticket": "x"})]


# -- bad files -----------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("c.jsonl", '{"ticket": "a"}\n{"ticket": \n', r"c\.jsonl, line 2: not valid JSON"),
    ("c.jsonl", '{"ticket": "a"}\n[1, 2]\n', r"line 2: a JSON list, not an object"),
    ("c.jsonl", '{"inputs": "text", "name": "x"}\n',
     r"line 1: inputs must be an object"),  # case-shaped only when inputs is an object...
    ("c.jsonl", '{"id": "a", "ticket": "x"}\n{"name": "a", "ticket": "y"}\n',
     r"case id 'a' is used by cases 1 and 2; give every case its own id"),
    ("c.jsonl", "\n  \n", r"c\.jsonl is empty"),
    ("c.csv", "ticket,priority\nx,1,extra\n", r"row 1 \(line 2\): more cells than the header"),
    ("c.csv", "ticket,priority\nx\n", r"row 1 \(line 2\): fewer cells"),
    ("c.csv", "ticket,ticket\nx,y\n", r"column 'ticket' appears twice"),
    ("c.csv", "ticket\n", r"c\.csv has no cases"),
    ("c.yaml", "cases:\n- name: a\n  inputs: {t: 1}\n- name: a\n  inputs: {t: 2}\n",
     r"Duplicate case name: 'a'; give every case its own name"),
    ("c.yaml", "cases: [\n", r"cannot be read as a pydantic-evals Dataset .*YAML syntax"),
    ("c.yaml", "rows:\n- a\n", r"not a pydantic-evals Dataset file: .*write `cases:`"),
    ("c.json", '{"cases": [{"name": "a", "inputs": 3}]}', r"inputs must be an object"),
    ("c.txt", "x", r"unknown file type '\.txt'; use a \.jsonl, \.csv"),
])
def test_a_bad_file_is_one_clear_error(tmp_path: Path, name: str, text: str,
                                       expected: str) -> None:
    f = write(tmp_path / name, text)
    with pytest.raises(UserError, match=expected) as info:
        load_cases(f)
    assert "\n" not in str(info.value)


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"does not exist; check the path"):
        load_cases(tmp_path / "nope.jsonl")


# -- checked against the flow --------------------------------------------------------------


def test_cases_that_fit_the_state_pass_the_check() -> None:
    check_cases([EvalCase("a", {"ticket": "t", "priority": 2, "tags": ["x"]}),
                 # messages go through LangGraph's reducer, which converts dicts and strings
                 EvalCase("b", {"messages": [{"role": "user", "content": "hi"}]}),
                 # a replayed call is not node input
                 EvalCase("c", request=Request(messages=[]))], ticket_flow(), "classify")


def test_numbers_read_for_text_fields_become_text_again(tmp_path: Path) -> None:
    f = write(tmp_path / "c.csv", "ticket,priority\n88231,2\n")
    given = load_cases(f)
    assert given[0].inputs == {"ticket": 88231, "priority": 2}  # the CSV cannot know
    (fitted,) = check_cases(given, ticket_flow(), "classify")
    assert fitted.inputs == {"ticket": "88231", "priority": 2}
    assert check_cases(given[:0], ticket_flow(), None) == []


def test_unknown_and_mistyped_fields_are_named_with_the_expected_fields() -> None:
    cases = [EvalCase("ok", {"ticket": "t"}),
             EvalCase("typo", {"tikcet": "t"}),
             EvalCase("wrong", {"ticket": "t", "priority": "high", "tags": "x"}),
             EvalCase("empty", {})]
    with pytest.raises(UserError) as info:
        check_cases(cases, ticket_flow(), None)
    text = str(info.value)
    assert text.startswith("3 of 4 cases do not fit flow 'tickets'")
    assert "TicketState: ticket, priority, tags, label, messages" in text
    assert "case 'typo': unknown field 'tikcet' (did you mean 'ticket'?)" in text
    assert "case 'wrong': field 'priority': input should be a valid integer" in text
    assert "got 'high'" in text and "field 'tags': input should be a valid list" in text
    assert "case 'empty': no inputs" in text and "'ok'" not in text


def test_only_the_first_offending_cases_are_listed() -> None:
    cases = [EvalCase(f"c{i}", {"nope": i}) for i in range(10)]
    with pytest.raises(UserError, match=r"10 of 10 cases .* \(and 7 more cases\)") as info:
        check_cases(cases, ticket_flow(), None)
    assert "c3" not in str(info.value)


def test_a_pydantic_state_is_checked_too() -> None:
    class State(BaseModel):
        question: str
        n: int = 0

    flow: Flow[State] = Flow("pyd", State)
    flow.add_node("noop", lambda s: {})
    check_cases([EvalCase("a", {"question": "q", "n": 3})], flow, "noop")
    with pytest.raises(UserError, match=r"case 'b': field 'n': input should be a valid integer"):
        check_cases([EvalCase("b", {"question": "q", "n": [1]})], flow, "noop")


def test_an_unknown_node_names_the_flows_nodes() -> None:
    with pytest.raises(UserError, match=r"flow 'tickets' has no node 'clasify' \(did you mean "
                                        r"'classify'\?\); its nodes: classify"):
        check_cases([EvalCase("a", {"ticket": "t"})], ticket_flow(), "clasify")
