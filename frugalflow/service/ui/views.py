"""What the run viewer's pages show, computed from the ledger: a run's summary row, its graph
with per-node model, cost and status, its attempts as a timeline (with their service tiers),
what a waiting run waits for (its parked requests), and stored values as text that any
content (deep, huge, hostile) cannot break."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from ...persistence.ledger import RunRecord, RunStats
from ...persistence.parked import OPEN_ITEMS, READY_ITEMS
from ...persistence.tables import AttemptRow, BatchItemRow, NodeRunRow, RunRow
from ...statuses import FINAL_STATUSES, Outcome, RunStatus
from ...tiers import Tier
from ..responses import depth_over
from .graph import Drawing

LIVE_STATUSES = frozenset({RunStatus.PENDING, RunStatus.QUEUED, RunStatus.RUNNING})
"""A run in one of these may change any moment: its page follows its events."""
RESUMABLE = frozenset({RunStatus.INTERRUPTED, RunStatus.PAUSED, RunStatus.FAILED,
                       RunStatus.BUDGET_EXCEEDED})

_MAX_DEPTH = 100  # deeper stored values are shown as a placeholder
_MAX_CHARS = 200_000  # longer texts are cut (the API has the whole value)
_FOLD_LINES, _FOLD_CHARS = 24, 2_000  # longer texts start folded
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Text:
    """A stored value as text for a <pre>: folded when long, cut when huge."""

    text: str
    folded: bool
    note: str | None = None

    @property
    def summary(self) -> str:
        first = self.text.split("\n", 1)[0]
        return (first[:80] + "...") if len(first) > 80 else first


def as_text(value: Any) -> Text:
    """`value` pretty-printed (strings as they are), lone surrogates escaped."""
    if isinstance(value, str):
        text = value
    elif depth_over(value, _MAX_DEPTH):
        return Text(f"(not shown: nested deeper than {_MAX_DEPTH} levels)", False)
    else:
        try:
            text = json.dumps(value, indent=2, ensure_ascii=False, default=str)
        except (ValueError, TypeError, RecursionError) as e:
            return Text(f"(not shown: cannot be written as JSON, {type(e).__name__})", False)
    text = _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)
    note = None
    if len(text) > _MAX_CHARS:
        note = f"cut at {_MAX_CHARS:,} of {len(text):,} characters; the API has all of it"
        text = text[:_MAX_CHARS]
    folded = len(text) > _FOLD_CHARS or text.count("\n") >= _FOLD_LINES
    return Text(text, folded, note)


def _aware(t: datetime | None) -> datetime | None:
    return None if t is None else (t if t.tzinfo else t.replace(tzinfo=timezone.utc))


def duration(run: RunRow, now: datetime | None = None) -> float | None:
    """Seconds from creation to the end (or to `now` while it runs)."""
    start = _aware(run.created_at)
    going = run.status in LIVE_STATUSES or run.status == RunStatus.WAITING  # not done yet
    end = _aware(run.finished_at) or (now if going else _aware(run.updated_at))
    if start is None or end is None:
        return None
    return max(0.0, (end - start).total_seconds())


@dataclass(frozen=True)
class RunLine:
    """One row of the runs page."""

    run: RunRow
    stats: RunStats
    seconds: float | None


def run_lines(rows: list[RunRow], stats: dict[str, RunStats]) -> list[RunLine]:
    now = datetime.now(timezone.utc)
    return [RunLine(r, stats.get(r.id, RunStats()), duration(r, now)) for r in rows]


@dataclass
class NodeView:
    """A node of the run's flow: what served it, what it cost, where it stands."""

    name: str
    status: str = "not run"
    models: list[str] = field(default_factory=list)
    cost: float = 0.0
    executions: int = 0
    answers: int = 0
    """Successful model calls (what feedback marks)."""
    feedback: bool | None = None
    tiers: list[str] = field(default_factory=list)
    """The discounted tiers (batch, flex, off_peak) its answers were served on."""


@dataclass
class Try:
    """One attempt on the timeline, placed on the run's time axis (0..1000)."""

    row: AttemptRow
    x: int
    w: int
    standard_cost: float | None = None
    """On a discounted tier: what its tokens would have cost at the model's standard price."""

    @property
    def fell_back(self) -> bool:
        return self.row.outcome == Outcome.ERROR and self.row.action == "next"

    @property
    def tier(self) -> str | None:
        """The tier to tag it with (None: a standard call, untagged)."""
        t = self.row.tier
        return None if t is None or t == Tier.STANDARD else t

    @property
    def late(self) -> bool:
        """A batch answer that came after its call had moved on: paid, not used."""
        return self.row.outcome == Outcome.LATE


@dataclass
class Execution:
    """One execution of a node (a LangGraph task) and its attempts."""

    node: str
    status: str
    started: datetime | None
    error: str | None
    cost: float
    tries: list[Try] = field(default_factory=list)


def _node_views(order: list[str], record: RunRecord) -> dict[str, NodeView]:
    views = {n: NodeView(n) for n in order}
    for nr in record.nodes:
        v = views.setdefault(nr.node, NodeView(nr.node))
        v.status, v.executions = nr.status, v.executions + 1  # in start order: last wins
    for a in record.attempts:
        v = views.setdefault(a.node, NodeView(a.node))
        v.cost += a.cost_usd
        if a.outcome in (Outcome.OK, Outcome.REPLAYED):
            if a.model not in v.models:
                v.models.append(a.model)
            if a.tier not in (None, Tier.STANDARD) and a.tier not in v.tiers:
                v.tiers.append(a.tier)
            if a.outcome == Outcome.OK:
                v.answers += 1
                v.feedback = a.feedback if a.feedback is not None else v.feedback
    return views


StandardPrice = Callable[[str, int, int], float | None]
"""(model, input tokens, output tokens) -> the cost at the model's standard price, if known."""


def _timeline(record: RunRecord, standard: StandardPrice | None = None) -> list[Execution]:
    attempts = [a for a in record.attempts if a.outcome != Outcome.PENDING]
    times = [_aware(a.started_at) for a in attempts] + [_aware(record.run.created_at)]
    t0 = min(t for t in times if t is not None)
    ends = [(_aware(a.started_at) or t0).timestamp() + a.latency_ms / 1000 for a in attempts]
    span = max([t0.timestamp() + 0.001, *ends]) - t0.timestamp()

    def place(a: AttemptRow) -> Try:
        start = ((_aware(a.started_at) or t0).timestamp() - t0.timestamp()) / span
        was: float | None = None
        if standard is not None and a.tier not in (None, Tier.STANDARD) and (
                a.input_tokens or a.output_tokens):
            was = standard(a.model, a.input_tokens, a.output_tokens)
        return Try(a, x=min(995, round(start * 1000)),
                   w=max(5, round(a.latency_ms / 1000 / span * 1000)), standard_cost=was)

    by_task: dict[str, Execution] = {}
    out: list[Execution] = []
    for nr in record.nodes:
        ex = Execution(nr.node, nr.status, _aware(nr.started_at), nr.error, nr.cost_usd)
        by_task[nr.id] = ex
        out.append(ex)
    for a in attempts:
        found = by_task.get(a.task_id or "")
        if found is None:  # attempts from before node runs were recorded: one per node
            key = f"node:{a.node}"
            found = by_task.get(key)
            if found is None:
                found = by_task[key] = Execution(a.node, "", _aware(a.started_at), None, 0.0)
                out.append(found)
            found.cost += a.cost_usd
        found.tries.append(place(a))
    return out


def clock_time(t: datetime | None, now: datetime) -> str:
    """`HH:MM UTC`, with the date when it is not today's (UTC)."""
    t = _aware(t)
    if t is None:
        return "-"
    t = t.astimezone(timezone.utc)
    return t.strftime("%H:%M UTC" if t.date() == now.date() else "%Y-%m-%d %H:%M UTC")


@dataclass(frozen=True)
class Parked:
    """One parked request of the run (a batch item or a timer), as its table shows it."""

    row: BatchItemRow
    batch_status: str | None = None

    @property
    def open(self) -> bool:
        """Still waiting for its answer (or its hour)."""
        return self.row.status in OPEN_ITEMS


@dataclass(frozen=True)
class Waiting:
    """What a waiting run waits for, in one sentence: "Waiting for 2 batch answers until
    05:10 UTC and a cheaper hour at 04:00 UTC; deadline 06:00 UTC"."""

    answers: int
    """Open batch items (flex and other parking tiers count with them)."""
    hours: int
    """Open timers (a cheaper window to come)."""
    ready: int
    """Items with something to act on: the poller wakes the run."""
    until: datetime | None
    """When the first open batch item is given up for a synchronous call."""
    wake: datetime | None
    """When the first timer's cheaper hour comes."""
    deadline: datetime | None

    def sentence(self, now: datetime | None = None) -> str:
        now = now or datetime.now(timezone.utc)
        parts = []
        if self.answers:
            part = f"{self.answers} batch answer{'' if self.answers == 1 else 's'}"
            parts.append(part + (f" until {clock_time(self.until, now)}" if self.until else ""))
        if self.hours:
            part = "a cheaper hour" if self.hours == 1 else f"{self.hours} cheaper hours"
            parts.append(part + (f" until {clock_time(self.wake, now)}" if self.wake else ""))
        if parts:
            text = "Waiting for " + " and ".join(parts)
        elif self.ready:
            text = "Its answers are in: the batch poller resumes it"
        else:
            text = "Waiting for the batch poller"
        if self.deadline is not None:
            text += f"; deadline {clock_time(self.deadline, now)}"
        return text + "."


def waiting_of(run: RunRow, parked: list[Parked]) -> Waiting:
    open_items = [p.row for p in parked if p.open]
    answers = [i for i in open_items if i.tier != Tier.OFF_PEAK]
    hours = [i for i in open_items if i.tier == Tier.OFF_PEAK]
    deadlines = [d for d in (_aware(i.deadline_at) for i in open_items) if d is not None]
    fallbacks = [f for f in (_aware(i.fallback_at) for i in answers) if f is not None]
    wakes = [w for w in (_aware(i.wake_at) for i in hours) if w is not None]
    return Waiting(
        answers=len(answers), hours=len(hours),
        ready=sum(1 for p in parked if p.row.status in READY_ITEMS),
        until=min(fallbacks, default=None), wake=min(wakes, default=None),
        deadline=min(deadlines, default=None) or _aware(run.deadline_at))


@dataclass
class RunView:
    """Everything the run page shows that changes while the run goes on."""

    run: RunRow
    drawing: Drawing | None
    nodes: list[NodeView]
    timeline: list[Execution]
    output: Text | None
    interrupts: Text | None
    stats: RunStats
    seconds: float | None
    parked: list[Parked] = field(default_factory=list)
    """The run's parked requests, oldest first (open ones and those that ended)."""

    def node(self, name: str) -> NodeView | None:
        return next((n for n in self.nodes if n.name == name), None)

    @property
    def updated_ms(self) -> int:
        """When the run's row last changed, in ms since the epoch (for the page's script)."""
        t = _aware(self.run.updated_at)
        return 0 if t is None else int(t.timestamp() * 1000)

    @property
    def live(self) -> bool:
        return self.run.status in LIVE_STATUSES

    @property
    def waiting(self) -> Waiting | None:
        """What it waits for, while its status is `waiting`."""
        return waiting_of(self.run, self.parked) if self.run.status == RunStatus.WAITING else None

    @property
    def can_cancel(self) -> bool:
        return self.run.status not in FINAL_STATUSES

    @property
    def can_resume(self) -> bool:
        return self.run.status in RESUMABLE


def run_view(record: RunRecord, drawing: Drawing | None, stats: RunStats, *,
             parked: list[Parked] | None = None,
             standard: StandardPrice | None = None) -> RunView:
    """`parked`: the run's parked requests; `standard`: prices a discounted try's tokens at
    its model's standard price (shown beside what it cost)."""
    views = _node_views(drawing.order if drawing else [], record)
    run = record.run
    return RunView(
        run=run, drawing=drawing, nodes=list(views.values()),
        timeline=_timeline(record, standard),
        output=None if run.output is None else as_text(run.output),
        interrupts=as_text(run.interrupts) if run.interrupts else None,
        stats=stats, seconds=duration(run, datetime.now(timezone.utc)),
        parked=parked or [])
