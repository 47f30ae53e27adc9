"""Judge: a validator that asks another routed model whether an answer is acceptable."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from pydantic import BaseModel

from .generation import INNER_CONFIG as _INNER_CONFIG
from .validation import ModelJudge
from .catalog import ModelSpec
from .exceptions import UserError
from .needs import Needs
from .needs import prompt_text as _prompt_text
from .routed import RoutedChatModel

__all__ = ["Judge"]


class Judge:
    """A validator that asks another model whether an answer is acceptable.

    ``model.with_validator(Judge("The reply answers the customer's question politely."))``:
    after each answer, a routed model with the judge's `needs` (never the model that wrote
    the answer) reads the criteria, the conversation's last message and the answer, and
    replies APPROVE or REJECT with a reason. A rejection escalates the answer to a more
    capable model like any validator failure (and is an outcome routers learn from); an
    unreadable verdict counts as a rejection. The judge's own calls are routed, priced and
    recorded under the node name `<node>:judge`. On the simulated catalog, judges check
    answers against the flows' oracles and err as often as their quality says.
    """

    MARK = "frugalflow_judge"
    """The key, in the judge prompt's `additional_kwargs`, that marks a judge request: no
    provider integration sends it, test doubles recognise a judge request by it (never by the
    prompt's wording) and read what is judged from it."""

    def __init__(self, criteria: str, *, needs: Needs | None = None) -> None:
        if not criteria.strip():
            raise UserError("Judge needs criteria: what makes an answer acceptable")
        self.criteria = criteria.strip()
        self.needs = needs if needs is not None else Needs(quality={"reasoning": 0.75},
                                                           expected_output_tokens=60)

    def __repr__(self) -> str:
        return f"Judge({self.criteria[:40]!r})"

    def prompt(self, question: str, answer: str) -> list[BaseMessage]:
        return [
            SystemMessage(
                "You check another model's answer against criteria. Reply with APPROVE or "
                "REJECT as the first word, then one sentence of reasons.\n"
                f"Criteria: {self.criteria}"),
            HumanMessage(f"Input:\n{question}\n\nAnswer:\n{answer}",
                         additional_kwargs={self.MARK: {"input": question, "answer": answer}}),
        ]

    @staticmethod
    def verdict(text: str) -> bool | str:
        """True for APPROVE; the reason for REJECT or an unreadable reply."""
        words = text.strip().split(None, 1)
        first = words[0].strip("*:.,!").upper() if words else ""
        rest = words[1].strip() if len(words) > 1 else ""
        if first == "APPROVE":
            return True
        if first == "REJECT":
            return f"the judge rejected it: {rest or 'no reason given'}"
        return f"the judge's verdict was unreadable: {text.strip()[:120]!r}"

    async def check(self, routed: RoutedChatModel, spec: ModelSpec,
                    messages: Sequence[BaseMessage], subject: Any) -> bool | str:
        answer = (subject.model_dump_json() if isinstance(subject, BaseModel)
                  else json.dumps(subject, default=str) if isinstance(subject, dict)
                  else str(getattr(subject, "content", subject)))
        judge = RoutedChatModel(
            needs=self.needs.with_(exclude_models=(*self.needs.exclude_models, spec.key)),
            context=routed.context, node=f"{routed.node or 'model'}:judge",
        )
        reply = await judge.ainvoke(self.prompt(_prompt_text(messages), answer),
                                    config=_INNER_CONFIG)
        return self.verdict(str(reply.content))


# The routed model's validation recognises a judge by this base (it cannot import this
# module: a judge is itself built on a routed model).
ModelJudge.register(Judge)
