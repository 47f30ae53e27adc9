"""How a run stands when the runner returns (RunResult), and how one execution ended."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .statuses import RunStatus

__all__ = ["ENDED", "STOPPED", "Ending", "RunResult"]


@dataclass
class RunResult:
    """Where a run stands after the runner returned from it."""

    run_id: str
    status: RunStatus
    state: dict[str, Any] | None = None
    cost_usd: float = 0.0
    error: str | None = None
    interrupts: list[Any] = field(default_factory=list)
    lost_lease: bool = field(default=False, repr=False)
    """This executor stopped because another executor took the run over (status `paused`
    here; the run goes on there)."""

    def __post_init__(self) -> None:
        # Typed as the enum for type checkers; a plain string (a ledger row's) becomes it
        # here, so `result.status is RunStatus.FAILED` and a misspelt status fail early.
        self.status = RunStatus(self.status)

    @property
    def ok(self) -> bool:
        return self.status == RunStatus.SUCCEEDED


ENDED = frozenset({RunStatus.INTERRUPTED, RunStatus.BUDGET_EXCEEDED, RunStatus.FAILED,
                    RunStatus.SUCCEEDED, RunStatus.CANCELLED})
"""Where a run stays until someone acts on it (resume, cancel, start anew)."""
STOPPED = ENDED | {RunStatus.PAUSED, RunStatus.WAITING}
"""Where one execution of a run stops (a `waiting` run is woken by the batch poller)."""


@dataclass
class Ending:
    """How one execution of a run stopped: what is recorded as the run's end."""

    status: RunStatus = RunStatus.FAILED
    values: dict[str, Any] | None = None
    interrupts: list[Any] = field(default_factory=list)
    error: str | None = None
    error_type: str | None = None
    continuation: bool = False
    """The run had executed before (its node rows may be left open, its calls replayed)."""

    def stop(self, status: RunStatus, error: str, cause: BaseException) -> None:
        self.status, self.error, self.error_type = status, error, type(cause).__name__

    def result(self, run_id: str) -> RunResult:
        return RunResult(run_id, self.status, self.values, error=self.error,
                         interrupts=self.interrupts)
