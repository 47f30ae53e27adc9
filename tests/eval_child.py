"""An evaluation in a process of its own, for the SIGKILL test: it prints each recorded cell.

    python eval_child.py DB_URL   # prints "cell <n>" after the n-th cell is recorded
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any, TypedDict

from langchain_core.messages import HumanMessage

from frugalflow import END, START, Flow, Needs, RoutedChatModel
from frugalflow.catalog import Catalog
from frugalflow.evaluation.cases import EvalCase, Score
from frugalflow.evaluation.run import EvalProgress, Evaluation
from frugalflow.persistence import Store

MODELS = ["sim-openai/gpt-4.1-nano", "sim-google/gemini-2.5-flash-lite"]


class State(TypedDict, total=False):
    question: str
    answer: str


def flow() -> Flow[State]:
    f: Flow[State] = Flow("child", State)

    @f.node(needs=Needs(expected_output_tokens=40))
    async def answer(state: State, model: RoutedChatModel) -> State:
        reply = await model.ainvoke([HumanMessage(state["question"])])
        return {"answer": str(reply.content)}

    return f.add_edge(START, "answer").add_edge("answer", END)


class Answered:
    name = "answered"

    async def score(self, case: EvalCase, output: Any) -> Score:
        return Score(passed=bool(output["answer"]))


CASES = [EvalCase(id=f"q{i}", inputs={"question": f"what is {i} + {i}?"}) for i in range(6)]


def evaluation(db: str) -> Evaluation:
    return Evaluation(flow(), CASES, Answered(), node="answer", catalog=Catalog.simulated(),
                      candidates=MODELS, store=Store(db), concurrency=1)


async def main(db: str) -> None:
    ev = evaluation(db)

    def show(p: EvalProgress) -> None:
        print(f"cell {p.done}", flush=True)

    await ev.run(await ev.plan(), on_progress=show)
    print("finished", flush=True)


if __name__ == "__main__":
    from frugalflow.testing.simulator import simulator

    simulator.latency_scale = 0.3  # each call takes a while: the kill lands between cells
    asyncio.run(main(sys.argv[1]))
