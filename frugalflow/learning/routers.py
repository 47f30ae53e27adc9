"""Routers: per input, the probability that each candidate model succeeds.

`PriorRouter` gives one probability per model; `LearnedRouter` fits a multi-task logistic
regression on logged outcomes; `train_router` builds one from the ledger's examples.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, TypedDict, runtime_checkable

import numpy as np

from ..exceptions import UserError
from ._solver import Design, Objective, design, minimise, sigmoid, step_size
from .examples import Example, tags_for
from .hull import HullMix, Rule, hull_mix, operating_curve
from .features import (
    ArrayDoc,
    Featurizer,
    FloatArray,
    Floats,
    Floats32,
    LexicalFeaturizer,
    decode_array,
    default_featurizer,
    encode_array,
    featurize,
    featurizer_from_dict,
    featurizer_to_dict,
)

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..catalog import Catalog

__all__ = ["LearnedRouter", "PriorDoc", "PriorRouter", "Router", "RouterOptions", "train_router"]

_FORMAT = "frugalflow.router"
_VERSION = 1


class PriorDoc(TypedDict, total=False):
    """A saved `PriorRouter`."""

    prior: dict[str, float]
    default: float


class RouterOptions(TypedDict, total=False):
    """`LearnedRouter`'s settings, as `train_router` passes them on."""

    prior_strength: float
    l2: float | None
    head_l2: float | None
    shared: bool
    min_head_examples: int
    max_iter: int
    tol: float


@runtime_checkable
class Router(Protocol):
    """Predicts, for an input, the probability that each candidate model succeeds."""

    name: str

    def predict(
        self,
        text: str,
        candidates: Sequence[str],
        *,
        node: str | None = None,
        category: str | None = None,
    ) -> dict[str, float]: ...


class PriorRouter:
    """The same probability for every input: `prior[model]`, else `default`."""

    name = "prior"

    def __init__(self, prior: Mapping[str, float] | None = None, *, default: float = 0.5) -> None:
        self.prior = {str(k): _check_p(v, k) for k, v in (prior or {}).items()}
        self.default = _check_p(default, "default")

    @classmethod
    def from_catalog(
        cls, catalog: Catalog, skills: Iterable[str] | None = None, *, default: float = 0.5
    ) -> PriorRouter:
        """P(success) = a model's mean quality score over `skills` (all its skills if None).

        Models without a score for any of those skills get `default`.
        """
        names = list(skills) if skills is not None else None
        prior: dict[str, float] = {}
        for spec in catalog:
            known = [s for s in (names if names is not None else spec.quality) if s in spec.quality]
            if known:
                prior[spec.key] = spec.mean_quality(known)
        return cls(prior, default=default)

    def p(self, model: str) -> float:
        return self.prior.get(model, self.default)

    def predict(
        self,
        text: str,
        candidates: Sequence[str],
        *,
        node: str | None = None,
        category: str | None = None,
    ) -> dict[str, float]:
        return {m: self.p(m) for m in candidates}

    def to_dict(self) -> PriorDoc:
        return {"prior": dict(self.prior), "default": self.default}

    @classmethod
    def from_dict(cls, d: PriorDoc) -> PriorRouter:
        return cls(d.get("prior") or {}, default=d.get("default", 0.5))

    def __repr__(self) -> str:
        return f"PriorRouter({len(self.prior)} models, default={self.default})"


def _check_p(value: float, what: str) -> float:
    p = float(value)
    if not 0.0 <= p <= 1.0:
        raise UserError(f"prior probability for {what!r} must be in 0..1, got {value!r}")
    return p


class LearnedRouter(Router):
    """Multi-task logistic regression: P(model succeeds | features of the input).

    For model m with its own head: ``logit = x . (w_shared + w_m) + b_m``; a model with
    fewer than `min_head_examples` examples has no head (``x . w_shared + b_m``); a model
    never seen gets the prior. Every prediction is blended with the prior,
    ``p = (n * p_learned + k * p_prior) / (n + k)`` with n the model's (weighted) example
    count and k = `prior_strength`. `shared=False` fits independent per-model regressions.

    L2 penalties `l2` (shared weights; default max(1e-4, 1/N) for N weighted examples) and
    `head_l2` (per-model weights; default 2 * l2) on the weighted mean log-loss. Fitting is
    full-batch accelerated gradient descent (FISTA with adaptive restart) from zeros, so a
    fit is deterministic.
    """

    name = "learned"

    def __init__(
        self,
        featurizer: Featurizer | None = None,
        *,
        prior: PriorRouter | Mapping[str, float] | None = None,
        prior_strength: float = 20.0,
        l2: float | None = None,
        head_l2: float | None = None,
        shared: bool = True,
        min_head_examples: int = 30,
        max_iter: int = 300,
        tol: float = 1e-7,
    ) -> None:
        self.featurizer: Featurizer = featurizer if featurizer is not None else default_featurizer()
        if prior is None or isinstance(prior, PriorRouter):
            self._prior_given = prior
        else:
            self._prior_given = PriorRouter(prior)
        self.prior_strength = float(prior_strength)
        self.l2 = l2
        self.head_l2 = head_l2
        self.shared = shared
        self.min_head_examples = int(min_head_examples)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        # fitted state
        self.models: list[str] = []
        self.heads: list[str] = []
        self.counts: dict[str, float] = {}
        self.base_rate = 0.5
        # float32 once fitted; float64 while a fit runs
        self.w_shared: FloatArray | None = None
        self.W: FloatArray | None = None
        self.b: FloatArray | None = None
        self.n_iter = 0
        self.l2_used: float | None = None
        self.mixes: dict[str, HullMix] = {}
        """Calibrated operating points per node ("*": any node), see `calibrate`."""

    def __repr__(self) -> str:
        state = f"{len(self.models)} models, {len(self.heads)} heads" if self.fitted else "unfitted"
        return f"LearnedRouter({self.featurizer!r}, {state})"

    @property
    def fitted(self) -> bool:
        return self.b is not None

    @property
    def prior(self) -> PriorRouter:
        """The prior blended into predictions (the global success rate when none was given)."""
        return self._prior_given or PriorRouter(default=self.base_rate)

    # -- fitting ---------------------------------------------------------------------

    def fit(
        self, examples: Iterable[Example], *, heads: Iterable[str] | None = None
    ) -> LearnedRouter:
        """Fit from scratch (the featurizer's idf too, when it has `fit`).

        `heads`: the models that get their own weights (default: every model with at least
        `min_head_examples` examples). The outcomes of the others still train the shared
        weights, e.g. the logged outcomes of models you no longer route to.
        """
        data = _collect(examples)
        if not data.models:
            raise UserError("LearnedRouter.fit needs at least one example")
        fit_features: Callable[[Sequence[str]], object] | None = getattr(
            self.featurizer, "fit", None)
        if fit_features is not None:
            fit_features(data.texts)
        self.models = list(data.models)
        counts = data.weights.sum(axis=0)
        self.counts = {m: float(c) for m, c in zip(self.models, counts, strict=True)}
        total = float(data.weights.sum())
        self.base_rate = float((data.labels * data.weights).sum() / total) if total else 0.5
        if heads is not None:
            wanted = set(heads)
            self.heads = [m for m in self.models if m in wanted]
        else:
            self.heads = [m for m, c in zip(self.models, counts, strict=True)
                          if c >= self.min_head_examples]
        if not self.shared and len(self.heads) < len(self.models):
            # without a shared part a model needs its own weights
            self.heads = list(self.models)
        d = self.featurizer.dim
        self.w_shared = np.zeros(d)
        self.W = np.zeros((len(self.heads), d))
        rate = np.clip(
            (data.labels * data.weights).sum(0) / np.maximum(counts, 1e-12), 1e-3, 1 - 1e-3
        )
        self.b = np.log(rate / (1 - rate))
        X = featurize(self.featurizer, data.texts, data.tags)
        self._optimise(design(X), data.labels, data.weights, self.max_iter, anchored=False)
        return self

    refit = fit

    def partial_fit(self, examples: Iterable[Example], *, max_iter: int = 50) -> LearnedRouter:
        """Update a fitted router with new outcomes (warm-started; the idf stays as fitted).

        Runs `max_iter` passes over the new examples only, starting from the current
        weights and penalising the distance to them. Only the weights of the models in
        `examples` move (their own weights and intercepts); the shared weights and the other
        models' change only with `fit`, so call `fit` on all outcomes now and then. Models
        not seen before get an intercept (and a head once they have enough examples).
        """
        if not self.fitted:
            return self.fit(examples)
        data = _collect(examples)
        if not data.models:
            return self
        assert self.W is not None and self.b is not None
        new = [m for m in data.models if m not in self.models]
        for m in new:
            self.models.append(m)
            self.counts[m] = 0.0
            rate = float(np.clip(self.base_rate, 1e-3, 1 - 1e-3))
            self.b = np.append(self.b, math.log(rate / (1 - rate)))
        for m, c in zip(data.models, data.weights.sum(axis=0), strict=True):
            self.counts[m] += float(c)
        grow = [m for m in self.models if m not in self.heads
                and self.counts[m] >= self.min_head_examples]
        if grow:
            self.heads += grow
            self.W = np.vstack([self.W, np.zeros((len(grow), self.W.shape[1]))])
        # align the new data's columns with the router's model order
        cols = [self.models.index(m) for m in data.models]
        labels = np.zeros((len(data.texts), len(self.models)))
        weights = np.zeros_like(labels)
        labels[:, cols] = data.labels
        weights[:, cols] = data.weights
        X = featurize(self.featurizer, data.texts, data.tags)
        self._optimise(design(X), labels, weights, max_iter, anchored=True,
                       only=set(data.models))
        return self

    def _optimise(
        self, X: Design, Y: Floats, Wt: Floats, max_iter: int, *, anchored: bool,
        only: set[str] | None = None,
    ) -> None:
        """Minimise the penalised log-loss from the current weights.

        `anchored`: penalise the distance to the current weights (an update that keeps
        what the last fit learned) instead of their size, with the last fit's penalty.
        `only`: train just these models' own weights and intercepts; the shared weights
        and the other models' stay as they are.
        """
        assert self.w_shared is not None and self.W is not None and self.b is not None
        total = float(Wt.sum())
        if total <= 0:
            return
        f = self._objective(X, Y, Wt / total, total, anchored=anchored)
        trainable = self._trainable(X.d, only)
        d = X.d
        # The start as stored: float32 weights make the first step's logits float32.
        x0: FloatArray = np.concatenate(
            [self.w_shared if self.shared else np.zeros(d), self.W.ravel(), self.b])
        x, self.n_iter = minimise(f, x0, trainable, step_size(f, trainable),
                                  max_iter=max_iter, tol=self.tol)
        w0, W, b = f.unpack(x)
        # Stored and used as float32, so a saved router predicts exactly the same.
        self.w_shared = (w0 if self.shared else np.zeros(d)).astype(np.float32)
        self.W = W.astype(np.float32)
        self.b = b.astype(np.float32)

    def _objective(
        self, X: Design, Y: Floats, Wn: Floats, total: float, *, anchored: bool
    ) -> Objective:
        """The loss to minimise: the models' heads, and penalties from `l2`/`head_l2`."""
        assert self.w_shared is not None and self.W is not None
        # Default penalty: 1/N on the mean loss (scikit-learn's C=1), at least 1e-4.
        if anchored and self.l2_used is not None:
            l2 = self.l2_used
        else:
            l2 = self.l2 if self.l2 is not None else max(1e-4, 1.0 / total)
            self.l2_used = l2
        hl2 = self.head_l2 if self.head_l2 is not None else 2.0 * l2
        d, H = X.d, len(self.heads)
        # centre of the penalty: zero, or the current weights for an anchored update
        c0 = self.w_shared.astype(np.float64) if anchored and self.shared else np.zeros(d)
        cW = self.W.astype(np.float64) if anchored else np.zeros((H, d))
        return Objective(
            X, Y, Wn,
            head_col=np.array([self.heads.index(m) if m in self.heads else -1
                               for m in self.models]),
            head_models=np.array([self.models.index(h) for h in self.heads], dtype=np.int64),
            use_shared=self.shared, l2=l2, hl2=hl2, c0=c0, cW=cW,
        )

    def _trainable(self, d: int, only: set[str] | None) -> Floats:
        """1 for each coordinate of theta that moves, 0 for those held (see `only`)."""
        H, M = len(self.heads), len(self.models)
        trainable = np.ones(d + H * d + M)
        if only is not None:
            trainable[:] = 0.0
            for h, m in enumerate(self.heads):
                if m in only:
                    trainable[d + h * d: d + (h + 1) * d] = 1.0
            for i, m in enumerate(self.models):
                if m in only:
                    trainable[d + H * d + i] = 1.0
        return trainable

    # -- prediction ------------------------------------------------------------------

    def predict(
        self,
        text: str,
        candidates: Sequence[str],
        *,
        node: str | None = None,
        category: str | None = None,
    ) -> dict[str, float]:
        row = self.predict_batch([text], candidates, [category], nodes=[node])[0]
        return {m: float(p) for m, p in zip(candidates, row, strict=True)}

    def predict_batch(
        self,
        texts: Sequence[str],
        candidates: Sequence[str],
        categories: Sequence[str | None] | None = None,
        *,
        nodes: Sequence[str | None] | None = None,
    ) -> Floats:
        """[len(texts), len(candidates)] P(success), blended with the prior."""
        n = len(texts)
        cats = list(categories) if categories is not None else [None] * n
        nds = list(nodes) if nodes is not None else [None] * n
        if len(cats) != n or len(nds) != n:
            raise UserError("predict_batch: texts, categories and nodes differ in length")
        prior = self.prior
        p_prior = np.array([prior.p(m) for m in candidates], dtype=np.float64)
        out = np.repeat(p_prior[None, :], n, axis=0)
        if not self.fitted or n == 0:
            return out
        assert self.w_shared is not None and self.W is not None and self.b is not None
        known = [j for j, m in enumerate(candidates) if m in self.counts]
        if not known:
            return out
        tags = [tags_for(nd, c) for nd, c in zip(nds, cats, strict=True)]
        X = design(featurize(self.featurizer, texts, tags))
        w0 = self.w_shared.astype(np.float64)
        WT = np.vstack([w0[None, :], self.W.astype(np.float64)])
        S = X.matmul(WT)
        for j in known:
            m = candidates[j]
            i = self.models.index(m)
            z = S[:, 0] + float(self.b[i])
            if m in self.heads:
                z = z + S[:, 1 + self.heads.index(m)]
            n_m = self.counts[m]
            k = self.prior_strength
            out[:, j] = (n_m * sigmoid(z) + k * p_prior[j]) / (n_m + k)
        return out

    # -- operating point on the hull -------------------------------------------------

    def mix_for(self, node: str | None) -> HullMix | None:
        """The calibrated operating mix for `node` (else the one for any node), if any."""
        return self.mixes.get(node or "*") or self.mixes.get("*")

    def calibrate(
        self, texts: Sequence[str], candidates: Sequence[str], outcomes: Floats,
        paid: Floats, *, node: str | None = None, rule: Rule = Rule.PRICE_WEIGHT,
        quality: float | None = None, cost: float | None = None,
        categories: Sequence[str | None] | None = None, expected: Floats | None = None,
        confidence: float = 0.95,
    ) -> HullMix:
        """Measure this router's operating curve on calibration inputs (every candidate's
        outcome and cost per input, [n, candidates]) and keep, for `node` (None: any node),
        the mix of two adjacent hull points reaching `quality` (lower-bound pass rate) or
        `cost` (mean USD per call). `choose` draws from it per call once a run uses the
        router. `expected`: the costs known before each call (default: each candidate's
        mean of `paid`). Raises UserError when no mix reaches the target."""
        P = self.predict_batch(texts, candidates, categories,
                               nodes=[node] * len(texts))
        paid = np.asarray(paid, dtype=np.float64)
        C = expected if expected is not None else np.repeat(
            paid.mean(axis=0, keepdims=True), len(texts), axis=0)
        curve = operating_curve(rule, P, C, np.asarray(outcomes, dtype=bool), paid)
        mix = hull_mix(curve, rule, quality=quality, cost=cost, confidence=confidence)
        if mix is None:
            best = max(curve, key=lambda p: p.rate)
            what = f"pass rate {quality}" if quality is not None else f"cost ${cost}/call"
            raise UserError(f"no operating point of the router reaches {what} on these "
                            f"{len(texts)} inputs (best rate {best.rate:.3f} at "
                            f"${best.cost:.6g}/call): lower the target or add candidates")
        self.mixes[node or "*"] = mix
        return mix

    # -- persistence -----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Versioned JSON with base64 arrays; `LearnedRouter.from_bytes` reads it back."""
        doc = {
            "format": _FORMAT,
            "version": _VERSION,
            "kind": "learned",
            "featurizer": featurizer_to_dict(self.featurizer),
            "params": {
                "prior_strength": self.prior_strength, "l2": self.l2, "head_l2": self.head_l2,
                "shared": self.shared, "min_head_examples": self.min_head_examples,
                "max_iter": self.max_iter, "tol": self.tol,
            },
            "prior": self._prior_given.to_dict() if self._prior_given is not None else None,
            "models": self.models,
            "heads": self.heads,
            "counts": [self.counts[m] for m in self.models],
            "base_rate": self.base_rate,
            "n_iter": self.n_iter,
            "l2_used": self.l2_used,
            "w_shared": encode_array(self.w_shared) if self.w_shared is not None else None,
            "W": encode_array(self.W) if self.W is not None else None,
            "b": encode_array(self.b) if self.b is not None else None,
            "mixes": {node: mix.to_dict() for node, mix in self.mixes.items()},
        }
        return json.dumps(doc, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, blob: bytes) -> LearnedRouter:
        try:
            doc = json.loads(blob.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserError(f"not a saved frugalflow router: {e}") from None
        if not isinstance(doc, dict) or (doc.get("format"), doc.get("kind")) != (
            _FORMAT, "learned"
        ):
            raise UserError("not a saved frugalflow LearnedRouter")
        if doc.get("version") != _VERSION:
            raise UserError(
                f"saved router has format version {doc.get('version')!r}; this frugalflow "
                f"reads version {_VERSION}: refit it or upgrade frugalflow"
            )
        p = doc["params"]
        prior = PriorRouter.from_dict(doc["prior"]) if doc.get("prior") is not None else None
        r = cls(
            featurizer_from_dict(doc["featurizer"]), prior=prior,
            prior_strength=p["prior_strength"], l2=p["l2"], head_l2=p["head_l2"],
            shared=p["shared"], min_head_examples=p["min_head_examples"],
            max_iter=p["max_iter"], tol=p["tol"],
        )
        r.models = list(doc["models"])
        r.heads = list(doc["heads"])
        r.counts = {m: float(c) for m, c in zip(r.models, doc["counts"], strict=True)}
        r.base_rate = float(doc["base_rate"])
        r.n_iter = int(doc.get("n_iter", 0))
        r.l2_used = doc.get("l2_used")
        r.w_shared = _weights(doc.get("w_shared"))
        r.W = _weights(doc.get("W"))
        r.b = _weights(doc.get("b"))
        r.mixes = {str(k): HullMix.from_dict(v) for k, v in (doc.get("mixes") or {}).items()}
        return r


def _weights(saved: ArrayDoc | None) -> Floats32 | None:
    return decode_array(saved, np.float32) if saved is not None else None


@dataclass
class _Data:
    texts: list[str]
    tags: list[str | None]
    models: list[str]
    labels: Floats  # [n_inputs, n_models] weighted mean success (0 where unobserved)
    weights: Floats  # [n_inputs, n_models] total weight (0: unobserved)


def _collect(examples: Iterable[Example]) -> _Data:
    """Group outcomes by input (text, node, category) and model."""
    rows: dict[tuple[str, str | None], int] = {}
    cols: dict[str, int] = {}
    entries: list[tuple[int, int, float, float]] = []
    texts: list[str] = []
    tags: list[str | None] = []
    for ex in examples:
        tag = tags_for(ex.node, ex.category)
        key = (ex.text, tag)
        i = rows.get(key)
        if i is None:
            i = rows[key] = len(texts)
            texts.append(ex.text)
            tags.append(tag)
        j = cols.setdefault(ex.model, len(cols))
        entries.append((i, j, float(bool(ex.success)), float(ex.weight)))
    labels = np.zeros((len(texts), len(cols)))
    weights = np.zeros_like(labels)
    if entries:
        e = np.array(entries)
        ii, jj = e[:, 0].astype(np.int64), e[:, 1].astype(np.int64)
        np.add.at(weights, (ii, jj), e[:, 3])
        np.add.at(labels, (ii, jj), e[:, 2] * e[:, 3])
        labels = np.divide(labels, weights, out=np.zeros_like(labels), where=weights > 0)
    return _Data(texts, tags, list(cols), labels, weights)


def train_router(
    examples: Sequence[Example], catalog: Catalog | None = None, *,
    featurizer: Featurizer | None = None, **options: Unpack[RouterOptions],
) -> LearnedRouter:
    """A `LearnedRouter` fitted on `examples` (blocking: run it in a thread from async code).

    The catalog's quality scores are the prior; features are lexical unless `featurizer`
    says otherwise (pass `EmbeddingFeaturizer()` with the embeddings extra installed).
    `options` go to `LearnedRouter`.
    """
    if not examples:
        raise UserError("train_router: no examples; run flows with a validator or record "
                        "feedback first (Ledger.feedback)")
    prior = PriorRouter.from_catalog(catalog) if catalog is not None else None
    # A light prior: a node's own outcomes should soon outweigh catalog-wide scores.
    options.setdefault("prior_strength", 5.0)
    router = LearnedRouter(featurizer or LexicalFeaturizer(), prior=prior, **options)
    return router.fit(examples)
