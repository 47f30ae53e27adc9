"""Learned routing on real per-query outcomes: accuracy and cost on held-out questions.

    python bench/routing.py                                  # the three shared data sets
    python bench/routing.py --datasets mmlu-pro --embeddings # MiniLM features (extra needed)
    python bench/routing.py --csv runs.csv --models small,big [--price small=0.1,0.4 ...]

Data: `--data` (default: ../shared/data from the repository root), see its README.

- mmlu-pro: MMLU-Pro, ladder Llama-3.1-8B-Instruct, Gemini 1.5 Flash, Llama-3.1-70B-Instruct,
  Gemini 1.5 Pro, Gemini 3.1 Pro; the 27 other models' outcomes are not used.
- routellm-mmlu, routellm-gsm8k: the RouteLLM paper's data, Mixtral-8x7B-Instruct (weak)
  vs gpt-4-1106-preview (strong).
- --csv: any CSV with a text column (`prompt` or `question`, plus `options` if present),
  `correct:<model>` per model, and `cost:<model>` (USD per query) or `out_chars:<model>`.

Method. Rows with a blank outcome for any model of the ladder are dropped. A seeded split
(70/30 by question, stratified by category/subject when there is one) gives train and test;
everything printed is measured on the test split. The routers see only the question text
and its category; they are fitted on the train split only:

- frugalflow: `frugalflow.learning.LearnedRouter` on `LexicalFeaturizer` (hashed word uni-
  and bigram TF-IDF + category and length indicators; `--embeddings`: MiniLM embeddings),
  multi-task (weights shared by all models plus per-model ones), routed per query by the
  expected value rule of `choose(..., price_weight=lambda)`: the model maximising
  p - lambda * expected cost, swept over lambda.
- baseline: the usual TF-IDF + one logistic regression per model (no shared weights, no
  length indicators), routed by `choose(..., target=t)`: the cheapest model with p >= t.

Each router's cost-quality curve is printed; "cost to reach 95% of the best single model's
accuracy" is read off that curve on the test split (as the issue states the baseline's
figure), and, separately, at an operating point chosen on a validation fold of the train
split (the router is fitted on the other 80%, lambda or t is chosen there, the router is
refitted on the whole train split and run once on test): the figure a deployment would get.
For two-model sets also PGR, APGR and CPT (RouteLLM, arXiv 2406.18665) against strong-call
share, for the routers and for random routing.

Prices come from genai-prices through frugalflow's catalog (`ModelSpec.cost`); every price and
token assumption is printed. It prints figures; it is not a timed test.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from frugalflow.catalog import ModelSpec
from frugalflow.learning import (
    EmbeddingFeaturizer,
    Example,
    LearnedRouter,
    LexicalFeaturizer,
    OperatingPoint,
    Rule,
    choose,
    embeddings_available,
    hull_mix,
)
from frugalflow.learning.hull import default_params, route_batch
from frugalflow.usage import Usage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from routing_metrics import accuracy_at_cost, apgr, auc, cpt, pgr_curve  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data"

# Data-set model name -> (provider, model id genai-prices knows). Open-weight models are
# priced at Together (the "-Turbo" endpoints, the Llama 3.1 builds Together serves).
PRICE_REFS: dict[str, tuple[str, str]] = {
    "Meta-Llama-3_1-8B-Instruct": ("together", "meta-llama/Meta-Llama-3.1-8B-Instruct-Turbo"),
    "gemini-1.5-flash-002": ("google", "gemini-1.5-flash-002"),
    "Meta-Llama-3_1-70B-Instruct": ("together", "meta-llama/Meta-Llama-3.1-70B-Instruct-Turbo"),
    "gemini-1.5-pro-002": ("google", "gemini-1.5-pro-002"),
    "gemini-3.1-pro": ("google", "gemini-3.1-pro-preview"),
    "mixtral-8x7b-instruct": ("together", "mistralai/Mixtral-8x7B-Instruct-v0.1"),
    "gpt-4-1106-preview": ("openai", "gpt-4-1106-preview"),
}
# Used (and printed) only when genai-prices does not know a model: USD per million tokens.
FALLBACK_PRICES: dict[str, tuple[float, float, str]] = {
    "mixtral-8x7b-instruct": (0.60, 0.60, "Together's list price for Mixtral-8x7B-Instruct"),
    "Meta-Llama-3_1-8B-Instruct": (0.18, 0.18, "Together's list price, Llama 3.1 8B Turbo"),
    "Meta-Llama-3_1-70B-Instruct": (0.88, 0.88, "Together's list price, Llama 3.1 70B Turbo"),
}
MMLU_PRO_LADDER = [
    "Meta-Llama-3_1-8B-Instruct",
    "gemini-1.5-flash-002",
    "Meta-Llama-3_1-70B-Instruct",
    "gemini-1.5-pro-002",
    "gemini-3.1-pro",
]
ROUTELLM_PAIR = ["mixtral-8x7b-instruct", "gpt-4-1106-preview"]
MMLU_PRO_PREFIX_TOKENS = 3500
GSM8K_PREFIX_TOKENS = 1200
ROUTELLM_MMLU_OUTPUT_TOKENS = 1
TARGET_SHARE = 0.95  # of the best single model's accuracy
COST_SHARES = (0.2, 0.5)  # accuracy at these shares of the best single model's cost
ISSUE_TARGET_PCT = 50.0  # issue: the router reaches it at <= 50% of that model's cost


# -- data ------------------------------------------------------------------------------


@dataclass
class Dataset:
    name: str
    texts: list[str]
    categories: list[str | None] | None
    models: list[str]
    correct: np.ndarray  # [n, M] bool
    cost: np.ndarray  # [n, M] USD actually paid per query
    in_tokens: np.ndarray | None  # [n] known before the call (None: costs given per query)
    out_tokens: np.ndarray | None  # [n, M]
    unit_prices: dict[str, tuple[float, float]]  # USD per token (input, output)
    notes: list[str] = field(default_factory=list)
    n_read: int = 0
    dropped: int = 0
    test_mask: np.ndarray | None = None  # [n] bool: the file's own test rows (--split-column)

    @property
    def n(self) -> int:
        return len(self.texts)


def _open(path: Path) -> io.TextIOBase:
    if not path.exists():
        sys.exit(f"error: {path} not found (pass --data DIR, the folder holding mmlu-pro/ "
                 "and routellm/, or --csv FILE)")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _read_rows(path: Path) -> list[dict[str, str]]:
    csv.field_size_limit(1 << 30)
    with _open(path) as f:
        return list(csv.DictReader(f))


def _truth(value: str) -> bool | None:
    v = value.strip().lower()
    if v in ("", "nan", "none", "na"):
        return None
    if v in ("1", "1.0", "true", "yes"):
        return True
    if v in ("0", "0.0", "false", "no"):
        return False
    raise ValueError(f"unreadable outcome {value!r}")


def _keep_complete(rows: list[dict[str, str]], models: Sequence[str]) -> list[dict[str, str]]:
    missing = [m for m in models if f"correct:{m}" not in rows[0]]
    if missing:
        sys.exit(f"error: no column correct:{missing[0]} (columns: {', '.join(rows[0])})")
    return [r for r in rows if all(_truth(r[f"correct:{m}"]) is not None for m in models)]


def _price_spec(model: str) -> tuple[ModelSpec | None, str]:
    provider, model_id = PRICE_REFS.get(model, ("", model))
    caps = {c: True for c in ("tool_calling", "structured_output", "vision", "streaming",
                              "reasoning")}
    spec = ModelSpec(
        provider=provider or "openai", model=model_id, price_ref=f"{provider}:{model_id}",
        context_window=1_000_000, max_output_tokens=100_000, capabilities=caps,
    )
    import logging

    logging.getLogger("frugalflow").disabled = True  # a missing price is reported below
    try:
        priced = spec.priced
    finally:
        logging.getLogger("frugalflow").disabled = False
    return (spec if priced else None), f"{provider}:{model_id}" if provider else model_id


def _costs(
    models: Sequence[str], in_tokens: np.ndarray, out_tokens: np.ndarray,
    overrides: dict[str, tuple[float, float]],
) -> tuple[np.ndarray, dict[str, tuple[float, float]], list[str]]:
    """Per query and model: USD via the catalog's genai-prices lookup (tiers included)."""
    cost = np.zeros((len(in_tokens), len(models)))
    unit: dict[str, tuple[float, float]] = {}
    notes = ["prices (USD per million tokens; genai-prices via frugalflow.catalog.ModelSpec.cost):"]
    for j, m in enumerate(models):
        if m in overrides:
            pin, pout = overrides[m]
            cost[:, j] = (in_tokens * pin + out_tokens[:, j] * pout) / 1e6
            unit[m] = (pin / 1e6, pout / 1e6)
            notes.append(f"  {m:30s} {'--price (given)':52s} in {pin:7.3f}  out {pout:7.3f}")
            continue
        spec, ref = _price_spec(m)
        if spec is None:
            if m not in FALLBACK_PRICES:
                sys.exit(f"error: genai-prices has no price for {m!r} ({ref}); pass "
                         f"--price {m}=IN,OUT (USD per million input, output tokens)")
            pin, pout, why = FALLBACK_PRICES[m]
            cost[:, j] = (in_tokens * pin + out_tokens[:, j] * pout) / 1e6
            unit[m] = (pin / 1e6, pout / 1e6)
            notes.append(f"  {m:30s} FALLBACK ({why}; not in genai-prices as {ref})"
                         f" in {pin:.3f} out {pout:.3f}")
            continue
        ins, outs = np.rint(in_tokens).astype(int), np.rint(out_tokens[:, j]).astype(int)
        memo: dict[tuple[int, int], float] = {}
        for i, (a, b) in enumerate(zip(ins, outs, strict=True)):
            key = (int(a), int(b))
            c = memo.get(key)
            if c is None:
                c = memo[key] = spec.cost(Usage(input_tokens=key[0], output_tokens=key[1]))
            cost[i, j] = c
        unit[m] = (spec.input_price_per_mtok / 1e6, spec.output_price_per_mtok / 1e6)
        notes.append(
            f"  {m:30s} {ref:52s} in {spec.input_price_per_mtok:7.3f}  "
            f"out {spec.output_price_per_mtok:7.3f}"
        )
    return cost, unit, notes


def _token_notes(models: Sequence[str], in_tokens: np.ndarray, out_tokens: np.ndarray) -> list[str]:
    lines = [f"tokens per query: input mean {in_tokens.mean():,.0f} "
             f"(min {in_tokens.min():,.0f}, max {in_tokens.max():,.0f}); output mean by model:"]
    lines += [f"  {m:30s} {out_tokens[:, j].mean():8.1f}" for j, m in enumerate(models)]
    return lines


def _mc_prompt(question: str, options: str) -> str:
    """The question and its lettered options, as the model saw them."""
    try:
        opts = json.loads(options)
    except json.JSONDecodeError:
        return f"{question}\n{options}"
    letters = "ABCDEFGHIJKLMNOP"
    return question + "".join(f"\n{letters[i]}. {o}" for i, o in enumerate(opts[:16]))


def load_mmlu_pro(data: Path, prefix_tokens: int, prices: dict[str, tuple[float, float]],
                  models: Sequence[str] = MMLU_PRO_LADDER) -> Dataset:
    rows = _read_rows(data / "mmlu-pro" / "mmlu_pro_correctness.csv.gz")
    kept = _keep_complete(rows, models)
    texts = [_mc_prompt(r["question"], r["options"]) for r in kept]
    in_tok = np.array([prefix_tokens + (len(r["question"]) + len(r["options"])) / 4 for r in kept])
    out_tok = np.array([[float(r[f"out_chars:{m}"] or 0) / 4 for m in models] for r in kept])
    cost, unit, pnotes = _costs(models, in_tok, out_tok, prices)
    notes = [
        f"input tokens = {prefix_tokens:,} (assumed length of the 5-shot chain-of-thought prefix, "
        "the same 5 examples per category; --prefix-tokens) + len(question + options) / 4",
        "output tokens = out_chars:<model> / 4 per model and query (visible answer only: a "
        "thinking model's hidden reasoning tokens are not in the data and not priced)",
        *pnotes, *_token_notes(models, in_tok, out_tok),
    ]
    return Dataset(
        "MMLU-Pro", texts, [r["category"] for r in kept], list(models),
        np.array([[_truth(r[f"correct:{m}"]) for m in models] for r in kept], dtype=bool),
        cost, in_tok, out_tok, unit, notes, len(rows), len(rows) - len(kept),
    )


def load_routellm_mmlu(data: Path, prices: dict[str, tuple[float, float]]) -> Dataset:
    rows = _read_rows(data / "routellm" / "mmlu.csv.gz")
    models = ROUTELLM_PAIR
    kept = _keep_complete(rows, models)
    # RouteLLM's script prompts 5 dev examples of the subject (cut to <= 1,536 tokens) before
    # the question; a dev example is about as long as the subject's questions.
    by_subject: dict[str, list[int]] = {}
    for r in kept:
        by_subject.setdefault(r["subject"], []).append(len(r["prompt"]))
    prefix = {s: min(1536.0, 20 + 5 * (float(np.mean(v)) / 4 + 2))
              for s, v in by_subject.items()}
    in_tok = np.array([prefix[r["subject"]] + len(r["prompt"]) / 4 for r in kept])
    out_tok = np.full((len(kept), 2), float(ROUTELLM_MMLU_OUTPUT_TOKENS))
    cost, unit, pnotes = _costs(models, in_tok, out_tok, prices)
    notes = [
        "input tokens = 5-shot prefix (5 dev examples of the subject, each estimated as the "
        "subject's mean prompt length/4 + 2 answer tokens, + 20 header tokens, capped at "
        "1,536 as RouteLLM's script does) + len(prompt) / 4",
        f"output tokens = {ROUTELLM_MMLU_OUTPUT_TOKENS} per query (no answer lengths in this file; "
        "RouteLLM's MMLU script generates max_new_tokens=1, the answer letter)",
        *pnotes, *_token_notes(models, in_tok, out_tok),
    ]
    return Dataset(
        "RouteLLM MMLU", [r["prompt"] for r in kept], [r["subject"] for r in kept], models,
        np.array([[_truth(r[f"correct:{m}"]) for m in models] for r in kept], dtype=bool),
        cost, in_tok, out_tok, unit, notes, len(rows), len(rows) - len(kept),
    )


def load_routellm_gsm8k(data: Path, prefix_tokens: int,
                        prices: dict[str, tuple[float, float]]) -> Dataset:
    rows = _read_rows(data / "routellm" / "gsm8k.csv.gz")
    models = ROUTELLM_PAIR
    kept = _keep_complete(rows, models)
    in_tok = np.array([prefix_tokens + len(r["prompt"]) / 4 for r in kept])
    out_tok = np.array([[float(r[f"out_chars:{m}"] or 0) / 4 for m in models] for r in kept])
    cost, unit, pnotes = _costs(models, in_tok, out_tok, prices)
    notes = [
        f"input tokens = {prefix_tokens:,} (assumed length of RouteLLM's 8-shot prefix: 8 GSM8K "
        "train problems with worked answers; --gsm8k-prefix-tokens) + len(prompt) / 4",
        "output tokens = out_chars:<model> / 4 per model and query",
        *pnotes, *_token_notes(models, in_tok, out_tok),
    ]
    return Dataset(
        "RouteLLM GSM8K", [r["prompt"] for r in kept], None, models,
        np.array([[_truth(r[f"correct:{m}"]) for m in models] for r in kept], dtype=bool),
        cost, in_tok, out_tok, unit, notes, len(rows), len(rows) - len(kept),
    )


TASK_COLUMNS = ("category", "task", "eval_name", "subject")


def load_csv(path: Path, models: list[str], prefix_tokens: int, output_tokens: int | None,
             prices: dict[str, tuple[float, float]], split_column: str = "split") -> Dataset:
    rows = _read_rows(path)
    if not rows:
        sys.exit(f"error: {path} has no rows")
    cols = rows[0].keys()
    text_col = "prompt" if "prompt" in cols else "question" if "question" in cols else None
    if text_col is None:
        sys.exit(f"error: {path} needs a 'prompt' or 'question' column")
    cat_col = next((c for c in TASK_COLUMNS if c in cols), None)
    given = [m for m in models if f"cost:{m}" in cols]  # per-query costs win over prices
    kept = [r for r in _keep_complete(rows, models) if all(r[f"cost:{m}"].strip() for m in given)]
    if len(kept) < 20:
        sys.exit(f"error: only {len(kept)} complete rows in {path}; need at least 20")
    texts = [r[text_col] + (f"\n{r['options']}" if r.get("options") else "") for r in kept]
    correct = np.array([[_truth(r[f"correct:{m}"]) for m in models] for r in kept], dtype=bool)
    cost = np.zeros((len(kept), len(models)))
    for m in given:
        cost[:, models.index(m)] = [float(r[f"cost:{m}"]) for r in kept]
    notes = [f"costs of {', '.join(given)}: the file's cost:<model> columns (USD per query, as "
             "given; a router expects each model's mean on the train split)"] if given else []
    priced = [m for m in models if m not in given]
    in_tok = out_tok = None
    unit: dict[str, tuple[float, float]] = {}
    if priced:
        in_tok = np.array([prefix_tokens + len(t) / 4 for t in texts])
        out_tok, onote = _csv_output_tokens(kept, models, priced, output_tokens)
        part, unit, pnotes = _costs(priced, in_tok, out_tok[:, [models.index(m) for m in priced]],
                                    prices)
        for k, m in enumerate(priced):
            cost[:, models.index(m)] = part[:, k]
        notes += [f"input tokens = {prefix_tokens} (--prefix-tokens) + len(text) / 4", onote,
                  *pnotes, *_token_notes(priced, in_tok, out_tok[:, [models.index(m)
                                                                     for m in priced]])]
    cats = [r[cat_col] or None for r in kept] if cat_col else None
    if cat_col:
        notes.append(f"task column: {cat_col!r} (stratifies the split; a router feature)")
    test_mask = None
    if split_column in cols:
        test_mask = np.array([r[split_column].strip().lower() == "test" for r in kept])
        if test_mask.all() or not test_mask.any():
            sys.exit(f"error: the {split_column!r} column needs both 'test' rows and others "
                     "(train); fix it or pass --split-column none")
    return Dataset(path.name, texts, cats, models, correct, cost, in_tok, out_tok, unit, notes,
                   len(rows), len(rows) - len(kept), test_mask)


def _csv_output_tokens(kept: list[dict[str, str]], models: list[str], priced: list[str],
                       output_tokens: int | None) -> tuple[np.ndarray, str]:
    if output_tokens is not None:
        return (np.full((len(kept), len(models)), float(output_tokens)),
                f"output tokens = {output_tokens} per query (--output-tokens)")
    absent = [m for m in priced if f"out_chars:{m}" not in kept[0]]
    if absent:
        sys.exit(f"error: no cost:{absent[0]} or out_chars:{absent[0]} column; add one "
                 "or pass --output-tokens N")
    out = np.array([[float(r.get(f"out_chars:{m}") or 0) / 4 for m in models] for r in kept])
    return out, "output tokens = out_chars:<model> / 4"


# -- split -----------------------------------------------------------------------------


def split(n: int, groups: Sequence[str | None] | None, frac: float, seed: int,
          among: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(first, second) index arrays: `frac` of each group (of `among`) in `second`."""
    idx = np.arange(n) if among is None else np.asarray(among)
    rng = np.random.default_rng(seed)
    keys = [groups[int(i)] if groups is not None else None for i in idx]
    first: list[int] = []
    second: list[int] = []
    for g in sorted(set(keys), key=lambda k: (k is None, str(k))):
        members = idx[[k == g for k in keys]]
        members = members[rng.permutation(len(members))]
        k = int(round(frac * len(members)))
        second += list(members[:k])
        first += list(members[k:])
    return np.sort(np.array(first, dtype=np.int64)), np.sort(np.array(second, dtype=np.int64))


# -- routers ---------------------------------------------------------------------------


def examples(ds: Dataset, rows: np.ndarray) -> list[Example]:
    cats = ds.categories
    return [
        Example(None, ds.texts[i], m, bool(ds.correct[i, j]), cats[int(i)] if cats else None)
        for i in rows for j, m in enumerate(ds.models)
    ]


@dataclass
class RouterKind:
    name: str
    make: Callable[[], LearnedRouter]
    rule: str  # "value": argmax p - lambda * cost; "target": cheapest with p >= t


UNCONVERGED: dict[str, int] = {}  # router kind -> fits stopped at --max-iter


def fit_predict(kind: RouterKind, ds: Dataset, train: np.ndarray,
                test: np.ndarray) -> np.ndarray:
    router = kind.make().fit(examples(ds, train), heads=ds.models)
    if router.n_iter >= router.max_iter:
        UNCONVERGED[kind.name] = UNCONVERGED.get(kind.name, 0) + 1
    cats = [ds.categories[i] for i in test] if ds.categories else None
    return router.predict_batch([ds.texts[i] for i in test], ds.models, cats)


def expected_costs(ds: Dataset, train: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """What a router knows before the call: this prompt's input tokens and the mean output
    for a model priced by tokens; the mean on train for a model whose costs are given."""
    out = np.repeat(ds.cost[train].mean(axis=0)[None, :], len(rows), axis=0)
    if ds.in_tokens is None or ds.out_tokens is None:
        return out
    for j, m in enumerate(ds.models):
        if m in ds.unit_prices:
            pin, pout = ds.unit_prices[m]
            out[:, j] = ds.in_tokens[rows] * pin + ds.out_tokens[train, j].mean() * pout
    return out


def _rule(rule: str) -> Rule:
    return Rule.PRICE_WEIGHT if rule == "value" else Rule.TARGET


def route(rule: str, P: np.ndarray, C: np.ndarray, param: float) -> np.ndarray:
    """The model each row goes to: the first model of `choose`'s order, vectorised
    (`frugalflow.learning.hull.route_batch`). "value": argmax of p - param * cost;
    "target": the cheapest model (by expected cost) with p >= param, else the most likely."""
    return route_batch(_rule(rule), P, C, param)


def params_for(rule: str, C: np.ndarray) -> np.ndarray:
    return default_params(_rule(rule), C)


@dataclass
class Point:
    param: float
    acc: float
    cost: float
    shares: np.ndarray


def sweep(rule: str, P: np.ndarray, C: np.ndarray, correct: np.ndarray,
          paid: np.ndarray) -> list[Point]:
    pts = []
    rows = np.arange(len(P))
    for p in params_for(rule, C):
        pick = route(rule, P, C, p)
        pts.append(Point(float(p), float(correct[rows, pick].mean()), float(paid[rows, pick].sum()),
                         np.bincount(pick, minlength=P.shape[1]) / len(P)))
    return pts


def cheapest_reaching(points: Sequence[Point], acc: float) -> Point | None:
    ok = [p for p in points if p.acc >= acc - 1e-12]
    return min(ok, key=lambda p: (p.cost, -p.acc)) if ok else None


# -- reporting -------------------------------------------------------------------------


def pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def curve_table(points: Sequence[Point], models: Sequence[str], best_cost: float,
                rule: str, k: int = 10) -> list[str]:
    """About k points spread over the cost range, each with its share of calls per model."""
    pts = sorted(points, key=lambda p: p.cost)
    lo, hi = pts[0].cost, pts[-1].cost
    chosen: list[Point] = []
    for c in np.linspace(lo, hi, k):
        p = min(pts, key=lambda q: abs(q.cost - c))
        if all(p is not q for q in chosen):
            chosen.append(p)
    label = "lambda/USD" if rule == "value" else "target p"
    widths = [max(7, len(m)) for m in models]
    head = f"    {label:>11s}  " + " ".join(f"{m:>{w}s}" for m, w in zip(models, widths, strict=True))
    head += "  accuracy    cost USD  % of best"
    lines = [head]
    for p in chosen:
        shares = " ".join(f"{100 * s:{w - 1}.1f}%" for s, w in zip(p.shares, widths, strict=True))
        lines.append(f"    {p.param:11.4g}  {shares}  {p.acc:8.4f}  {p.cost:10.4f}  "
                     f"{100 * p.cost / best_cost:8.1f}%")
    return lines


@dataclass
class _Split:
    """The test split's outcomes and costs, and the best single model (chosen on train)."""

    train: np.ndarray
    test: np.ndarray
    Y: np.ndarray
    paid: np.ndarray
    best: int
    best_cost: float
    target: float


def run_dataset(ds: Dataset, args: argparse.Namespace, kinds: list[RouterKind]) -> dict[str, float]:
    t0 = time.perf_counter()
    print("=" * 100)
    print(f"{ds.name}: {ds.n_read:,} rows read, {ds.dropped:,} dropped (a blank outcome for a "
          f"model of the ladder), {ds.n:,} used")
    if ds.test_mask is not None:
        train, test = np.flatnonzero(~ds.test_mask), np.flatnonzero(ds.test_mask)
        print(f"split: the file's {args.split_column!r} column, {len(train):,} train / "
              f"{len(test):,} test questions (rows marked 'test' are the test split)")
    else:
        train, test = split(ds.n, ds.categories, args.test_frac, args.seed)
        strat = "stratified by category" if ds.categories else "no category column: unstratified"
        print(f"split: seed {args.seed}, {len(train):,} train / {len(test):,} test questions "
              f"({100 * (1 - args.test_frac):.0f}/{100 * args.test_frac:.0f}, {strat})")
    for line in ds.notes:
        print(line)
    sp = _baselines(ds, train, test)
    out: dict[str, float] = {"best_acc": float(sp.Y.mean(axis=0)[sp.best])}

    C_test = expected_costs(ds, train, test)
    scores: dict[str, np.ndarray] = {}
    for kind in kinds:
        P = _router_on_test(ds, args, kind, sp, C_test, out)
        _operating_point(ds, args, kind, sp, P, C_test, out)
        if len(ds.models) == 2:
            scores[kind.name] = P[:, 1] - P[:, 0]  # turned to strong - weak below
    if len(ds.models) == 2:
        weak, strong = weak_strong(ds, sp.train, args.strong)
        if (weak, strong) == (1, 0):
            scores = {name: -sc for name, sc in scores.items()}
        _pgr_report(ds, sp.Y, scores, args.seed, weak, strong)
    print(f"[{ds.name}: {time.perf_counter() - t0:.1f} s]")
    return out


def _baselines(ds: Dataset, train: np.ndarray, test: np.ndarray) -> _Split:
    """Print the single models, the oracle and random routing on the test split."""
    Y, paid = ds.correct[test], ds.cost[test]
    acc = Y.mean(axis=0)
    total = paid.sum(axis=0)
    best = int(np.argmax(ds.correct[train].mean(axis=0)))  # chosen on train
    best_cost, best_acc = float(total[best]), float(acc[best])
    target = TARGET_SHARE * best_acc
    print()
    print(f"single models on the test split ({len(test):,} questions):")
    print(f"    {'model':30s} {'accuracy':>8s}  {'total USD':>10s}  {'mean USD':>10s}  % of best")
    for j, m in enumerate(ds.models):
        mark = "  <- best (on train)" if j == best else ""
        print(f"    {m:30s} {acc[j]:8.4f}  {total[j]:10.4f}  {total[j] / len(test):10.6f}  "
              f"{100 * total[j] / best_cost:8.1f}%{mark}")
    rows = np.arange(len(test))
    cheapest = np.argsort(paid, axis=1, kind="stable")
    ok_sorted = np.take_along_axis(Y, cheapest, axis=1)
    first_ok = np.where(ok_sorted.any(axis=1), ok_sorted.argmax(axis=1), 0)
    oracle = cheapest[rows, first_ok]
    o_acc, o_cost = Y[rows, oracle].mean(), paid[rows, oracle].sum()
    print(f"    {'oracle (cheapest correct model)':30s} {o_acc:8.4f}  {o_cost:10.4f}  "
          f"{o_cost / len(test):10.6f}  {100 * o_cost / best_cost:8.1f}%")
    if len(ds.models) > 2:
        r_acc, r_cost = acc.mean(), total.mean()
        print(f"    {'random (uniform over ladder)':30s} {r_acc:8.4f}  {r_cost:10.4f}  "
              f"{r_cost / len(test):10.6f}  {100 * r_cost / best_cost:8.1f}%")
    cheap = int(np.argmin(total))
    if acc[best] > acc[cheap]:
        s = max(0.0, (target - acc[cheap]) / (acc[best] - acc[cheap]))
        mix = (1 - s) * total[cheap] + s * total[best]
        print(f"    random {ds.models[cheap]}/{ds.models[best]} mix reaching the "
              f"target sends {pct(s)} to {ds.models[best]}: {100 * mix / best_cost:.1f}% "
              "of the best model's cost (expected value)")
    print(f"target: {TARGET_SHARE:.0%} of {ds.models[best]}'s accuracy = {target:.4f}")
    return _Split(train, test, Y, paid, best, best_cost, target)


def _router_on_test(ds: Dataset, args: argparse.Namespace, kind: RouterKind, sp: _Split,
                    C_test: np.ndarray, out: dict[str, float]) -> np.ndarray:
    """Fit `kind` on train, print its test curve; its test predictions."""
    t1 = time.perf_counter()
    P = fit_predict(kind, ds, sp.train, sp.test)
    fit_s = time.perf_counter() - t1
    pts = sweep(kind.rule, P, C_test, sp.Y, sp.paid)
    print()
    rule = ("max p - lambda * expected cost (choose(price_weight=lambda))"
            if kind.rule == "value" else "cheapest with p >= t (choose(target=t))")
    print(f"{kind.name}: rule {rule}; fit + predict {fit_s:.1f} s")
    _check_choose(kind.rule, P, C_test, ds.models)
    aucs = "  ".join(f"{m} {auc(P[:, j], sp.Y[:, j]):.3f}"
                     for j, m in enumerate(ds.models))
    print(f"  ROC AUC of predicted success on test (0.5 = blind): {aucs}")
    print("  cost-quality curve on test (shares of calls per model):")
    for line in curve_table(pts, ds.models, sp.best_cost, kind.rule, args.points):
        print(line)
    hit = cheapest_reaching(pts, sp.target)
    if hit is None:
        print(f"  cost to reach {sp.target:.4f}: not reached on the curve")
    else:
        print(f"  cost to reach {sp.target:.4f} (read off the test curve): "
              f"{100 * hit.cost / sp.best_cost:.1f}% of {ds.models[sp.best]}'s cost "
              f"(accuracy {hit.acc:.4f}, param {hit.param:.4g})")
        out[f"{kind.name}:curve_pct"] = 100 * hit.cost / sp.best_cost
    for share in COST_SHARES:
        got = accuracy_at_cost(np.array([p.cost for p in pts]), np.array([p.acc for p in pts]),
                               share * sp.best_cost)
        if got is None:
            print(f"  accuracy at {share:.0%} of the best model's cost: no point that cheap")
            continue
        print(f"  accuracy at {share:.0%} of the best model's cost (test curve): {got[0]:.4f}; "
              f"mixing two points: {got[1]:.4f}")
        out[f"{kind.name}:acc@{share:.0%}"] = got[1]
    return P


def _operating_point(ds: Dataset, args: argparse.Namespace, kind: RouterKind, sp: _Split,
                     P: np.ndarray, C_test: np.ndarray, out: dict[str, float]) -> None:
    """The operating point chosen without test labels: out-of-fold predictions on the train
    split (k folds, each predicted by a router fitted on the other folds)."""
    train, M = sp.train, len(ds.models)
    t2 = time.perf_counter()
    P_oof = np.zeros((len(train), M))
    fold = np.zeros(len(train), dtype=np.int64)
    rest = np.arange(len(train))
    for f in range(args.val_folds - 1):
        keep, held = split(len(train), [ds.categories[i] for i in train] if ds.categories
                           else None, 1.0 / (args.val_folds - f), args.seed + 1 + f,
                           among=rest)
        fold[held] = f
        rest = keep
    fold[rest] = args.val_folds - 1
    for f in range(args.val_folds):
        P_oof[fold == f] = fit_predict(kind, ds, train[fold != f], train[fold == f])
    C_oof = expected_costs(ds, train, train)
    oof_pts = sweep(kind.rule, P_oof, C_oof, ds.correct[train], ds.cost[train])
    train_target = TARGET_SHARE * ds.correct[train, sp.best].mean()
    chosen = cheapest_reaching(oof_pts, train_target)
    if chosen is None:
        print("  validation: no operating point reaches the target out of fold")
        return
    rows = np.arange(len(sp.test))
    pick = route(kind.rule, P, C_test, chosen.param)
    v_acc, v_cost = sp.Y[rows, pick].mean(), sp.paid[rows, pick].sum()
    counts = np.bincount(pick, minlength=M) / len(pick)
    shares = " ".join(f"{m} {100 * s:.1f}%"
                      for m, s in zip(ds.models, counts, strict=True))
    verdict = "reaches" if v_acc >= sp.target else "misses"
    print(f"  operating point chosen without test labels (param {chosen.param:.4g}: the "
          f"cheapest reaching {train_target:.4f} on {args.val_folds}-fold out-of-fold "
          f"predictions of the train split; {time.perf_counter() - t2:.1f} s):")
    print(f"    test accuracy {v_acc:.4f} ({verdict} {sp.target:.4f}), cost "
          f"{100 * v_cost / sp.best_cost:.1f}% of {ds.models[sp.best]}'s; calls: {shares}")
    out[f"{kind.name}:val_pct"] = 100 * v_cost / sp.best_cost
    out[f"{kind.name}:val_acc"] = float(v_acc)
    _hull_point(ds, kind, sp, P, C_test, oof_pts, train_target, out)


def _hull_point(ds: Dataset, kind: RouterKind, sp: _Split, P: np.ndarray, C_test: np.ndarray,
                oof_pts: Sequence[Point], train_target: float, out: dict[str, float]) -> None:
    """The same target met by a random mix of two adjacent points of the out-of-fold curve's
    lower convex hull (`frugalflow.learning.hull_mix`, on observed rates), run on test."""
    k = len(sp.train)
    curve = [OperatingPoint(p.param, k, int(round(p.acc * k)), p.cost / k) for p in oof_pts]
    mix = hull_mix(curve, _rule(kind.rule), quality=train_target, confidence=None)
    if mix is None:
        return
    rows = np.arange(len(sp.test))
    acc = cost = 0.0
    for param, share in mix.shares:
        pick = route(kind.rule, P, C_test, param)
        acc += share * float(sp.Y[rows, pick].mean())
        cost += share * float(sp.paid[rows, pick].sum())
    print(f"    on the hull instead: {mix.describe()}: test accuracy {acc:.4f} (expected), cost "
          f"{100 * cost / sp.best_cost:.1f}% of {ds.models[sp.best]}'s")
    out[f"{kind.name}:hull_pct"] = 100 * cost / sp.best_cost
    out[f"{kind.name}:hull_acc"] = acc


def _check_choose(rule: str, P: np.ndarray, C: np.ndarray, models: Sequence[str]) -> None:
    """The vectorised rule agrees with frugalflow.learning.choose on sample queries."""
    params = params_for(rule, C)
    for i in range(0, len(P), max(1, len(P) // 25)):
        for p in params[:: max(1, len(params) // 8)]:
            probs = dict(zip(models, P[i], strict=True))
            costs = dict(zip(models, C[i], strict=True))
            kw = {"price_weight": p} if rule == "value" else {"target": p}
            first = choose(probs, costs, **kw)[0][0]
            mine = models[int(route(rule, P[i: i + 1], C[i: i + 1], p)[0])]
            if first != mine and not math.isclose(
                probs[first] - (p * costs[first] if rule == "value" else 0),
                probs[mine] - (p * costs[mine] if rule == "value" else 0),
            ):
                raise AssertionError(f"route() and choose() disagree: {mine} vs {first}")


def weak_strong(ds: Dataset, train: np.ndarray, stated: str | None) -> tuple[int, int]:
    """(weak, strong) for PGR: as stated by --strong, else the dearer model (mean cost per
    query on train) is the strong one. Printed either way; a surprising order is flagged,
    never swapped silently."""
    mean_cost = ds.cost[train].mean(axis=0)
    acc = ds.correct[train].mean(axis=0)
    if stated is not None:
        if stated not in ds.models:
            sys.exit(f"error: --strong {stated!r} is not one of the models: "
                     f"{', '.join(ds.models)}")
        strong = ds.models.index(stated)
        how = "as stated by --strong"
    else:
        strong = int(np.argmax(mean_cost))
        how = "by mean cost per query on train (--strong to state it)"
    weak = 1 - strong
    print(f"weak/strong {how}: weak {ds.models[weak]} (${mean_cost[weak]:.6f}/query, train "
          f"accuracy {acc[weak]:.4f}), strong {ds.models[strong]} (${mean_cost[strong]:.6f}, "
          f"{acc[strong]:.4f})")
    if mean_cost[strong] < mean_cost[weak]:
        print("warning: the strong model is the cheaper one: PGR's 'share of strong calls' is "
              "then not a cost")
    if acc[strong] <= acc[weak]:
        print("warning: the strong model is not more accurate on train: PGR's gap is <= 0 "
              "and its figures mean little")
    return weak, strong


def _pgr_report(ds: Dataset, Y: np.ndarray, scores: dict[str, np.ndarray], seed: int,
                weak: int = 0, strong: int = 1) -> None:
    wa, sa = Y[:, weak].mean(), Y[:, strong].mean()
    grid = np.linspace(0, 1, 101)
    print()
    print(f"PGR vs share of calls to {ds.models[strong]} (PGR = (acc - weak) / (strong - weak); "
          f"weak {wa:.4f}, strong {sa:.4f}):")
    curves = {name: pgr_curve(s, Y, weak, strong, grid) for name, s in scores.items()}
    rng = np.random.default_rng(seed + 7)
    randoms = [pgr_curve(rng.random(len(Y)), Y, weak, strong, grid) for _ in range(20)]
    curves["random (mean of 20)"] = np.mean(randoms, axis=0)
    shown = list(range(0, 101, 10))
    print(f"    {'router':24s} " + " ".join(f"{s:>5d}%" for s in shown))
    for name, accs in curves.items():
        pgr = (accs - wa) / (sa - wa)
        print(f"    {name:24s} " + " ".join(f"{pgr[s]:6.3f}" for s in shown))
    print(f"    {'router':24s} {'APGR':>6s} {'CPT(50%)':>9s} {'CPT(80%)':>9s}   (APGR: trapezoid "
          "over 0..100% strong calls in 1% steps)")
    for name, accs in curves.items():
        c50, c80 = cpt(accs, grid, wa, sa, 0.5), cpt(accs, grid, wa, sa, 0.8)
        fmt = lambda v: f"{100 * v:8.1f}%" if v is not None else "     n/a"  # noqa: E731
        print(f"    {name:24s} {apgr(accs, grid, wa, sa):6.3f} {fmt(c50)} {fmt(c80)}")


def _arguments() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help=f"folder with mmlu-pro/ and routellm/ (default {DEFAULT_DATA})")
    ap.add_argument("--datasets", default="mmlu-pro,routellm-mmlu,routellm-gsm8k")
    ap.add_argument("--csv", type=Path, help="a CSV of the same shape instead of --datasets")
    ap.add_argument("--models", help="with --csv: the models (cheap to expensive is not needed)")
    ap.add_argument("--price", action="append", default=[], metavar="MODEL=IN,OUT",
                    help="USD per million input, output tokens (overrides genai-prices)")
    ap.add_argument("--prefix-tokens", type=int, default=None,
                    help=f"prompt tokens before the question (MMLU-Pro default "
                         f"{MMLU_PRO_PREFIX_TOKENS}; --csv default 0)")
    ap.add_argument("--gsm8k-prefix-tokens", type=int, default=GSM8K_PREFIX_TOKENS)
    ap.add_argument("--output-tokens", type=int, default=None,
                    help="with --csv and no out_chars columns: output tokens per query")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--test-frac", type=float, default=0.3)
    ap.add_argument("--points", type=int, default=10, help="curve points printed")
    ap.add_argument("--embeddings", action="store_true",
                    help="frugalflow router on MiniLM embeddings (frugalflow[embeddings])")
    ap.add_argument("--embeddings-cache", type=Path, default=None,
                    help="folder to keep computed embeddings in between runs")
    ap.add_argument("--max-iter", type=int, default=1000,
                    help="gradient steps per fit (a fit stopped here before converging is "
                         "reported)")
    ap.add_argument("--split-column", default="split",
                    help="with --csv: rows whose value here is 'test' are the test split "
                         "(default: split; 'none' to ignore it)")
    ap.add_argument("--strong", default=None,
                    help="two-model sets: the strong model for PGR (default: the dearer one)")
    ap.add_argument("--val-folds", type=int, default=3,
                    help="folds of the train split for choosing the operating point")
    return ap


def _router_kinds(ap: argparse.ArgumentParser, args: argparse.Namespace) -> list[RouterKind]:
    if args.embeddings and not embeddings_available():
        ap.error("--embeddings needs the extra: pip install 'frugalflow[embeddings]'")
    shared_emb = (EmbeddingFeaturizer(cache_dir=args.embeddings_cache)
                  if args.embeddings else None)

    def ours() -> LearnedRouter:
        feat = shared_emb if shared_emb is not None else LexicalFeaturizer()
        return LearnedRouter(feat, max_iter=args.max_iter)

    def baseline() -> LearnedRouter:
        return LearnedRouter(LexicalFeaturizer(length_tags=False), shared=False,
                             max_iter=args.max_iter)

    ours_name = "frugalflow (MiniLM)" if args.embeddings else "frugalflow"
    return [RouterKind(ours_name, ours, "value"),
            RouterKind("baseline TF-IDF+LR", baseline, "target")]


def _datasets(ap: argparse.ArgumentParser,
              args: argparse.Namespace) -> list[Callable[[], Dataset]]:
    prices: dict[str, tuple[float, float]] = {}
    for item in args.price:
        try:
            name, _, pair = item.partition("=")
            pin, pout = (float(x) for x in pair.split(","))
        except ValueError:
            ap.error(f"--price {item!r}: use MODEL=IN,OUT (USD per million tokens)")
        prices[name] = (pin, pout)
    datasets: list[Callable[[], Dataset]] = []
    if args.csv is not None:
        if not args.models:
            ap.error("--csv needs --models a,b,...")
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        if len(models) < 2:
            ap.error("--models needs at least two models")
        prefix = args.prefix_tokens if args.prefix_tokens is not None else 0
        datasets.append(lambda: load_csv(args.csv, models, prefix, args.output_tokens, prices,
                                         args.split_column))
        return datasets
    known = {
        "mmlu-pro": lambda: load_mmlu_pro(
            args.data, MMLU_PRO_PREFIX_TOKENS if args.prefix_tokens is None else args.prefix_tokens, prices),
        "routellm-mmlu": lambda: load_routellm_mmlu(args.data, prices),
        "routellm-gsm8k": lambda: load_routellm_gsm8k(
            args.data, args.gsm8k_prefix_tokens, prices),
    }
    for name in (n.strip() for n in args.datasets.split(",") if n.strip()):
        if name not in known:
            ap.error(f"unknown data set {name!r}; known: {', '.join(known)}")
        datasets.append(known[name])
    return datasets


def _summary(summary: list[tuple[str, dict[str, float]]], kinds: list[RouterKind]) -> None:
    print("=" * 100)
    print(f"summary: cost to reach {TARGET_SHARE:.0%} of the best single model's accuracy, "
          "% of that model's cost (test split)")
    print(f"    {'data set':16s} {'router':22s} {'curve read-off':>15s} {'validation-chosen':>18s} "
          f"{'(its accuracy)':>15s} {'on the hull':>12s} {'(accuracy)':>11s}   accuracy at "
          + ", ".join(f"{s:.0%}" for s in COST_SHARES) + " of its cost")
    for name, res in summary:
        for kind in kinds:
            c = res.get(f"{kind.name}:curve_pct")
            v = res.get(f"{kind.name}:val_pct")
            a = res.get(f"{kind.name}:val_acc")
            h, ha = res.get(f"{kind.name}:hull_pct"), res.get(f"{kind.name}:hull_acc")
            shares = [res.get(f"{kind.name}:acc@{s:.0%}") for s in COST_SHARES]
            print(f"    {name:16s} {kind.name:22s} "
                  f"{(f'{c:.1f}%' if c is not None else 'not reached'):>15s} "
                  f"{(f'{v:.1f}%' if v is not None else 'n/a'):>18s} "
                  f"{(f'{a:.4f}' if a is not None else ''):>15s} "
                  f"{(f'{h:.1f}%' if h is not None else 'n/a'):>12s} "
                  f"{(f'{ha:.4f}' if ha is not None else ''):>11s}   "
                  + ", ".join(f"{x:.4f}" if x is not None else "n/a" for x in shares))
    for name, n in UNCONVERGED.items():
        print(f"warning: {n} fit(s) of {name} stopped at --max-iter before converging; "
              "raise --max-iter")
    for name, res in summary:
        c = res.get(f"{kinds[0].name}:curve_pct")
        if name == "MMLU-Pro" and c is not None:
            met = "MET" if c <= ISSUE_TARGET_PCT else "NOT MET"
            print(f"issue target on MMLU-Pro (router <= {ISSUE_TARGET_PCT:.0f}%): {met} "
                  f"({c:.1f}% read off the curve)")


def main(argv: Sequence[str] | None = None) -> int:
    ap = _arguments()
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    kinds = _router_kinds(ap, args)
    datasets = _datasets(ap, args)
    summary: list[tuple[str, dict[str, float]]] = []
    for load in datasets:
        ds = load()
        summary.append((ds.name, run_dataset(ds, args, kinds)))
    _summary(summary, kinds)
    print(f"total time {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
