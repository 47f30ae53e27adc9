"""Flows: workflows written as plain Python graphs whose model nodes are routed.

    flow = Flow("triage", State)

    @flow.node(needs=Needs(quality={"classification": 0.7}))
    async def classify(state: State, model: RoutedChatModel) -> dict: ...

    flow.add_edge(START, "classify")
    app = flow.compile(Catalog.default())      # every check happens here
    result = await app.ainvoke({"ticket": "..."}, budget=0.05)

A flow compiles to a LangGraph `StateGraph` and runs on LangGraph, so checkpoints,
interrupts, streaming, `Send` fan-out and subgraphs keep working. A node function takes
the state and, optionally, `model` (its routed chat model), `config` and `runtime`.
"""

from __future__ import annotations

import difflib
import inspect
import math
import os
import typing
import uuid
from collections.abc import (AsyncIterator, Awaitable, Callable, Hashable, Iterable, Iterator,
                             Mapping, Sequence)
from dataclasses import dataclass, field
from typing import Any, Generic, cast, overload

from typing_extensions import TypeVar

from langchain_core.messages import AIMessage as AIMessageT
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime, get_runtime
from pydantic import ValidationError

from .validation import Validator
from .catalog import Catalog
from .exceptions import FlowError, UserError
from .needs import Needs
from .ranking import no_capable_model_error, rank
from .resilience import Breakers, FallbackPolicy, default_breakers
from .routed import RoutedChatModel, RunContext
from .usage import Listener, RunUsage

__all__ = ["END", "START", "Agent", "CompiledFlow", "Flow", "NodeSpec", "check_budget"]


def check_budget(budget: float | None) -> float | None:
    """`budget` if it is None (no limit) or a finite amount of USD above 0, else ValueError.

    NaN compares false with everything and infinity never runs out: either would quietly
    lift the cap, so both are refused where a budget enters (Python, CLI, service)."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise ValueError(f"budget must be a number of USD above 0 (or None: no limit), "
                         f"got {budget!r}")
    try:
        value = float(budget)
    except OverflowError:  # an int beyond any float
        value = math.inf
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"budget must be a finite amount of USD above 0 (or None: no limit), "
                         f"got {value!r}")
    return value

S = TypeVar("S", default=Any)
"""A flow's state type; a bare `CompiledFlow` means `CompiledFlow[Any]`."""
M = TypeVar("M", bound=Mapping[str, object])
NodeFn = Callable[..., Any]
_RESERVED = {START, END}


@dataclass
class NodeSpec:
    """A node of a flow: its function (or subflow) and, for model nodes, its needs."""

    name: str
    fn: NodeFn | None = None
    needs: Needs | None = None
    subflow: Flow[Any] | None = None
    description: str = ""
    validator: Validator | None = None

    @property
    def uses_model(self) -> bool:
        return self.needs is not None


@dataclass
class _Branch:
    source: str
    path: Callable[..., Any]
    targets: list[str] | None  # None: not declared, may go anywhere
    path_map: dict[Hashable, str] | None = None


@dataclass
class Flow(Generic[S]):
    """A workflow definition. Build it with `node`/`add_node`, edges, then `compile`."""

    name: str
    state: type[S]
    description: str = ""
    nodes: dict[str, NodeSpec] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    branches: list[_Branch] = field(default_factory=list)
    joins: list[tuple[tuple[str, ...], str]] = field(default_factory=list)
    input_schema: type[Any] | None = None
    """The fields a run's input may (and, if required, must) have: a TypedDict, pydantic
    model or dataclass. Without it, the state's fields (see `frugalflow.inputs`)."""

    # -- definition ----------------------------------------------------------------

    def node(
        self,
        name: str | None = None,
        *,
        needs: Needs | Mapping[str, Any] | None = None,
        model: bool | None = None,
        description: str = "",
        validator: Validator | None = None,
        **need_fields: Any,
    ) -> Callable[[NodeFn], NodeFn]:
        """Decorator form of `add_node`: `@flow.node(needs=Needs(tools=True))`."""

        def decorate(fn: NodeFn) -> NodeFn:
            self.add_node(
                name or fn.__name__, fn, needs=needs, model=model,
                description=description, validator=validator, **need_fields,
            )
            return fn

        return decorate

    def add_node(
        self,
        name: str,
        fn: NodeFn | Flow[Any],
        *,
        needs: Needs | Mapping[str, Any] | None = None,
        model: bool | None = None,
        description: str = "",
        validator: Validator | None = None,
        **need_fields: Any,
    ) -> Flow[S]:
        """Add a node. It is a model node if it has needs or its function takes `model`.

        `validator` checks the node's model answers (see `RoutedChatModel.validator`); a
        rejected answer escalates to a more capable model.
        """
        if not isinstance(name, str) or not name or name in _RESERVED or name.startswith("__"):
            raise FlowError(f"flow {self.name!r}: invalid node name {name!r}", node=str(name))
        if name in self.nodes:
            raise FlowError(f"flow {self.name!r}: node {name!r} is defined twice", node=name)
        if isinstance(fn, Flow):
            self.nodes[name] = NodeSpec(name, subflow=fn, description=description or fn.description)
            return self
        if not callable(fn):
            raise FlowError(
                f"flow {self.name!r}: node {name!r} must be a function or a Flow, "
                f"got {type(fn).__name__}",
                node=name,
            )
        takes_model = "model" in inspect.signature(fn).parameters
        if model is None:
            model = takes_model or needs is not None or bool(need_fields)
        resolved: Needs | None = None
        if model:
            try:
                if isinstance(needs, Needs):
                    resolved = needs.with_(**need_fields) if need_fields else needs
                else:
                    resolved = Needs(**{**dict(needs or {}), **need_fields})
            except ValidationError as e:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
                )
                raise FlowError(
                    f"flow {self.name!r}, node {name!r}: bad needs: {problems}", node=name
                ) from None
            if not takes_model:
                raise FlowError(
                    f"flow {self.name!r}, node {name!r} has needs but its function takes no "
                    "`model` parameter; add one: def {0}(state, model): ...".format(name),
                    node=name,
                )
        if validator is not None and resolved is None:
            raise FlowError(f"flow {self.name!r}, node {name!r}: a validator needs a model node",
                            node=name)
        self.nodes[name] = NodeSpec(name, fn=fn, needs=resolved, description=description,
                                    validator=validator)
        return self

    def add_agent(self, agent: Agent, name: str | None = None) -> Flow[S]:
        """Add a reusable `Agent` as a model node."""
        return self.add_node(name or agent.name, agent.node(), needs=agent.needs,
                             validator=agent.validator)

    def add_edge(self, start: str | Sequence[str], end: str) -> Flow[S]:
        """An edge; a list of starts waits for all of them (a join)."""
        starts = [start] if isinstance(start, str) else list(start)
        for s in starts:
            self.edges.append((s, end))
        if not isinstance(start, str):
            self.joins.append((tuple(starts), end))
        return self

    def add_conditional_edges(
        self,
        source: str,
        path: Callable[..., Any],
        targets: Sequence[str] | Mapping[Hashable, str] | None = None,
    ) -> Flow[S]:
        """Route from `source` by `path(state)`: a node name, a list of names or `Send`s.

        Name the possible `targets` (or annotate `path`'s return as `Literal[...]`) so that
        compile can check them; undeclared targets are trusted to exist.
        """
        path_map: dict[Hashable, str] | None = None
        names: list[str] | None
        if isinstance(targets, Mapping):
            path_map = dict(targets)
            names = list(path_map.values())
        elif targets is not None:
            names = list(targets)
        else:
            names = _literal_targets(path)
        self.branches.append(_Branch(source, path, names, path_map))
        return self

    def set_entry(self, name: str) -> Flow[S]:
        return self.add_edge(START, name)

    def set_finish(self, name: str) -> Flow[S]:
        return self.add_edge(name, END)

    # -- compile -------------------------------------------------------------------

    def check(self, catalog: Catalog | None = None) -> None:
        """Raise FlowError / NoCapableModelError for every problem found before running."""
        names = set(self.nodes)
        if not names:
            raise FlowError(f"flow {self.name!r} has no nodes; add one with flow.add_node")

        def known(n: str, where: str) -> None:
            if n in names or n in _RESERVED:
                return
            close = difflib.get_close_matches(n, sorted(names), n=2)
            hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise FlowError(
                f"flow {self.name!r}: {where} names unknown node {n!r}{hint} "
                f"(nodes: {', '.join(sorted(names))})",
                node=n,
            )

        for a, b in self.edges:
            known(a, f"edge {a!r} -> {b!r}")
            known(b, f"edge {a!r} -> {b!r}")
            if b == START:
                raise FlowError(f"flow {self.name!r}: edge {a!r} -> START points into the start")
            if a == END:
                raise FlowError(f"flow {self.name!r}: edge END -> {b!r} leaves the end")
        for br in self.branches:
            known(br.source, f"conditional edge from {br.source!r}")
            for t in br.targets or []:
                known(t, f"conditional edge {br.source!r} -> {t!r}")
        if not any(a == START for a, _ in self.edges) and not any(
            br.source == START for br in self.branches
        ):
            first = next(iter(self.nodes))
            raise FlowError(
                f"flow {self.name!r} has no entry: add flow.add_edge(START, {first!r})"
            )

        # Reachability from START (an undeclared conditional edge may reach anything).
        succ: dict[str, set[str]] = {}
        for a, b in self.edges:
            succ.setdefault(a, set()).add(b)
        for br in self.branches:
            succ.setdefault(br.source, set()).update(
                br.targets if br.targets is not None else names | {END}
            )
        seen, todo = {START}, [START]
        while todo:
            for nxt in succ.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        unreachable = sorted(names - seen)
        if unreachable:
            raise FlowError(
                f"flow {self.name!r}: node(s) {', '.join(map(repr, unreachable))} can never run: "
                "no edge leads to them from START. Add an edge or remove them.",
                node=unreachable[0],
            )

        for spec in self.nodes.values():
            if spec.subflow is not None:
                spec.subflow.check(catalog)
            elif spec.needs is not None and catalog is not None:
                self._check_node_catalog(spec, catalog)

    def _check_node_catalog(self, spec: NodeSpec, catalog: Catalog) -> None:
        needs = spec.needs
        assert needs is not None
        providers = set(catalog.providers)
        for p in (*(needs.providers or ()), *needs.exclude_providers):
            if p not in providers:
                close = difflib.get_close_matches(p, sorted(providers), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise FlowError(
                    f"flow {self.name!r}, node {spec.name!r}: provider {p!r} in its needs is not "
                    f"in catalog {catalog.name!r}{hint}; providers: {', '.join(sorted(providers))}",
                    node=spec.name,
                )
        for m in (*(needs.models or ()), *needs.exclude_models):
            if m not in catalog:
                close = difflib.get_close_matches(m, [s.key for s in catalog], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise FlowError(
                    f"flow {self.name!r}, node {spec.name!r}: model {m!r} in its needs is not in "
                    f"catalog {catalog.name!r}{hint}",
                    node=spec.name,
                )
        ranking = rank(catalog, needs, input_tokens=needs.min_context or 0)
        if not ranking.candidates:
            raise no_capable_model_error(spec.name, needs, ranking, catalog)

    def build_graph(self) -> StateGraph[Any, Any, Any, Any]:
        """The LangGraph StateGraph (uncompiled) this flow describes."""
        graph: StateGraph[Any, Any, Any, Any] = StateGraph(self.state, context_schema=RunContext)
        for spec in self.nodes.values():
            if spec.subflow is not None:
                graph.add_node(spec.name, spec.subflow.build_graph().compile())
            else:
                graph.add_node(spec.name, _wrap(spec))
        joined = {(s, e) for starts, e in self.joins for s in starts}
        for starts, end in self.joins:
            graph.add_edge(list(starts), end)
        for a, b in self.edges:
            if (a, b) not in joined:
                graph.add_edge(a, b)
        for br in self.branches:
            if br.path_map is not None:
                graph.add_conditional_edges(br.source, br.path, br.path_map)
            elif br.targets is not None:
                graph.add_conditional_edges(br.source, br.path, br.targets)
            else:
                graph.add_conditional_edges(br.source, br.path)
        return graph

    def compile(
        self,
        catalog: Catalog | None = None,
        *,
        checkpointer: BaseCheckpointSaver[Any] | None = None,
        policy: FallbackPolicy | None = None,
        breakers: Breakers | None = None,
        interrupt_before: Sequence[str] | None = None,
        interrupt_after: Sequence[str] | None = None,
    ) -> CompiledFlow[S]:
        """Check the flow against `catalog` (default: `Catalog.default()`) and compile it."""
        catalog = catalog if catalog is not None else Catalog.default()
        self.check(catalog)
        for n in (*(interrupt_before or ()), *(interrupt_after or ())):
            if n not in self.nodes:
                raise FlowError(f"flow {self.name!r}: interrupt names unknown node {n!r}", node=n)
        graph = self.build_graph().compile(
            checkpointer=checkpointer,
            interrupt_before=list(interrupt_before or []) or None,
            interrupt_after=list(interrupt_after or []) or None,
            name=self.name,
        )
        compiled: CompiledFlow[S] = CompiledFlow(
            self, catalog, graph, policy or FallbackPolicy(), breakers or default_breakers
        )
        return compiled


def _literal_targets(path: Callable[..., Any]) -> list[str] | None:
    try:
        hints = typing.get_type_hints(path)
    except Exception:  # unresolvable annotations: targets stay undeclared
        return None
    ret = hints.get("return")
    if typing.get_origin(ret) is typing.Literal:
        return [str(a) for a in typing.get_args(ret)]
    return None


def _wrap(spec: NodeSpec) -> Callable[..., Any]:
    fn = spec.fn
    assert fn is not None
    params = inspect.signature(fn).parameters
    wants = {k for k in ("model", "config", "runtime") if k in params}
    needs = spec.needs
    name = spec.name

    # One routed model per node, shared by every run: it finds the run's RunContext (budget,
    # spend, breakers) in LangGraph's runtime at call time.
    shared = (RoutedChatModel(needs=needs, node=name, validator=spec.validator)
              if "model" in wants else None)

    def kwargs_for(config: RunnableConfig, runtime: Runtime[RunContext]) -> dict[str, Any]:
        kw: dict[str, Any] = {}
        if shared is not None:
            if not isinstance(runtime.context, RunContext):
                raise FlowError(
                    f"node {name!r} needs a RunContext: run the flow through "
                    "CompiledFlow.ainvoke/astream or its `.graph` (which builds one), or pass "
                    "context=RunContext(catalog) to a graph you built with Flow.build_graph",
                    node=name,
                )
            kw["model"] = shared
        if "config" in wants:
            kw["config"] = config
        if "runtime" in wants:
            kw["runtime"] = runtime
        return kw

    if inspect.iscoroutinefunction(fn):

        async def run_async(state: Any, config: RunnableConfig, runtime: Runtime[RunContext]) -> Any:
            return await fn(state, **kwargs_for(config, runtime))

        run_async.__name__ = name
        return run_async

    def run_sync(state: Any, config: RunnableConfig, runtime: Runtime[RunContext]) -> Any:
        return fn(state, **kwargs_for(config, runtime))

    run_sync.__name__ = name
    return run_sync


ContextFactory = Callable[[RunnableConfig | None, Mapping[str, Any] | None], RunContext]
"""Builds a run's context from its config and the plain `context` LangGraph was given."""
ContextSetup = Callable[[RunContext, RunnableConfig | None, Mapping[str, Any] | None],
                        Awaitable[None]]
"""Completes a built context with what needs I/O (a stored policy's measurements)."""

CONTEXT_KEYS = ("budget", "policy", "run_id")
"""What a run's plain context (or its `configurable`) may set."""


class FlowGraph(CompiledStateGraph[Any, Any, Any, Any]):
    """A flow's compiled LangGraph graph, which builds a run's `RunContext` when it is not given.

    LangGraph's server and Studio invoke the graph itself with a config (and at most a plain
    dict as `context`), never with a Python object: every `stream`/`astream` (which `invoke`,
    `ainvoke` and `astream_events` go through) without a `RunContext` gets one from
    `context_factory`, so the run's nodes share one budget and spend.
    """

    def __init__(self, *, context_factory: ContextFactory | None = None,
                 context_setup: ContextSetup | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Both in __dict__: `copy()` (how the server attaches its checkpointer) keeps them.
        self.context_factory = context_factory
        self.context_setup = context_setup

    @classmethod
    def of(cls, graph: CompiledStateGraph[Any, Any, Any, Any], context_factory: ContextFactory,
           context_setup: ContextSetup | None = None) -> FlowGraph:
        attrs = {k: v for k, v in graph.__dict__.items() if k != "__orig_class__"}
        return cls(context_factory=context_factory, context_setup=context_setup, **attrs)

    def get_context_jsonschema(self) -> dict[str, Any] | None:
        """What a run's plain `context` may set (Studio's assistant form shows it): the
        RunContext object itself has no JSON form."""
        return {"title": f"{self.name}_context", "type": "object", "properties": {
            "budget": {"type": ["number", "null"], "exclusiveMinimum": 0,
                       "description": "USD this run may spend (default: FRUGALFLOW_BUDGET)"},
            "policy": {"type": ["string", "null"],
                       "description": "stored node policy (default: FRUGALFLOW_POLICY)"},
            "run_id": {"type": ["string", "null"]},
        }, "additionalProperties": False}

    def _context(self, config: RunnableConfig | None, context: Any) -> tuple[Any, bool]:
        """The context to run with, and whether it was built here (from configuration)."""
        if isinstance(context, RunContext) or self.context_factory is None:
            return context, False
        if context is None:
            try:  # a subgraph of a flow run: the parent's context
                parent = get_runtime().context
            except RuntimeError:
                parent = None
            if isinstance(parent, RunContext):
                return parent, False
        elif not isinstance(context, Mapping):
            return context, False  # not ours to interpret: LangGraph's schema coercion decides
        return self.context_factory(config, context), True

    async def astream(
        self, input: Any, config: RunnableConfig | None = None, *, context: Any = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        built, fresh = self._context(config, context)
        if fresh and self.context_setup is not None:
            await self.context_setup(built, config, context)
        async for part in super().astream(input, config, context=built, **kwargs):
            yield part

    def stream(
        self, input: Any, config: RunnableConfig | None = None, *, context: Any = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        built, fresh = self._context(config, context)
        if fresh and self.context_setup is not None and _setting(config, context, "policy"):
            raise UserError("a stored policy is loaded from the database: run the graph with "
                            "ainvoke/astream (async), or without a policy")
        yield from super().stream(input, config, context=built, **kwargs)


def _setting(config: RunnableConfig | None, given: Any, key: str) -> Any:
    """`key` from a run's plain context, else its `configurable`, else FRUGALFLOW_<KEY>."""
    if isinstance(given, Mapping) and given.get(key) is not None:
        return given[key]
    configurable = (config or {}).get("configurable") or {}
    if configurable.get(key) is not None:
        return configurable[key]
    return os.environ.get(f"FRUGALFLOW_{key.upper()}") or None


def _budget_setting(value: object, source: str) -> float | None:
    """A budget given as configuration (a number or its text), checked; UserError if bad."""
    try:
        if isinstance(value, str):
            value = float(value) if value.strip() else None
        return check_budget(cast("float | None", value))
    except ValueError as e:
        raise UserError(f"{source}: {e}") from None


class CompiledFlow(Generic[S]):
    """A checked flow bound to a catalog; runs on LangGraph (`.graph`).

    `CompiledFlow[S]`: `ainvoke`/`invoke` of a flow whose state `S` is a TypedDict return `S`.
    """

    def __init__(
        self,
        flow: Flow[S],
        catalog: Catalog,
        graph: CompiledStateGraph[Any, Any, Any, Any],
        policy: FallbackPolicy,
        breakers: Breakers,
    ) -> None:
        self.flow = flow
        self.catalog = catalog
        self.graph: CompiledStateGraph[Any, Any, Any, Any] = FlowGraph.of(
            graph, self.default_context, self._setup_context)
        """The LangGraph graph: expose it to LangGraph's server (`langgraph.json`) as is."""
        self.policy = policy
        self.breakers = breakers

    @property
    def name(self) -> str:
        return self.flow.name

    def new_context(
        self,
        *,
        budget: float | None = None,
        run_id: str | None = None,
        listeners: Iterable[Listener] = (),
        usage: RunUsage | None = None,
    ) -> RunContext:
        """The runtime context for one run: its budget, spend and attempt listeners."""
        check_budget(budget)
        if usage is None:
            usage = RunUsage(budget_usd=budget, run_id=run_id or uuid.uuid4().hex)
        usage.listeners.extend(listeners)
        return RunContext(
            catalog=self.catalog, policy=self.policy, breakers=self.breakers, usage=usage
        )

    def default_context(self, config: RunnableConfig | None = None,
                        given: Mapping[str, Any] | None = None) -> RunContext:
        """The context of a run started without one (LangGraph's server, Studio, a plain
        `graph.ainvoke`): this flow's catalog, and the budget from the plain `context`
        (`{"budget": 0.05}`), else `config["configurable"]["budget"]`, else the environment's
        `FRUGALFLOW_BUDGET` (none: no limit). Its run id is the context's or configurable's
        `run_id` (LangGraph's server sets one), else a new one. A `policy` named the same
        way is loaded by the graph's async entry points (`_setup_context`)."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(CONTEXT_KEYS))
        if unknown:
            raise UserError(f"flow {self.name!r}: unknown context key(s) {', '.join(unknown)}; "
                            f"expected: {', '.join(CONTEXT_KEYS)}")
        configurable = (config or {}).get("configurable") or {}
        if given.get("budget") is not None:
            budget = _budget_setting(given["budget"], "context budget")
        elif configurable.get("budget") is not None:
            budget = _budget_setting(configurable["budget"], "configurable budget")
        else:
            budget = _budget_setting(os.environ.get("FRUGALFLOW_BUDGET", ""), "FRUGALFLOW_BUDGET")
        run_id = given.get("run_id") or configurable.get("run_id")
        return self.new_context(budget=budget, run_id=str(run_id) if run_id else None)

    async def _setup_context(self, ctx: RunContext, config: RunnableConfig | None,
                             given: Mapping[str, Any] | None) -> None:
        """A default context's stored node policy: named by the plain context's, else the
        configurable's `policy`, else `FRUGALFLOW_POLICY`; read (newest version) from
        `FRUGALFLOW_DATABASE_URL` at each run's start."""
        name = _setting(config, given, "policy")
        if name is None:
            return
        from .measured import load_measurements, unknown_policy
        from .persistence.policy_store import PolicyStore
        from .persistence.store import Store

        url = os.environ.get("FRUGALFLOW_DATABASE_URL")
        if not url:
            raise UserError(f"policy {name!r} is read from a database: set "
                            "FRUGALFLOW_DATABASE_URL to the one it was saved in")
        store = Store(url)
        try:
            policies = PolicyStore(store)
            version = await policies.version(str(name))
            stored = await policies.load(str(name), version) if version is not None else None
            if stored is None:
                raise unknown_policy(str(name), {p.name for p in await policies.list()})
            validated = {n for n, spec in self.flow.nodes.items() if spec.validator is not None}
            ctx.measured = await load_measurements(
                store, self.flow.name, validated=validated, policy=stored.policy,
                label=f"policy {name} v{version}", production=False)
        finally:
            await store.close()

    def _config(self, config: RunnableConfig | None, ctx: RunContext) -> RunnableConfig:
        config = cast(RunnableConfig, dict(config or {}))  # a copy: the caller's stays as is
        if self.graph.checkpointer is not None:
            configurable = dict(config.get("configurable") or {})
            configurable.setdefault("thread_id", ctx.usage.run_id)
            config["configurable"] = configurable
        return config

    def _check(self, input: Any, config: RunnableConfig | None) -> None:
        """A run's input is checked against the flow's input fields (`inputs`). On a thread
        (a thread_id: a checkpointer keeps its state) an input may instead update any state
        field, which LangGraph itself checks: only a thread's start could be told apart."""
        thread = bool((config or {}).get("configurable", {}).get("thread_id"))
        if isinstance(input, Mapping) and not thread:
            from .inputs import check_input

            check_input(self.flow, input)

    @overload
    async def ainvoke(self: CompiledFlow[M], input: Any, config: RunnableConfig | None = None,
                      *, budget: float | None = None, context: RunContext | None = None,
                      **kwargs: Any) -> M: ...

    @overload
    async def ainvoke(self, input: Any, config: RunnableConfig | None = None,
                      *, budget: float | None = None, context: RunContext | None = None,
                      **kwargs: Any) -> dict[str, Any]: ...

    async def ainvoke(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        budget: float | None = None,
        context: RunContext | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run to the end (or an interrupt) and return the final state: a dict (of the
        state's TypedDict type), with `__interrupt__` when it stopped at an interrupt.
        An input that does not fit the flow raises `InputError` before any call."""
        self._check(input, config)
        ctx = context or self.new_context(budget=budget)
        return await self.graph.ainvoke(input, self._config(config, ctx), context=ctx, **kwargs)

    @overload
    def invoke(self: CompiledFlow[M], input: Any, config: RunnableConfig | None = None,
               *, budget: float | None = None, context: RunContext | None = None,
               **kwargs: Any) -> M: ...

    @overload
    def invoke(self, input: Any, config: RunnableConfig | None = None,
               *, budget: float | None = None, context: RunContext | None = None,
               **kwargs: Any) -> dict[str, Any]: ...

    def invoke(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        budget: float | None = None,
        context: RunContext | None = None,
        **kwargs: Any,
    ) -> Any:
        self._check(input, config)
        ctx = context or self.new_context(budget=budget)
        return self.graph.invoke(input, self._config(config, ctx), context=ctx, **kwargs)

    async def astream(
        self,
        input: Any,
        config: RunnableConfig | None = None,
        *,
        budget: float | None = None,
        context: RunContext | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """LangGraph's `astream` with this flow's run context."""
        self._check(input, config)
        ctx = context or self.new_context(budget=budget)
        async for item in self.graph.astream(
            input, self._config(config, ctx), context=ctx, **kwargs
        ):
            yield item

    def explain(self, input_tokens: int = 1000) -> dict[str, list[dict[str, Any]]]:
        """Per model node: every catalog model, accepted in order or rejected with reasons."""
        from .ranking import explain

        out: dict[str, list[dict[str, Any]]] = {}
        for spec in self.flow.nodes.values():
            if spec.needs is not None:
                out[spec.name] = explain(self.catalog, spec.needs, input_tokens=input_tokens)
        return out


@dataclass
class Agent:
    """A reusable model node: instructions, needs, tools and an output schema.

    As a node it sends `instructions` and the prompt built from the state, runs a bounded
    tool loop when it has tools, and writes its answer (text, or an `output` model when
    given) to `state[output_key]`.
    """

    name: str
    instructions: str
    needs: Needs = field(default_factory=Needs)
    tools: Sequence[BaseTool] = ()
    output: type[Any] | None = None
    prompt: Callable[[Any], str] = field(default=lambda state: str(state))
    output_key: str | None = None
    max_tool_rounds: int = 5
    validator: Validator | None = None

    def __post_init__(self) -> None:
        changes: dict[str, Any] = {}
        if self.tools and not self.needs.tools:
            changes["tools"] = True
        if self.output is not None and not self.needs.structured_output:
            changes["structured_output"] = True
        if changes:
            self.needs = self.needs.with_(**changes)

    async def run(self, state: Any, model: RoutedChatModel) -> dict[str, Any]:
        from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage, ToolMessage

        messages: list[BaseMessage] = [SystemMessage(self.instructions),
                                       HumanMessage(self.prompt(state))]
        if self.tools:
            by_name = {t.name: t for t in self.tools}
            bound = model.bind_tools(list(self.tools))
            for _ in range(self.max_tool_rounds):
                reply = await bound.ainvoke(messages)
                messages.append(reply)
                if not reply.tool_calls:
                    break
                for call in reply.tool_calls:
                    tool = by_name.get(call["name"])
                    result = (await tool.ainvoke(call["args"]) if tool is not None
                              else f"unknown tool {call['name']!r}")
                    messages.append(ToolMessage(str(result), tool_call_id=call["id"]))
            else:
                messages.append(HumanMessage("Answer now, without calling tools."))
        if self.output is not None:
            value: Any = await model.with_structured_output(self.output).ainvoke(messages)
            value = value.model_dump() if hasattr(value, "model_dump") else value
        elif self.tools and isinstance(messages[-1], AIMessageT) and not messages[-1].tool_calls:
            value = str(messages[-1].content)
        else:
            value = str((await model.ainvoke(messages)).content)
        return {self.output_key or self.name: value}

    def node(self) -> Callable[..., Any]:
        """This agent as a flow node function `(state, model) -> update`."""

        async def agent_node(state: Any, model: RoutedChatModel) -> dict[str, Any]:
            return await self.run(state, model)

        agent_node.__name__ = self.name
        return agent_node

