"""Property checks for bundles and invariant functions, as library API.

Each ``*_errors`` function returns relative residuals (floats) so that tests, users and CI can
state their own tolerances; the ``assert_*`` wrappers raise ``AssertionError`` naming the
property that failed. Use float64 for tight checks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .base import Bundle, randn

__all__ = [
    "relative_error",
    "bundle_errors",
    "assert_bundle",
    "assert_invariant",
    "random_algebra_element",
    "DEFAULT_TOLERANCES",
]

#: Relative tolerances that well-conditioned points meet (condition numbers ≲ 10).
DEFAULT_TOLERANCES = {torch.float64: 1e-9, torch.float32: 2e-3}


def _norm(tensors) -> torch.Tensor:
    return torch.sqrt(sum((t.detach().double() ** 2).sum() for t in tensors))


def _ratio(num, den) -> float:
    """num / den, with 0/0 = 0 (a zero vector is trivially orthogonal/horizontal)."""
    num, den = float(num), float(den)
    return 0.0 if num == 0.0 else num / max(den, 1e-300)


def relative_error(x, y) -> float:
    """‖x - y‖ / max(‖y‖, tiny) over tuples (or single tensors)."""
    x = (x,) if isinstance(x, torch.Tensor) else tuple(x)
    y = (y,) if isinstance(y, torch.Tensor) else tuple(y)
    diff = _norm(a.detach().double() - b.detach().double() for a, b in zip(x, y))
    return float(diff / _norm(y).clamp_min(1e-300))


def random_algebra_element(bundle: Bundle, *, generator=None, dtype=None, device=None):
    """A Gaussian Lie-algebra element (``bundle.random_algebra_element``)."""
    return bundle.random_algebra_element(generator=generator, dtype=dtype, device=device)


def _scale(xi, t):
    return tuple(_scale(x, t) for x in xi) if isinstance(xi, tuple) else xi * t


def _gradient_covariance_error(bundle: Bundle, p, g, q, generator) -> float:
    """∇f(p·g) against act_dual(∇f(p), g) for the invariant f(p) = ⟨C, invariants(p)⟩."""
    weights = tuple(randn(t.shape, generator, t.dtype, t.device) for t in bundle.invariants(p))

    def grad_at(point):
        point = tuple(t.detach().clone().requires_grad_() for t in point)
        value = sum((w * t).sum() for w, t in zip(weights, bundle.invariants(point)))
        return torch.autograd.grad(value, point)

    return relative_error(grad_at(q), bundle.act_dual(grad_at(p), g))


def _leaves(xi) -> list[torch.Tensor]:
    """The tensors of a (nested) tuple of Lie-algebra elements."""
    return [t for x in xi for t in _leaves(x)] if isinstance(xi, tuple) else [xi]


def _vertical_fd_error(bundle: Bundle, p, xi, dtype) -> float:
    """``vertical(p, ξ)`` against the central difference of t ↦ p·exp(tξ) at t = 0. The step
    moves the point by a fixed fraction h of its size, h ≈ eps^⅓ of the dtype (1e-5, 1e-2):
    t = h / ‖ξ‖, so that the round-off eps/h and the truncation h² of the difference are
    relative to ‖vertical(p, ξ)‖ ∝ ‖ξ‖ whatever the size of ξ."""
    size = float(_norm(_leaves(xi)))
    if size == 0.0:  # the zero algebra (a discrete group such as O(1)): nothing moves
        return float(_norm(bundle.vertical(p, xi)))
    step = (1e-5 if dtype == torch.float64 else 1e-2) / max(size, 1e-300)
    plus = bundle.act(p, bundle.group_exp(_scale(xi, step)))
    minus = bundle.act(p, bundle.group_exp(_scale(xi, -step)))
    fd = tuple((a - b) / (2 * step) for a, b in zip(plus, minus))
    return relative_error(fd, bundle.vertical(p, xi))


def bundle_errors(bundle: Bundle, *, generator=None, dtype=torch.float64, device=None) -> dict:
    """Relative residuals of every bundle property at one random point.

    Keys: ``invariants`` (preserved by the action), ``inverse`` (p·g·g⁻¹ = p),
    ``gradient_covariant`` (``act_dual``),
    ``vertical_fd`` (``vertical`` against a
    central difference of the action), ``orthogonal`` (horizontal ⟂ vertical), ``idempotent``,
    ``complementary``, ``vertical_is_vertical``, ``metric_invariant`` (only for invariant
    metrics), ``dress_invariant``, ``dressing_consistent``, ``retract_zero``,
    ``transport_horizontal``, ``projection_equivariant`` and ``moment_invariant`` (only for
    invariant metrics).
    """
    g_rand = dict(generator=generator, dtype=dtype, device=device)
    p = bundle.random_point(**g_rand)
    g = bundle.random_group_element(**g_rand)
    q = bundle.act(p, g)
    v = bundle.random_tangent(p, generator=generator)
    w = bundle.random_tangent(p, generator=generator)
    xi = random_algebra_element(bundle, **g_rand)
    out = {"invariants": relative_error(bundle.invariants(q), bundle.invariants(p))}
    out["inverse"] = relative_error(bundle.act(q, bundle.inverse(g)), p)
    out["gradient_covariant"] = _gradient_covariance_error(bundle, p, g, q, generator)

    out["vertical_fd"] = _vertical_fd_error(bundle, p, xi, dtype)
    vert = bundle.vertical(p, xi)

    hv, pv = bundle.project_horizontal(p, v), bundle.project_vertical(p, v)
    scale = bundle.norm(p, hv) * bundle.norm(p, vert)
    out["orthogonal"] = _ratio(bundle.inner(p, hv, vert).abs(), scale)
    out["idempotent"] = max(
        relative_error(bundle.project_horizontal(p, hv), hv),
        relative_error(bundle.project_vertical(p, pv), pv),
    )
    out["complementary"] = relative_error(tuple(a + b for a, b in zip(hv, pv)), v)
    out["vertical_is_vertical"] = _ratio(
        bundle.norm(p, bundle.project_horizontal(p, pv)), bundle.norm(p, v)
    )
    out["dress_invariant"] = relative_error(bundle.dress(q), bundle.dress(p))
    out["dressing_consistent"] = relative_error(bundle.act(p, bundle.dressing(p)), bundle.dress(p))
    out["retract_zero"] = relative_error(bundle.retract(p, tuple(0 * t for t in v)), p)
    p_next = bundle.retract(p, tuple(0.1 * t for t in hv))
    moved = bundle.transport(p, p_next, w)
    out["transport_horizontal"] = _ratio(
        bundle.norm(p_next, bundle.project_vertical(p_next, moved)), bundle.norm(p_next, moved)
    )
    if bundle.metric_is_invariant:
        gv, gw = bundle.act(v, g), bundle.act(w, g)
        out["metric_invariant"] = _ratio(
            (bundle.inner(q, gv, gw) - bundle.inner(p, v, w)).abs(),
            bundle.norm(p, v) * bundle.norm(p, w),
        )
        # the splitting commutes with the action exactly when the metric is invariant
        out["projection_equivariant"] = relative_error(
            bundle.project_horizontal(q, gv), bundle.act(bundle.project_horizontal(p, v), g)
        )
        # so do the adaptive optimisers' second moments
        out["moment_invariant"] = relative_error(
            bundle.slice_mean_square(q, gv), bundle.slice_mean_square(p, v)
        )
    return out


def assert_bundle(bundle: Bundle, *, generator=None, dtype=torch.float64, device=None, tol=None):
    """Assert every property of ``bundle_errors`` below ``tol`` (default by dtype)."""
    tol = DEFAULT_TOLERANCES[dtype] if tol is None else tol
    errors = bundle_errors(bundle, generator=generator, dtype=dtype, device=device)
    failed = {k: e for k, e in errors.items() if not e <= tol}
    if failed:
        raise AssertionError(f"{bundle!r} fails {failed} (tolerance {tol:g}, dtype {dtype})")
    return errors


def assert_invariant(
    fn: Callable, bundle: Bundle, point, *, generator=None, tol: float = 1e-9, condition=10.0
) -> float:
    """Assert fn(p·g) == fn(p) for a random g (relative ``tol``); return the error."""
    point = tuple(point)
    g = bundle.random_group_element(
        generator=generator, dtype=point[0].dtype, device=point[0].device, condition=condition
    )
    error = relative_error(fn(bundle.act(point, g)), fn(point))
    if not error <= tol:
        raise AssertionError(f"not invariant under {bundle!r}: relative change {error:.3g}")
    return error
