r"""A bundle's quotient P/G as a ``geoopt.Manifold``, for geoopt's Riemannian optimisers.

geoopt binds one manifold to one tensor, while a bundle point is a tuple of tensors. The
adapter therefore holds a point in ONE flat 1-D tensor (a ``geoopt.ManifoldParameter``):
``pack(point)`` concatenates the flattened tensors in the bundle's order (one copy) and
``unpack(flat)`` returns views of the flat tensor with the bundle's shapes (no copy), so a model
reads its weights through ``unpack(param)`` and autograd fills ``param.grad`` in packed form.

What each geoopt member maps to (P is open in a vector space, so its tangent spaces are the
whole space; the quotient's tangent space at π(p) is represented by the horizontal space H_p):

=========================  ==================================================================
geoopt                      bundle
=========================  ==================================================================
``inner``, ``norm``         the metric g_p of P (``bundle.inner``); on horizontal vectors this
                            is the quotient metric when g is G-invariant
``egrad2rgrad``             ``bundle.horizontal_gradient``: P_H(G_p⁻¹ ∇f), the horizontal
                            lift of the quotient gradient
``proju``                   ``bundle.project_horizontal`` (g-orthogonal projection onto H_p)
``projx``                   identity: P is open, every finite point with full-rank factors is
                            on it; not moving the point keeps optimiser state valid
``retr``                    ``bundle.retract``: p + u (commutes with the linear action)
``expmap``                  = ``retr``. Exact quotient geodesic when the metric is Euclidean and
                            G-invariant (compact G, e.g. ``ResidualRotation``) and u is
                            horizontal (straight lines are total-space geodesics and a
                            horizontal geodesic projects to a geodesic); otherwise a first-order
                            retraction, as geoopt allows
``transp``                  ``bundle.transport``: horizontal projection at the new point
``component_inner``         ``bundle.slice_mean_square`` broadcast to every tensor and packed: one
                            gauge-invariant magnitude per slice that no symmetry mixes (per row
                            of each head factor, per model-space row of a rotated tensor)
``random`` / ``origin``     ``bundle.random_point`` (``origin`` draws it with a fixed seed)
=========================  ==================================================================

``component_inner`` is what geoopt's ``RiemannianAdam`` accumulates as its second moment
(``exp_avg_sq += (1-β₂)·component_inner(x, grad)``, a tensor of the point's shape, then
``direction = exp_avg / (sqrt(exp_avg_sq) + eps)`` elementwise). A per-coordinate square would
pick a basis that G rotates; the per-slice invariant magnitudes make the preconditioner commute
with the action, so RiemannianAdam on this manifold with an invariant metric is
gauge-equivariant. For ``v ≠ u`` the bilinear form is recovered by polarisation,
¼[m(u+v) − m(u−v)] with m = ``slice_mean_square``.

Where geoopt 0.5.1's algorithms lose gauge equivariance (runs from p and p·g compared on their
invariants; ``tests/manifolds/test_adapters.py`` asserts each regime, ``docs/guides/adapters.md``
gives
the measured gaps):

* ``RiemannianSGD`` without momentum is equivariant to round-off.
* ``RiemannianSGD`` with momentum is not: geoopt seeds the buffer with the *raw Euclidean*
  gradient (``state["momentum_buffer"] = grad.clone()`` before ``egrad2rgrad``) and then adds
  the Riemannian one, so the first step is lr·(m·∇f + grad f): under the invariant metric ∇f
  transforms with g⁻ᵀ while grad f is pushed forward by g, and the sum is not equivariant.
  Seeding the buffer with zeros before the first step (the torch way,
  ``opt.state[param]["momentum_buffer"] = torch.zeros_like(param)``) restores it.
* ``weight_decay`` (both optimisers) adds wd·p to the Euclidean gradient: p transforms with g,
  ∇f with g⁻ᵀ, so decay on the representative breaks GL(r) equivariance (O(d) is unaffected).
* ``RiemannianAdam`` with this ``component_inner`` is equivariant; with geoopt's ``Euclidean``
  manifold instead (plain Adam: per-coordinate moments, Euclidean gradient) it is not.
* Under the Euclidean metric on GL(r) heads nothing is equivariant: the metric does not descend
  to the quotient (gradient steps from p·g with a badly conditioned g may even diverge).
"""

from __future__ import annotations

import math

import geoopt
import torch

from ..base import Bundle, Point, Tangent

__all__ = ["GeooptManifold"]


class GeooptManifold(geoopt.Manifold):
    """The quotient of ``bundle`` as a geoopt manifold on flat packed points.

    Points and tangent vectors are 1-D tensors of length ``size`` = Σ numel of the bundle's
    tensors (``pack`` / ``unpack`` convert); see the module docstring for the mathematics.
    """

    name = "Quotient"
    ndim = 1
    reversible = False

    def __init__(self, bundle: Bundle):
        super().__init__()
        if not isinstance(bundle, Bundle):
            raise TypeError(f"GeooptManifold needs a manifolds.Bundle, got {type(bundle)}")
        self.bundle = bundle
        self.shapes = tuple(tuple(int(n) for n in s) for s in bundle.point_shapes())
        self.sizes = tuple(math.prod(s) for s in self.shapes)
        self.size = sum(self.sizes)

    def extra_repr(self) -> str:
        return repr(self.bundle)

    # ---- packing --------------------------------------------------------------------------
    def pack(self, point: Point) -> torch.Tensor:
        """The tensors of a point (or tangent vector), flattened and concatenated (one copy)."""
        point = self.bundle.check_point(point)
        return torch.cat([t.reshape(-1) for t in point])

    def unpack(self, flat: torch.Tensor) -> Point:
        """Views of a flat tensor with the bundle's shapes (never a copy)."""
        self._assert_check_shape(tuple(flat.shape), "flat")
        return tuple(c.view(s) for c, s in zip(flat.split(self.sizes), self.shapes))

    def _check_shape(self, shape, name):
        if tuple(shape) == (self.size,):
            return True, None
        return False, f"'{name}' must be a flat tensor of shape ({self.size},), got {tuple(shape)}"

    def _pack(self, tangent: Tangent) -> torch.Tensor:
        return torch.cat([t.reshape(-1) for t in tangent])

    # ---- checks ------------------------------------------------------------------------------
    def _check_point_on_manifold(self, x, *, atol=1e-5, rtol=1e-5):
        """A point is on P when it is finite and the bundle can dress it (full rank)."""
        if not bool(torch.isfinite(x).all()):
            return False, "the point has non-finite entries"
        try:
            self.bundle.dressing(self.unpack(x))
        except ValueError as error:
            return False, str(error)
        return True, None

    def _check_vector_on_tangent(self, x, u, *, atol=1e-5, rtol=1e-5):
        """A tangent vector of the quotient is horizontal: ‖P_V u‖ ≤ atol + rtol·‖u‖."""
        point, vec = self.unpack(x), self.unpack(u)
        vertical = self.bundle.norm(point, self.bundle.project_vertical(point, vec))
        bound = atol + rtol * self.bundle.norm(point, vec)
        if bool(vertical <= bound):
            return True, None
        return False, f"vertical component {float(vertical):.3g} exceeds {float(bound):.3g}"

    # ---- metric ------------------------------------------------------------------------------
    def inner(self, x, u, v=None, *, keepdim=False):
        """g_x(u, v) (``bundle.inner``); shape () or (1,) with ``keepdim``."""
        v = u if v is None else v
        value = self.bundle.inner(self.unpack(x), self.unpack(u), self.unpack(v))
        return value.reshape(1) if keepdim else value

    def norm(self, x, u, *, keepdim=False):
        value = self.bundle.norm(self.unpack(x), self.unpack(u))
        return value.reshape(1) if keepdim else value

    def component_inner(self, x, u, v=None):
        """Gauge-invariant per-slice magnitudes of u (``bundle.slice_mean_square``), packed:
        shape of x. For ``v`` given, the polarisation ¼[m(u+v) − m(u−v)] of that quadratic.
        """
        point = self.unpack(x)
        if v is None:
            parts = self.bundle.slice_mean_square(point, self.unpack(u))
        else:
            plus = self.bundle.slice_mean_square(point, self.unpack(u + v))
            minus = self.bundle.slice_mean_square(point, self.unpack(u - v))
            parts = tuple(0.25 * (a - b) for a, b in zip(plus, minus))
        return self._pack(m.expand(s) for m, s in zip(parts, self.shapes))

    # ---- projections and gradients -------------------------------------------------------
    def proju(self, x, u):
        """Horizontal projection P_H u."""
        return self._pack(self.bundle.project_horizontal(self.unpack(x), self.unpack(u)))

    def egrad2rgrad(self, x, u):
        """Horizontal lift of the quotient gradient, P_H(G_x⁻¹ u)."""
        return self._pack(self.bundle.horizontal_gradient(self.unpack(x), self.unpack(u)))

    def projx(self, x):
        """Identity: the total space is open (see the module docstring)."""
        return x

    # ---- moving ---------------------------------------------------------------------------
    def retr(self, x, u):
        """p + u (``bundle.retract``)."""
        return self._pack(self.bundle.retract(self.unpack(x), self.unpack(u)))

    def expmap(self, x, u):
        """The retraction; the exact quotient exponential only in the cases the module
        docstring lists."""
        return self.retr(x, u)

    def transp(self, x, y, v):
        """Vector transport from x to y: horizontal projection at y (``bundle.transport``)."""
        return self._pack(self.bundle.transport(self.unpack(x), self.unpack(y), self.unpack(v)))

    def retr_transp(self, x, u, v):
        y = self.retr(x, u)
        return y, self.transp(x, y, v)

    def transp_follow_retr(self, x, u, v):
        return self.transp(x, self.retr(x, u), v)

    # ---- sampling -------------------------------------------------------------------------
    def random(self, *size, dtype=None, device=None, generator=None, **kwargs):
        """A packed ``bundle.random_point``; ``size`` may be empty or ``(self.size,)``."""
        if len(size) == 1 and isinstance(size[0], (tuple, list)):
            size = tuple(size[0])
        if size not in ((), (self.size,)):
            raise ValueError(f"{self!r}: points have shape ({self.size},), asked for {size}")
        point = self.bundle.random_point(generator=generator, dtype=dtype, device=device, **kwargs)
        return self.pack(point)
