r"""Refinement to a critical point without forming the Hessian: inexact Newton–MINRES.

``refine.refine_critical_point`` forms the dense Hessian, which costs n² memory. Above the
dense size the same Newton system on the complement of the level orbit directions,

    (P H P) s = −P ∇F,        P = I − U Uᵀ   (U an orthonormal basis of the level span),

is solved by MINRES (Paige & Saunders, SIAM J. Numer. Anal. 1975) from Hessian–vector
products alone, so memory is O(n·k) for k level directions. MINRES suits the system: H may
be indefinite away from a minimum, and P H P is singular on span U but the right side lies in
range P, so the system is consistent and every Krylov vector stays horizontal. The solve is
inexact (Dembo, Eisenstat & Steihaug, SIAM J. Numer. Anal. 1982): relative residual

    η_k = min(10⁻¹, √ρ_k),    ρ_k = ‖∇F_k‖ / (max|λ(PHP)|·‖θ_k‖),

which tends to zero with the scale-free gradient ρ_k and so keeps convergence superlinear,
while far-off steps stay cheap.

Globalisation: the dense route's test first, the step when it reduces ‖∇F‖ by the Armijo
factor (1 − 10⁻⁴ t), halving t; where that fails (the dense route's trust region needs the
eigendecomposition this route does not have) Armijo on F along the step when it descends F,
else along −P∇F. The stopping rule is the dense route's, ‖∇F‖ ≤ ``rel_tol``·max|λ(PHP)|·‖θ‖,
with max|λ| from Lanczos to relative accuracy 10⁻³ (warm-started at the previous iterate's top
eigenvector).

Cost: one HVP (about two gradients) per MINRES iteration, and MINRES needs O(√κ) of them for
a Hessian of condition κ on the complement. Counted on the λ = 10⁻² teacher regression at
2,368 parameters (κ ≈ 5·10⁶; ``critical.SETTINGS["regression-teacher-decay-wide"]``): this
route reaches relative ‖∇F‖ 1e-13 in 2 Newton steps and 3,803 products, the dense route in 3
steps and 4 Hessians, 9,472 products. The dense route's products are batched 256 at a time
(``dense_hessian``), this route's are one at a time, so below the dense limit the dense route
is usually the faster one in wall time; this one is for where n² does not fit.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
from scipy.sparse.linalg import ArpackNoConvergence, eigsh
from torch.nn.attention import SDPBackend, sdpa_kernel

from .hessian import _GradientGraph, as_linear_operator, flatten
from .refine import Refined, _as_basis, _line_search, _value_and_gradient, orthonormal_basis

__all__ = ["refine_critical_point_krylov", "minres", "hessian_residuals"]


class _ProjectedHessian:
    """P H P at one point as a scipy operator on float64 numpy vectors, counting products."""

    def __init__(self, objective, params, basis: torch.Tensor):
        self.graph = _GradientGraph(objective, params)
        self.basis, self.products = basis, 0
        self.operator = as_linear_operator(self.apply, self.graph.grad)

    def project(self, v: torch.Tensor) -> torch.Tensor:
        return v - self.basis @ (self.basis.mT @ v) if self.basis.shape[1] else v

    def top(self, start: np.ndarray | None) -> tuple[float, np.ndarray]:
        """max|λ| to relative accuracy 1e-3 and its eigenvector (Lanczos, ARPACK)."""
        n = self.graph.n
        v0 = np.random.default_rng(0).standard_normal(n) if start is None else start
        try:
            values, vectors = eigsh(self.operator, k=1, which="LM", tol=1e-3, v0=v0)
        except ArpackNoConvergence as err:  # the best Ritz pair so far is accurate enough
            if not len(err.eigenvalues):
                raise
            values, vectors = err.eigenvalues, err.eigenvectors
        return float(abs(values[0])), vectors[:, 0]

    def apply(self, v: torch.Tensor) -> torch.Tensor:
        self.products += 1
        return self.project(self.graph.matvec(self.project(v)).detach())

    def solve(self, rhs: torch.Tensor, rtol: float, maxiter: int) -> torch.Tensor:
        return self.project(minres(self.apply, rhs, rtol, maxiter))


def minres(matvec: Callable, b: torch.Tensor, rtol: float, maxiter: int) -> torch.Tensor:
    """x with ‖b − A x‖ ≤ ``rtol``·‖b‖ for symmetric A (``matvec``), by MINRES (Paige &
    Saunders 1975) within ``maxiter`` products of A in all.

    A relative test on the true ‖r‖/‖b‖, not scipy's backward-error test ‖r‖/(‖A‖‖x‖ + ‖b‖),
    which stops far too early at large ‖A‖‖A⁻¹‖. In floating point MINRES's recurrence for
    ‖r‖ drifts from the true residual (by up to ε·κ(A)² relative, Sleijpen, van der Vorst &
    Modersitzki 2000), so the true residual is checked at the end of each pass and a pass
    restarted on it (iterative refinement) until it is met or the products are spent."""
    x, spent = torch.zeros_like(b), 0
    target = rtol * float(b.norm())
    residual = b
    while spent < maxiter:
        if float(residual.norm()) <= target:
            break
        correction, used = _minres_pass(matvec, residual, target, maxiter - spent)
        x, spent = x + correction, spent + used + 1
        residual = b - matvec(x)
    return x


def _minres_pass(matvec, b, target, maxiter):
    """One MINRES pass from x = 0 until the recurrence residual |β₁ s₁ ⋯ sₖ| ≤ ``target``:
    Lanczos on A from b, the tridiagonal Tₖ reduced by Givens rotations, x updated along the
    directions dₖ = (vₖ − δₖ dₖ₋₁ − εₖ dₖ₋₂)/γₖ. Stops at a Lanczos breakdown (βₖ₊₁ = 0:
    the Krylov space is invariant, x exact). (x, products used)."""
    x = torch.zeros_like(b)
    eta = float(b.norm())
    v_prev, v, beta_k = torch.zeros_like(b), b / eta, 0.0
    d_prev2, d_prev = torch.zeros_like(b), torch.zeros_like(b)
    c_prev2, s_prev2, c_prev, s_prev = 1.0, 0.0, 1.0, 0.0
    for used in range(1, maxiter + 1):
        w = matvec(v) - beta_k * v_prev
        alpha = float(v @ w)
        w = w - alpha * v
        beta_next = float(w.norm())
        epsilon, delta_bar = s_prev2 * beta_k, c_prev2 * beta_k  # rotation k − 2
        delta = c_prev * delta_bar + s_prev * alpha  # rotation k − 1
        gamma_bar = -s_prev * delta_bar + c_prev * alpha
        gamma = math.hypot(gamma_bar, beta_next)  # rotation k zeroes β_{k+1}
        if gamma == 0.0:
            return x, used
        c, s = gamma_bar / gamma, beta_next / gamma
        d = (v - delta * d_prev - epsilon * d_prev2) / gamma
        x = x + (c * eta) * d
        eta = -s * eta
        if abs(eta) <= target or beta_next == 0.0:
            return x, used
        v_prev, v, beta_k = v, w / beta_next, beta_next
        d_prev2, d_prev = d_prev, d
        c_prev2, s_prev2, c_prev, s_prev = c_prev, s_prev, c, s
    return x, maxiter


def refine_critical_point_krylov(
    objective: Callable[..., torch.Tensor],
    params,
    level=None,
    *,
    rel_tol: float = 1e-12,
    max_steps: int = 30,
    max_iterations: int | None = None,
) -> Refined:
    """Inexact Newton–MINRES steps on the complement of the level directions until ‖∇F‖ is
    at round-off (the module docstring); the arguments and result as in
    ``refine.refine_critical_point`` (``hessian`` is None: none is formed; ``products``
    counts every Hessian–vector product, Lanczos's included).

    ``max_iterations``: most MINRES iterations (Hessian–vector products) per Newton step
    (default 10·n).
    """
    params = tuple(p.detach().clone() for p in params)
    if rel_tol <= 0 or max_steps < 0 or (max_iterations is not None and max_iterations < 1):
        raise ValueError(
            f"rel_tol must be > 0, max_steps >= 0 and max_iterations >= 1, got "
            f"rel_tol={rel_tol}, max_steps={max_steps}, max_iterations={max_iterations}"
        )
    value, grad = _value_and_gradient(objective, params)
    n = grad.numel()
    maxiter = 10 * n if max_iterations is None else max_iterations
    history, steps, products, top = [float(grad.norm())], 0, 0, None
    best = (history[0], params, math.inf)
    while True:
        basis = orthonormal_basis(_as_basis(level, params), n, grad)
        with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels: no double backward
            hessian = _ProjectedHessian(objective, params, basis)
            scale, top = hessian.top(top)
            rel = history[-1] / max(scale * float(flatten(params).norm()), 1e-300)
            if history[-1] <= best[0]:
                best = (history[-1], params, rel)
            if rel <= rel_tol or steps >= max_steps:
                products += hessian.products
                break
            horizontal = hessian.project(grad)
            step = hessian.solve(-horizontal, min(0.1, math.sqrt(rel)), maxiter)
            products += hessian.products
        accepted = _line_search(objective, params, value, grad, step, False)
        if accepted is None and float(grad @ step) < 0:
            accepted = _line_search(objective, params, value, grad, step, True)
        if accepted is None:
            accepted = _line_search(objective, params, value, grad, -horizontal, True)
        if accepted is None:
            break
        (params, value, grad), steps = accepted, steps + 1
        history.append(float(grad.norm()))
    norm, params, rel = best
    return Refined(params, norm, rel, history, rel <= rel_tol, steps, None, products)


def hessian_residuals(objective, params, directions: torch.Tensor, scale: float) -> dict:
    """For every column v of ``directions`` (n, k): the Rayleigh quotient vᵀHv/(s‖v‖²) and the
    residual ‖Hv‖/(s‖v‖), s = ``scale`` (max|λ(H)|), from k Hessian–vector products at
    ``params`` (vectorised over the columns). Along a level orbit's tangents at a critical point
    both are at round-off; a Rayleigh quotient alone can vanish where Hv does not."""
    if directions.shape[1] == 0:
        empty = directions.new_zeros(0)
        return dict(rayleigh=empty, residual=empty)
    with sdpa_kernel(SDPBackend.MATH):
        graph = _GradientGraph(objective, params)
        hv = torch.cat([graph.matmat(chunk.mT).detach().mT for chunk in directions.split(64, 1)], 1)
    squared = (directions * directions).sum(0)
    return dict(
        rayleigh=(directions * hv).sum(0) / squared / scale,
        residual=hv.norm(dim=0) / squared.sqrt() / scale,
    )
