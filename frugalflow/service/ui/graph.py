"""A flow's LangGraph graph laid out for an SVG drawing: nodes in layers from START to END
(the longest path from START, back edges of loops set aside), edges as paths."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

BOX_W, BOX_H = 212, 58
GAP_X, GAP_Y = 28, 46
MARGIN = 14


@dataclass
class Box:
    id: str
    label: str
    x: int = 0
    y: int = 0
    terminal: bool = False
    """LangGraph's __start__ / __end__ (drawn small)."""


@dataclass(frozen=True)
class Line:
    d: str
    """The SVG path."""
    conditional: bool
    label: str | None


@dataclass
class Drawing:
    boxes: list[Box]
    lines: list[Line]
    width: int
    height: int

    box_w: int = BOX_W
    box_h: int = BOX_H

    @property
    def order(self) -> list[str]:
        """The flow's nodes (not START and END) in drawing order, top to bottom."""
        return [b.id for b in self.boxes if not b.terminal]


def _layers(ids: list[str], edges: list[tuple[str, str]]) -> dict[str, int]:
    """Each node's layer: its longest distance from the roots over the edges that are not
    back edges (a loop's way back would otherwise push its nodes down forever)."""
    succ: dict[str, list[str]] = {i: [] for i in ids}
    for s, t in edges:
        succ[s].append(t)
    roots = [i for i in ids if i == "__start__"] or ids[:1]
    back: set[tuple[str, str]] = set()
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    for root in roots + ids:
        if root in state:
            continue
        stack = [(root, iter(succ[root]))]
        state[root] = 1
        while stack:
            node, it = stack[-1]
            nxt = next(it, None)
            if nxt is None:
                state[node] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                back.add((node, nxt))
            elif nxt not in state:
                state[nxt] = 1
                stack.append((nxt, iter(succ[nxt])))
    forward = [(s, t) for s, t in edges if (s, t) not in back]
    layer = {i: 0 for i in ids}
    for _ in ids:  # longest path in a DAG: at most len(ids) relaxation rounds
        changed = False
        for s, t in forward:
            if layer[t] < layer[s] + 1:
                layer[t], changed = layer[s] + 1, True
        if not changed:
            break
    return layer


def layout(graph: Any) -> Drawing:
    """Lay out `graph` (LangGraph's `get_graph()`: `.nodes` id -> node, `.edges` with
    source, target, data, conditional)."""
    ids = list(graph.nodes)
    edges = [(e.source, e.target) for e in graph.edges
             if e.source in graph.nodes and e.target in graph.nodes]
    layer = _layers(ids, edges)
    others = [v for k, v in layer.items() if k != "__end__"]
    if "__end__" in layer and others:  # END below everything, however short its way
        layer["__end__"] = max(others) + 1
    rows: dict[int, list[str]] = {}
    for i in ids:
        rows.setdefault(layer[i], []).append(i)
    widest = max((len(r) for r in rows.values()), default=1)
    width = 2 * MARGIN + widest * BOX_W + (widest - 1) * GAP_X
    boxes: dict[str, Box] = {}
    for depth, row in sorted(rows.items()):
        span = len(row) * BOX_W + (len(row) - 1) * GAP_X
        left = (width - span) // 2
        for n, i in enumerate(row):
            terminal = i in ("__start__", "__end__")
            label = {"__start__": "START", "__end__": "END"}.get(i, i)
            boxes[i] = Box(i, label, x=left + n * (BOX_W + GAP_X),
                           y=MARGIN + depth * (BOX_H + GAP_Y), terminal=terminal)
    width += GAP_X  # room for the loops drawn round the right side
    lines = [_line(boxes[e.source], boxes[e.target], layer, bool(e.conditional),
                   None if e.data is None else str(e.data))
             for e in graph.edges if e.source in boxes and e.target in boxes]
    height = 2 * MARGIN + (max(rows, default=0) + 1) * (BOX_H + GAP_Y) - GAP_Y
    ordered = sorted(boxes.values(), key=lambda b: (b.y, b.x))
    return Drawing(ordered, lines, width, height)


def _line(a: Box, b: Box, layer: dict[str, int], conditional: bool,
          label: str | None) -> Line:
    ax, bx = a.x + BOX_W // 2, b.x + BOX_W // 2
    if layer[b.id] > layer[a.id]:  # down: bottom of a to top of b
        y1, y2 = a.y + BOX_H, b.y
        mid = (y1 + y2) // 2
        return Line(f"M{ax},{y1} C{ax},{mid} {bx},{mid} {bx},{y2 - 2}", conditional, label)
    # Back (a loop) or sideways: out of a's right side, round, into b's right side.
    x1, x2 = a.x + BOX_W, b.x + BOX_W
    reach = max(x1, x2) + GAP_X
    y1, y2 = a.y + BOX_H // 2, b.y + BOX_H // 2
    return Line(f"M{x1},{y1} C{reach},{y1} {reach},{y2} {x2 + 2},{y2}", conditional, label)
