r"""Conserved quantities of gradient flow and the distance of a representative from its gauge.

**Noether charges of GL(r).** Per head write the point as factors (A, B) (``bundle.factors``:
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

**Gauge coordinates.** The section of a GL(r) head bundle is the set of *balanced* points
(AᵀA = BᵀB, the zero set of the moment map); an orbit meets it in dress(p)·O(r), one point up
to the compact stabiliser O(r). Which point of that circle the dressing names (the diagonalising
basis, the sign rule) costs nothing and no optimiser controls it, so a gauge coordinate that
counts it says little. Three coordinates, from the most to the least informative:

* ``section_distance``: min over K in the compact stabiliser of ‖p − dress(p)·K‖ / ‖p‖, the
  relative Euclidean distance from p to the nearest balanced representative of its own orbit.
  For GL(r) heads K ranges over O(r) and the minimum is orthogonal Procrustes: with X = [A; B]
  and X₀ = [A₀; B₀] the factors of p and of dress(p) stacked, K = UVᵀ for X₀ᵀX = UΣVᵀ. It is
  zero exactly on the section, in the units of the parameters, and unaffected by the
  dressing's ambiguity (equal singular values pick another K, not another set).
* ``balance_gap``: the bundle's own ``balance_gap``, per head the norm of the moment map
  relative to the same projection of AᵀA + BᵀB (for GL(r) ‖AᵀA − BᵀB‖_F / ‖AᵀA + BᵀB‖_F). It
  vanishes on the same set, needs no dressing, is smooth, and exists for every bundle (the
  RoPE commutant: the projection onto its Lie algebra; ``ResidualRotation``: ‖offdiag C‖_F /
  ‖C‖_F). Scale-free, in [0, 1].
* ``gauge_drift``: ‖p − dress(p)‖ / ‖p‖, the distance to the one canonical point. It counts the
  rotation inside the section: a balanced point rotated by K ∈ O(r) has a drift of order one.
  It shows where the dressing would move the point, not how far it is from the section.

Theory: ``docs/theory/dressing.md`` (the balanced section and its ambiguity).
"""

from __future__ import annotations

import torch

from manifolds import Bundle

__all__ = ["balance_gap", "gauge_drift", "head_imbalance", "section_distance"]


def _head_factors(bundle: Bundle, point, what: str):
    try:
        return bundle.factors(bundle.check_point(point))
    except NotImplementedError:
        raise ValueError(
            f"{what} is defined for factored head bundles (HeadQK, HeadOV, RotaryQK, "
            f"PositiveRescaling), got {bundle!r}; apply it to each head component of a "
            "ProductBundle"
        ) from None


def head_imbalance(bundle: Bundle, point, *, matrices: bool = False) -> torch.Tensor:
    """Per head ‖AᵀA − BᵀB‖_F, shape (H,) — ‖W_qᵀW_q − W_kᵀW_k‖ for ``HeadQK``,
    ‖W_vᵀW_v − W_o W_oᵀ‖ for ``HeadOV``; with ``matrices=True`` the (H, r, r) matrices
    themselves. Conserved by Euclidean gradient flow of any GL(r)-invariant loss for GL(r)
    heads; for a smaller group (``RotaryQK``'s commutant, ``PositiveRescaling`` of degree k,
    whose conserved charge is ‖a‖² − k‖b‖²) only its projection onto the group's Lie algebra
    is conserved: ``bundle.moment_map``."""
    a, b = _head_factors(bundle, point, "head_imbalance")
    diff = a.mT @ a - b.mT @ b  # (H, r, r)
    return diff if matrices else torch.linalg.matrix_norm(diff)


def balance_gap(bundle: Bundle, point):
    """Relative distance from the balanced/diagonal section, independent of the dressing
    (``bundle.balance_gap``): heads (H,) in [0, 1]; ``ResidualRotation`` a scalar;
    ``ProductBundle`` a tuple, one entry per component."""
    return bundle.balance_gap(point)


def gauge_drift(bundle: Bundle, point):
    """Relative distance ‖p − dress(p)‖ / ‖p‖ of the representative from its dressed one
    (``bundle.gauge_drift``): heads (H,), a scalar for bundles without heads, a tuple per
    component of a ``ProductBundle``. Raises the bundle's ``ValueError`` where the dressing is
    undefined (rank drop); where it is ambiguous the value depends on round-off — use
    ``balance_gap``."""
    return bundle.gauge_drift(point)


def section_distance(bundle: Bundle, point) -> torch.Tensor:
    """Per head min over K in the compact stabiliser of ‖p − dress(p)·K‖ / ‖p‖, shape (H,):
    the relative distance to the nearest balanced point of the orbit (module docstring).

    K ranges over O(r) for GL(r) heads (``compact_dim`` = H·r(r−1)/2, r ≥ 2: orthogonal
    Procrustes) and is the identity where the compact part is trivial (``compact_dim`` 0:
    positive rescaling, r = 1). Other factored bundles (the RoPE commutant) raise
    ``ValueError``: use ``balance_gap``. A rank drop raises the bundle's ``ValueError``."""
    a, b = _head_factors(bundle, point, "section_distance")
    a0, b0 = bundle.factors(bundle.dress(bundle.check_point(point)))
    heads, r = a.shape[0], a.shape[-1]
    x, x0 = torch.cat([a, b], dim=-2), torch.cat([a0, b0], dim=-2)  # (H, rows, r)
    if r > 1 and bundle.compact_dim == heads * r * (r - 1) // 2:  # K ∈ O(r) per head
        u, _, vh = torch.linalg.svd(x0.mT @ x)  # (H, r, r)
        x0 = x0 @ (u @ vh)
    elif bundle.compact_dim != 0:
        raise ValueError(
            f"section_distance knows the compact stabilisers O(r) and {{1}}, not that of "
            f"{bundle!r}; use balance_gap"
        )
    diff = (x - x0).square().sum(dim=(-2, -1))
    size = x.square().sum(dim=(-2, -1))
    return (diff / size.clamp_min(torch.finfo(size.dtype).tiny)).sqrt()
