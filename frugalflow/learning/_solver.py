"""The numerics under `LearnedRouter.fit`: the design matrix, the penalised multi-task
log-loss and its gradient, and the accelerated gradient descent that minimises it.

Nothing here knows about models, texts or featurizers: parameters are one flat vector
``theta = (w_shared, W.ravel(), b)`` and models are column indices.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np
from numpy.typing import NDArray

from .features import FloatArray, Floats, SparseRows

__all__ = ["Design", "Objective", "design", "minimise", "sigmoid", "step_size"]

Ints = NDArray[np.int64]


def sigmoid(z: FloatArray) -> FloatArray:
    p: FloatArray = 0.5 * (1.0 + np.tanh(0.5 * z))
    return p


class Design(Protocol):
    """X as the optimiser sees it: `X @ W.T` and `R.T @ X`."""

    @property
    def n(self) -> int: ...

    @property
    def d(self) -> int: ...

    def matmul(self, WT: FloatArray) -> Floats:
        """[n, k] = X @ WT.T for WT of shape [k, d]."""
        ...

    def rmatmul(self, R: FloatArray) -> Floats:
        """[k, d] = R.T @ X for R of shape [n, k]."""
        ...


def design(X: SparseRows | Floats) -> Design:
    return _SparseDesign(X) if isinstance(X, SparseRows) else _DenseDesign(X)


class _DenseDesign:
    def __init__(self, X: Floats) -> None:
        self.X = np.asarray(X, dtype=np.float64)
        self.n, self.d = self.X.shape

    def matmul(self, WT: FloatArray) -> Floats:
        return np.asarray(self.X @ WT.T)

    def rmatmul(self, R: FloatArray) -> Floats:
        return np.asarray(R.T @ self.X)


class _SparseDesign:
    def __init__(self, X: SparseRows) -> None:
        self.n, self.d = X.shape
        self.indices = X.indices
        rows = np.repeat(np.arange(self.n), np.diff(X.indptr))
        self.nonempty = np.flatnonzero(np.diff(X.indptr) > 0)
        self.starts = X.indptr[self.nonempty]
        self.data32 = X.data.astype(np.float32)
        # the same entries by column, for R.T @ X
        order = np.argsort(X.indices, kind="stable")
        self.c_rows = rows[order]
        self.c_data = X.data[order].astype(np.float32)
        self.c_cols, self.c_starts = np.unique(X.indices[order], return_index=True)

    def matmul(self, WT: FloatArray) -> Floats:
        # float32 products (half the memory traffic); sums of a row's few hundred terms
        out = np.zeros((self.n, WT.shape[0]))
        WT32 = WT.astype(np.float32)
        if len(self.nonempty):
            for j in range(WT.shape[0]):
                out[self.nonempty, j] = np.add.reduceat(
                    self.data32 * WT32[j][self.indices], self.starts
                )
        return out

    def rmatmul(self, R: FloatArray) -> Floats:
        out = np.zeros((R.shape[1], self.d))
        if len(self.c_cols):
            RT = np.ascontiguousarray(R.T, dtype=np.float32)
            for j in range(R.shape[1]):
                out[j, self.c_cols] = np.add.reduceat(
                    self.c_data * RT[j][self.c_rows], self.c_starts
                )
        return out


class Objective:
    """The weighted log-loss of M models' logits plus L2 penalties, over ``theta``.

    ``logit[i, m] = x_i . w_shared + x_i . W[head_col[m]] + b[m]``, the shared term only
    when `use_shared`, the head term only for models with a head (`head_col[m] >= 0`;
    `head_models[h]` is head h's model). Penalties: `l2` on ``w_shared - c0``, `hl2` on
    ``W - cW`` (`c0`, `cW`: zero, or the current weights for an anchored update).
    """

    def __init__(
        self, X: Design, Y: Floats, Wn: Floats, *, head_col: Ints, head_models: Ints,
        use_shared: bool, l2: float, hl2: float, c0: Floats, cW: Floats,
    ) -> None:
        self.X, self.Y, self.Wn = X, Y, Wn
        self.head_col = head_col
        self.has_head = head_col >= 0
        self.head_models = head_models
        self.use_shared = use_shared
        self.l2, self.hl2 = l2, hl2
        self.c0, self.cW = c0, cW
        self.d = X.d
        self.H = len(head_models)

    def pack(self, w0: FloatArray, W: FloatArray, b: FloatArray) -> FloatArray:
        return np.concatenate([w0, W.ravel(), b])

    def unpack(self, theta: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray]:
        d, H = self.d, self.H
        return theta[:d], theta[d: d + H * d].reshape(H, d), theta[d + H * d:]

    def logits(self, theta: FloatArray) -> FloatArray:
        X = self.X
        w0, W, b = self.unpack(theta)
        WT = np.vstack([w0[None, :], W]) if self.use_shared else W
        S = X.matmul(WT) if len(WT) else np.zeros((X.n, 0))
        Z = np.repeat(b[None, :], X.n, axis=0)
        if self.use_shared:
            Z += S[:, :1]
            S = S[:, 1:]
        if self.H:
            Z[:, self.has_head] += S[:, self.head_col[self.has_head]]
        return Z

    def back(self, R: FloatArray) -> tuple[Floats, Floats, FloatArray]:
        """(d/dw_shared, d/dW, d/db) of sum(R * Z): the adjoint of `logits`."""
        cols = [R.sum(axis=1)] if self.use_shared else []
        cols += [R[:, m] for m in self.head_models]
        G = self.X.rmatmul(np.stack(cols, axis=1)) if cols else np.zeros((0, self.d))
        g0 = G[0] if self.use_shared else np.zeros(self.d)
        return g0, (G[1:] if self.use_shared else G), R.sum(axis=0)

    def loss_grad(self, theta: FloatArray) -> tuple[float, FloatArray]:
        w0, W, b = self.unpack(theta)
        Z = self.logits(theta)
        Y, Wn = self.Y, self.Wn
        loss = float((Wn * (np.logaddexp(0.0, Z) - Y * Z)).sum())
        d0, dW = w0 - self.c0, W - self.cW
        loss += 0.5 * (self.l2 * float(d0 @ d0) + self.hl2 * float((dW * dW).sum()))
        g0, GW, gb = self.back(Wn * (sigmoid(Z) - Y))
        return loss, self.pack(g0 + self.l2 * d0, GW + self.hl2 * dW, gb)


def step_size(f: Objective, trainable: Floats) -> float:
    """1/L, L bounding the log-loss's curvature over the `trainable` coordinates.

    The curvature is at most 1/4 * A^T diag(weights) A (A: the linear map `logits`); its
    top eigenvalue comes from power iteration from a fixed start, with a margin.
    """
    v = trainable.copy()
    v /= np.linalg.norm(v)
    top = 0.0
    for _ in range(12):
        hv = f.pack(*f.back(0.25 * f.Wn * f.logits(v))) * trainable
        top = float(np.linalg.norm(hv))
        if top <= 0:
            break
        v = hv / top
    return 1.0 / (1.5 * top + max(f.l2, f.hl2) + 1e-12)


def minimise(
    f: Objective, x0: FloatArray, trainable: Floats, step: float, *, max_iter: int, tol: float
) -> tuple[FloatArray, int]:
    """FISTA with adaptive restart from `x0`, moving only the `trainable` coordinates.

    Stops after `max_iter` iterations or when the loss changed by at most `tol` (relative)
    five times in a row. Returns the parameters and the iterations run.
    """
    x: FloatArray = x0
    y = x.copy()
    t = 1.0
    f_prev = math.inf
    stall = 0
    it = 0
    while it < max_iter:
        it += 1
        f_y, g = f.loss_grad(y)
        g *= trainable
        x_new = y - step * g
        if float(g @ (x_new - x)) > 0:
            t = 1.0  # momentum points uphill: drop it (adaptive restart)
        t_new = 0.5 * (1.0 + math.sqrt(1.0 + 4.0 * t * t))
        y = x_new + ((t - 1.0) / t_new) * (x_new - x)
        x, t = x_new, t_new
        if abs(f_prev - f_y) <= tol * max(abs(f_y), 1e-12):
            stall += 1
            if stall >= 5:
                break
        else:
            stall = 0
        f_prev = f_y
    return x, it
