"""Evaluation data sets: read cases from JSONL, CSV or pydantic-evals files, write them back, and
check them against a flow's input state before anything is paid."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .cases import EvalCase

if TYPE_CHECKING:
    from ..flow import Flow

__all__ = ["aload_cases", "check_cases", "load_cases", "save_cases"]


def load_cases(path: str | Path) -> list[EvalCase]:
    """The cases of a data set file (.jsonl, .csv, or pydantic-evals .yaml/.yml/.json)."""
    raise NotImplementedError


async def aload_cases(path: str | Path) -> list[EvalCase]:
    """`load_cases` off the event loop."""
    return await asyncio.to_thread(load_cases, path)


def save_cases(cases: Sequence[EvalCase], path: str | Path) -> None:
    """Write `cases` in pydantic-evals' Dataset format (YAML or JSON by suffix)."""
    raise NotImplementedError


def check_cases(cases: Sequence[EvalCase], flow: Flow[Any], node: str | None) -> None:
    """Raise UserError when a case's inputs do not fit the flow's state, or `node` is unknown."""
    raise NotImplementedError
