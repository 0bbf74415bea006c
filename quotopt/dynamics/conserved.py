r"""Conserved quantities of gradient flow and the distance of a representative from its gauge.

**Noether charges of GL(r).** Per head write the point as factors (A, B) (``bundle._factors``:
A = W_q, B = W_k for ``HeadQK``; A = W_v, B = W_oᵀ for ``HeadOV``). For a loss of M = A Bᵀ with
G = ∂f/∂M the Euclidean gradient is (G B, Gᵀ A), and along gradient flow ṗ = −∇f

    d/dt (AᵀA − BᵀB) = −(AᵀGB + BᵀGᵀA) + (BᵀGᵀA + AᵀGB) = 0,

so the *imbalance* D = AᵀA − BᵀB (r × r per head) is conserved (Du, Hu, Lee, NeurIPS 2018;
Kunin et al., "Neural Mechanics", ICLR 2021, derive it as the Noether charge ⟨p, X_ξ(p)⟩ =
tr(Dξ) of the symmetry). Gradient *descent* with step η changes D by
η²(BᵀGᵀGB − AᵀGGᵀA) per step, so over a fixed time T = Nη the drift is O(η): the quantity
measures how far a discrete optimiser is from the flow. Anything that is not plain Euclidean
gradient flow of an invariant loss (weight decay, Adam, invariant metrics, non-invariant terms)
moves D, and the quotient geometry makes D a pure gauge coordinate. O(d) has no such charge:
tr(Cξ) vanishes for skew ξ because C = Σ T̂ᵀT̂ is symmetric.

**Gauge coordinates.** ``gauge_drift`` is the relative Euclidean distance between the
representative p and the canonical representative dress(p) of its own orbit (the one point where
the orbit meets the dressed section); it is zero exactly on the section. ``balance_gap`` is a
smooth, dressing-free alternative: per head ‖AᵀA − BᵀB‖_F / ‖AᵀA + BᵀB‖_F, which vanishes exactly
on the balanced set dress(p)·O(r) (every balanced factorisation of M is the dressed one up to an
orthogonal g), is unchanged by orthogonal g and by scaling p, and does not jump where the dressing
is ambiguous (equal singular values), unlike ``gauge_drift``. For ``ResidualRotation`` the
analogue is ‖offdiag C‖_F / ‖C‖_F (zero when the frame diagonalises C, as the dressing does).
"""

from __future__ import annotations

import torch

from manifolds import Bundle, HeadQK, ProductBundle, ResidualRotation

__all__ = ["head_imbalance", "balance_gap", "gauge_drift"]


def _head_factors(bundle: Bundle, point, what: str):
    if not isinstance(bundle, HeadQK):
        raise ValueError(
            f"{what} is defined for GL(r) head bundles (HeadQK, HeadOV), got {bundle!r}; "
            f"apply it to each head component of a ProductBundle"
        )
    a, b = bundle.factors(bundle.check_point(point))
    return a, b


def head_imbalance(bundle: Bundle, point, *, matrices: bool = False) -> torch.Tensor:
    """Per head ‖AᵀA − BᵀB‖_F, shape (H,) — ‖W_qᵀW_q − W_kᵀW_k‖ for ``HeadQK``,
    ‖W_vᵀW_v − W_o W_oᵀ‖ for ``HeadOV``; with ``matrices=True`` the (H, r, r) matrices
    themselves. Conserved by Euclidean gradient flow of any GL(r)-invariant loss."""
    a, b = _head_factors(bundle, point, "head_imbalance")
    diff = a.mT @ a - b.mT @ b  # (H, r, r)
    return diff if matrices else torch.linalg.matrix_norm(diff)


def balance_gap(bundle: Bundle, point):
    """Relative distance from the balanced/diagonal section, independent of the dressing.

    Heads: (H,) with ‖AᵀA − BᵀB‖_F / ‖AᵀA + BᵀB‖_F ∈ [0, 1]. ``ResidualRotation``: a scalar
    ‖C − diag C‖_F / ‖C‖_F with C = Σ T̂ᵀT̂. ``ProductBundle``: a tuple, one entry per component.
    """
    if isinstance(bundle, ProductBundle):
        point = bundle.check_point(point)
        return tuple(balance_gap(c, p) for c, p in zip(bundle.components, bundle._split(point)))
    if isinstance(bundle, ResidualRotation):
        point = bundle.check_point(point)
        c = bundle._cross(point, point)
        off = c - torch.diag_embed(torch.diagonal(c))
        return torch.linalg.matrix_norm(off) / torch.linalg.matrix_norm(c).clamp_min(_tiny(c))
    a, b = _head_factors(bundle, point, "balance_gap")
    ga, gb = a.mT @ a, b.mT @ b
    total = torch.linalg.matrix_norm(ga + gb)
    return torch.linalg.matrix_norm(ga - gb) / total.clamp_min(_tiny(total))


def gauge_drift(bundle: Bundle, point):
    """Relative distance ‖p − dress(p)‖ / ‖p‖ of the representative from its dressed one.

    Heads: (H,), norms over both tensors of each head. ``ResidualRotation`` (and any bundle
    without heads): a scalar over all tensors. ``ProductBundle``: a tuple per component. Raises
    the bundle's ``ValueError`` where the dressing is undefined (rank drop); where it is
    ambiguous (``bundle.is_ambiguous``) the value depends on round-off — use ``balance_gap``.
    """
    point = bundle.check_point(point)
    if isinstance(bundle, ProductBundle):
        return tuple(gauge_drift(c, p) for c, p in zip(bundle.components, bundle._split(point)))
    dressed = bundle.dress(point)
    per_head = isinstance(bundle, HeadQK)  # every tensor has the head axis first
    diff = _sq_norm([p - q for p, q in zip(point, dressed)], per_head)
    size = _sq_norm(point, per_head)
    return (diff / size.clamp_min(_tiny(size))).sqrt()


def _sq_norm(tensors, per_head: bool) -> torch.Tensor:
    """Σ‖t‖² over the tensors, per leading (head) index when ``per_head``."""
    if per_head:
        return sum((t**2).sum(tuple(range(1, t.dim()))) for t in tensors)
    return sum((t**2).sum() for t in tensors)


def _tiny(t: torch.Tensor) -> float:
    return torch.finfo(t.dtype).tiny
