r"""Hessians of a loss over a tuple of tensors: products, the dense matrix, extreme eigenvalues.

A loss is a callable ``loss_fn(*params) -> scalar tensor``; ``params`` is a tuple (or list) of
tensors, e.g. a bundle point or a model's parameters. The loss must be a function of its
arguments (closures over ``nn.Parameter`` objects are not seen): everything here differentiates
with respect to detached copies of ``params`` that require grad.

* ``hvp``: the Hessian–vector product H v = d/dt ∇f(p + t v) at t = 0, by double backward
  (Pearlmutter, "Fast exact multiplication by the Hessian", Neural Comput. 1994): one gradient
  graph, then ∇(∇f · v). Exact up to round-off, about the cost of two gradients.
* ``dense_hessian``: the n × n matrix, one HVP per basis vector, vectorised over chunks of basis
  vectors (``torch.autograd.grad(..., is_grads_batched=True)``, i.e. ``vmap`` over the backward
  pass) and symmetrised ½(H + Hᵀ). Meant for validation on small models (n ≤ ``max_params``).
* ``lanczos_extremes``: a few extreme eigenvalues by implicitly restarted Lanczos (ARPACK,
  ``scipy.sparse.linalg.eigsh``) over a ``LinearOperator`` whose matvec is the HVP, so the
  Hessian is never formed. Lanczos finds well-separated extremes quickly; it cannot count the
  exact zeros of a degenerate null space (use ``dense_hessian`` for that; stochastic spectral
  densities cannot either).

Work in float64 for identities at the 1e-10 level; everything keeps the dtype of ``params``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

__all__ = [
    "flatten",
    "unflatten",
    "hvp",
    "dense_hessian",
    "hessian_operator",
    "lanczos_extremes",
    "WHICH",
]

Loss = Callable[..., torch.Tensor]

#: ``which`` values accepted by ``lanczos_extremes`` (ARPACK's names for symmetric problems):
#: largest/smallest algebraic, largest/smallest magnitude, both ends.
WHICH = ("LA", "SA", "LM", "SM", "BE")


def flatten(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate the tensors of a tuple into one vector (C order, tensor by tensor)."""
    tensors = tuple(tensors)
    if not tensors:
        raise ValueError("flatten needs at least one tensor")
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: torch.Tensor, like: Sequence) -> tuple[torch.Tensor, ...]:
    """Split a vector into a tuple shaped like ``like`` (tensors or shapes): inverse of
    ``flatten``. The pieces are views of ``vector``."""
    shapes = [tuple(t.shape) if isinstance(t, torch.Tensor) else tuple(t) for t in like]
    sizes = [math.prod(s) for s in shapes]
    if vector.dim() != 1 or vector.numel() != sum(sizes):
        raise ValueError(
            f"unflatten: expected a vector of {sum(sizes)} entries for shapes {shapes}, "
            f"got shape {tuple(vector.shape)}"
        )
    return tuple(piece.view(s) for piece, s in zip(torch.split(vector, sizes), shapes))


def _leaves(params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    params = tuple(params)
    if not params or not all(isinstance(p, torch.Tensor) for p in params):
        raise ValueError("params must be a non-empty tuple or list of tensors")
    return tuple(p.detach().requires_grad_(True) for p in params)


def _n_params(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() for p in params)


class _GradientGraph:
    """∇f at ``params`` with its graph kept, so that many HVPs share one forward/backward."""

    def __init__(self, loss_fn: Loss, params: Sequence[torch.Tensor]):
        self.leaves = _leaves(params)
        with torch.enable_grad():
            loss = loss_fn(*self.leaves)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            grads = torch.autograd.grad(loss, self.leaves, create_graph=True, allow_unused=True)
        grads = tuple(torch.zeros_like(p) if g is None else g for g, p in zip(grads, self.leaves))
        self.grad = flatten(grads)  # (n,)
        self.n = self.grad.numel()

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector v of shape (n,)."""
        return self.matmat(v.unsqueeze(0), vectorize=False)[0]

    def matmat(self, rows: torch.Tensor, vectorize: bool = True) -> torch.Tensor:
        """(H vᵢ)ᵢ for the rows vᵢ of a (c, n) matrix, as a (c, n) matrix."""
        if not self.grad.requires_grad:  # ∇f does not depend on p: the loss is affine
            return self.grad.new_zeros((rows.shape[0], self.n))
        rows = rows.to(dtype=self.grad.dtype, device=self.grad.device)
        if vectorize:
            return self._backward(rows, batched=True)
        return torch.stack([self._backward(row, batched=False) for row in rows])

    def _backward(self, rows: torch.Tensor, batched: bool) -> torch.Tensor:
        """∇(∇f · v) for v = ``rows`` (one (n,) vector, or (c, n) rows when ``batched``)."""
        out = torch.autograd.grad(
            self.grad,
            self.leaves,
            rows,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=batched,
        )
        lead = tuple(rows.shape[:1]) if batched else ()
        pieces = [
            p.new_zeros((*lead, p.numel())) if o is None else o.reshape(*lead, -1)
            for o, p in zip(out, self.leaves)
        ]
        return torch.cat(pieces, dim=-1)


def hvp(loss_fn: Loss, params: Sequence[torch.Tensor], vector: Sequence[torch.Tensor]):
    """Hessian–vector product ∇²f(params)·vector, a tuple shaped like ``params``.

    ``vector`` is a tuple of tensors with the shapes of ``params``. Double backward: exact.
    """
    params = tuple(params)
    vector = tuple(vector)
    if len(vector) != len(params) or any(v.shape != p.shape for v, p in zip(vector, params)):
        raise ValueError(
            f"vector must have the shapes of params {[tuple(p.shape) for p in params]}, got "
            f"{[tuple(v.shape) for v in vector]}"
        )
    graph = _GradientGraph(loss_fn, params)
    return tuple(t.detach() for t in unflatten(graph.matvec(flatten(vector)), params))


def dense_hessian(
    loss_fn: Loss,
    params: Sequence[torch.Tensor],
    *,
    max_params: int = 5000,
    chunk_size: int = 256,
    vectorize: bool = True,
) -> torch.Tensor:
    """The exact Hessian (n, n) of ``loss_fn`` at ``params``, symmetrised ½(H + Hᵀ).

    Rows are HVPs against the standard basis, ``chunk_size`` at a time; ``vectorize=False``
    computes them one by one (for losses whose ops have no batching rule). The order of the
    coordinates is that of ``flatten(params)``. Raises ``ValueError`` when n > ``max_params``
    (memory n² and time n HVPs grow quickly: use ``lanczos_extremes`` there).
    """
    params = tuple(params)
    n = _n_params(params)
    if n > max_params:
        raise ValueError(
            f"dense_hessian: {n} parameters exceed max_params={max_params} (the dense Hessian "
            f"needs {n}² entries and {n} Hessian-vector products); raise max_params or use "
            f"lanczos_extremes for extreme eigenvalues"
        )
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size}")
    graph = _GradientGraph(loss_fn, params)
    eye = torch.eye(n, dtype=graph.grad.dtype, device=graph.grad.device)
    rows = [graph.matmat(eye[i : i + chunk_size], vectorize) for i in range(0, n, chunk_size)]
    hessian = torch.cat(rows).detach()
    return 0.5 * (hessian + hessian.mT)


def hessian_operator(loss_fn: Loss, params: Sequence[torch.Tensor]) -> LinearOperator:
    """The Hessian at ``params`` as a scipy ``LinearOperator`` (float64 numpy in and out).

    The gradient graph is built once and kept alive by the operator (memory of one backward).
    """
    graph = _GradientGraph(loss_fn, params)
    return as_linear_operator(graph.matvec, graph.grad)


def as_linear_operator(matvec: Callable, like: torch.Tensor) -> LinearOperator:
    """A symmetric torch ``matvec`` on (n,) vectors shaped like ``like`` (its dtype and
    device) as a scipy ``LinearOperator`` on float64 numpy vectors."""
    n = like.numel()

    def numpy_matvec(x: np.ndarray) -> np.ndarray:
        v = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float64).reshape(-1))
        out = matvec(v.to(dtype=like.dtype, device=like.device)).detach()
        return out.to(device="cpu", dtype=torch.float64).numpy()

    return LinearOperator((n, n), matvec=numpy_matvec, dtype=np.float64)


def lanczos_extremes(
    loss_fn: Loss,
    params: Sequence[torch.Tensor],
    k: int = 6,
    which: str = "LA",
    *,
    tol: float = 0.0,
    return_eigenvectors: bool = False,
    maxiter: int | None = None,
    ncv: int | None = None,
    seed: int = 0,
):
    """``k`` extreme Hessian eigenvalues by Lanczos on HVPs (``scipy.sparse.linalg.eigsh``).

    ``which`` is one of ``WHICH``: "LA"/"SA" largest/smallest algebraic (the top of the
    spectrum, the most negative curvature), "LM"/"SM" largest/smallest magnitude, "BE" half
    from each end. ``tol`` is ARPACK's relative accuracy (0: machine precision). The starting
    vector is Gaussian from ``seed``, so results are reproducible. Needs 1 ≤ k < n.

    Returns the eigenvalues in ascending order (float64 numpy); with ``return_eigenvectors``
    also a list of k eigenvectors, each a tuple of tensors shaped like ``params`` (unit norm in
    the flattened Euclidean coordinates), in the same order.
    """
    params = tuple(params)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    n = _n_params(params)
    if not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(
            f"lanczos_extremes needs 1 <= k < n = {n}, got k={k!r} (use dense_hessian for the "
            f"whole spectrum)"
        )
    operator = hessian_operator(loss_fn, params)
    v0 = np.random.default_rng(seed).standard_normal(n)
    values, vectors = eigsh(operator, k=k, which=which, tol=tol, v0=v0, maxiter=maxiter, ncv=ncv)
    order = np.argsort(values)
    values = values[order]
    if not return_eigenvectors:
        return values
    like = params[0]
    eigvecs = [
        unflatten(torch.from_numpy(vectors[:, i].copy()).to(like.dtype).to(like.device), params)
        for i in order
    ]
    return values, eigvecs
