"""What the emulator answers, in provider-neutral terms: seeded sentences, a tool call or
schema-valid JSON (a simulator oracle's right answer when it knows the schema), then shaped
by the answer-level faults (truncated, filtered, blocked, without usage)."""

from __future__ import annotations

import random
from typing import Any

from .dialects import Answer, Ask, Context, dumps, pieces, tokens
from .fake_json import fake_json

__all__ = ["compose", "oracle_answer", "shape"]

_VOCAB = (
    "the customer asked about their account and the team reviewed recent billing history "
    "before proposing a clear next step with a short summary of timing options risks and "
    "costs so that everyone understands what happens after the refund is processed today"
).split()


def oracle_answer(name: str, ask: Ask) -> dict[str, Any] | None:
    """The right answer when an oracle of the process-wide simulator knows this schema (it
    knows the ready-made flows'), so the flows' validators accept the emulator's answers;
    else None (a fake is generated)."""
    from langchain_core.messages import HumanMessage

    from .simulator import simulator

    read = simulator.oracles.get(name)
    if read is None:
        return None
    answer, _difficulty = read([HumanMessage(ask.last_text)])
    return dict(answer) if answer else None


def compose(ask: Ask, rng: random.Random, said: object, refused: bool) -> Answer:
    """The answer to `ask`: `said` (a responder's text, or JSON-able) if not None, else a
    tool call, schema-valid JSON or a few seeded sentences; empty when `refused`."""
    n_in = tokens(ask.prompt_chars)
    if refused:
        return Answer("", [], n_in, 1, refused=True)
    text = said if said is None or isinstance(said, str) else dumps(said)
    calls: list[tuple[str, str, dict[str, Any]]] = []
    if text is None:
        forced = ask.choice not in (None, "auto", "none")
        if ask.tools and ask.choice != "none" and (forced or not ask.after_tool):
            name, schema = next(((n, s) for n, s in ask.tools if n == ask.choice),
                                ask.tools[0])
            args = oracle_answer(name, ask)
            if args is None:
                args = fake_json(schema, rng)
            calls.append((f"call_{rng.getrandbits(64):016x}", name,
                          args if isinstance(args, dict) else {}))
            text = ""
        elif ask.json_schema is not None:
            known = oracle_answer(str(ask.json_schema.get("title", "")), ask)
            text = dumps(known if known is not None else fake_json(ask.json_schema, rng))
        else:
            text = _sentences(rng)
            if ask.json_mode:
                text = dumps({"answer": text})
    n_out = tokens(len(text) + sum(len(dumps(a)) + len(n) for _, n, a in calls))
    return Answer(text, calls, n_in, n_out)


def _sentences(rng: random.Random) -> str:
    sentences = []
    for _ in range(rng.randint(2, 3)):
        words = [rng.choice(_VOCAB) for _ in range(rng.randint(6, 11))]
        sentences.append(" ".join(words).capitalize() + ".")
    return " ".join(sentences)


def shape(answer: Answer, ctx: Context, kind: str | None, reason: str | None) -> Answer:
    """`answer` as the answer-level fault `kind` (if any) leaves it; `reason` is the filter's
    or the block's reason where the provider names one."""
    if kind == "stream_truncated" and not ctx.stream:
        answer.unfinished = True
    elif kind == "filtered":
        # The filter stops the answer part-way (Gemini's blocked candidate has no parts).
        answer.filtered = (reason or "SAFETY") if ctx.provider == "gemini" else "content_filter"
        answer.text = "".join(pieces(answer.text)[:2]) if not answer.tool_calls else ""
        answer.tool_calls = []
        answer.output_tokens = tokens(len(answer.text))
    elif kind == "prompt_blocked":
        answer.blocked = reason or "SAFETY"
        answer.text, answer.tool_calls, answer.output_tokens = "", [], 0
    elif kind == "no_usage":
        answer.usage = False
    return answer
