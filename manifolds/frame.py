r"""The frame handle: a point of a bundle with the factorisation every operation there reuses.

``bundle.at(point)`` returns a ``Frame``. It owns the point's factorisation (``data``: what
``Bundle.factorise`` returns — per head Grams and their eigendecompositions or Cholesky factors
for the factored bundles, an eigenframe for O(d), nothing for bundles that need none) and offers
what an optimiser needs at that point: the Riemannian gradient with its gauge-invariant second
moments, the horizontal projection, the bounded step with decay and retraction, the frame of
the point the step reaches (``moved``), transport to it by projection there, and re-dressing
of the gradient, the moments and r×r statistics per head (``redressed``; the rule by which a
statistic moves is the bundle's ``act_statistic``, derived in ``docs/theory/dressing.md``).
Which factorisation backs a frame — exact spectral, Cholesky, written down in closed form at a
balanced point, float32 or float64 — is the bundle's business, not the optimiser's: optimisers
talk to the geometry through this handle only (``geometry="iterative"`` on the head pairs:
frames built by matmul-only iterations, ``manifolds.frames.iterative_frame``).

The contract. A bundle's public methods take a point and nothing else; each is
``bundle.at(point)`` asked once. The formulas live in the bundle's protected hooks, which take
the frame: ``_inner(frame, u, v)``, ``_project_vertical(frame, v)``,
``_project_horizontal(frame, v)``, ``_riemannian_gradient(frame, egrad)`` (with
``_gradient_and_moments``, the gradient and its second moments together),
``_slice_mean_square(frame, v)``, ``_limit_step(frame, step)`` (with ``_step_scale``, its scale,
where the step is taken in place), ``_dressing_or_identity(frame)``
and ``_redress(frame, covector, tangents, statistics)``. A hook reads ``frame.point`` and, only
where it needs the factorisation, ``frame.data`` (``bundle.factorise(point)``, computed once per
frame); it never factorises otherwise. A frame built with ``data`` (``bundle.at(point, data)``)
trusts it to be the point's factorisation: the caller that caches one (an optimiser between
steps) answers for its being current.

The factored bundles' invariant metric gives the gradient's second moments with the gradient
(‖g Q⁻¹ R‖² = rowsum(g Q⁻¹ ∘ g) for R Rᵀ = Q: no second product, ``FactoredBundle``).
``PairFrame`` (the frames of the GL(r) head pairs) computes what several operations share once:
the step bound reuses the projection's r×r products (Aᵀ(Z₁ − Aξ) = AᵀZ₁ − Pξ). The
derivations are in ``docs/theory/optimisers.md``.
``ProductFrame`` (``manifolds.product``) holds one frame per component, each factorised on first
use.
"""

from __future__ import annotations

import torch

__all__ = ["Frame", "FrameReuse"]

Tensors = tuple[torch.Tensor, ...]


class FrameReuse:
    """The hooks by which a bundle builds a step's new frame from the last one's bases (a warm
    frame, ``Frame.moved``); ``Bundle`` inherits these defaults: no reuse."""

    def frame_basis(self, data):
        """``(bases, age)``: what a nearby point's frame may be built from (``factorise_from``;
        tensors with the head axis first, and the steps since they were exact), or None."""
        return None

    def empty_basis(self, point):
        """Zeros shaped like ``frame_basis``'s bases at ``point``, or None (no reuse)."""
        return None

    def factorise_from(self, point, bases: tuple, age: int):
        """The factorisation of ``point`` from ``bases`` ``age`` steps old, as ``Frame.moved``
        built it (age 0: factorised afresh); bundles that reuse no bases factorise."""
        return self.factorise(point)

    def decay_multiplier(self, factor: float) -> float | None:
        """The number every tensor of a point is multiplied by when ``scale_invariants``
        multiplies the invariants by ``factor`` — where the bundle's step may then be taken in
        place (``Frame.descend``: the retraction is p + v and the horizontal projection returns
        tensors of its own) — else None (the default)."""
        return None

    def _step_scale(self, frame, step, factor: float = 1.0):
        """Per head the factor (…, 1, 1) by which ``_limit_step`` scales the step
        ``factor``·``step``, or None where it leaves every step as it is (the default)."""
        return None


class Frame:
    """A point of ``bundle`` and its factorisation (computed on first use, then reused).

    Every method is a function of the point alone (and its arguments): a frame is immutable,
    and moving the point gives a new frame (``moved``, ``redressed``)."""

    __slots__ = ("bundle", "point", "_data")

    def __init__(self, bundle, point: Tensors, data=None):
        self.bundle = bundle
        self.point = tuple(point)
        self._data = data

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.bundle!r})"

    @property
    def data(self):
        """The factorisation at the point (``Bundle.factorise``), computed once."""
        if self._data is None:
            self._data = self.bundle.factorise(self.point)
        return self._data

    @property
    def cached(self):
        """The factorisation if computed or given already, else None (computes nothing: for
        operations that reuse it where it exists and need it not)."""
        return self._data

    # ---- the metric ----------------------------------------------------------------------------
    def inner(self, u: Tensors, v: Tensors) -> torch.Tensor:
        """The metric at the point (a scalar tensor)."""
        return self.bundle._inner(self, u, v)

    def norm(self, v: Tensors) -> torch.Tensor:
        """The metric norm of ``v``."""
        return self.inner(v, v).clamp_min(0).sqrt()

    # ---- gradients and moments ---------------------------------------------------------------
    def riemannian_gradient(self, egrad: Tensors) -> Tensors:
        """The metric's gradient (horizontal for a G-invariant loss)."""
        return tuple(self.bundle._riemannian_gradient(self, egrad))

    def horizontal_gradient(self, egrad: Tensors) -> Tensors:
        """The Riemannian gradient projected on the horizontal space (exact for any loss)."""
        return self.horizontal(self.riemannian_gradient(egrad))

    def gradient_and_moments(self, egrad: Tensors) -> tuple[Tensors, Tensors]:
        """(Riemannian gradient, its ``mean_square``), computed together where the bundle shares
        work between them (``_gradient_and_moments``)."""
        rgrad, moments = self.bundle._gradient_and_moments(self, egrad)
        return tuple(rgrad), tuple(moments)

    def mean_square(self, v: Tensors) -> Tensors:
        """Gauge-invariant mean squares of ``v`` per slice no symmetry mixes
        (``Bundle.slice_mean_square``)."""
        return tuple(self.bundle._slice_mean_square(self, v))

    def horizontal(self, v: Tensors) -> Tensors:
        """The metric-orthogonal projection of ``v`` onto the horizontal space here; also the
        transport of a vector from a nearby point to this one."""
        return tuple(self.bundle._project_horizontal(self, v))

    def vertical_part(self, v: Tensors) -> Tensors:
        """The metric-orthogonal projection of ``v`` onto the vertical space (the orbit's)."""
        return tuple(self.bundle._project_vertical(self, v))

    # ---- moving ---------------------------------------------------------------------------------
    def descend(self, direction: Tensors, lr: float, weight_decay: float, project: bool = True):
        """The point a step reaches: decay on the invariants (``scale_invariants`` by
        1 − lr·wd), then the step −lr·P_H(direction) (``project``; pass False for a direction
        that is horizontal already), bounded (``limit_step``), retracted. Where the bundle
        allows it (``decay_multiplier``) in two passes, written into the projection's tensors:
        c·p − lr·s·P_H(direction), c the decay's multiplier and s the bound's scale."""
        bundle = self.bundle
        root = bundle.decay_multiplier(1 - lr * weight_decay) if project else None
        if root is None:
            if project:
                direction = self.horizontal(direction)
            step = bundle._limit_step(self, tuple(d * -lr for d in direction))
            return self._retract_decayed(step, lr, weight_decay)
        h = self.horizontal(direction)
        scale = bundle._step_scale(self, h, -lr)
        scale = -lr if scale is None else scale * -lr
        return tuple(t.mul_(scale).add_(p, alpha=root) for p, t in zip(self.point, h))

    def _retract_decayed(self, step: Tensors, lr: float, weight_decay: float) -> Tensors:
        base = self.point
        if weight_decay:
            base = self.bundle.scale_invariants(base, 1 - lr * weight_decay)
        return tuple(self.bundle.retract(base, step))

    def moved(self, new_point: Tensors) -> Frame:
        """The frame of ``new_point``, a step away (factorised now: a step's new frame serves
        the transport of its moments and the next step). Where the bundle reuses bases
        (``Bundle.frame_basis`` of this frame) it is built from them (``factorise_from``)
        instead of factorised: a warm frame."""
        new_point, bundle = tuple(new_point), self.bundle
        basis = bundle.frame_basis(self.cached)
        if basis is None:
            return bundle.at(new_point, bundle.factorise(new_point))
        bases, age = basis
        return bundle.at(new_point, bundle.factorise_from(new_point, bases, age + 1))

    @property
    def basis(self):
        """``(bases, age)`` a nearby frame may be built from (``Bundle.frame_basis``), or
        None; an optimiser keeps it in its state, so a resumed run builds the frames an
        uninterrupted one would."""
        return self.bundle.frame_basis(self.cached)

    def dressing_or_identity(self):
        """(u, dressable): ``Bundle.dressing_or_identity`` from this frame's factorisation."""
        return self.bundle._dressing_or_identity(self)

    def redressed(self, covector: Tensors, tangents: tuple, statistics=None):
        """(frame of p·u, act_dual(covector, u), tangents·u) for u the dressing where it is
        defined (identity elsewhere); the dressed frame comes written down where the bundle
        knows it in closed form. With ``statistics``, triples ``(index, kind, S)`` of r×r
        statistics of tensor ``index`` (``kind``: ``"covector"`` or ``"tangent"``,
        ``Bundle.act_statistic``), a fourth entry: the statistics carried to p·u."""
        stats = () if statistics is None else tuple(statistics)
        moved, covector, carried, carried_stats, data = self.bundle._redress(
            self, covector, tangents, stats
        )
        frame = self.bundle.at(moved, data)
        if statistics is None:
            return frame, covector, carried
        return frame, covector, carried, carried_stats

    # ---- flags --------------------------------------------------------------------------------
    @property
    def deficient(self):
        """Per head (bool), whether the point is rank-deficient to the frame's precision; None
        for bundles without heads."""
        return self.bundle.deficient_heads(self.data)
