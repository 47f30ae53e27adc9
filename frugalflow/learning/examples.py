"""What routers learn from: `Example`, one logged outcome, and the category string of an input."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..exceptions import UserError

__all__ = ["Example", "tags_for"]


@dataclass(frozen=True, slots=True)
class Example:
    """One logged outcome: `model` was given `text` (at `node`) and succeeded or not."""

    node: str | None
    text: str
    model: str
    success: bool
    category: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise UserError(f"Example.weight must be a finite number >= 0, got {self.weight!r}")


def tags_for(node: str | None, category: str | None) -> str | None:
    """The featurizers' category string for an input: `node:<n>|cat:<c>` (parts optional)."""
    parts = []
    if node:
        parts.append(f"node:{node}")
    if category:
        parts.append(f"cat:{category}")
    return "|".join(parts) or None

