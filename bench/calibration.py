"""Per-node policies from small calibration samples: what the lower-bound rule delivers on
held-out data, what the evaluation costs, and the learned router against a per-task table.

    python bench/calibration.py                       # RouteLLM MMLU and MMLU-Pro, full
    python bench/calibration.py --seeds 2 --sizes 25,100 --no-router   # quick look
    python bench/calibration.py --csv evals.csv [--models a,b,c]

Data: `--data` (default ../shared/data from the repository root; see its README).
- routellm-mmlu: RouteLLM's MMLU (57 subjects = 57 nodes), Mixtral-8x7B-Instruct and
  gpt-4-1106-preview.
- mmlu-pro: MMLU-Pro (14 categories = 14 nodes), the 5-model ladder of bench/routing.py plus
  gpt-4o-2024-05-13 and deepseek-chat-2024-05.
- --csv: a task column (`category`, `task`, `eval_name` or `subject`: one node per value),
  `correct:<model>`, `cost:<model>` (USD per query) and optionally `split` (rows marked
  `test` are the held-out rows; the calibration draws come from the others) and a text
  column (`prompt` or `question`: the learned router's input; without one it is skipped).

Method, for each node size n and seed: draw n calibration rows per node (nodes with fewer
than n + --min-holdout rows are left out and counted), measure every model on them, choose
each node's policy with `frugalflow.evaluation.cheapest_policy` (the cheapest single model
or mix of two adjacent hull models whose 95% Wilson lower bound meets the target), and
measure it on the node's other rows (a mix: the share-weighted pass rate and cost, i.e. its
expectation). The incumbent is the best single model on the pooled calibration draws.
- (a) accuracy and cost on the held-out rows against the incumbent's: "switch safely"
  (each node's target is 95% of the incumbent's calibration pass rate on that node; a node
  where nothing reaches it keeps the incumbent) and "95% overall" (one target for every
  node, the cheapest in 0.30..0.99 whose calibration estimate of the overall accuracy is
  >= 95% of the incumbent's: chosen without held-out labels).
- (b) of the nodes given a policy (its lower bound meets the target), the share whose
  held-out pass rate meets it, per target. A held-out sample is itself noisy, so this share
  understates what the interval promises about the true rate.
- (c) the evaluation's cost (n rows x every model x every node) and the calls after which
  the saving per call of each rule above pays it back.
Then the router comparison: a 70/30 split stratified by node (or the file's split); the
learned router (frugalflow.learning.LearnedRouter, lexical features + the node as a tag) and
a per-node lookup table (the node's pass rate per model on train), both run by
`choose(price_weight=lambda)` on the same expected cost per query (this prompt's input tokens
and the model's mean output on train; with a file's costs, the model's mean on train); each
one's operating mix (`frugalflow.learning.hull_mix`: two adjacent points of its lower
convex hull) is chosen on 3-fold out-of-fold predictions of the train split, the cheapest
whose lower-bound accuracy is >= 95% of the incumbent's train accuracy, then applied to test.
Prices: bench/routing.py's (genai-prices via frugalflow's catalog), all printed.
It prints figures; it is not a timed test.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import routing  # noqa: E402  (the loaders and prices of bench/routing.py)
from routing_metrics import accuracy_at_cost  # noqa: E402

from frugalflow.evaluation import Measured, Policy, cheapest_policy, lower_hull  # noqa: E402
from frugalflow.learning import (  # noqa: E402
    LearnedRouter,
    LexicalFeaturizer,
    Rule,
    hull_mix,
    operating_curve,
)

SIZES = (25, 50, 100, 200)
TARGETS = (0.5, 0.6, 0.7, 0.8, 0.9)
SAFE_SHARE = 0.95  # "switch safely": a node's target is this share of the incumbent's rate
RELATIVE = -1.0  # key of the "switch safely" rule in SizeRun.kept
GRID = np.round(np.arange(0.30, 0.9901, 0.01), 2)
MMLU_PRO_MODELS = [*routing.MMLU_PRO_LADDER, "gpt-4o-2024-05-13", "deepseek-chat-2024-05"]
routing.PRICE_REFS.setdefault("gpt-4o-2024-05-13", ("openai", "gpt-4o-2024-05-13"))
routing.PRICE_REFS.setdefault("deepseek-chat-2024-05", ("deepseek", "deepseek-chat"))
TASK_COLUMNS = ("category", "task", "eval_name", "subject")


@dataclass
class TaskData:
    """A multi-task data set: per row its task (node), every model's outcome and cost."""

    name: str
    models: list[str]
    tasks: list[str]
    correct: np.ndarray  # [n, M] bool
    paid: np.ndarray  # [n, M] USD per query
    texts: list[str] | None
    test: np.ndarray | None  # [n] bool: the file's held-out rows (a `split` column)
    notes: list[str] = field(default_factory=list)
    source: routing.Dataset | None = None  # token counts and prices, for per-query estimates

    def expected(self, train: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """[rows, M] the cost a router knows before each call: this prompt's input tokens and
        the model's mean output on train when priced by tokens, else its mean cost on train."""
        if self.source is not None:
            return routing.expected_costs(self.source, train, rows)
        return np.repeat(self.paid[train].mean(axis=0)[None, :], len(rows), axis=0)


@dataclass(frozen=True)
class Chosen:
    policy: Policy
    promised: bool  # the policy's lower bound meets the target


def node_policy(measured: Sequence[Measured], target: float, *, incumbent: str) -> Chosen:
    """The lower-bound rule's policy for a node, else the incumbent alone (no promise)."""
    policy = cheapest_policy(measured, target)
    if policy is not None:
        return Chosen(policy, True)
    keep = next(m for m in measured if m.model == incumbent)
    return Chosen(Policy(((incumbent, 1.0),), keep.cost, keep.interval().low), False)


def held_out(policy: Policy, models: Sequence[str], Y: np.ndarray,
             paid: np.ndarray) -> tuple[float, float]:
    """A policy's expected pass rate and cost per call on held-out rows."""
    rate = cost = 0.0
    for model, share in policy.shares:
        j = models.index(model)
        rate += share * float(Y[:, j].mean())
        cost += share * float(paid[:, j].mean())
    return rate, cost


def _estimate(policy: Policy, measured: Sequence[Measured]) -> float:
    """A policy's pass rate as the calibration sample estimates it (point rates)."""
    by = {m.model: m for m in measured}
    return sum(share * by[model].rate for model, share in policy.shares)


@dataclass
class SizeRun:
    """One (n, seed): the figures (a), (b), (c)."""

    n: int
    seed: int
    nodes: int
    skipped: int
    incumbent: str
    acc_share: float  # switch safely: held-out accuracy / incumbent's
    cost_share: float  # switch safely: held-out cost / incumbent's
    moved: int  # nodes not left on the incumbent alone
    overall_target: float | None  # "95% overall": the common target chosen
    overall_acc_share: float
    overall_cost_share: float
    eval_cost: float
    saving_per_call: float
    payback_calls: float | None
    overall_saving: float  # the same for "95% overall"
    overall_payback: float | None
    kept: dict[float, tuple[int, int]]  # target -> (nodes meeting it held out, nodes promised)


@dataclass
class _Node:
    measured: list[Measured]
    Y: np.ndarray  # held-out outcomes
    paid: np.ndarray  # held-out costs
    weight: int  # held-out rows


def _draw(data: TaskData, n: int, seed: int, min_holdout: int) -> tuple[list[_Node], int, float]:
    """The nodes' calibration measurements and held-out rows; nodes left out; eval cost."""
    rng = np.random.default_rng(seed)
    tasks = np.array(data.tasks)
    nodes: list[_Node] = []
    skipped, eval_cost = 0, 0.0
    for task in sorted(set(data.tasks)):
        rows = np.flatnonzero(tasks == task)
        if data.test is not None:
            pool, hold = rows[~data.test[rows]], rows[data.test[rows]]
        else:
            pool, hold = rows, np.array([], dtype=np.int64)
        if len(pool) < n or len(hold) + len(pool) - n < min_holdout:
            skipped += 1
            continue
        pool = pool[rng.permutation(len(pool))]
        cal, rest = pool[:n], pool[n:]
        hold = hold if data.test is not None else rest
        if len(hold) < min_holdout:
            skipped += 1
            continue
        Yc, Pc = data.correct[cal], data.paid[cal]
        measured = [Measured(m, n, int(Yc[:, j].sum()), float(Pc[:, j].mean()))
                    for j, m in enumerate(data.models)]
        eval_cost += float(Pc.sum())
        nodes.append(_Node(measured, data.correct[hold], data.paid[hold], len(hold)))
    return nodes, skipped, eval_cost


def _aggregate(nodes: Sequence[_Node], policies: Sequence[Policy],
               models: Sequence[str]) -> tuple[float, float]:
    """Held-out accuracy and cost per call over all nodes (weighted by held-out rows)."""
    total = sum(nd.weight for nd in nodes)
    acc = cost = 0.0
    for nd, pol in zip(nodes, policies, strict=True):
        r, c = held_out(pol, models, nd.Y, nd.paid)
        acc, cost = acc + r * nd.weight / total, cost + c * nd.weight / total
    return acc, cost


def _overall(nodes: Sequence[_Node], models: Sequence[str], incumbent: str,
             inc_rate: float) -> tuple[float | None, list[Policy]]:
    """The cheapest common target whose calibration estimate reaches 95% of the incumbent."""
    best: tuple[float, float, list[Policy]] | None = None
    for t in GRID:
        chosen = [node_policy(nd.measured, float(t), incumbent=incumbent).policy for nd in nodes]
        est = sum(_estimate(p, nd.measured) * len(nd.Y) for p, nd in zip(chosen, nodes,
                                                                         strict=True))
        est /= sum(len(nd.Y) for nd in nodes)
        cost = sum(p.expected_cost * len(nd.Y) for p, nd in zip(chosen, nodes, strict=True))
        if est >= SAFE_SHARE * inc_rate and (best is None or cost < best[1]):
            best = (float(t), cost, chosen)
    if best is None:
        return None, [Policy(((incumbent, 1.0),), 0.0, 0.0)] * len(nodes)
    return best[0], best[2]


def run_size(data: TaskData, n: int, seed: int, targets: Sequence[float] = TARGETS,
             min_holdout: int = 25) -> SizeRun:
    """The experiment at one node size and seed (see the module docstring)."""
    nodes, skipped, eval_cost = _draw(data, n, seed, min_holdout)
    if not nodes:
        raise SystemExit(f"error: {data.name}: no node has {n} + {min_holdout} rows")
    M = data.models
    pooled = np.array([sum(nd.measured[j].successes for nd in nodes) for j in range(len(M))])
    incumbent = M[int(np.argmax(pooled))]
    j_inc = M.index(incumbent)
    inc_pol = [Policy(((incumbent, 1.0),), 0.0, 0.0)] * len(nodes)
    inc_acc, inc_cost = _aggregate(nodes, inc_pol, M)
    kept: dict[float, tuple[int, int]] = {}
    for t in targets:
        met = promised = 0
        for nd in nodes:
            ch = node_policy(nd.measured, t, incumbent=incumbent)
            if ch.promised:
                promised += 1
                met += held_out(ch.policy, M, nd.Y, nd.paid)[0] >= t
        kept[t] = (met, promised)
    safe: list[Policy] = []
    met = promised = moved = 0
    for nd in nodes:
        target = SAFE_SHARE * nd.measured[j_inc].rate
        ch = node_policy(nd.measured, target, incumbent=incumbent)
        safe.append(ch.policy)
        moved += ch.policy.shares != ((incumbent, 1.0),)
        if ch.promised:
            promised += 1
            met += held_out(ch.policy, M, nd.Y, nd.paid)[0] >= target
    kept[RELATIVE] = (met, promised)
    acc, cost = _aggregate(nodes, safe, M)
    inc_rate = float(pooled[j_inc] / (n * len(nodes)))
    t_all, overall = _overall(nodes, M, incumbent, inc_rate)
    o_acc, o_cost = _aggregate(nodes, overall, M)
    saving, o_saving = inc_cost - cost, inc_cost - o_cost
    return SizeRun(n, seed, len(nodes), skipped, incumbent, acc / inc_acc, cost / inc_cost,
                   moved, t_all, o_acc / inc_acc, o_cost / inc_cost, eval_cost, saving,
                   eval_cost / saving if saving > 0 else None, o_saving,
                   eval_cost / o_saving if o_saving > 0 else None, kept)


# -- printing ----------------------------------------------------------------------------


def _spread(values: Sequence[float], fmt: str = "{:.1%}") -> str:
    if not values:
        return "n/a"
    lo, hi = min(values), max(values)
    return f"{fmt.format(float(np.mean(values)))} [{fmt.format(lo)}, {fmt.format(hi)}]"


def report_sizes(data: TaskData, runs: Sequence[SizeRun], targets: Sequence[float]) -> None:
    """Print (a), (b), (c) for every n, mean [min, max] over seeds."""
    by_n: dict[int, list[SizeRun]] = {}
    for r in runs:
        by_n.setdefault(r.n, []).append(r)
    seeds = len(next(iter(by_n.values())))
    incs = sorted({r.incumbent for r in runs})
    print(f"incumbent (best single model on the pooled calibration draws): {', '.join(incs)}; "
          f"figures: mean [min, max] over {seeds} seeds")
    print("(a) held-out accuracy and cost, as a share of the incumbent's on the same rows")
    print(f"    {'n':>4s} {'nodes':>5s}  {'switch safely: accuracy':>26s} {'cost':>24s} "
          f"{'moved':>6s}  {'95% overall: target':>20s} {'accuracy':>22s} {'cost':>22s}")
    for n, rs in sorted(by_n.items()):
        tgt = [r.overall_target for r in rs if r.overall_target is not None]
        print(f"    {n:4d} {rs[0].nodes:5d}  {_spread([r.acc_share for r in rs]):>26s} "
              f"{_spread([r.cost_share for r in rs]):>24s} "
              f"{np.mean([r.moved for r in rs]):6.1f}  "
              f"{(_spread(tgt, '{:.2f}') if tgt else 'none'):>20s} "
              f"{_spread([r.overall_acc_share for r in rs]):>22s} "
              f"{_spread([r.overall_cost_share for r in rs]):>22s}")
    skipped = {n: rs[0].skipped for n, rs in by_n.items() if rs[0].skipped}
    if skipped:
        print("    nodes left out (fewer rows than n + --min-holdout): "
              + ", ".join(f"n={n}: {k}" for n, k in sorted(skipped.items())))
    _report_kept(by_n, targets)
    print("(c) the evaluation's cost (n rows x every model x every node) and the calls (spread "
          "over the nodes as the held-out rows are) after which the saving per call against "
          "the incumbent pays it back")
    for n, rs in sorted(by_n.items()):
        parts = []
        for rule, save, pay in (("switch safely", [r.saving_per_call for r in rs],
                                 [r.payback_calls for r in rs]),
                                ("95% overall", [r.overall_saving for r in rs],
                                 [r.overall_payback for r in rs])):
            paid_back = [p for p in pay if p is not None]
            parts.append(f"{rule}: saves ${np.mean(save):.7f}/call, pays back after "
                         + (f"{_spread(paid_back, '{:,.0f}')} calls" if paid_back else "never")
                         + (f" ({len(pay) - len(paid_back)} seed(s) never)"
                            if paid_back and len(paid_back) < len(pay) else ""))
        print(f"    n={n:4d}: eval ${np.mean([r.eval_cost for r in rs]):.4f}; " + "; ".join(parts))


def _report_kept(by_n: dict[int, list[SizeRun]], targets: Sequence[float]) -> None:
    print("(b) nodes whose held-out pass rate meets the target, of those the lower-bound "
          "rule gave a policy (met/promised summed over seeds)")
    keys = [*targets, RELATIVE]
    names = [f"t={t:.2f}" for t in targets] + ["safely", "pooled"]
    print(f"    {'n':>4s} " + " ".join(f"{s:>16s}" for s in names))
    for n, rs in sorted(by_n.items()):
        cells = []
        tm = tp = 0
        for k in keys:
            m = sum(r.kept[k][0] for r in rs)
            p = sum(r.kept[k][1] for r in rs)
            tm, tp = tm + m, tp + p
            cells.append(f"{m / p:.1%} ({m}/{p})" if p else "no promise")
        cells.append(f"{tm / tp:.1%} ({tm}/{tp})" if tp else "no promise")
        print(f"    {n:4d} " + " ".join(f"{c:>16s}" for c in cells))
    rs100 = by_n.get(100)
    if rs100:
        m = sum(r.kept[k][0] for r in rs100 for k in keys)
        p = sum(r.kept[k][1] for r in rs100 for k in keys)
        if p:
            verdict = "MET" if m / p >= 0.9 else "NOT MET"
            print(f"    target (n=100: the rule meets its target on >= 90% of nodes): {verdict} "
                  f"({m / p:.1%} pooled over targets and seeds)")


# -- the learned router against a per-task table ------------------------------------------


@dataclass
class RouterResult:
    name: str
    mix: str  # the operating mix chosen out of fold
    acc: float  # test accuracy (expectation over the mix)
    cost_share: float  # test cost / the incumbent's
    single_acc: float | None  # the cheapest single operating point instead of a mix
    single_cost_share: float | None
    curve: tuple[np.ndarray, np.ndarray] | None = None  # test (cost share, accuracy) per point


def _folds(tasks: Sequence[str], rows: np.ndarray, k: int, seed: int) -> np.ndarray:
    """A fold number per row, stratified by task."""
    rng = np.random.default_rng(seed)
    fold = np.zeros(len(rows), dtype=np.int64)
    t = np.array([tasks[i] for i in rows])
    for task in sorted(set(t.tolist())):
        idx = np.flatnonzero(t == task)
        fold[idx[rng.permutation(len(idx))]] = np.arange(len(idx)) % k
    return fold


def table_predict(data: TaskData, train: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """The per-task lookup table: each model's pass rate on the row's task in `train`."""
    tasks = np.array(data.tasks)
    overall = data.correct[train].mean(axis=0)
    rates = {t: data.correct[train[tasks[train] == t]].mean(axis=0)
             for t in set(tasks[train].tolist())}
    return np.array([rates.get(tasks[i], overall) for i in rows], dtype=np.float64)


UNCONVERGED: list[bool] = []  # per learned-router fit: stopped at --max-iter


def learned_predict(data: TaskData, train: np.ndarray, rows: np.ndarray,
                    max_iter: int) -> np.ndarray:
    from frugalflow.learning import Example

    assert data.texts is not None
    router = LearnedRouter(LexicalFeaturizer(), max_iter=max_iter)
    router.fit([Example(None, data.texts[i], m, bool(data.correct[i, j]), data.tasks[i])
                for i in train for j, m in enumerate(data.models)], heads=data.models)
    UNCONVERGED.append(router.n_iter >= max_iter)
    return router.predict_batch([data.texts[i] for i in rows], data.models,
                                [data.tasks[i] for i in rows])


def _apply(mix_shares: Sequence[tuple[float, float]], P: np.ndarray, C: np.ndarray,
           Y: np.ndarray, paid: np.ndarray) -> tuple[float, float]:
    from frugalflow.learning.hull import route_batch

    rows = np.arange(len(P))
    acc = cost = 0.0
    for param, share in mix_shares:
        pick = route_batch(Rule.PRICE_WEIGHT, P, C, param)
        acc += share * float(Y[rows, pick].mean())
        cost += share * float(paid[rows, pick].sum())
    return acc, cost


def compare_routers(data: TaskData, seed: int, folds: int, max_iter: int) -> list[RouterResult]:
    """Both routers at the operating point chosen out of fold on train, measured on test."""
    if data.test is not None:
        train, test = np.flatnonzero(~data.test), np.flatnonzero(data.test)
    else:
        train, test = routing.split(len(data.tasks), data.tasks, 0.3, seed)
    inc = int(np.argmax(data.correct[train].mean(axis=0)))
    target = SAFE_SHARE * float(data.correct[train, inc].mean())
    inc_cost = float(data.paid[test, inc].sum())
    predictors = {"per-task table": lambda tr, rs: table_predict(data, tr, rs)}
    if data.texts is not None:
        predictors["learned router"] = lambda tr, rs: learned_predict(data, tr, rs, max_iter)
    fold = _folds(data.tasks, train, folds, seed + 1)
    out: list[RouterResult] = []
    for name, predict in predictors.items():
        P_oof = np.zeros((len(train), len(data.models)))
        for f in range(folds):
            P_oof[fold == f] = predict(train[fold != f], train[fold == f])
        C_oof = data.expected(train, train)
        curve = operating_curve(Rule.PRICE_WEIGHT, P_oof, C_oof, data.correct[train],
                                data.paid[train])
        mix = hull_mix(curve, Rule.PRICE_WEIGHT, quality=target)
        P = predict(train, test)
        C = data.expected(train, test)
        if mix is None:
            out.append(RouterResult(name, "no operating point reaches the target", float("nan"),
                                    float("nan"), None, None))
            continue
        acc, cost = _apply(mix.shares, P, C, data.correct[test], data.paid[test])
        test_curve = operating_curve(Rule.PRICE_WEIGHT, P, C, data.correct[test],
                                     data.paid[test])
        on_test = (np.array([p.cost * len(test) / inc_cost for p in test_curve]),
                   np.array([p.rate for p in test_curve]))
        singles = [p for p in curve if Measured("", p.n, p.successes, p.cost).interval().low
                   >= target]
        s_acc = s_cost = None
        if singles:
            one = min(singles, key=lambda p: p.cost)
            s_acc, s_cost = _apply(((one.param, 1.0),), P, C, data.correct[test],
                                   data.paid[test])
        out.append(RouterResult(name, mix.describe(), acc, cost / inc_cost, s_acc,
                                None if s_cost is None else s_cost / inc_cost, on_test))
    return out


def report_routers(data: TaskData, results: Sequence[RouterResult], seed: int) -> str:
    """Print the comparison; return the verdict line for the summary."""
    print("router vs per-task table, operating point chosen without test labels (lower bound "
          f"of the out-of-fold accuracy >= 95% of the incumbent's train accuracy; seed {seed}):")
    print(f"    {'router':16s} {'test accuracy':>13s} {'cost % of incumbent':>20s}  "
          f"{'single point instead':>28s}  mix (out of fold)")
    for r in results:
        single = (f"{r.single_acc:.4f} at {r.single_cost_share:.1%}"
                  if r.single_acc is not None and r.single_cost_share is not None else "none")
        print(f"    {r.name:16s} {r.acc:13.4f} {r.cost_share:20.1%}  {single:>28s}  {r.mix}")
    if any(UNCONVERGED):
        print(f"    warning: {sum(UNCONVERGED)} of {len(UNCONVERGED)} learned-router fits stopped "
              "at --max-iter before converging (raise --max-iter)")
    UNCONVERGED.clear()
    by = {r.name: r for r in results}
    if "learned router" not in by:
        return f"{data.name}: no text column, learned router not run"
    lr, tb = by["learned router"], by["per-task table"]
    head = (f"{data.name} (seed {seed}): accuracy {lr.acc:.4f} vs the table's {tb.acc:.4f}, cost "
            f"{lr.cost_share:.1%} vs {tb.cost_share:.1%} of the incumbent's")
    if lr.cost_share <= tb.cost_share and lr.acc >= tb.acc:
        return f"{head}: learned router not worse"
    if lr.cost_share >= tb.cost_share and lr.acc <= tb.acc:
        return f"{head}: learned router WORSE"
    # A trade-off: judge both test curves (mixing two points) at the table's chosen cost.
    assert lr.curve is not None and tb.curve is not None
    at_r = accuracy_at_cost(lr.curve[0], lr.curve[1], tb.cost_share)
    at_t = accuracy_at_cost(tb.curve[0], tb.curve[1], tb.cost_share)
    r = at_r[1] if at_r is not None else float("nan")
    t = at_t[1] if at_t is not None else float("nan")
    word = "not worse" if at_r is not None and at_t is not None and r >= t else "WORSE"
    return (f"{head}; a trade-off: at the table's cost the test curves (mixing two points) "
            f"reach {r:.4f} (router) and {t:.4f} (table): learned router {word}")


# -- data ----------------------------------------------------------------------------------


def _from_routing(ds: routing.Dataset) -> TaskData:
    assert ds.categories is not None
    return TaskData(ds.name, list(ds.models), [str(c) for c in ds.categories], ds.correct,
                    ds.cost, list(ds.texts), None, list(ds.notes), ds)


def load_task_csv(path: Path, models: Sequence[str] | None, split_column: str) -> TaskData:
    """A CSV with a task column, correct:<m>, cost:<m>, optionally a split and a text."""
    rows = routing._read_rows(path)
    if not rows:
        raise SystemExit(f"error: {path} has no rows")
    cols = list(rows[0])
    task_col = next((c for c in TASK_COLUMNS if c in cols), None)
    if task_col is None:
        raise SystemExit(f"error: {path} needs a task column ({', '.join(TASK_COLUMNS)})")
    names = list(models) if models else [c.split(":", 1)[1] for c in cols
                                        if c.startswith("correct:")]
    missing = [f"{p}:{m}" for m in names for p in ("correct", "cost") if f"{p}:{m}" not in cols]
    if len(names) < 2 or missing:
        raise SystemExit(f"error: {path} needs correct:<model> and cost:<model> for at least two "
                         f"models (missing: {', '.join(missing) or 'a second model'})")
    kept = [r for r in rows if all(routing._truth(r[f"correct:{m}"]) is not None
                                   and r[f"cost:{m}"].strip() for m in names)]
    text_col = next((c for c in ("prompt", "question") if c in cols), None)
    test = None
    if split_column in cols:
        test = np.array([r[split_column].strip().lower() == "test" for r in kept])
    notes = [f"nodes: the {task_col!r} column; costs: the file's cost:<model> columns (USD per "
             f"query, as given); {len(rows) - len(kept)} of {len(rows)} rows dropped (a blank "
             "outcome or cost)",
             f"split: {'the ' + repr(split_column) + ' column (test rows held out)' if test is not None else 'none: drawn per seed'}"]
    return TaskData(path.name, names, [r[task_col] for r in kept],
                    np.array([[routing._truth(r[f"correct:{m}"]) for m in names] for r in kept],
                             dtype=bool),
                    np.array([[float(r[f"cost:{m}"]) for m in names] for r in kept]),
                    [r[text_col] for r in kept] if text_col else None, test, notes)


def _datasets(args: argparse.Namespace) -> list[TaskData]:
    if args.csv is not None:
        models = [m.strip() for m in args.models.split(",")] if args.models else None
        return [load_task_csv(args.csv, models, args.split_column)]
    out: list[TaskData] = []
    for name in (n.strip() for n in args.datasets.split(",") if n.strip()):
        if name == "routellm-mmlu":
            out.append(_from_routing(routing.load_routellm_mmlu(args.data, {})))
        elif name == "mmlu-pro":
            out.append(_from_routing(routing.load_mmlu_pro(
                args.data, routing.MMLU_PRO_PREFIX_TOKENS, {}, models=MMLU_PRO_MODELS)))
        else:
            raise SystemExit(f"error: unknown data set {name!r}; known: routellm-mmlu, mmlu-pro "
                             "(or --csv FILE)")
    return out


def _arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=routing.DEFAULT_DATA)
    ap.add_argument("--datasets", default="routellm-mmlu,mmlu-pro")
    ap.add_argument("--csv", type=Path, help="a CSV with a task column instead of --datasets")
    ap.add_argument("--models", help="with --csv: the models (default: every correct:<m>)")
    ap.add_argument("--split-column", default="split", help="with --csv (default: split)")
    ap.add_argument("--sizes", default=",".join(map(str, SIZES)))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--targets", default=",".join(map(str, TARGETS)))
    ap.add_argument("--min-holdout", type=int, default=25,
                    help="held-out rows a node needs to be counted")
    ap.add_argument("--no-router", action="store_true", help="skip the router comparison")
    ap.add_argument("--max-iter", type=int, default=1000,
                    help="gradient steps per fit at most (fits converge in about 350 here)")
    ap.add_argument("--folds", type=int, default=3)
    ap.add_argument("--router-seeds", type=int, default=1,
                    help="train/test splits for the router comparison (default 1)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _arguments().parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    targets = [float(t) for t in args.targets.split(",")]
    t0 = time.perf_counter()
    verdicts: list[str] = []
    for data in _datasets(args):
        print("=" * 100)
        print(f"{data.name}: {len(data.tasks):,} rows, {len(set(data.tasks))} nodes; models: "
              f"{', '.join(data.models)}")
        for line in data.notes:
            print(line)
        runs = [run_size(data, n, seed, targets, args.min_holdout)
                for n in sizes for seed in range(args.seeds)]
        report_sizes(data, runs, targets)
        if not args.no_router:
            for seed in range(args.router_seeds if data.test is None else 1):
                verdicts.append(report_routers(
                    data, compare_routers(data, seed, args.folds, args.max_iter), seed))
    if verdicts:
        print("=" * 100)
        print("target: the learned router (with hull mixing) is never worse than the per-task "
              "table with mixing")
        for v in verdicts:
            print(f"    {v}")
        held = not any("WORSE" in v for v in verdicts)
        print(f"    {'HOLDS' if held else 'DOES NOT HOLD'} on these data sets")
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
