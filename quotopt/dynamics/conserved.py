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

**Gauge coordinates.** ``gauge_drift`` is the relative Euclidean distance between the
representative p and the canonical representative dress(p) of its own orbit (the one point where
the orbit meets the dressed section); it is zero exactly on the section. ``balance_gap`` is a
smooth, dressing-free alternative — the bundle's own ``balance_gap``: per head the norm of the
bundle's moment map relative to the same projection of AᵀA + BᵀB (for GL(r)
‖AᵀA − BᵀB‖_F / ‖AᵀA + BᵀB‖_F, which vanishes exactly on the balanced set dress(p)·O(r); for a
subgroup such as the RoPE commutant the projection of AᵀA − BᵀB onto its Lie algebra). It is
unchanged by the compact part of G and by scaling p, and does not jump where the dressing is
ambiguous (equal singular values), unlike ``gauge_drift``. For ``ResidualRotation`` the analogue
is ‖offdiag C‖_F / ‖C‖_F (zero when the frame diagonalises C, as the dressing does).
"""

from __future__ import annotations

import torch

from manifolds import Bundle

__all__ = ["head_imbalance", "balance_gap", "gauge_drift"]


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
    themselves. Conserved by Euclidean gradient flow of any GL(r)-invariant loss."""
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
