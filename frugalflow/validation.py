"""How an answer is checked: its structured output parsed against the schema, and the node's
validator's verdict (a callable, a pydantic model, or a `ModelJudge` such as `Judge`).

Used by the candidate loop (`attempts`) and by evaluations scoring with a node's validator
(`evaluation.scorers.ValidatorScorer`), so both judge an answer the same way.
"""

from __future__ import annotations

import asyncio
import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, cast

from langchain_core.messages import AIMessage, BaseMessage
from pydantic import BaseModel

from .exceptions import MalformedResponseError, UserError, ValidationFailedError, short_error

if TYPE_CHECKING:
    from .catalog import ModelSpec
    from .routed import RoutedChatModel

__all__ = ["ModelJudge", "Validator", "parse_output", "rejection", "validate"]


class ModelJudge(ABC):
    """A validator that is itself a model call (`Judge` registers here): it is given the
    routed model that asked, the model that answered, the prompt and the answer."""

    @abstractmethod
    async def check(self, routed: RoutedChatModel, spec: ModelSpec,
                    messages: Sequence[BaseMessage], subject: Any) -> bool | str:
        """True to accept; False or a reason to reject."""


Validator = Callable[[Any], object] | type[BaseModel] | ModelJudge
"""What checks a node's answers: a callable (sync or async) returning True/None to accept,
False or a reason string (or raising) to reject; a pydantic model the answer must fit; or a
`ModelJudge` such as `Judge` (another model decides)."""


def parse_output(schema: Any, spec: ModelSpec, message: AIMessage) -> Any:
    """The structured output parsed from `message` (None without a schema)."""
    if schema is None:
        return None
    calls = message.tool_calls
    if not calls:
        raise MalformedResponseError(
            f"{spec.key} returned no structured output (no tool call)",
            provider=spec.provider, model=spec.model,
        )
    if isinstance(schema, type) and issubclass(schema, BaseModel):
        try:
            return schema.model_validate(calls[0]["args"])
        except Exception as e:  # pydantic.ValidationError or a bad type
            raise MalformedResponseError(
                f"{spec.key} output fails schema {schema.__name__}: {short_error(e)}",
                provider=spec.provider, model=spec.model,
            ) from e
    return calls[0]["args"]


async def validate(routed: RoutedChatModel, validator: Validator, spec: ModelSpec,
                   message: AIMessage, parsed: Any, messages: Sequence[BaseMessage]) -> None:
    """Run the node's validator; a failure escalates to a more capable model."""
    reason = await rejection(routed, validator, spec, message, parsed, messages)
    if reason is not None:
        raise ValidationFailedError(f"{spec.key} output rejected by the validator: {reason}",
                                    provider=spec.provider, model=spec.model)


async def rejection(routed: RoutedChatModel | None, validator: Validator, spec: ModelSpec | None,
                    message: AIMessage | None, parsed: Any,
                    messages: Sequence[BaseMessage]) -> str | None:
    """Why `validator` rejects the answer (`parsed` if any, else `message`), or None when it
    accepts. A judge needs the routed model that asked and the answering model's spec."""
    subject = parsed if parsed is not None else message
    reason: str | None = None
    verdict: object  # False, or a str (the reason), rejects the answer
    try:
        if isinstance(validator, ModelJudge):
            if routed is None or spec is None:
                raise UserError("a Judge validator needs a routed model and a model to judge")
            verdict = await validator.check(routed, spec, messages, subject)
        elif isinstance(validator, type) and issubclass(validator, BaseModel):
            if parsed is None:
                validator.model_validate_json(str(getattr(message, "content", "")))
            else:
                validator.model_validate(
                    parsed.model_dump() if isinstance(parsed, BaseModel) else parsed)
            verdict = True
        else:
            # (mypy cannot narrow the union by `issubclass` above)
            verdict = cast(Callable[[Any], object], validator)(subject)
            if inspect.isawaitable(verdict):
                verdict = await verdict
    except (UserError, asyncio.CancelledError):
        raise
    except Exception as e:  # the validator's own words are the reason
        reason = short_error(e)
        verdict = False
    if verdict is False or isinstance(verdict, str):
        return verdict if isinstance(verdict, str) else reason or "returned False"
    return None
