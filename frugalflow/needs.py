"""What a node needs of a model (`Needs`), and what a call's messages weigh (token estimates).

A node declares `Needs`: hard needs (capabilities, context, providers, price and latency
caps, quality minimums) filter the catalog, the rest rank what is left (see `ranking`).
The estimates here are tokenizer-free: about four characters a token.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import timedelta
from enum import StrEnum
from functools import cached_property
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


__all__ = [
    "SKILLS", "Needs", "Unscored", "estimate_tokens", "prompt_text", "tool_tokens",
    "unscored_reason"]


# The skills a model has a quality score in (the catalog) and a node may ask a minimum of.
SKILLS: tuple[str, ...] = (
    "classification",
    "extraction",
    "summarization",
    "writing",
    "reasoning",
    "coding",
    "math",
    "tool_use",
)


class Unscored(StrEnum):
    """What a quality minimum does with a model that has no score for the skill."""

    REJECT = "reject"
    """Not a candidate until it is scored (measure it with `frugalflow eval`)."""
    ACCEPT = "accept"
    """A candidate like a model that meets the minimum (its cost decides)."""


def unscored_reason(skill: str) -> str:
    """Why the default rule rejects a model with no `skill` score, and the ways out."""
    return (f"unscored for {skill} (rule: reject; measure it with `frugalflow eval`, "
            "or set Needs(unscored='accept'))")


class Needs(BaseModel):
    """What a node requires of a model.

    Hard needs filter the catalog; the rest rank what is left. The context window needed
    is computed per call from the actual messages plus `max_output_tokens` (or
    `expected_output_tokens`).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    tools: bool = False
    structured_output: bool = False
    vision: bool = False
    reasoning: bool = False
    streaming: bool = False
    min_context: int | None = Field(default=None, gt=0)
    quality: dict[str, float] = Field(default_factory=dict)
    """Minimum score per skill, 0..1 (skills: classification, extraction, ...)."""
    unscored: Unscored = Unscored.REJECT
    """What `quality` does with a model that has no score for a skill it names."""
    providers: tuple[str, ...] | None = None
    """Only these providers (None: any)."""
    exclude_providers: tuple[str, ...] = ()
    models: tuple[str, ...] | None = None
    """Only these `provider/model` keys (None: any)."""
    exclude_models: tuple[str, ...] = ()
    max_cost_per_call: float | None = Field(default=None, gt=0)
    """USD: candidates whose expected cost for the call exceeds this are rejected."""
    max_latency_ms: float | None = Field(default=None, gt=0)
    expected_output_tokens: int = Field(default=400, gt=0)
    max_output_tokens: int | None = Field(default=None, gt=0)
    target: float | None = Field(default=None, ge=0, le=1)
    """With a router in the run: first the cheapest model predicted to succeed with at least
    this probability on *this* input."""
    price_weight: float | None = Field(default=None, ge=0)
    """With a router: order by predicted success minus this weight times the expected cost."""
    deadline: timedelta | None = None
    """How long after the run's start this node's answers may come (e.g. 6 hours). With a
    deadline the node may be served on a cheaper tier that answers later (batch, flex, an
    off-peak hour) when it can still answer in time; None: the run's default deadline
    (`Runner.start(deadline=...)`), else now, at standard prices. `timedelta(0)`: now, even
    under a run's default deadline (the node may not wait: standard tier, ranked as without
    a deadline)."""
    cascade: bool = False
    """With a router: try models in order of expected cost per success (cost / p), the order
    that minimises the expected spend until an answer passes the node's validator (outcomes
    taken as independent). For nodes whose validator escalates: quality is held by the
    validator, the router only saves the calls that would fail."""

    @model_validator(mode="after")
    def _one_routing_rule(self) -> Needs:
        if self.cascade and (self.target is not None or self.price_weight is not None):
            raise ValueError("cascade orders by cost per success; it cannot be combined with "
                             "target or price_weight (choose one routing rule)")
        return self

    @field_validator("deadline")
    @classmethod
    def _deadline_not_negative(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value < timedelta(0):
            raise ValueError(f"deadline must be a duration (e.g. timedelta(hours=6); "
                             f"timedelta(0): answer now), got {value}")
        return value

    @property
    def answers_now(self) -> bool:
        """Whether the node may not wait, whatever its run's default deadline
        (`deadline=timedelta(0)`)."""
        return self.deadline == timedelta(0)

    @property
    def routed(self) -> bool:
        """Whether a run's router reorders the candidates for these needs."""
        return self.target is not None or self.price_weight is not None or self.cascade

    @field_validator("quality")
    @classmethod
    def _valid_quality(cls, value: dict[str, float]) -> dict[str, float]:
        for skill, score in value.items():
            if skill not in SKILLS:
                import difflib

                close = difflib.get_close_matches(skill, SKILLS, n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(
                    f"unknown skill {skill!r}{hint}; skills are: {', '.join(SKILLS)}"
                )
            if not 0.0 <= score <= 1.0:
                raise ValueError(f"quality[{skill!r}] must be between 0 and 1, got {score}")
        return value

    @field_validator("providers", "exclude_providers", "models", "exclude_models", mode="before")
    @classmethod
    def _tuple(cls, value: Any) -> Any:
        if isinstance(value, str):
            return (value,)
        return tuple(value) if value is not None else None

    def with_(self, **changes: Any) -> Needs:
        """A copy with `changes` applied and validated (fields left at their default stay
        so: an output estimate tells a node's own setting from the default)."""
        return Needs(**{**self.model_dump(exclude_unset=True), **changes})

    @property
    def output_budget(self) -> int:
        return self.max_output_tokens or self.expected_output_tokens

    @cached_property
    def cache_key(self) -> tuple[Any, ...]:
        """A hashable form of these needs (computed once)."""
        d = self.model_dump()
        d["quality"] = tuple(sorted(self.quality.items()))
        return tuple(sorted(d.items()))

    def describe(self) -> str:
        """The non-default needs, e.g. `tools, quality.writing>=0.8`."""
        return self._description

    @cached_property
    def _description(self) -> str:
        # LangChain asks for it on every call (identifying params): computed once.
        parts: list[str] = []
        for name in ("tools", "structured_output", "vision", "reasoning", "streaming"):
            if getattr(self, name):
                parts.append(name)
        parts += [f"quality.{k}>={v}" for k, v in sorted(self.quality.items())]
        if self.quality and self.unscored is not Unscored.REJECT:
            parts.append(f"unscored={self.unscored.value}")
        for name in ("min_context", "providers", "exclude_providers", "models",
                     "exclude_models", "max_cost_per_call", "max_latency_ms", "target",
                     "price_weight", "cascade", "deadline"):
            value = getattr(self, name)
            if value:
                parts.append(f"{name}={value}")
        if self.answers_now:
            parts.append("deadline=0 (answers now)")
        return ", ".join(parts) or "no special needs"


# -- token estimation ----------------------------------------------------------------

_IMAGE_TOKENS = 800


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return len(content) // 4 + 1
    if isinstance(content, list):
        n = 0
        for block in content:
            if isinstance(block, str):
                n += len(block) // 4 + 1
            elif isinstance(block, dict):
                kind = block.get("type")
                if kind in ("image", "image_url"):
                    n += _IMAGE_TOKENS
                else:
                    n += len(str(block.get("text", ""))) // 4 + 1
        return n
    return len(str(content)) // 4 + 1


def estimate_tokens(messages: Sequence[BaseMessage], tools: Sequence[Any] = ()) -> int:
    """A tokenizer-free estimate of a prompt's input tokens (about 4 characters a token)."""
    n = 0
    for m in messages:
        n += 4 + _content_tokens(m.content)
        if isinstance(m, AIMessage) and m.tool_calls:
            n += len(json.dumps([c.get("args") for c in m.tool_calls], default=str)) // 4
    return n + tool_tokens(tools) if tools else n


def tool_tokens(tools: Sequence[Any]) -> int:
    """Estimated prompt tokens taken by tool definitions."""
    return sum(len(json.dumps(tool_schema(t), default=str)) // 4 for t in tools)


def tool_schema(tool: Any) -> dict[str, Any]:
    try:
        return convert_to_openai_tool(tool)
    except Exception:  # an odd tool only makes the estimate rougher
        return {"name": str(tool)}


def has_images(messages: Sequence[BaseMessage]) -> bool:
    for m in messages:
        if isinstance(m.content, list):
            for block in m.content:
                if isinstance(block, dict) and block.get("type") in ("image", "image_url"):
                    return True
    return False


def prompt_text(messages: Sequence[BaseMessage], limit: int = 4000) -> str:
    """The text a router reads: the last human message (or the last message)."""
    for m in reversed(messages):
        if isinstance(m, HumanMessage):
            return str(m.content)[:limit]
    return str(messages[-1].content)[:limit] if messages else ""
