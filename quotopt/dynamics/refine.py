r"""True critical points before counting flat directions (docs/theory/flat-directions.md).

For f invariant, Hess f(p)[v_ξ, v_ξ] = −⟨∇f(p), p·ξ²⟩: vertical curvature is O(‖∇F‖), so flat
directions counted at a point that is only near-critical measure the tolerance, not the
geometry. ``refine_critical_point`` first drives ‖∇F‖ to round-off by Newton steps:

    s = −Q (QᵀHQ)⁺ Qᵀ∇F,      θ ← θ + t·s,

with H the dense float64 Hessian, Q an orthonormal basis of the Euclidean complement of the
*level* orbit directions (those along which F is constant: the whole vertical space when F is
invariant, only the compact subgroup's — O(d), O(r) per head pair, none for rescaling — under
L2 weight decay) and the pseudo-inverse dropping eigenvalues below ``rcond``·max|λ(H)|. The
full step (t = 1) is taken when it reduces ‖∇F‖ by the Armijo factor (1 − 10⁻⁴): quadratic
convergence near the critical point. Otherwise (far from it, or at negative curvature) the step
is a trust-region step on the same quadratic model (Nocedal & Wright 2006, ch. 4): s =
−Σ gᵢ/(λᵢ + μ) vᵢ in the eigenbasis of QᵀHQ, μ ≥ max(0, −λ_min) chosen so that ‖s‖ is the
radius, accepted when F falls by more than 10⁻⁴ of the predicted decrease, the radius adapted
by that ratio (retries reuse the eigendecomposition). It descends F, escapes saddles along
negative curvature and never jumps far along nearly flat directions. Restricting to Q keeps
the step off the exactly flat orbit (where the Newton system is singular); the level
directions are recomputed at every iterate.

Stopping rule (the relative gradient): ‖∇F‖ ≤ ``rel_tol`` · max|λ(H)| · ‖θ‖, i.e. the gradient
is below what the curvature produces over the point's own scale.

``critical_point_counts`` then counts at the refined point: ``flat_total`` (|λ(H)| ≤ tol ·
max|λ|), ``flat_horizontal`` (the same for QᵀHQ, Q the complement of the level directions),
``expected_flat`` (their rank) and the counts over a ladder of tolerances. At a critical point
with no accidental degeneracy: flat_total = expected_flat and flat_horizontal = 0.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..groups import group_point, write_point
from .flat import flat_directions, widest_gap
from .hessian import dense_hessian, flatten, unflatten

__all__ = [
    "Refined",
    "refine_critical_point",
    "critical_point_counts",
    "model_objective",
    "model_orbit_basis",
    "orthonormal_basis",
    "TOLERANCES",
]

#: The tolerance ladder of ``critical_point_counts`` (relative to max|λ(H)|).
TOLERANCES = tuple(10.0**-k for k in range(4, 14))


@dataclasses.dataclass
class Refined:
    """A refined point: ``params`` (the iterate of smallest ‖∇F‖), ``grad_norm`` its ‖∇F‖,
    ``grad_rel`` ‖∇F‖ / (max|λ(H)|·‖θ‖), ``history`` of ‖∇F‖ per iterate (the first is the
    input's), ``converged`` (grad_rel ≤ rel_tol), ``steps`` (Newton steps taken),
    ``hessian`` (the dense Hessian at ``params``, for ``critical_point_counts``),
    ``products`` (Hessian–vector products spent: n per dense Hessian formed)."""

    params: tuple[torch.Tensor, ...]
    grad_norm: float
    grad_rel: float
    history: list[float]
    converged: bool
    steps: int
    hessian: torch.Tensor | None = None  # the dense Hessian at ``params``
    products: int = 0

    def summary(self) -> dict:
        """JSON-ready fields (no tensors)."""
        fields = ("grad_norm", "grad_rel", "history", "converged", "steps", "products")
        return {k: getattr(self, k) for k in fields}


def _hessian(objective, params, max_params) -> torch.Tensor:
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU attention kernels have no double backward
        return dense_hessian(objective, params, max_params=max_params)


def _value_and_gradient(objective, params) -> tuple[float, torch.Tensor]:
    leaves = tuple(p.detach().clone().requires_grad_(True) for p in params)
    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        value = objective(*leaves)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    grad = flatten([torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves)])
    return float(value.detach()), grad


def _svd_rank(s: torch.Tensor, shape) -> int:
    """Numerical rank from singular values ``s`` of a matrix of ``shape`` (LAPACK's rule)."""
    return int((s > s[0] * max(shape) * torch.finfo(s.dtype).eps).sum()) if s.numel() else 0


def _complement(directions: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the Euclidean complement of the columns' span (rank by SVD)."""
    eye = torch.eye(n, dtype=like.dtype, device=like.device)
    if directions is None or directions.shape[1] == 0:
        return eye
    u, s, _ = torch.linalg.svd(directions.to(like.dtype), full_matrices=True)
    return u[:, _svd_rank(s, directions.shape) :]


def orthonormal_basis(directions: torch.Tensor | None, n: int, like: torch.Tensor):
    """(n, rank) orthonormal basis of the columns' span (rank by SVD), (n, 0) for none."""
    if directions is None or directions.shape[1] == 0:
        return like.new_zeros(n, 0)
    u, s, _ = torch.linalg.svd(directions.to(like.dtype), full_matrices=False)
    return u[:, : _svd_rank(s, directions.shape)]


def _newton_step(evals, evecs, q, grad, cutoff, saddle_free):
    """−Q (QᵀHQ)⁺ Qᵀ∇F, or with |λ| (saddle-free Newton, a descent direction of F)."""
    keep = evals.abs() > cutoff
    curvature = evals.abs() if saddle_free else evals
    coef = (evecs.mT @ (q.mT @ grad)) / torch.where(keep, curvature, torch.ones_like(evals))
    return -(q @ (evecs @ torch.where(keep, coef, torch.zeros_like(coef))))


def _trust_step(evals, g, radius):
    """argmin gᵀs + ½ Σλᵢsᵢ² over ‖s‖ ≤ radius in the eigenbasis: sᵢ = −gᵢ/(λᵢ + μ) with
    μ ≥ max(0, −λ_min) by bisection so that ‖s‖ = radius (μ = 0 when the Newton step of a
    positive definite model fits). The "hard case" (g ⟂ the lowest eigenvector) is ignored."""
    lowest = float(evals.min())
    if lowest > 0:
        newton = -g / evals
        if float(newton.norm()) <= radius:
            return newton
    lo = max(0.0, -lowest)
    hi = lo + float(g.norm()) / radius + abs(lowest) + 1e-300
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float((g / (evals + mid)).norm()) > radius:
            lo = mid
        else:
            hi = mid
    return -g / (evals + hi)


def _trust_region(objective, params, value, evals, evecs, q, grad, radius, tries=30):
    """One accepted trust-region step on the model at ``params`` (ρ = actual/predicted
    decrease of F > 10⁻⁴; the radius shrinks ×¼ when ρ < ¼, doubles when ρ > ¾ at the
    boundary), reusing the eigendecomposition for every retry. ((params, F, ∇F) | None, radius)."""
    g = evecs.mT @ (q.mT @ grad)
    for _ in range(tries):
        coef = _trust_step(evals, g, radius)
        predicted = float(g @ coef + 0.5 * (evals * coef * coef).sum())
        step = q @ (evecs @ coef)
        trial = tuple(p + s for p, s in zip(params, unflatten(step, params)))
        trial_value, trial_grad = _value_and_gradient(objective, trial)
        rho = (trial_value - value) / predicted if predicted < 0 else -1.0
        length = float(coef.norm())
        if rho < 0.25:
            radius = 0.25 * length
        elif rho > 0.75 and length >= 0.99 * radius:
            radius = 2.0 * radius
        if rho > 1e-4:
            return (trial, trial_value, trial_grad), radius
    return None, radius


def _line_search(objective, params, value, grad, step, on_value, halvings=40):
    """Halve t from 1 until ‖∇F‖ (or, ``on_value``, F) decreases by the Armijo factor."""
    norm, slope = float(grad.norm()), float(grad @ step)
    for halving in range(halvings):
        t = 0.5**halving
        trial = tuple(p + t * s for p, s in zip(params, unflatten(step, params)))
        trial_value, trial_grad = _value_and_gradient(objective, trial)
        if on_value:
            ok = trial_value <= value + 1e-4 * t * slope
        else:
            ok = float(trial_grad.norm()) <= (1 - 1e-4 * t) * norm
        if ok:
            return trial, trial_value, trial_grad
    return None


def _as_basis(level, params):
    return level(params) if callable(level) else level


def refine_critical_point(
    objective: Callable[..., torch.Tensor],
    params,
    level=None,
    *,
    rel_tol: float = 1e-12,
    max_steps: int = 30,
    rcond: float = 1e-10,
    max_params: int = 5000,
) -> Refined:
    """Newton steps on the complement of the level directions until ‖∇F‖ is at round-off.

    ``objective(*params)`` is the scalar F; ``params`` a tuple of float64 tensors; ``level``
    the (n, k) level orbit directions in ``flatten(params)`` coordinates, a callable
    params → (n, k) (recomputed at every iterate), or None (the whole space). See the module
    docstring for the step, the line search and the stopping rule.
    """
    params = tuple(p.detach().clone() for p in params)
    if rel_tol <= 0 or max_steps < 0 or rcond <= 0:
        raise ValueError(
            f"rel_tol and rcond must be > 0 and max_steps >= 0, got rel_tol={rel_tol}, "
            f"rcond={rcond}, max_steps={max_steps}"
        )
    value, grad = _value_and_gradient(objective, params)
    history, steps, rel, radius = [float(grad.norm())], 0, math.inf, None
    best, products = (history[0], params, rel, None), 0
    while True:
        hessian = _hessian(objective, params, max_params)
        products += hessian.shape[0]
        q = _complement(_as_basis(level, params), hessian.shape[0], hessian)
        evals, evecs = torch.linalg.eigh(q.mT @ hessian @ q)
        # max|λ(H)| read on the complement (by interlacing at most H's): the level
        # directions' own curvature is O(‖∇F‖), far below it near a critical point
        scale = float(evals.abs().max())
        rel = history[-1] / max(scale * float(flatten(params).norm()), 1e-300)
        if history[-1] <= best[0]:
            best = (history[-1], params, rel, hessian)
        if rel <= rel_tol or steps >= max_steps:
            break
        # a full Newton step where it reduces ‖∇F‖ (quadratic convergence near the critical
        # point); else a trust-region step on F (far from it, or at negative curvature)
        step = _newton_step(evals, evecs, q, grad, rcond * scale, False)
        accepted = _line_search(objective, params, value, grad, step, False, halvings=1)
        if accepted is None:
            if radius is None:
                radius = min(float(step.norm()), 0.1 * float(flatten(params).norm()))
            accepted, radius = _trust_region(
                objective, params, value, evals, evecs, q, grad, radius
            )
        if accepted is None:
            break
        (params, value, grad), steps = accepted, steps + 1
        history.append(float(grad.norm()))
    norm, params, rel, hessian = best  # trust-region steps descend F but may raise ‖∇F‖
    return Refined(params, norm, rel, history, rel <= rel_tol, steps, hessian, products)


def critical_point_counts(
    objective: Callable[..., torch.Tensor],
    params,
    level: torch.Tensor,
    *,
    rel_tol: float = 1e-8,
    tolerances=TOLERANCES,
    max_params: int = 5000,
    hessian: torch.Tensor | None = None,
) -> dict:
    """Flat-direction counts at ``params`` against the level directions ``level`` (n, k).

    Returns ``n_params``, ``expected_flat`` (rank of ``level``), ``flat_total``,
    ``flat_horizontal``, ``tolerance_rule``, ``grad_norm``, ``scale`` (max|λ(H)|),
    ``flat_by_tolerance`` {tol: [flat_total, flat_horizontal]}, ``gap`` (the smallest
    |λ|/max|λ| of the horizontal Hessian: how far the non-flat spectrum sits from the
    tolerances), ``by_gap`` (the counts at the widest spectral gap of the total Hessian,
    ``flat.widest_gap``: ``flat_total``, ``flat_horizontal``, ``ratio``, relative
    ``threshold``) and ``max_abs_vertical_rayleigh``. ``hessian``: the dense Hessian at ``params``
    if already formed (``Refined.hessian``).
    """
    params = tuple(p.detach() for p in params)
    if hessian is None:
        hessian = _hessian(objective, params, max_params)
    grad_norm = float(_value_and_gradient(objective, params)[1].norm())
    report = flat_directions(hessian, level, rel_tol=rel_tol, grad_norm=grad_norm).to_dict()
    total = torch.tensor(report["eigenvalues"]).abs()
    horizontal = torch.tensor(report["horizontal_eigenvalues"]).abs()
    scale = report["scale"]
    ladder = {
        f"{tol:.0e}": [int((total <= tol * scale).sum()), int((horizontal <= tol * scale).sum())]
        for tol in tolerances
    }
    gap = widest_gap(total)
    by_gap = dict(
        flat_total=gap["count"],
        flat_horizontal=int((horizontal <= gap["threshold"] * scale).sum()),
        ratio=gap["ratio"],
        threshold=gap["threshold"],
    )
    return dict(
        n_params=report["n_params"],
        expected_flat=report["orbit_dim"],
        flat_total=report["flat_total"],
        flat_horizontal=report["flat_horizontal"],
        tolerance_rule=report["tolerance_rule"],
        rel_tol=rel_tol,
        grad_norm=grad_norm,
        scale=scale,
        flat_by_tolerance=ladder,
        by_gap=by_gap,
        gap=float(horizontal.min() / scale) if horizontal.numel() and scale > 0 else None,
        max_abs_vertical_rayleigh=report["max_abs_vertical_rayleigh"],
    )


# ---- models ------------------------------------------------------------------------------------
def model_objective(model, loss: Callable, weight_decay: float = 0.0):
    """F(θ) = loss(forward) + (λ/2)‖θ‖² over the trainable parameters of ``model`` (in
    ``named_parameters`` order), where ``forward(*args, **kwargs)`` runs ``model`` at θ."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def objective(*ps):
        bound = dict(zip(names, ps))
        value = loss(lambda *args, **kwargs: functional_call(model, bound, args, kwargs))
        if weight_decay:
            value = value + 0.5 * weight_decay * sum((p * p).sum() for p in ps)
        return value

    return objective


def _skew_tree(tree):
    if isinstance(tree, tuple):
        return tuple(_skew_tree(t) for t in tree)
    return 0.5 * (tree - tree.mT)


def _index(tree, k):
    return tuple(_index(t, k) for t in tree) if isinstance(tree, tuple) else tree[k]


@torch.no_grad()
def model_orbit_basis(model, groups, params=None, *, compact: bool = False) -> torch.Tensor:
    """(n, Σ group_dim) vertical tangents of every bundle group, as columns in the flattened
    coordinates of the model's trainable parameters (``parameters()`` order), at ``params``
    (a tuple of those parameters' values; default: the model's own).

    ``compact=True`` takes the compact subalgebra instead: the skew-symmetric part of every
    Lie-algebra basis element (so(r) inside gl(r), all of so(d), nothing of a rescaling's
    R_{>0}) — the orbits an L2 penalty keeps level. Columns may be dependent; callers use
    their span (``critical_point_counts`` takes its rank).
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    values = tuple(trainable) if params is None else tuple(params)
    position = {id(p): i for i, p in enumerate(trainable)}
    where, start = {}, 0
    for p in trainable:
        where[id(p)], start = start, start + p.numel()
    columns = []
    for group in groups:
        bundle = group.get("bundle")
        if bundle is None:
            continue
        local = dict(group, params=[values[position[id(p)]] for p in group["params"]])
        point = tuple(t.detach() for t in group_point(local))
        basis = bundle.algebra_basis(dtype=point[0].dtype, device=point[0].device)
        if compact:
            basis = _skew_tree(basis)
        for k in range(bundle.group_dim):
            tangent = bundle.vertical(point, _index(basis, k))
            zeros = dict(group, params=[torch.zeros_like(p) for p in group["params"]])
            write_point(zeros, tangent)
            full = values[0].new_zeros(start)
            for p, z in zip(group["params"], zeros["params"]):
                full[where[id(p)] : where[id(p)] + p.numel()] = z.reshape(-1)
            columns.append(full)
    return torch.stack(columns, 1) if columns else values[0].new_zeros(start, 0)
