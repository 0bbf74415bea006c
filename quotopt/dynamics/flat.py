r"""Symmetry-induced flat directions of a loss: vertical tangents, orbit dimension, and the
near-null space of the Hessian on the total space and on a horizontal complement.

Let f be G-invariant, f(p·g) = f(p), and X_ξ(p) = d/dt p·exp(tξ)|₀ the vertical field of ξ in
the Lie algebra 𝔤. Differentiating the invariance twice along t ↦ p·exp(tξ) gives

    X_ξᵀ ∇²f(p) X_ξ = −⟨∇f(p), d²/dt² p·exp(tξ)|₀⟩,
    ∇²f(p) X_ξ(p)   = −(DX_ξ)ᵀ ∇f(p)        (differentiate ⟨∇f, X_ξ⟩ = 0 in p).

* At a **critical point** (∇f = 0) every vertical vector is in the Hessian's null space, so the
  total-space Hessian has at least ``orbit_dim`` = dim V_p zero eigenvalues (= dim G at a free
  point, less where p has a stabiliser). These zeros are pure gauge: they say nothing about the
  landscape of the quotient.
* **Away from a critical point** the vertical directions are *not* null: the Hessian picks up the
  term −⟨∇f, p·ξ²⟩ from the gradient along the curvature of the orbit (the orbit of a linear
  action is a curved submanifold; its second fundamental form pairs with ∇f). This is why the
  report gives the Rayleigh quotients X_ξᵀ H X_ξ / X_ξᵀX_ξ rather than asserting zeros.

**Which horizontal space.** ``horizontal_basis`` returns Q with orthonormal columns (Euclidean
inner product of the flattened coordinates ``flatten(point)``) spanning a complement W of
V_p = span of the vertical tangents: ``complement="euclidean"`` takes W = V_p^⊥ (Euclidean),
``complement="metric"`` takes the bundle metric's horizontal space H_p (``project_horizontal``;
for the invariant head metric this differs from V_p^⊥). The *count* of zero eigenvalues of QᵀHQ
does not depend on the choice at a critical point: V ⊆ ker H and H symmetric give
range H ⊆ V^⊥; if QᵀHQ x = 0 then w = Qx has Hw ⊥ W and Hw ⊥ V, hence Hw ⊥ V + W = Rⁿ, so
Hw = 0. Thus ker(QᵀHQ) ≅ ker H ∩ W and, because ker H ⊇ V, dim ker(QᵀHQ) = dim ker H − dim V
for *every* complement W (Sylvester's law of inertia: H defines a quadratic form on Rⁿ/V, and
every complement is a copy of Rⁿ/V). The non-zero eigenvalues do depend on W and on the metric;
with a relative threshold the numerical count is the same for any well-conditioned complement.
Where the metric is the Euclidean one and G-invariant (O(d), ``metric_is_invariant``), π is a
Riemannian submersion at free points and QᵀHQ with the Euclidean complement *is* the Riemannian
Hessian of the induced function on the quotient in an orthonormal basis, at every point (Absil,
Mahony, Sepulchre 2008, ch. 5: the Hessian of a Riemannian quotient lifts to P_H ∇²f on H). For
GL(r) under the invariant metric the quotient Hessian also carries connection terms and a
non-Euclidean metric, so only the inertia (counts) agrees with QᵀHQ, at critical points.

Counting rule: an eigenvalue is *flat* when |λ| ≤ ``rel_tol`` · max|λ(H)|, with the same scale
max|λ(H)| of the total-space Hessian for both counts (by Cauchy interlacing every eigenvalue of
QᵀHQ lies within the total spectrum). In float64 ``rel_tol`` = 1e-8 separates round-off
(≈ 1e-14) from curvature; in float32 use ≳ 1e-4. Stochastic spectral-density methods cannot
count exact zeros: this is a dense, exact computation for small models.

References: Kunin et al., "Neural Mechanics" (ICLR 2021); Zhao et al., "Symmetry teleportation"
(ICLR 2022); Absil, Mahony, Sepulchre, *Optimization Algorithms on Matrix Manifolds* (2008).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import numpy as np
import torch

from manifolds import Bundle, unchecked

from .hessian import dense_hessian, flatten, unflatten

__all__ = [
    "algebra_basis",
    "vertical_basis",
    "orbit_dimension",
    "horizontal_basis",
    "FlatReport",
    "flat_directions",
    "analyse_flat_directions",
    "widest_gap",
]

COMPLEMENTS = ("euclidean", "metric")


# ---- the Lie algebra and the vertical space --------------------------------------------
def algebra_basis(bundle: Bundle, *, dtype=None, device=None):
    """A basis of the bundle's Lie algebra stacked on a leading axis of length ``group_dim``
    (``bundle.algebra_basis``: unit matrices of gl(r), E_ij − E_ji of so(d), the I/K blocks of
    the RoPE commutant, a padded tuple per component of a product). Raises ``ValueError`` for
    an object that provides none."""
    member = getattr(bundle, "algebra_basis", None)
    try:
        if member is None:
            raise NotImplementedError
        return member(dtype=dtype, device=device)
    except NotImplementedError:
        raise ValueError(
            f"cannot infer a Lie-algebra basis for {bundle!r}: algebra_shape "
            f"{getattr(bundle, 'algebra_shape', None)} with group_dim "
            f"{getattr(bundle, 'group_dim', None)} provides no algebra_basis"
        ) from None


def _map_rows(fn: Callable, stacked, n_rows: int) -> torch.Tensor:
    """Stack fn(x) for the rows x of a stacked pytree: vmap, falling back to a loop."""

    with unchecked():  # rank checks synchronise, which vmap cannot trace
        try:
            return torch.func.vmap(fn)(stacked)
        except RuntimeError:
            return torch.stack([fn(_index(stacked, k)) for k in range(n_rows)])


def _index(tree, k):
    return tuple(_index(t, k) for t in tree) if isinstance(tree, tuple) else tree[k]


def vertical_basis(bundle: Bundle, point) -> torch.Tensor:
    """(n_params, group_dim) matrix whose columns are flatten(bundle.vertical(point, e_k)) for
    the basis e_k of ``algebra_basis`` (coordinates in the order of ``flatten(point)``)."""
    point = bundle.check_point(point)
    ref = point[0]
    basis = algebra_basis(bundle, dtype=ref.dtype, device=ref.device)
    dim = bundle.group_dim
    if dim == 0:
        return ref.new_zeros((sum(p.numel() for p in point), 0))
    columns = _map_rows(lambda xi: flatten(bundle.vertical(point, xi)), basis, dim)
    return columns.mT


def _rank(matrix: torch.Tensor, rank_tol: float | None) -> int:
    if matrix.shape[-1] == 0:
        return 0
    s = torch.linalg.svdvals(matrix)
    rel = max(matrix.shape) * torch.finfo(matrix.dtype).eps if rank_tol is None else rank_tol
    return int((s > rel * s[0]).sum())


def orbit_dimension(bundle: Bundle, point, rank_tol: float | None = None) -> int:
    """dim V_p: the numerical rank of ``vertical_basis`` (singular values above
    ``rank_tol``·σ_max, default max(n, group_dim)·eps). Equals ``group_dim`` at a free point,
    dim G − dim Stab(p) where p has a stabiliser (e.g. rank-deficient rows under O(d))."""
    return _rank(vertical_basis(bundle, point), rank_tol)


def _euclidean_complement(vertical: torch.Tensor, rank_tol: float | None) -> torch.Tensor:
    k = _rank(vertical, rank_tol)
    if vertical.shape[1] == 0:
        return torch.eye(vertical.shape[0], dtype=vertical.dtype, device=vertical.device)
    u = torch.linalg.svd(vertical, full_matrices=True)[0]
    return u[:, k:]


def horizontal_basis(
    bundle: Bundle, point, complement: str = "euclidean", rank_tol: float | None = None
) -> torch.Tensor:
    """(n_params, n_params − orbit_dim) matrix Q with Euclidean-orthonormal columns spanning a
    complement of the vertical space (see the module docstring for why either choice gives the
    same flat count at a critical point).

    ``complement="euclidean"``: the Euclidean orthogonal complement V_p^⊥ of the flattened
    coordinates (SVD of the vertical basis). ``complement="metric"``: the bundle metric's
    horizontal space H_p = range of ``project_horizontal`` (the same space when the metric is
    Euclidean), orthonormalised by an SVD.
    """
    if complement not in COMPLEMENTS:
        raise ValueError(f"complement must be one of {COMPLEMENTS}, got {complement!r}")
    point = bundle.check_point(point)
    vertical = vertical_basis(bundle, point)
    if complement == "euclidean":
        return _euclidean_complement(vertical, rank_tol)
    n, k = vertical.shape[0], _rank(vertical, rank_tol)
    eye = torch.eye(n, dtype=point[0].dtype, device=point[0].device)

    def project(e):
        return flatten(bundle.project_horizontal(point, unflatten(e, point)))

    projector = _map_rows(project, eye, n).mT  # (n, n), column i = P_H e_i
    return torch.linalg.svd(projector)[0][:, : n - k]


# ---- the report ------------------------------------------------------------------------------
@dataclasses.dataclass
class FlatReport:
    """Flat directions of a Hessian and how many the symmetry explains.

    n_params: n. orbit_dim: rank of the vertical tangents. flat_total: eigenvalues of H with
    |λ| ≤ rel_tol·scale. flat_horizontal: the same count for QᵀHQ (Q orthonormal basis of a
    horizontal complement). vertical_rayleigh: vᵀHv/(vᵀv)/scale for each analytic vertical
    tangent v (≈ 0 at a critical point, not away from one). scale: max|λ(H)|.
    eigenvalues, horizontal_eigenvalues: ascending spectra (float64 numpy). grad_norm: ‖∇f‖
    at the point when known (None otherwise).
    """

    n_params: int
    orbit_dim: int
    flat_total: int
    flat_horizontal: int
    vertical_rayleigh: np.ndarray
    tolerance_rule: str
    eigenvalues: np.ndarray
    horizontal_eigenvalues: np.ndarray
    rel_tol: float
    scale: float
    grad_norm: float | None = None

    @property
    def symmetry_flat(self) -> int:
        """flat_total − flat_horizontal: flat directions removed by passing to the quotient
        (equals orbit_dim at a generic critical point)."""
        return self.flat_total - self.flat_horizontal

    def to_dict(self) -> dict:
        """JSON-serialisable data (lists of floats, ints, strings)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for key in ("vertical_rayleigh", "eigenvalues", "horizontal_eigenvalues"):
            out[key] = [float(x) for x in out[key]]
        out["symmetry_flat"] = self.symmetry_flat
        out["max_abs_vertical_rayleigh"] = float(np.abs(self.vertical_rayleigh).max(initial=0.0))
        return out


def flat_directions(
    hessian: torch.Tensor,
    vertical: torch.Tensor,
    horizontal: torch.Tensor | None = None,
    rel_tol: float = 1e-8,
    *,
    rank_tol: float | None = None,
    grad_norm: float | None = None,
) -> FlatReport:
    """Count the flat directions of ``hessian`` (n, n) against the vertical tangents.

    ``vertical``: (n, k) analytic vertical tangents (e.g. ``vertical_basis``); ``horizontal``:
    (n, m) orthonormal basis of a complement of their span (default: the Euclidean orthogonal
    complement). See ``FlatReport`` for the fields and the module docstring for the rule and
    the mathematics (flat_horizontal = flat_total − orbit_dim at a generic critical point).
    """
    h = 0.5 * (hessian + hessian.mT)
    n = h.shape[0]
    if h.shape != (n, n) or vertical.dim() != 2 or vertical.shape[0] != n:
        raise ValueError(
            f"hessian must be (n, n) and vertical (n, k); got {tuple(hessian.shape)} and "
            f"{tuple(vertical.shape)}"
        )
    vertical = vertical.to(h.dtype)
    if horizontal is None:
        horizontal = _euclidean_complement(vertical, rank_tol)
    horizontal = horizontal.to(h.dtype)
    evals = torch.linalg.eigvalsh(h)
    h_evals = torch.linalg.eigvalsh(horizontal.mT @ h @ horizontal)
    scale = float(evals.abs().max()) if n else 0.0
    threshold = rel_tol * scale
    norms_sq = (vertical * vertical).sum(0)
    rayleigh = (vertical * (h @ vertical)).sum(0) / norms_sq.clamp_min(torch.finfo(h.dtype).tiny)
    rayleigh = rayleigh / scale if scale > 0 else rayleigh
    return FlatReport(
        n_params=n,
        orbit_dim=_rank(vertical, rank_tol),
        flat_total=int((evals.abs() <= threshold).sum()),
        flat_horizontal=int((h_evals.abs() <= threshold).sum()),
        vertical_rayleigh=rayleigh.detach().cpu().double().numpy(),
        tolerance_rule=f"|λ| ≤ {rel_tol:g} · max|λ(H)| = {threshold:.3g}",
        eigenvalues=evals.detach().cpu().double().numpy(),
        horizontal_eigenvalues=h_evals.detach().cpu().double().numpy(),
        rel_tol=float(rel_tol),
        scale=scale,
        grad_norm=grad_norm,
    )


def widest_gap(eigenvalues, ceiling: float = 1e-4, floor: float | None = None) -> dict:
    """The tolerance read off the spectrum itself: the widest gap in log|λ| below
    ``ceiling``·max|λ|.

    With a = |λ|/max|λ| sorted ascending and a₀ = ``floor`` (default: the dtype's machine
    epsilon, the round-off level of a relative eigenvalue), the gap is the largest ratio
    a_{i+1}/a_i among the a_{i+1} ≤ ``ceiling``; ``count`` = i eigenvalues lie below it,
    ``threshold`` = √(a_i a_{i+1}) (relative) splits it and ``ratio`` says how clean the split
    is (≥ 1e3: the flat block stands apart from the curvature; ~10: there is no block). Unlike
    a fixed ``rel_tol`` this does not assume where the round-off of the flat block ends.
    """
    values = torch.as_tensor(eigenvalues, dtype=torch.float64).abs().sort().values
    floor = torch.finfo(torch.float64).eps if floor is None else float(floor)
    scale = float(values[-1]) if values.numel() else 0.0
    if scale <= 0:
        return dict(count=int(values.numel()), ratio=math.inf, threshold=0.0)
    rel = torch.cat([values.new_tensor([floor]), (values / scale).clamp_min(floor)])
    candidates = int((rel[1:] <= ceiling).sum())
    if candidates == 0:
        return dict(count=0, ratio=float(rel[1] / floor), threshold=math.sqrt(floor * rel[1]))
    ratios = rel[1 : candidates + 1] / rel[:candidates]
    i = int(ratios.argmax())
    return dict(count=i, ratio=float(ratios[i]), threshold=float((rel[i] * rel[i + 1]).sqrt()))


def analyse_flat_directions(
    loss_fn: Callable[..., torch.Tensor],
    bundle: Bundle,
    point,
    rel_tol: float = 1e-8,
    *,
    complement: str = "euclidean",
    rank_tol: float | None = None,
    max_params: int = 5000,
) -> FlatReport:
    """Dense Hessian of ``loss_fn(*point)`` at ``point`` (a tuple in the bundle's order), the
    vertical basis, a horizontal complement (``complement`` as in ``horizontal_basis``) and the
    ``FlatReport``, which also records ‖∇f‖ so a reader can tell a critical point."""
    point = tuple(t.detach() for t in bundle.check_point(point))
    hessian = dense_hessian(loss_fn, point, max_params=max_params)
    leaves = tuple(t.clone().requires_grad_(True) for t in point)
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(*leaves), leaves, allow_unused=True)
    grad_norm = math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads if g is not None))
    return flat_directions(
        hessian,
        vertical_basis(bundle, point),
        horizontal_basis(bundle, point, complement, rank_tol),
        rel_tol,
        rank_tol=rank_tol,
        grad_norm=grad_norm,
    )
