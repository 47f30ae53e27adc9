"""Which models an evaluation measures, and a flow forced onto one of them.

The candidates are every catalog model that passes the nodes' *hard* needs (capabilities,
context, providers): quality thresholds are judged on a prior, and measuring that prior is
what an evaluation is for, so they do not filter here. A forced flow runs each model node
on one candidate only (no fallback to another model), so a cell measures that model.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..catalog import Catalog, ModelSpec
from ..exceptions import UserError
from ..flow import END, START, Flow, NodeSpec
from ..needs import Needs
from ..ranking import prefilter

__all__ = ["Candidates", "force_flow", "forced_needs", "measured_needs", "model_needs",
           "resolve_candidates"]

# Needs that rank or cap by the prior (or by a router), not by what a model can do at all.
_PRIOR_ONLY: dict[str, Any] = {"quality": {}, "target": None, "price_weight": None,
                               "cascade": False, "max_cost_per_call": None,
                               "max_latency_ms": None}


def measured_needs(needs: Needs) -> Needs:
    """`needs` without what an evaluation measures instead (quality on the prior, routing)."""
    return needs.with_(**_PRIOR_ONLY)


def forced_needs(needs: Needs, model: str) -> Needs:
    """`needs` that only `model` may take: the node's capabilities, no choice of model."""
    return measured_needs(needs).with_(models=(model,), exclude_models=(), providers=None,
                                       exclude_providers=())


def model_needs(flow: Flow[Any], node: str | None = None) -> list[tuple[str, Needs]]:
    """(node, needs) of every model node of `flow` (of `node` only, when given), subflows
    included."""
    out: list[tuple[str, Needs]] = []
    for name, spec in flow.nodes.items():
        if node is not None and name != node:
            continue
        if spec.subflow is not None:
            out += model_needs(spec.subflow)
        elif spec.needs is not None:
            out.append((name, spec.needs))
    return out


@dataclass(frozen=True, slots=True)
class Candidates:
    """The models to measure, and the models a pattern matched but that cannot run the
    node (model -> why)."""

    models: list[str]
    dropped: dict[str, str] = field(default_factory=dict)


def _hard_reasons(catalog: Catalog, spec: ModelSpec,
                  needs: Iterable[tuple[str, Needs]]) -> list[str]:
    """Why `spec` cannot run these nodes at all (availability aside: that is per cell)."""
    unavailable = catalog.unavailable_reason(spec)
    reasons: list[str] = []
    for node, n in needs:
        ranked = prefilter(catalog, forced_needs(n, spec.key))
        for rejected, why in ranked.rejected:
            if rejected.key == spec.key:
                reasons += [f"node {node!r}: {r}" for r in why if r != unavailable]
    return reasons


def _default(catalog: Catalog, needs: Sequence[tuple[str, Needs]]) -> list[str]:
    keep: list[str] | None = None
    for _, n in needs:
        eligible = [s.key for s in prefilter(catalog, measured_needs(n)).eligible]
        keep = eligible if keep is None else [k for k in keep if k in eligible]
    return keep or []


def _split(selection: str | Sequence[str]) -> list[str]:
    items = selection.split(",") if isinstance(selection, str) else list(selection)
    return [i.strip() for i in items if i and i.strip()]


def resolve_candidates(catalog: Catalog, needs: Sequence[tuple[str, Needs]],
                       selection: str | Sequence[str] | None = None) -> Candidates:
    """The models to evaluate: `selection` (keys and globs such as "openai/*", comma
    separated or a list), else every model that passes the nodes' hard needs.

    An unknown model, a pattern that matches nothing, or a named model that lacks a hard
    need is a UserError (nothing is paid yet). A model without its API key stays: its
    cells are recorded as errors with the reason, and the others go on."""
    keys = [s.key for s in catalog]
    if selection is None:
        defaults = _default(catalog, needs)
        if not defaults:
            raise UserError(f"no model in catalog {catalog.name!r} passes the hard needs of "
                            f"{', '.join(repr(n) for n, _ in needs) or 'the flow'}; name "
                            "candidates with --models, or configure a provider (its API key)")
        return Candidates(defaults)
    models: list[str] = []
    dropped: dict[str, str] = {}
    for item in _split(selection):
        if any(ch in item for ch in "*?["):
            matched = fnmatch.filter(keys, item)
            if not matched:
                raise UserError(f"--models {item!r} matches no model in catalog "
                                f"{catalog.name!r} (models: {', '.join(keys)})")
            for key in matched:
                why = _hard_reasons(catalog, catalog[key], needs)
                if why:
                    dropped[key] = "; ".join(why)
                elif key not in models:
                    models.append(key)
            continue
        if item not in catalog:
            close = difflib.get_close_matches(item, keys, n=3)
            hint = (f"; did you mean {', '.join(close)}?" if close
                    else f" (models: {', '.join(keys)})")
            raise UserError(f"no model {item!r} in catalog {catalog.name!r}{hint}")
        why = _hard_reasons(catalog, catalog[item], needs)
        if why:
            raise UserError(f"model {item!r} cannot run what is evaluated: {'; '.join(why)}; "
                            "leave it out of --models")
        if item not in models:
            models.append(item)
    if not models:
        raise UserError(f"--models {selection!r}: no matched model can run what is evaluated "
                        f"({'; '.join(f'{k}: {v}' for k, v in dropped.items())})")
    return Candidates(models, dropped)


def _forced_spec(spec: NodeSpec, model: str) -> NodeSpec:
    if spec.subflow is not None:
        return replace(spec, subflow=force_flow(spec.subflow, model))
    if spec.needs is not None:
        return replace(spec, needs=forced_needs(spec.needs, model))
    return spec


def force_flow(flow: Flow[Any], model: str, node: str | None = None) -> Flow[Any]:
    """A copy of `flow` whose model nodes all run on `model` (their validators kept: a
    rejected answer is the model's failure); with `node`, that node alone between START
    and END, so its state update is what a cell scores."""
    if node is not None:
        only = Flow(flow.name, flow.state, flow.description,
                    nodes={node: _forced_spec(flow.nodes[node], model)})
        return only.add_edge(START, node).add_edge(node, END)
    return Flow(flow.name, flow.state, flow.description,
                nodes={n: _forced_spec(s, model) for n, s in flow.nodes.items()},
                edges=list(flow.edges), branches=list(flow.branches), joins=list(flow.joins))
