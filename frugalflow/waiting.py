"""Runs that wait: which of a run's interrupts are parked calls, what a run's deadline is,
and how a waiting run is resumed (the runner's side of `frugalflow.batches.parking`)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta, timezone
from typing import Any

from langgraph.types import Command, Interrupt

from .batches.parking import is_waiting
from .exceptions import UserError

__all__ = ["deadline_at", "parked_interrupts", "resume_input", "user_interrupts"]


def _value(interrupt: Interrupt | dict[str, Any]) -> object:
    # LangGraph's "tasks" stream gives interrupts as dicts, its state snapshot as objects.
    return interrupt.get("value") if isinstance(interrupt, dict) else interrupt.value


def user_interrupts(interrupts: Sequence[Any]) -> list[Any]:
    """The interrupts that ask a human (not parked calls)."""
    return [i for i in interrupts if not is_waiting(_value(i))]


def parked_interrupts(interrupts: Sequence[Any]) -> list[Any]:
    return [i for i in interrupts if is_waiting(_value(i))]


def resume_input(interrupts: Sequence[Interrupt], value: Any) -> Any:
    """The graph input resuming a run with `interrupts` pending and a human's `value`:
    None when only parked calls wait (their nodes run again and look for their answers),
    the value addressed to the one human interrupt when parked calls wait beside it."""
    users = user_interrupts(interrupts)
    if not users:
        return None
    if len(users) == 1 and len(users) < len(interrupts):
        return Command(resume={users[0].id: value})
    return Command(resume=value)


def deadline_at(deadline: timedelta | datetime | None, now: datetime | None = None) -> datetime | None:
    """A run's default deadline as a UTC moment (`timedelta`: from now)."""
    if deadline is None:
        return None
    now = now or datetime.now(timezone.utc)
    if isinstance(deadline, timedelta):
        if deadline <= timedelta(0):
            raise UserError(f"deadline must be a positive duration or a future time, got "
                            f"{deadline}")
        return now + deadline
    if deadline.tzinfo is None:
        raise UserError(f"deadline {deadline.isoformat()} has no time zone; give an aware "
                        "datetime (e.g. datetime(..., tzinfo=timezone.utc)) or a timedelta")
    if deadline <= now:
        raise UserError(f"deadline {deadline.isoformat()} is already past; give a future time")
    return deadline.astimezone(timezone.utc)
