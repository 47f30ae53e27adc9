"""Cases drawn from production: a node's recorded calls (the request as sent, the answer
production accepted), and replaying a recorded request to another model."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING

from .cases import EvalCase, Request

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.messages import AIMessage

    from ..persistence.ledger import Ledger

__all__ = ["cases_from_ledger", "replay_request"]


async def cases_from_ledger(ledger: Ledger, *, flow: str, node: str,
                            since: datetime | None = None, until: datetime | None = None,
                            limit: int | None = None, seed: int = 0) -> list[EvalCase]:
    """The node's recorded successful calls with a request, as cases (seeded sample)."""
    raise NotImplementedError


async def replay_request(model: BaseChatModel, request: Request) -> AIMessage:
    """Send a recorded request to `model`, bound to its tools / response schema as recorded."""
    raise NotImplementedError
