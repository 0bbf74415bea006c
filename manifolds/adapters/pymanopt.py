r"""A bundle's quotient P/G as a ``pymanopt`` manifold, with the exact Riemannian Hessian.

A point is a tuple of numpy arrays in the bundle's order (``point_layout`` = their number; a
bundle of one tensor uses a bare array, as pymanopt expects for ``point_layout == 1``). Tangent
vectors of multi-tensor points are ``TangentVector`` lists with vector-space arithmetic (+, -,
scalar *, /, unary -), which pymanopt's solvers need. Arrays are converted to torch float64
tensors and every operation is delegated to the bundle:

==================================  ===========================================================
pymanopt                             bundle
==================================  ===========================================================
``inner_product``, ``norm``          the metric g_p of P (``bundle.inner``)
``projection``, ``to_tangent_space``  horizontal projection P_H (lifts of quotient tangents)
``euclidean_to_riemannian_gradient``  ``bundle.horizontal_gradient``: P_H(G_p⁻¹ ∇f)
``euclidean_to_riemannian_hessian``  P_H(∇_ξ grad f), the lift of the quotient Hessian (below)
``retraction``                       ``bundle.retract``: p + v
``exp``                              = ``retraction``: the exact quotient exponential when the
                                     metric is Euclidean and G is compact (O(d)) and v is
                                     horizontal; otherwise a first-order retraction
``transport``                        ``bundle.transport``: P_H at the new point
``random_point``                     ``bundle.random_point`` (seeded by ``seed``)
``random_tangent_vector``            a unit-norm horizontal projection of a Gaussian
``dist``, ``log``, ``pair_mean``     not available (no closed form for the GL(r) quotients)
==================================  ===========================================================

``dim`` is Σ numel(tensor) − ``group_dim``, the quotient dimension where the action is free.

**Riemannian Hessian.** Write the metric as g_p(u, v) = ⟨u, G_p v⟩ (Euclidean pairing ⟨·,·⟩,
G_p a symmetric positive operator depending on p). On P, an open subset of a vector space, the
Koszul formula for constant fields gives the Levi-Civita connection ∇_u v = Dv[u] + Γ_p(u, v),

    G_p Γ_p(u, v) = ½ [DG[u] v + DG[v] u − ∇_p g_p(u, v)],

where DG[u] is the derivative of p ↦ G_p along u and ∇_p g_p(u, v) the Euclidean gradient of
p ↦ g_p(u, v) at fixed u, v. The total-space gradient is w = G_p⁻¹∇f, whose derivative along ξ
is G_p⁻¹(∇²f[ξ] − DG[ξ] w); hence

    ∇_ξ w = G_p⁻¹ [∇²f[ξ] − ½ DG[ξ] w + ½ DG[w] ξ − ½ ∇_p g_p(ξ, w)].

For a G-invariant metric P → P/G is a Riemannian submersion and the quotient Hessian of f̄ at
π(p) along the horizontal lift ξ lifts to P_H(∇_ξ w) (Absil, Mahony & Sepulchre 2008,
Prop. 5.3.4; Boumal 2023, ch. 9). For the Euclidean metric G_p = I and this is P_H(∇²f[ξ]).
For the invariant metric of the head bundles (Mishra, Meyer, Bonnabel & Sepulchre 2014),
g(U, V) = tr(BᵀB U₁ᵀV₁) + tr(AᵀA U₂ᵀV₂) on factors (A, B):

    G(V) = (V₁ BᵀB, V₂ AᵀA),
    DG[a] b = (2 b₁ sym(Bᵀa₂), 2 b₂ sym(Aᵀa₁)),
    ∇_p g(u, v) = (2 A sym(u₂ᵀv₂), 2 B sym(u₁ᵀv₁)),

derived here from the Koszul formula above and implemented in closed form
(``metric_derivative``, ``metric_gradient``; checked against autograd in the tests). Any other
non-Euclidean metric is differentiated by torch autograd from ``bundle.inner``.

The Hessian is symmetric on H_p and passes a third-order Taylor test along p + tξ once the
retraction's acceleration Γ(ξ, ξ) is accounted for (p + tξ is not a second-order retraction
for a non-Euclidean metric; without the term the slope drops to 2):
f(p + tξ) = f + t g(w, ξ) + t²/2 [g(Hess ξ, ξ) + g(w, Γ(ξ, ξ))] + O(t³).

Under the Euclidean metric on GL(r) heads (which is only O(r)-invariant) the quotient has no
well-defined metric; the adapter still returns P_H(∇²f[ξ]), a symmetric operator on H_p that
trust-regions solvers accept, but the quotient geometry is then representative-dependent.
"""

from __future__ import annotations

import numpy as np
import torch
from pymanopt.manifolds.manifold import Manifold as _PymanoptManifoldBase

from ..base import Bundle, Point, Tangent
from ..factored import FactoredBundle
from ..linalg import sym
from ..product import ProductBundle

__all__ = [
    "PymanoptManifold",
    "TangentVector",
    "christoffel",
    "horizontal_hessian",
    "metric_derivative",
    "metric_gradient",
]


class TangentVector(list):
    """A tangent vector of a multi-tensor point: a list of arrays with vector arithmetic.

    ``+``/``-`` act elementwise on two tangent vectors of the same length, ``*`` and ``/`` scale
    by a scalar. The in-place list operators (``+=`` extends, ``*=`` repeats) are replaced by
    their arithmetic meaning. numpy defers to these operators (``__array_ufunc__ = None``), so
    ``np.float64(2.0) * v`` scales rather than broadcasting over the list.
    """

    __array_priority__ = 1000
    __array_ufunc__ = None

    def _same_length(self, other) -> TangentVector:
        if not isinstance(other, (list, tuple)) or len(other) != len(self):
            raise ValueError(
                f"tangent vector arithmetic needs another tangent vector of {len(self)} arrays"
            )
        return other

    def __add__(self, other):
        return TangentVector(a + b for a, b in zip(self, self._same_length(other)))

    __radd__ = __add__
    __iadd__ = __add__

    def __sub__(self, other):
        return TangentVector(a - b for a, b in zip(self, self._same_length(other)))

    __isub__ = __sub__

    def __rsub__(self, other):
        return TangentVector(b - a for a, b in zip(self, self._same_length(other)))

    def __mul__(self, scalar):
        return TangentVector(scalar * a for a in self)

    __rmul__ = __mul__
    __imul__ = __mul__

    def __truediv__(self, scalar):
        return TangentVector(a / scalar for a in self)

    __itruediv__ = __truediv__

    def __neg__(self):
        return TangentVector(-a for a in self)

    def __pos__(self):
        return TangentVector(self)


# ---- the Levi-Civita connection of the total-space metric ------------------------------------
def _components(bundle: Bundle, *tuples):
    """Per component of a ProductBundle: (component, slices of each tuple)."""
    start = 0
    for component in bundle.components:
        stop = start + component.n_tensors
        yield component, [t[start:stop] for t in tuples]
        start = stop


def _zeros(point: Point) -> Tangent:
    return tuple(torch.zeros_like(t) for t in point)


def _grad_or_zero(grads, like) -> Tangent:
    return tuple(torch.zeros_like(t) if g is None else g for g, t in zip(grads, like))


def _closed_form(kind: str, bundle: Bundle, point: Point, x: Tangent, y: Tangent):
    """DG[x] y (``kind="derivative"``) or ∇_p g(x, y) (``"gradient"``) in closed form, or None.

    Known: the Euclidean metric (both vanish), the head bundles' invariant metric, and products
    of bundles (per component, falling back to autograd for a component without a closed form).
    """
    if isinstance(bundle, ProductBundle):
        fn = metric_derivative if kind == "derivative" else metric_gradient
        parts = _components(bundle, point, x, y)
        return tuple(t for c, (p, a, b) in parts for t in fn(c, p, a, b))
    if bundle.metric == "euclidean":
        return _zeros(point)
    if isinstance(bundle, FactoredBundle) and bundle.metric_is_invariant:
        (pa, pb), (x1, x2), (y1, y2) = (bundle.factors(t) for t in (point, x, y))
        if kind == "derivative":  # (2 y₁ sym(Bᵀx₂), 2 y₂ sym(Aᵀx₁))
            return bundle.from_factors(2 * y1 @ sym(pb.mT @ x2), 2 * y2 @ sym(pa.mT @ x1))
        # (2 A sym(x₂ᵀy₂), 2 B sym(x₁ᵀy₁))
        return bundle.from_factors(2 * pa @ sym(x2.mT @ y2), 2 * pb @ sym(x1.mT @ y1))
    return None


def metric_derivative(
    bundle: Bundle, point: Point, a: Tangent, b: Tangent, *, autograd: bool = False
) -> Tangent:
    """The covector DG_p[a] b: derivative of p ↦ G_p b along a (see the module docstring).

    In closed form where known (``_closed_form``); otherwise, or with ``autograd=True`` (a check
    of the closed forms), by torch autograd through ``bundle.inner``: DG[a] b is the gradient in
    z of ⟨∇_p g_p(z, b), a⟩.
    """
    point, a, b = tuple(point), tuple(a), tuple(b)
    closed = None if autograd else _closed_form("derivative", bundle, point, a, b)
    if closed is not None:
        return closed
    with torch.enable_grad():
        p = tuple(t.detach().requires_grad_() for t in point)
        z = tuple(torch.zeros_like(t, requires_grad=True) for t in point)
        dg_p = torch.autograd.grad(bundle.inner(p, z, b), p, create_graph=True, allow_unused=True)
        along_a = sum((g * x).sum() for g, x in zip(_grad_or_zero(dg_p, p), a))
        if not along_a.requires_grad:  # the metric does not depend on the point
            return _zeros(point)
        return _grad_or_zero(torch.autograd.grad(along_a, z, allow_unused=True), point)


def metric_gradient(
    bundle: Bundle, point: Point, u: Tangent, v: Tangent, *, autograd: bool = False
) -> Tangent:
    """The Euclidean gradient of p ↦ g_p(u, v) at fixed u, v (see the module docstring).

    Closed forms and ``autograd`` as in ``metric_derivative``.
    """
    point, u, v = tuple(point), tuple(u), tuple(v)
    closed = None if autograd else _closed_form("gradient", bundle, point, u, v)
    if closed is not None:
        return closed
    with torch.enable_grad():
        p = tuple(t.detach().requires_grad_() for t in point)
        value = bundle.inner(p, u, v)
        if not value.requires_grad:  # the metric does not depend on the point
            return _zeros(point)
        return _grad_or_zero(torch.autograd.grad(value, p, allow_unused=True), point)


def christoffel(bundle: Bundle, point: Point, u: Tangent, v: Tangent) -> Tangent:
    """Γ_p(u, v) = ½ G_p⁻¹[DG[u] v + DG[v] u − ∇_p g_p(u, v)]: ∇_u v for constant fields.

    For the straight line p + tξ this is its covariant acceleration Γ(ξ, ξ).
    """
    terms = zip(
        metric_derivative(bundle, point, u, v),
        metric_derivative(bundle, point, v, u),
        metric_gradient(bundle, point, u, v),
    )
    return bundle.riemannian_gradient(point, tuple(0.5 * (x + y - z) for x, y, z in terms))


def horizontal_hessian(
    bundle: Bundle, point: Point, egrad: Tangent, ehess: Tangent, xi: Tangent
) -> Tangent:
    """Lift of the quotient Hessian along the horizontal ξ, P_H(∇_ξ grad f), from the
    Euclidean gradient ∇f and Hessian-vector product ∇²f[ξ] (see the module docstring)."""
    point = tuple(point)
    if bundle.metric == "euclidean":
        return bundle.project_horizontal(point, tuple(ehess))
    w = bundle.riemannian_gradient(point, tuple(egrad))
    terms = zip(
        ehess,
        metric_derivative(bundle, point, xi, w),
        metric_derivative(bundle, point, w, xi),
        metric_gradient(bundle, point, xi, w),
    )
    covector = tuple(h - 0.5 * x + 0.5 * y - 0.5 * z for h, x, y, z in terms)
    return bundle.project_horizontal(point, bundle.riemannian_gradient(point, covector))


# ---- the pymanopt manifold ---------------------------------------------------------------------
class PymanoptManifold(_PymanoptManifoldBase):
    """The quotient of ``bundle`` as a pymanopt manifold (see the module docstring).

    ``seed`` seeds ``random_point`` / ``random_tangent_vector``; ``typical_dist`` (default
    √dim) sets the trust-regions radii (Δ̄ = typical_dist, Δ₀ = Δ̄/8).
    """

    def __init__(self, bundle: Bundle, *, seed: int | None = None, typical_dist=None):
        if not isinstance(bundle, Bundle):
            raise TypeError(f"PymanoptManifold needs a manifolds.Bundle, got {type(bundle)}")
        self.bundle = bundle
        self.shapes = tuple(tuple(int(n) for n in s) for s in bundle.point_shapes())
        total = sum(int(np.prod(s)) for s in self.shapes)
        dimension = max(total - bundle.group_dim, 0)
        super().__init__(f"Quotient of {bundle!r}", dimension, point_layout=bundle.n_tensors)
        self._typical_dist = float(np.sqrt(dimension)) if typical_dist is None else typical_dist
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    @property
    def typical_dist(self):
        return self._typical_dist

    # ---- conversion ---------------------------------------------------------------------------
    def to_torch(self, arrays) -> tuple[torch.Tensor, ...]:
        """numpy point or tangent vector → tuple of float64 tensors (shares memory if it can)."""
        arrays = (arrays,) if self.point_layout == 1 and not _is_sequence(arrays) else arrays
        tensors = tuple(torch.as_tensor(np.asarray(x, dtype=np.float64)) for x in arrays)
        return self.bundle.check_point(tensors, "array tuple")

    def _point(self, tensors):
        arrays = tuple(np.array(t.detach().cpu().numpy(), copy=True) for t in tensors)
        return arrays[0] if self.point_layout == 1 else arrays

    def _tangent(self, tensors):
        arrays = TangentVector(np.array(t.detach().cpu().numpy(), copy=True) for t in tensors)
        return arrays[0] if self.point_layout == 1 else arrays

    # ---- metric ----------------------------------------------------------------------------
    def inner_product(self, point, tangent_vector_a, tangent_vector_b) -> float:
        p, u, v = (self.to_torch(x) for x in (point, tangent_vector_a, tangent_vector_b))
        return float(self.bundle.inner(p, u, v))

    def norm(self, point, tangent_vector) -> float:
        return float(self.bundle.norm(self.to_torch(point), self.to_torch(tangent_vector)))

    def dist(self, point_a, point_b):
        """Not available: the quotient distance has no closed form for the GL(r) metrics."""
        raise NotImplementedError(f"{self}: the quotient distance is not implemented")

    # ---- tangent spaces ----------------------------------------------------------------------
    def projection(self, point, vector):
        """Horizontal projection P_H (the lift of the quotient's tangent space)."""
        p, v = self.to_torch(point), self.to_torch(vector)
        return self._tangent(self.bundle.project_horizontal(p, v))

    to_tangent_space = projection

    def euclidean_to_riemannian_gradient(self, point, euclidean_gradient):
        p, g = self.to_torch(point), self.to_torch(euclidean_gradient)
        return self._tangent(self.bundle.horizontal_gradient(p, g))

    def euclidean_to_riemannian_hessian(
        self, point, euclidean_gradient, euclidean_hessian, tangent_vector
    ):
        """P_H(∇_ξ grad f) (``horizontal_hessian``), the lift of the quotient Hessian."""
        p, g, h, xi = (
            self.to_torch(x) for x in (point, euclidean_gradient, euclidean_hessian, tangent_vector)
        )
        return self._tangent(horizontal_hessian(self.bundle, p, g, h, xi))

    def christoffel(self, point, tangent_vector_a, tangent_vector_b):
        """Γ_p(u, v) of the total-space metric (see ``christoffel``), as a tangent vector."""
        p, u, v = (self.to_torch(x) for x in (point, tangent_vector_a, tangent_vector_b))
        return self._tangent(christoffel(self.bundle, p, u, v))

    def zero_vector(self, point):
        return self._tangent(_zeros(self.to_torch(point)))

    def random_tangent_vector(self, point):
        """A unit-norm horizontal vector: P_H of a standard Gaussian, normalised."""
        p = self.to_torch(point)
        v = self.bundle.project_horizontal(
            p, self.bundle.random_tangent(p, generator=self._generator)
        )
        scale = self.bundle.norm(p, v).clamp_min(torch.finfo(torch.float64).tiny)
        return self._tangent(t / scale for t in v)

    # ---- moving ------------------------------------------------------------------------------
    def retraction(self, point, tangent_vector):
        p, v = self.to_torch(point), self.to_torch(tangent_vector)
        return self._point(self.bundle.retract(p, v))

    def exp(self, point, tangent_vector):
        """The retraction (exact only in the cases the module docstring lists)."""
        return self.retraction(point, tangent_vector)

    def transport(self, point_a, point_b, tangent_vector_a):
        p, q, v = (self.to_torch(x) for x in (point_a, point_b, tangent_vector_a))
        return self._tangent(self.bundle.transport(p, q, v))

    def random_point(self):
        point = self.bundle.random_point(generator=self._generator, dtype=torch.float64)
        return self._point(point)


def _is_sequence(x) -> bool:
    return isinstance(x, (list, tuple))
