"""Metrics of bench/routing.py: ROC AUC, and RouteLLM's PGR, APGR and CPT (arXiv 2406.18665)."""

from __future__ import annotations

import numpy as np


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve: P(a random success scores above a random failure)."""
    label = np.asarray(label, dtype=bool)
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="stable")
    ranks = np.empty(len(score))
    ranks[order] = np.arange(1, len(score) + 1)
    # Ties share their mean rank.
    s_sorted = score[order]
    start = 0
    for i in range(1, len(score) + 1):
        if i == len(score) or s_sorted[i] != s_sorted[start]:
            if i - start > 1:
                ranks[order[start:i]] = (start + 1 + i) / 2
            start = i
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def pgr_curve(score: np.ndarray, correct: np.ndarray, weak: int, strong: int,
              grid: np.ndarray) -> np.ndarray:
    """Accuracy when the top share (by score) of queries goes to the strong model."""
    order = np.argsort(-score, kind="stable")
    accs = []
    n = len(score)
    for s in grid:
        k = int(round(s * n))
        use_strong = np.zeros(n, dtype=bool)
        use_strong[order[:k]] = True
        accs.append(np.where(use_strong, correct[:, strong], correct[:, weak]).mean())
    return np.array(accs)


def apgr(acc: np.ndarray, grid: np.ndarray, weak_acc: float, strong_acc: float) -> float:
    pgr = (acc - weak_acc) / (strong_acc - weak_acc)
    return float(np.sum((pgr[1:] + pgr[:-1]) / 2 * np.diff(grid)))


def cpt(acc: np.ndarray, grid: np.ndarray, weak_acc: float, strong_acc: float,
        x: float) -> float | None:
    """Smallest strong-call share whose PGR reaches x (linear between grid points)."""
    pgr = (acc - weak_acc) / (strong_acc - weak_acc)
    for i in range(len(grid)):
        if pgr[i] >= x:
            if i == 0:
                return float(grid[0])
            a, b = pgr[i - 1], pgr[i]
            return float(grid[i - 1] + (x - a) / (b - a) * (grid[i] - grid[i - 1]))
    return None


def accuracy_at_cost(cost: np.ndarray, acc: np.ndarray,
                     budget: float) -> tuple[float, float] | None:
    """The best accuracy within `budget` on a curve of (cost, accuracy) points: (one point,
    a random mix of two points spending the budget); None when every point costs more."""
    ok = cost <= budget
    if not ok.any():
        return None
    single = float(acc[ok].max())
    lo, hi = np.flatnonzero(ok), np.flatnonzero(~ok)
    mixed = single
    if len(hi):
        s = (budget - cost[lo][:, None]) / (cost[hi][None, :] - cost[lo][:, None])
        mixed = max(single, float(((1 - s) * acc[lo][:, None] + s * acc[hi][None, :]).max()))
    return single, mixed
