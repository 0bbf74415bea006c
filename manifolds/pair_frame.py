r"""The frame handle of the GL(r) head pairs and the formulas on their frames.

``PairFrame`` (``bundle.at(point)`` of ``HeadQK`` / ``HeadOV``) computes what several operations
share once (``manifolds.frame``); ``gl_vertical_generator`` solves for the vertical part of a
vector from its r×r products, on exact and iterative frames alike (``manifolds.frames``);
``balanced_dressing`` is the exact dressing from a spectral frame; ``signed_frame`` the frame of
a point whose columns changed sign. The formulas are those of ``manifolds.heads``' docstring.
"""

from __future__ import annotations

import torch

from .factored import FactorFrame
from .frame import Frame
from .frames import step_scale
from .iterative import WARM_TOLERANCE
from .linalg import gram, solve_in_eigenbases

__all__ = [
    "DRESSABLE_TOLERANCE",
    "PairFrame",
    "gl_vertical_generator",
    "balanced_dressing",
    "signed_frame",
    "warm_solve",
]

#: Relative eigenvalue floor of the float64 Grams below which a head cannot be dressed (a
#: relative singular value of 1e-6): the dressing's Λ^-½ would amplify round-off beyond use.
DRESSABLE_TOLERANCE = 1e-12


def gl_vertical_generator(
    metric: str, data: FactorFrame, az1: torch.Tensor, z2b: torch.Tensor, point=None
) -> torch.Tensor:
    """ξ ∈ gl(r) of the vertical part of Z from AᵀZ₁ and Z₂ᵀB (module docstring); ``point``:
    the frame's point, which a warm frame refactorises where its solve falls back."""
    if metric == "euclidean" and data.warm is not None:  # a warm frame (``warm_frame``)
        warm = data.warm
        if warm.exact is None:
            xi = warm_solve(data, az1.to(data.p.dtype) - z2b.to(data.p.dtype), point)
            if xi is not None:
                return xi
        return gl_vertical_generator(metric, warm.exact, az1, z2b)  # the exact frame's
    az1, z2b = az1.to(data.p.dtype), z2b.to(data.p.dtype)
    if metric == "euclidean" and data.sylvester is not None:  # the iterative route
        xi = data.sylvester.solve(az1 - z2b).to(az1.dtype)
        if data.u is None:  # no head fell back
            return xi
        denominator = data.lam.unsqueeze(-1) + data.mu.unsqueeze(-2)
        exact = solve_in_eigenbases(data.u, data.v, az1 - z2b, denominator)
        return torch.where(data.fallback.view(-1, 1, 1), exact, xi)
    if data.u is None:  # undamped invariant metric: ξ = ½[P⁻¹AᵀZ₁ − Z₂ᵀBQ⁻¹] (closed form;
        # on heads the frame had to damp, the same formula with the damped inverses)
        return 0.5 * (data.inv_p @ az1 - z2b @ data.inv_q)
    lam, mu = data.lam.unsqueeze(-1), data.mu.unsqueeze(-2)
    if metric == "euclidean":
        rhs, denominator = az1 - z2b, lam + mu
    else:
        eye = torch.eye(lam.shape[-2], dtype=lam.dtype, device=lam.device)
        q_damped = data.q + data.damp_q.unsqueeze(-1) * eye
        p_damped = data.p + data.damp_p.unsqueeze(-1) * eye
        rhs = az1 @ q_damped - p_damped @ z2b
        dq, dp = data.damp_q.unsqueeze(-1), data.damp_p.unsqueeze(-1)
        denominator = 2 * lam * mu + lam * dq + dp * mu
    return solve_in_eigenbases(data.u, data.v, rhs, denominator)


def warm_solve(data: FactorFrame, rhs: torch.Tensor, point) -> torch.Tensor | None:
    """ξ with Pξ + ξQ = rhs on a warm frame by its solver — or None where, on the CPU (where
    reading the residual costs nothing), some head's relative residual still exceeds
    ``WARM_TOLERANCE`` (what the step needs: an inexact solve errs only along the orbit), or the
    exact solve's own round-off 8·eps·κ if larger (κ = (λmax + μmax)/(λmin + μmin) estimated on
    the bases), after the solver's further rounds (``WARM_ROUNDS``): the
    frame's exact factorisation at ``point`` is then computed once (``warm.exact``; the frame
    keeps no reference to its point), and this solve and every later one on the frame use it,
    as does the next frame (``GeneralLinearPair.frame_basis``). A result depends on the frame
    and ``rhs`` alone, whatever was solved on the frame before."""
    warm = data.warm
    if warm.u.device.type != "cpu":
        return warm.solve(rhs)[0]
    (diag_p, diag_q), eps = warm.diagonals, torch.finfo(warm.u.dtype).eps
    condition = (diag_p.amax(-1) + diag_q.amax(-1)) / (diag_p.amin(-1) + diag_q.amin(-1))
    floor = WARM_TOLERANCE.get(warm.u.dtype, WARM_TOLERANCE[torch.float32])
    tolerance = torch.clamp(8 * eps * condition, min=floor)
    xi, relative = warm.solve(rhs, tolerance)
    bad = ~(relative <= tolerance)  # NaN: bad
    if not bool(bad.any()):
        return xi
    warm.exact = warm.refactorise(point)
    return None


def balanced_dressing(data: FactorFrame):
    """(u, u⁻ᵀ, S, dressable) of the balanced section, signs not yet fixed; heads that are not
    dressable (singular Grams) get u = u⁻ᵀ = I."""
    lam, mu = data.lam, data.mu
    floor_p = DRESSABLE_TOLERANCE * lam[..., -1:].abs()
    floor_q = DRESSABLE_TOLERANCE * mu[..., -1:].abs()
    dressable = (lam[..., :1] > floor_p).squeeze(-1) & (mu[..., :1] > floor_q).squeeze(-1)
    ok = dressable.view(-1, 1)
    root_p = torch.where(ok, lam, 1.0).sqrt()
    root_q = torch.where(ok, mu, 1.0).sqrt()
    core = (data.u.mT * root_p.unsqueeze(-1)) @ (data.v * root_q.unsqueeze(-2))  # R_A R_Bᵀ
    left, s, right_h = torch.linalg.svd(core)
    half = s.sqrt().unsqueeze(-2)
    u = (data.u / root_p.unsqueeze(-2)) @ (left * half)
    u_inv_t = (data.v / root_q.unsqueeze(-2)) @ (right_h.mT * half)
    eye = torch.eye(lam.shape[-1], dtype=lam.dtype, device=lam.device)
    keep = ok.unsqueeze(-1)
    return torch.where(keep, u, eye), torch.where(keep, u_inv_t, eye), s, dressable


def signed_frame(data: FactorFrame, signs: torch.Tensor) -> FactorFrame:
    """The frame of p·D for a diagonal D of ±1 (H, r, r): Grams and inverses conjugated,
    square-root factors and eigenvectors multiplied on the left (eigenvalues unchanged).
    Where ``signs`` is not such a diagonal the result is meaningless (callers discard it)."""
    d = signs.to(data.p.dtype)

    def conj(x):
        return None if x is None else d.mT @ x @ d

    def left(x):
        return None if x is None else d.mT @ x

    return data._replace(
        p=conj(data.p),
        q=conj(data.q),
        inv_p=conj(data.inv_p),
        inv_q=conj(data.inv_q),
        root_p=left(data.root_p),
        root_q=left(data.root_q),
        u=left(data.u),
        v=left(data.v),
    )


class PairFrame(Frame):
    """The frame handle of a GL(r) head pair (``manifolds.frame``): the projection, step bound,
    decay and retraction of a step in one pass that reuses the projection's r×r products."""

    __slots__ = ()

    def descend(self, direction, lr: float, weight_decay: float, project: bool = True):
        bundle = self.bundle
        if not project:
            return super().descend(direction, lr, weight_decay, project)
        f = self.data
        a, b = bundle.factors(self.point)
        z1, z2 = bundle.factors(tuple(direction))
        az1, z2b = bundle.row_sums(a.mT @ z1, z2.mT @ b)
        xi = gl_vertical_generator(bundle.metric, f, az1, z2b, self.point)
        x = xi.to(a.dtype)
        h1, h2 = torch.baddbmm(z1, a, x, alpha=-1), torch.baddbmm(z2, b, x.mT)  # P_H(Z)
        if bundle.metric == "euclidean":
            scale = -lr
        else:  # the bound on V = −lr·H, with AᵀH₁ = AᵀZ₁ − Pξ and BᵀH₂ = BᵀZ₂ + Qξᵀ
            work = f.p.dtype
            hh1, hh2 = (t.to(work) for t in bundle.row_sums(gram(h1), gram(h2)))
            ah1 = az1.to(work) - f.p @ xi
            bh2 = z2b.mT.to(work) + f.q @ xi.mT
            s = step_scale(f, lr * lr * hh1, lr * lr * hh2, -lr * ah1, -lr * bh2)
            scale = (-lr * s).to(a.dtype).view(-1, 1, 1)
        # √(1 − lr·wd)·p + scale·h, written into h (this step's own): decay on the invariants
        # (M ↦ (1 − lr·wd)M, ``decay_multiplier``) and the step in two passes, no new tensor
        root = bundle.decay_multiplier(1 - lr * weight_decay)
        return tuple(
            h.mul_(scale).add_(p, alpha=root)
            for p, h in zip(self.point, bundle.from_factors(h1, h2))
        )
