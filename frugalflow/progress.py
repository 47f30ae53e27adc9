"""What the CLI shows while a run goes on: per node its model, attempts, running cost and
elapsed time, redrawn in place on a terminal, one line per event elsewhere (logs, pipes).

`RunProgress` consumes the runner's events (`node_started`, `attempt`, `node_finished`,
`run_finished`); it never calls a model or the database, so it can be fed from any source
of events (the in-process bus, the service's stream).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .statuses import NodeStatus, Outcome

__all__ = ["NodeLine", "RunProgress"]

Clock = Callable[[], float]


@dataclass(slots=True)
class NodeLine:
    """One node execution as the view shows it."""

    node: str
    started: float
    status: str = "running"
    model: str | None = None
    attempts: int = 0
    failures: list[str] = field(default_factory=list)
    cost_usd: float = 0.0
    ended: float | None = None

    def elapsed(self, now: float) -> float:
        return (self.ended if self.ended is not None else now) - self.started


class RunProgress:
    """A live view of one run (or several) from its events.

    On a terminal the table is redrawn in place (`rich.live.Live`, started by `__enter__`);
    elsewhere each event prints one line, as a log would, so nothing waits for the end.
    """

    def __init__(self, console: Console, *, clock: Clock = time.monotonic,
                 live: bool | None = None) -> None:
        self.console = console
        self.clock = clock
        self.started = clock()
        self.nodes: dict[str, NodeLine] = {}  # by task id (a node may run more than once)
        self.cost_usd = 0.0
        self.finished: str | None = None
        self._live_wanted = console.is_terminal if live is None else live
        self._live: Live | None = None

    # -- events -------------------------------------------------------------------------------

    def event(self, e: Mapping[str, Any]) -> None:
        """Take one runner event (unknown kinds are ignored)."""
        kind = e.get("event")
        line: str | None = None
        if kind == "node_started":
            key = str(e.get("task_id") or e["node"])
            self.nodes[key] = NodeLine(node=str(e["node"]), started=self.clock())
            line = f"  [cyan]>[/] {escape(str(e['node']))}"
        elif kind == "attempt":
            line = self._attempt(e)
        elif kind == "node_finished":
            line = self._node_finished(e)
        elif kind == "run_finished":
            self.finished = str(e.get("status"))
        if self._live is not None:
            self._live.update(self.render())
        elif line is not None:
            self.console.print(line, highlight=False)

    def _line_of(self, node: str) -> NodeLine:
        # Attempts name their node, not their task: the latest running execution of it.
        for line in reversed(list(self.nodes.values())):
            if line.node == node and line.ended is None:
                return line
        return self.nodes.setdefault(node, NodeLine(node=node, started=self.clock()))

    def _attempt(self, e: Mapping[str, Any]) -> str:
        line = self._line_of(str(e.get("node")))
        cost = float(e.get("cost_usd") or 0.0)
        line.attempts += 1
        line.cost_usd += cost
        self.cost_usd += cost
        model = escape(str(e.get("model")))
        if e.get("outcome") in (Outcome.OK, Outcome.REPLAYED):
            line.model = str(e.get("model"))
            return (f"    {model}  {e.get('input_tokens', 0)}/{e.get('output_tokens', 0)} tok  "
                    f"${cost:.6f}  {float(e.get('latency_ms') or 0):.0f} ms")
        failure = f"{e.get('model')} {e.get('error_class')}"
        line.failures.append(failure)
        return f"    [yellow]{model} {escape(str(e.get('error_class')))} -> {escape(str(e.get('action')))}[/]"

    def _node_finished(self, e: Mapping[str, Any]) -> str | None:
        key = str(e.get("task_id") or e["node"])
        line = self.nodes.get(key) or self._line_of(str(e["node"]))
        line.status = str(e.get("status"))
        line.ended = self.clock()
        if line.status != NodeStatus.DONE:
            return f"  [red]{escape(line.node)} {escape(line.status)}[/]"
        return None

    # -- the view -----------------------------------------------------------------------------

    def render(self) -> RenderableType:
        """The table of nodes and a total line (elapsed, running cost)."""
        now = self.clock()
        table = Table(box=None, pad_edge=False, show_edge=False)
        for col, justify in (("node", "left"), ("status", "left"), ("model", "left"),
                             ("tries", "right"), ("cost $", "right"), ("time", "right")):
            table.add_column(col, justify=justify)  # type: ignore[arg-type]
        for line in self.nodes.values():
            style = {"running": "cyan", NodeStatus.DONE: "green"}.get(line.status, "red")
            table.add_row(escape(line.node), Text(line.status, style=style),
                          escape(line.model or (line.failures[-1] if line.failures else "...")),
                          str(line.attempts), f"{line.cost_usd:.6f}",
                          f"{line.elapsed(now):.1f}s")
        total = Text(f"{now - self.started:.1f}s elapsed, ${self.cost_usd:.6f} so far"
                     + (f", {self.finished}" if self.finished else ""), style="bold")
        return Group(table, total)

    def __enter__(self) -> RunProgress:
        if self._live_wanted:
            self._live = Live(self.render(), console=self.console, refresh_per_second=8,
                              transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self.render())
            self._live.__exit__(None, None, None)
            self._live = None
