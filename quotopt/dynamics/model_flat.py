"""Flat directions of a whole model's training objective against its symmetries.

``model_flat_directions(task, model)`` forms the Hessian of the full-batch training objective

    F(θ) = f(θ) + (λ/2) ‖θ‖²      (λ = ``weight_decay``; λ = 0: the loss alone)

over all trainable parameters in float64, counts its near-null eigenvalues (``flat_total``),
those of its restriction to the horizontal space (``flat_horizontal``), and compares them with
the orbit dimension of the symmetry groups that ``symmetries(model)`` finds.

Which orbits are level sets of F? f is invariant under every group element. ‖θ‖² is invariant
only under the elements that act isometrically: for a head pair (Wq g, Wk g⁻ᵀ) those with
g ∈ O(r), the maximal compact subgroup of GL(r); for ReLU rescaling (a ∈ R_{>0}) only a = 1;
O(d) on the residual stream entirely. At a critical point of F the tangents of those *compact*
orbits are null vectors of ∇²F (``compact_orbit_dimension``), the other vertical directions are
not: with λ > 0 only compact orbits stay flat. At λ = 0 every orbit is flat at a critical point.
"""

from __future__ import annotations

import torch
from scipy.sparse.linalg import ArpackNoConvergence
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from ..groups import group_point, symmetries
from .flat import flat_directions, vertical_basis
from .hessian import dense_hessian, flatten, lanczos_extremes, unflatten

DENSE_MAX = 5000  # parameters up to which the Hessian is formed densely
NOTE = (
    "Hessian of the full-batch training objective f + (weight_decay/2)·‖θ‖² over all trainable "
    "parameters, in float64, at the trained point. Without weight decay every orbit is a level "
    "set; with it only compact orbits (O(r) per head pair, O(d) on the residual stream; no "
    "rescaling direction) are. The trained point is only near-critical (grad_norm): vertical "
    "tangents along nilpotent ξ (ξ² = 0) stay exactly flat, those with ξ² ≠ 0 pick up curvature "
    "of order ‖∇F‖ (vertical_rayleigh, relative to max|λ|), and a memorised cross-entropy loss "
    "has a continuum of small eigenvalues besides: flat_by_tolerance shows how the counts move "
    "with the tolerance."
)


def compact_orbit_dimension(bundle) -> int:
    """Dimension of the subgroup of ``bundle``'s group that preserves ‖θ‖² (its orbits stay
    level sets of an L2-regularised objective; ``bundle.compact_dim``): r(r−1)/2 per GL(r) head,
    0 per rescaled unit, d(d−1)/2 for O(d)."""
    try:
        return bundle.compact_dim
    except NotImplementedError:
        raise ValueError(f"no compact-subgroup dimension known for {bundle!r}") from None


@torch.no_grad()
def model_vertical_basis(model, groups) -> tuple[torch.Tensor, dict[str, int]]:
    """(n, Σ group_dim) vertical tangents of every bundle group of ``groups`` as columns in
    the flattened coordinates of the model's trainable parameters (``parameters()`` order),
    and each group's orbit dimension (the rank of its columns)."""
    params = [p for p in model.parameters() if p.requires_grad]
    offsets, start = {}, 0
    for p in params:
        offsets[id(p)], start = start, start + p.numel()
    columns, dims = [], {}
    for group in groups:
        bundle = group.get("bundle")
        if bundle is None:
            continue
        point, layout = group_point(group), group.get("layout")
        basis = vertical_basis(bundle, point)  # (coordinates of the point, group_dim)
        for col in basis.mT:
            zeros = [torch.zeros_like(p) for p in group["params"]]
            tangent = unflatten(col, point)
            if getattr(layout, "needs_scatter", False):
                layout.scatter(zeros, tangent)
            else:
                for view, t in zip(layout(zeros) if layout else zeros, tangent):
                    view.copy_(t)
            full = params[0].new_zeros(start)
            for p, z in zip(group["params"], zeros):
                full[offsets[id(p)] : offsets[id(p)] + p.numel()] = z.reshape(-1)
            columns.append(full)
        dims[group["name"]] = int(torch.linalg.matrix_rank(basis)) if basis.numel() else 0
    return torch.stack(columns, 1) if columns else params[0].new_zeros(start, 0), dims


def model_flat_directions(
    task,
    model,
    rel_tol: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    refine: bool = False,
    dense_max: int | None = None,
) -> dict:
    """The flat-direction report (a JSON-ready dict) of the full-batch objective of the module
    docstring at ``model``'s parameters; converts ``model`` to float64 in place.

    ``refine=True`` first moves the model to a true critical point of F (Newton on the
    complement of the level orbit directions — the compact ones when ``weight_decay > 0``,
    all of them otherwise: ``quotopt.dynamics.refine`` up to ``dense_max`` parameters,
    default ``DENSE_MAX``; matrix-free ``refine_krylov`` above) and adds ``critical``: the
    refinement (‖∇F‖ before and after, steps, converged, Hessian–vector products, ``route``)
    and, on the dense route, the counts against the level directions (``expected_flat``,
    ``flat_total``, ``flat_horizontal``, ``flat_by_tolerance``).

    Above ``dense_max`` (``method`` "lanczos") the report holds what Hessian–vector products
    certify cheaply: the top of the spectrum, the converged bottom Ritz values, and for every
    vertical tangent v its Rayleigh quotient and residual ‖Hv‖/(max|λ|·‖v‖), and the largest
    residual over the level directions (``max_level_residual``: at a critical point it is at
    round-off, as H annihilates every tangent of a level orbit). ``flat_total`` and
    ``flat_horizontal`` are None: counting eigenvalues below 1e-8·max|λ| matrix-free needs
    the bottom of a spectrum of condition ~10⁷ resolved, which costs more products than the
    dense Hessian's n (``docs/theory/flat-directions.md``).
    """
    dense_max = DENSE_MAX if dense_max is None else dense_max
    model = model.double()
    groups = symmetries(model)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = tuple(p.detach() for p in model.parameters() if p.requires_grad)
    x, y = task.batch("train", None)

    def objective(*ps):
        bound = dict(zip(names, ps))
        logits = task.logits(lambda t, **kw: functional_call(model, bound, (t,), kw), x)
        penalty = sum(p.square().sum() for p in ps) if weight_decay else 0.0
        return task.loss(logits, y) + 0.5 * weight_decay * penalty

    critical = None
    if refine:
        critical = _refine(model, groups, objective, params, rel_tol, weight_decay, dense_max)
    params = tuple(p.detach() for p in model.parameters() if p.requires_grad)
    vertical, dims = model_vertical_basis(model, groups)
    with sdpa_kernel(SDPBackend.MATH):  # the fused CPU kernels have no double backward
        level = None
        if vertical.shape[0] > dense_max:  # the directions F is constant along
            from .refine import model_orbit_basis, orthonormal_basis

            level = model_orbit_basis(model, groups, params, compact=weight_decay > 0)
            level = orthonormal_basis(level, vertical.shape[0], vertical)
        report = _report(objective, params, vertical, dims, rel_tol, dense_max, level)
    leaves = tuple(p.clone().requires_grad_() for p in params)
    value = objective(*leaves)
    grad = flatten(torch.autograd.grad(value, leaves))
    rayleigh = torch.tensor(report["vertical_rayleigh"]).abs()
    compact = {g["name"]: compact_orbit_dimension(g["bundle"]) for g in groups if "bundle" in g}
    report.update(
        orbit_dims=dims,
        compact_orbit_dims=compact,
        compact_orbit_dim=sum(compact.values()),
        objective_weight_decay=weight_decay,
        grad_norm=float(grad.norm()),
        objective=float(value.detach()),
        vertical_flat=int((rayleigh <= rel_tol).sum()),
        note=NOTE,
    )
    if critical is not None:
        report["critical"] = critical
    return report


def _refine(model, groups, objective, params, rel_tol, weight_decay, dense_max) -> dict:
    """Refine ``model`` in place to a critical point of ``objective``; counts there (dense)."""
    from .refine import critical_point_counts, model_orbit_basis, refine_critical_point
    from .refine_krylov import refine_critical_point_krylov

    level = lambda ps: model_orbit_basis(model, groups, ps, compact=weight_decay > 0)  # noqa: E731
    dense = sum(p.numel() for p in params) <= dense_max
    if dense:
        refined = refine_critical_point(objective, params, level, max_params=dense_max)
    else:
        refined = refine_critical_point_krylov(objective, params, level)
    with torch.no_grad():
        for p, value in zip([p for p in model.parameters() if p.requires_grad], refined.params):
            p.copy_(value)
    out = dict(
        refine=refined.summary(),
        route="dense" if dense else "krylov",
        level="compact" if weight_decay > 0 else "all",
    )
    if dense:
        out.update(
            critical_point_counts(
                objective,
                refined.params,
                level(refined.params),
                rel_tol=rel_tol,
                hessian=refined.hessian,
            )
        )
    return out


def _report(objective, params, vertical, dims, rel_tol, dense_max, level) -> dict:
    n = vertical.shape[0]
    if n <= dense_max:
        hessian = dense_hessian(objective, params, max_params=dense_max)
        report = flat_directions(hessian, vertical, rel_tol=rel_tol).to_dict()
        report["method"] = "dense"
        report["flat_by_tolerance"] = _by_tolerance(report)
        return report
    # what products certify: the top, the converged bottom, the vertical residuals
    from .refine_krylov import hessian_residuals

    top = lanczos_extremes(objective, params, k=min(6, n - 1), which="LM", tol=1e-10)
    scale = float(abs(top).max())
    lowest = _converged_bottom(objective, params, k=min(6, n - 1))
    vertical_res = hessian_residuals(objective, params, vertical, scale)
    rayleigh, residual = vertical_res["rayleigh"], vertical_res["residual"]
    level_residual = hessian_residuals(objective, params, level, scale)["residual"]

    return dict(
        method="lanczos",
        n_params=n,
        eigenvalues=sorted(top.tolist()),
        scale=scale,
        lowest_converged=lowest,
        orbit_dim=sum(dims.values()),
        flat_total=None,
        flat_horizontal=None,
        vertical_rayleigh=rayleigh.tolist(),
        vertical_residual=residual.tolist(),
        rel_tol=rel_tol,
        tolerance_rule=None,
        max_abs_vertical_rayleigh=float(rayleigh.abs().max()) if rayleigh.numel() else 0.0,
        max_vertical_residual=float(residual.max()) if residual.numel() else 0.0,
        max_level_residual=float(level_residual.max()) if level_residual.numel() else 0.0,
    )


def _converged_bottom(objective, params, k: int) -> list[float]:
    """The bottom Ritz values that Lanczos converges within a bounded budget (ARPACK, 'SA',
    relative accuracy 1e-6, 20 restarts); a near-null cluster may leave none converged."""
    try:
        return lanczos_extremes(objective, params, k=k, which="SA", tol=1e-6, maxiter=20).tolist()
    except ArpackNoConvergence as err:
        return sorted(float(v) for v in err.eigenvalues)


def _by_tolerance(report: dict) -> dict[str, list[int]]:
    """{rel_tol: [flat_total, flat_horizontal]} over a ladder of tolerances: how robust the
    counts are (a clean symmetry gap keeps their difference at orbit_dim over decades)."""
    total = torch.tensor(report["eigenvalues"]).abs()
    horizontal = torch.tensor(report["horizontal_eigenvalues"]).abs()
    out = {}
    for exponent in range(-12, -1):
        tol = 10.0**exponent * report["scale"]
        out[f"1e{exponent}"] = [int((total <= tol).sum()), int((horizontal <= tol).sum())]
    return out
