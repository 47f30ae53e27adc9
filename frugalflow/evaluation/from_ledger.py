"""Cases drawn from production: a node's recorded calls (the request as sent, the answer
production accepted), and replaying a recorded request to another model.

A durable run records, with each successful call, its request (`Attempt.request`: messages,
tools, response schema). Those calls are the evaluation's cases: replayed as they were to
each candidate, and compared with the answer production accepted. An OK attempt passed the
node's validator (a rejected answer is an error attempt, and the call moved on), so the
reference is the OK answer unless a user marked it bad: a call with negative feedback stays
a case, without a reference and with `metadata["feedback"] = False`.
"""

from __future__ import annotations

import hashlib
from datetime import datetime
from typing import TYPE_CHECKING, Any

from langchain_core.messages import AIMessage, messages_from_dict

from ..exceptions import UserError
from .cases import EvalCase, Request
from .scorers import output_value

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel

    from ..persistence.ledger import Ledger, RecordedCall

__all__ = ["cases_from_ledger", "replay_request", "request_of"]


async def cases_from_ledger(ledger: Ledger, *, flow: str, node: str,
                            since: datetime | None = None, until: datetime | None = None,
                            limit: int | None = None, seed: int = 0) -> list[EvalCase]:
    """The successful calls of `node` in `flow` recorded with their request, started in
    [since, until), as cases (oldest first): each carries its `request` and, as `expected`,
    the answer production accepted (`output_value` of it), unless it got negative feedback.

    With `limit`, a seeded random sample of that many: each call's rank is a hash of the
    seed and its id, so the same seed draws the same calls, and calls recorded later displace
    only the ones they outrank. UserError when nothing matches, saying which filter emptied
    it and how to widen it."""
    if limit is not None and limit < 1:
        raise UserError(f"limit must be at least 1 call, got {limit}")
    if since is not None and until is not None and since >= until:
        raise UserError(f"since ({since.isoformat()}) must be before until "
                        f"({until.isoformat()})")

    def pick(ids: list[int]) -> list[int]:
        if limit is None or limit >= len(ids):
            return ids
        return sorted(ids, key=lambda i: _rank(seed, i))[:limit]

    calls = await ledger.recorded_calls(flow=flow, node=node, since=since, until=until,
                                        pick=pick)
    if not calls:
        raise UserError(await _nothing_found(ledger, flow, node, since, until))
    return [_case(call) for call in calls]


def _rank(seed: int, attempt_id: int) -> bytes:
    return hashlib.sha256(f"{seed}:{attempt_id}".encode()).digest()


def _case(call: RecordedCall) -> EvalCase:
    request = request_of(call.request)
    answer: AIMessage | None = None
    if call.response is not None:
        (message,) = messages_from_dict([call.response])
        answer = message if isinstance(message, AIMessage) else None
    metadata: dict[str, Any] = {"run_id": call.run_id, "call_id": call.call_id,
                                "model": call.model, "started_at": call.started_at.isoformat()}
    if call.feedback is not None:
        metadata["feedback"] = call.feedback
    accepted = answer is not None and call.feedback is not False
    return EvalCase(id=f"attempt-{call.id}", inputs={},
                    expected=output_value(answer, request) if accepted else None,
                    metadata=metadata, request=request)


def request_of(recorded: dict[str, Any]) -> Request:
    """The `Request` of a recorded request (`Attempt.request`, ff_attempts.request)."""
    return Request(messages=list(recorded.get("messages") or []),
                   tools=list(recorded.get("tools") or []), schema=recorded.get("schema"))


async def _nothing_found(ledger: Ledger, flow: str, node: str, since: datetime | None,
                         until: datetime | None) -> str:
    """Why no recorded call matched: the flow, the node, the requests, or the time range."""
    calls, replayable, first, last = await ledger.recorded_span(flow=flow, node=node)
    if calls == 0:
        in_flow, _, _, _ = await ledger.recorded_span(flow=flow)
        if in_flow == 0:
            flows = sorted(r.key for r in await ledger.costs("flow") if r.key != "None")
            known = f"flows recorded: {', '.join(flows)}" if flows else "it records no calls"
            return (f"no successful calls of flow {flow!r} in this ledger ({known}); check "
                    "the flow name and the database")
        nodes = sorted(r.key for r in await ledger.costs("node", flow=flow) if r.calls)
        return (f"flow {flow!r} has no successful calls of node {node!r} in this ledger; "
                f"nodes with calls: {', '.join(nodes) or 'none'}")
    if replayable == 0:
        return (f"the {calls} recorded calls of {flow}/{node} carry no request (recorded "
                "before frugalflow kept requests); run the flow durably (a Runner with a "
                "database) to record calls that can be replayed")
    span = f"recorded from {_when(first)} to {_when(last)}"
    return (f"none of the {replayable} replayable calls of {flow}/{node} ({span}) started "
            f"between {_when(since) if since else 'the first'} and "
            f"{_when(until) if until else 'now'}; widen or drop since/until")


def _when(moment: datetime | None) -> str:
    return moment.isoformat(timespec="seconds") if moment is not None else "?"


async def replay_request(model: BaseChatModel, request: Request, *,
                         key: str | None = None) -> AIMessage:
    """Send a recorded request to `model` (a built chat model) as production sent it: the
    same messages, bound to the same tools, and to the response schema as a forced tool
    call (as `with_structured_output` binds it), so `output_value(answer, request)` reads
    the structured output back. `key` (the catalog's `provider/model`) is written where
    routed answers say who answered, so a judge never judges its own model's answer."""
    messages = messages_from_dict(request.messages)
    tools: list[Any] = list(request.tools)
    if request.schema is not None:
        if not request.schema.get("title"):
            raise UserError("the recorded response schema has no title; it cannot be bound "
                            "as a tool")
        tools.append(request.schema)
    runnable: Any = model
    if tools:
        runnable = (model.bind_tools(tools, tool_choice="any") if request.schema is not None
                    else model.bind_tools(tools))
    answer = await runnable.ainvoke(messages)
    if not isinstance(answer, AIMessage):
        raise TypeError(f"{type(model).__name__} answered a {type(answer).__name__}, not an "
                        "AIMessage")
    if key is not None:
        answer.response_metadata = {**answer.response_metadata, "frugalflow": {"model": key}}
    return answer
