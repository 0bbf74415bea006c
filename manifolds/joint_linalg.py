r"""Kernels of the joint O(d) × GL(r) projection (``manifolds.joint``): stacked head factors
with their metric and Sylvester solves, and the two solvers of the Schur system on so(d).

``HeadStack`` holds the factors A, B (N, d, r) of every head of one r and reuses one ``eigh`` of
AᵀA and of BᵀB for every solve at a point. ``solve_direct`` forms the Schur operator on the
basis E_ij − E_ji and applies its pseudo-inverse (eigenvalues below 8·n·eps·max dropped: the
stabiliser); ``solve_cg`` runs preconditioned conjugate gradients to a backward-error bound,
‖r‖ ≤ tol·max(‖b‖, ‖V_O‖·‖Z‖).
"""

from __future__ import annotations

import torch

from .linalg import gram, sym

__all__ = ["HeadStack", "JointFrame", "skew_basis", "spectral_solve", "solve_direct", "solve_cg"]


def skew_basis(d: int, dtype=None, device=None) -> torch.Tensor:
    """E_ij − E_ji for i < j, stacked: (d(d−1)/2, d, d)."""
    i, j = torch.triu_indices(d, d, offset=1, device=device)
    rows = torch.arange(i.numel(), device=device)
    basis = torch.zeros((i.numel(), d, d), dtype=dtype, device=device)
    basis[rows, i, j], basis[rows, j, i] = 1.0, -1.0
    return basis


def spectral_solve(evals_l, u, evals_r, v, c, scale):
    """U[(Uᵀ c V) ⊘ (λᵢ + μⱼ)]Vᵀ / scale, zero where λᵢ + μⱼ vanishes (minimum norm)."""
    den = evals_l.unsqueeze(-1) + evals_r.unsqueeze(-2)
    tiny = den.abs().amax(dim=(-2, -1), keepdim=True) * torch.finfo(den.dtype).eps * 64
    safe = torch.where(den > tiny, den, torch.ones_like(den))
    core = torch.where(den > tiny, (u.mT @ c @ v) / safe, torch.zeros_like(safe))
    return u @ core @ v.mT / scale


class HeadStack:
    """The stacked factors (N, d, r) of every head of one r, with the metric and L_h⁻¹."""

    def __init__(self, a, b, metric):
        self.a, self.b = a, b
        if metric == "invariant":
            self.wa, self.wb = gram(a), gram(b)
        else:
            self.wa = self.wb = None
        self.spec_a = torch.linalg.eigh(gram(a))
        self.spec_b = torch.linalg.eigh(gram(b))

    def metric(self, z1, z2):
        """G Z = (Z₁ W_B, Z₂ W_A)."""
        return (z1, z2) if self.wa is None else (z1 @ self.wb, z2 @ self.wa)

    def adjoint(self, z1, z2):
        """V_h* Z = Aᵀ(Z₁W_B) − (Z₂W_A)ᵀB."""
        g1, g2 = self.metric(z1, z2)
        return self.a.mT @ g1 - g2.mT @ self.b

    def solve(self, c):
        """L_h⁻¹ c: Sylvester (Euclidean) or ½ (AᵀA)⁻¹ c (BᵀB)⁻¹ (invariant)."""
        (la, ua), (lb, ub) = self.spec_a, self.spec_b
        if self.wa is None:
            return spectral_solve(la, ua, lb, ub, c, 1.0)
        return 0.5 * (ua / la.unsqueeze(-2)) @ ua.mT @ c @ (ub / lb.unsqueeze(-2)) @ ub.mT

    def horizontal(self, z1, z2):
        """(I − P_h) Z and ξ, for Z of shape (..., N, d, r)."""
        xi = self.solve(self.adjoint(z1, z2))
        return (z1 - self.a @ xi, z2 + self.b @ xi.mT), xi

    def rotate(self, omega):
        """V_O(Ω) on the factors: (−ΩA, −ΩB), Ω (..., d, d) → (..., N, d, r)."""
        om = omega.unsqueeze(-3)
        return -(om @ self.a), -(om @ self.b)

    def cross(self, z1, z2):
        """Σ_N A (Z₁W_B)ᵀ + B (Z₂W_A)ᵀ (the head part of Σ T̂ᵀ(GZ)^), (..., d, d)."""
        g1, g2 = self.metric(z1, z2)
        return (self.a @ g1.mT + self.b @ g2.mT).sum(-3)


class JointFrame:
    """What ``JointBundle.factorise`` returns: reused by every projection at one point."""

    def __init__(self, blocks, rows, c_other, spectrum):
        self.blocks, self.rows, self.c_other, self.spectrum = blocks, rows, c_other, spectrum


def solve_direct(schur, rhs, basis):
    """Ω with S Ω = rhs by the pseudo-inverse of S on ``basis`` (n, d, d) of so(d)."""
    if basis.shape[0] == 0:
        return torch.zeros_like(rhs), {"method": "direct", "iterations": 0, "residual": 0.0}
    flat = basis.flatten(1)  # (n, d²)
    matrix = sym(flat @ schur(basis).flatten(1).mT)  # ⟨E_k, S E_l⟩
    evals, evecs = torch.linalg.eigh(matrix)
    keep = evals > evals.abs().max() * torch.finfo(evals.dtype).eps * matrix.shape[0] * 8
    coef = (evecs.mT @ (basis * rhs).sum((-2, -1))) / torch.where(
        keep, evals, torch.ones_like(evals)
    )
    coef = evecs @ torch.where(keep, coef, torch.zeros_like(coef))
    omega = (coef @ flat).reshape(rhs.shape)
    return omega, {"method": "direct", "iterations": 0, "residual": 0.0}


def solve_cg(schur, precondition, rhs, tol: float, max_iterations: int, scale=0.0):
    """Preconditioned conjugate gradients for S Ω = rhs on skew matrices (Frobenius inner
    product), from Ω = 0, until ‖r‖ ≤ tol·max(‖rhs‖, ``scale``) or ``max_iterations``.

    ``scale`` bounds ‖rhs‖ by the size of the data it was computed from (‖V_O‖·‖Z‖), so the
    stop is a backward-error test: a right-hand side at round-off (Z horizontal already) or
    round-off components on the stabiliser, where S is null and r cannot shrink, end the
    iteration instead of driving it into 0/0. A search direction on which S is null relative
    to the preconditioner (p·Sp ≤ eps·r·z: p on the stabiliser, a step α > 1/eps) ends it
    too, with that step not taken. One host
    synchronisation per iteration (the stopping test)."""
    x, res = torch.zeros_like(rhs), rhs.clone()
    norm_b = rhs.norm()
    ref = torch.maximum(norm_b, torch.as_tensor(scale, dtype=rhs.dtype, device=rhs.device))
    z = precondition(res)
    p, rz = z, (res * z).sum()
    eps = torch.finfo(rhs.dtype).eps
    its, (rel, stop) = 0, _progress(norm_b, ref, tol, torch.ones_like(norm_b, dtype=torch.bool))
    while not stop and its < max_iterations:
        its += 1
        sp = schur(p)
        curvature = (p * sp).sum()
        ok = curvature > eps * rz  # α = rz/p·Sp ≤ 1/eps: S and the preconditioner agree on p
        alpha = torch.where(ok, rz / torch.where(ok, curvature, torch.ones_like(curvature)), 0.0)
        x, res = x + alpha * p, res - alpha * sp
        norm_r = res.norm()
        rel, stop = _progress(norm_r, ref, tol, ok)
        if stop:
            break
        z = precondition(res)
        rz_new = (res * z).sum()
        beta = torch.where(rz > 0, rz_new / torch.where(rz > 0, rz, torch.ones_like(rz)), 0.0)
        p, rz = z + beta * p, rz_new
    return x, {"method": "cg", "iterations": its, "residual": rel, "tol": tol}


def _progress(norm_r, ref, tol: float, ok):
    """(‖r‖/ref as a float, whether to stop: converged or not ``ok``), one synchronisation."""
    ratio = norm_r / torch.where(ref > 0, ref, torch.ones_like(ref))
    go = ok & (ratio > tol)
    rel, go = torch.stack((ratio, go.to(ratio.dtype))).tolist()
    return rel, not go


def solve_schur(
    schur, rhs, spectrum, direct_d: int | None, cg_tol, max_iterations: int, norm_z=0.0
):
    """(ω, report) solving S(ω) = rhs for the Schur complement ``schur`` on the O(d) generator:
    formed on the basis E_ij − E_ji of so(``direct_d``) and pseudo-inverted, or (``direct_d``
    None) conjugate gradients preconditioned by the rotation block alone, whose
    eigendecomposition is ``spectrum`` (tolerance ``cg_tol``, default 1e-13 in float64 and 1e-6
    otherwise, relative to max(‖rhs‖, ‖V_O‖·``norm_z``), ``norm_z`` the metric norm of the
    projected vector and ‖V_O‖² ≤ λ_max(C))."""
    if direct_d is not None:
        return solve_direct(schur, rhs, skew_basis(direct_d, rhs.dtype, rhs.device))
    lam, u = spectrum
    tol = cg_tol or (1e-13 if rhs.dtype == torch.float64 else 1e-6)
    precondition = lambda k: spectral_solve(lam, u, lam, u, 2 * k, 1.0)  # noqa: E731
    scale = lam[..., -1].clamp(min=0).sqrt() * norm_z
    return solve_cg(schur, precondition, rhs, tol, max_iterations, scale)
