"""Learned routing: per input, the probability that each candidate model succeeds.

A *router* maps an input (its text, the node it comes from, an optional category) to
P(success) for each candidate model; `choose` turns those probabilities and the candidates'
expected costs into the order in which to try them.

- `PriorRouter`: one probability per model, from a dict or from the catalog's quality scores.
- `LearnedRouter`: logistic regression on a featurizer's output, fitted on logged outcomes
  (`Example`). It is multi-task: a *shared* weight vector (how hard the input is, learned from
  every model's outcomes) plus a per-model correction and intercept, so a model with little
  data still profits from the others' outcomes. Models with few examples are blended with the
  prior: ``p = (n * p_learned + k * p_prior) / (n + k)``.

Features come from a `Featurizer`: `LexicalFeaturizer` (hashed word uni- and bigram TF-IDF,
no downloads) or `EmbeddingFeaturizer` (all-MiniLM-L6-v2 sentence embeddings, the
`frugalflow[embeddings]` extra). Training is full-batch accelerated gradient descent from
zeros: deterministic, pure numpy, no network. Routers serialise to versioned JSON with
base64-encoded arrays (no pickle).

Modules: `examples` (what a router learns from, and which logged calls count as a
success), `features` (featurizers), `routers` (`PriorRouter`, `LearnedRouter`,
`train_router`), `choose` (the order to try models in), `hull` (a router's operating
points, their lower convex hull and the random mix of two adjacent points that reaches a
target quality or cost: `LearnedRouter.calibrate` keeps one per node, `choose` draws from it).
"""

from __future__ import annotations

from .choose import choose
from .examples import Example, LoggedCall, examples_from, success_of, tags_for
from .features import (
    EmbeddingFeaturizer,
    Featurizer,
    LexicalFeaturizer,
    SparseRows,
    default_featurizer,
    embeddings_available,
)
from .hull import HullMix, OperatingPoint, Rule, hull_mix, operating_curve
from .routers import LearnedRouter, PriorRouter, Router, train_router

__all__ = [
    "EmbeddingFeaturizer",
    "Example",
    "Featurizer",
    "HullMix",
    "LearnedRouter",
    "LexicalFeaturizer",
    "LoggedCall",
    "OperatingPoint",
    "PriorRouter",
    "Router",
    "Rule",
    "SparseRows",
    "choose",
    "default_featurizer",
    "embeddings_available",
    "examples_from",
    "hull_mix",
    "operating_curve",
    "success_of",
    "tags_for",
    "train_router",
]
