"""The principal-bundle interface shared by every symmetry in ``manifolds``.

A ``Bundle`` models a principal G-bundle π: P → P/G whose total space P is an open subset of a
Euclidean space of *tuples of tensors* (the point), with G acting on the right. Tangent vectors
are tuples of the same shapes. The quotient P/G is never represented explicitly: it is handled
through horizontal lifts (tangent vectors metric-orthogonal to the orbit) and through dressing
fields u: P → G with u(p·g) = g⁻¹u(p), whose canonical representative p·u(p) is constant on
orbits.

Every concrete bundle implements the abstract members; the defaults here are the generic
formulas (``project_horizontal = id - project_vertical``, retraction ``p + v`` because P is open,
transport by horizontal projection at the new point, ``dress = act(p, dressing(p))``).
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import math
from collections.abc import Iterator

import torch

from .checks import PointChecks
from .frame import FrameReuse
from .linalg import inverse
from .sampling import dtype_device, log_spaced, randn, random_orthogonal

Point = tuple[torch.Tensor, ...]
Tangent = tuple[torch.Tensor, ...]

__all__ = [
    "randn",
    "random_orthogonal",
    "Bundle",
    "Point",
    "Tangent",
    "unchecked",
    "checks_enabled",
    "AMBIGUITY_TOLERANCE",
]

#: Dressings whose smallest relative spectral gap is below this are reported as ambiguous: two
#: (nearly) equal singular values/eigenvalues make the canonical frame depend on round-off.
AMBIGUITY_TOLERANCE = 1e-6

_CHECKS = contextvars.ContextVar("manifolds_rank_checks", default=True)


def checks_enabled() -> bool:
    """Whether rank checks (which synchronise with the device) run in this context."""
    return _CHECKS.get()


@contextlib.contextmanager
def unchecked() -> Iterator[None]:
    """Skip the rank checks that need a host synchronisation (shape checks always run).

    Optimisers use this inside ``step()``; a rank-deficient point then gives non-finite values
    instead of a ``ValueError``, which the optimiser's non-finite guard catches.
    """
    token = _CHECKS.set(False)
    try:
        yield
    finally:
        _CHECKS.reset(token)


class Bundle(FrameReuse, PointChecks, abc.ABC):
    """A principal G-bundle over a tuple-of-tensors total space (see module docstring).

    Subclasses set ``n_tensors`` (the arity of a point) and ``metric`` and implement the
    abstract methods. All methods are batched over leading head/layer axes and are device- and
    dtype-agnostic. Methods that need a factorisation of the point (projections, gradients,
    second moments, transport) take the point alone; the frame handle ``at(point)``
    (``manifolds.frame.Frame``) answers the same questions from one factorisation of the point
    through the protected hooks (``_inner(frame, …)``, ``_project_vertical``, …), which
    subclasses implement, reading ``frame.data`` (their ``factorise``) only when they need it.
    Optional members raise ``NotImplementedError`` naming the bundle and the member.
    """

    n_tensors: int
    metric: str
    #: whether every tensor of a point carries a leading head (or unit) axis of one orbit each
    per_head: bool = False
    #: how frames and re-dressing are computed: "exact" factorisations, or "iterative"
    #: (matmul-only, where a bundle offers it: ``with_geometry``)
    geometry: str = "exact"

    def missing(self, member: str) -> NotImplementedError:
        """The uniform error of an optional member this bundle does not provide."""
        return NotImplementedError(f"{type(self).__name__} does not provide {member}")

    # ---- sizes and the group -------------------------------------------------------------
    @property
    @abc.abstractmethod
    def group_dim(self) -> int:
        """Dimension of the structure group G (the orbit dimension at a free point)."""

    @property
    def compact_dim(self) -> int:
        """Dimension of the subgroup of G that preserves the Euclidean norm of a point (its
        orbits stay level sets of an L2-regularised objective): r(r−1)/2 per GL(r) head,
        0 per rescaled unit, all of a compact G."""
        raise self.missing("compact_dim")

    @property
    def metric_is_invariant(self) -> bool:
        """Whether the metric is G-invariant (then it descends to P/G: projections etc. commute)."""
        return False

    @property
    @abc.abstractmethod
    def algebra_shape(self) -> tuple[int, ...]:
        """Shape of a Lie-algebra element ξ accepted by ``vertical``."""

    def algebra_basis(self, *, dtype=None, device=None) -> torch.Tensor:
        """A basis of the Lie algebra stacked on a leading axis of length ``group_dim``.

        The default serves full matrix algebras (``prod(algebra_shape) == group_dim``): the
        unit matrices. Other algebras override it."""
        shape, dim = tuple(self.algebra_shape), self.group_dim
        if math.prod(shape) != dim:
            raise self.missing("algebra_basis")
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        return torch.eye(dim, dtype=dtype, device=device).reshape(dim, *shape)

    def random_algebra_element(self, *, generator=None, dtype=None, device=None):
        """A Gaussian element of the Lie algebra (the default: of a full matrix algebra)."""
        if math.prod(tuple(self.algebra_shape)) != self.group_dim:
            raise self.missing("random_algebra_element")
        return randn(self.algebra_shape, generator, dtype, device)

    def group_exp(self, xi):
        """The group exponential exp(ξ) (matrix exponential of matrix groups)."""
        return torch.linalg.matrix_exp(xi)

    @abc.abstractmethod
    def point_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shape of each tensor of a point."""

    # ---- the action and its infinitesimal generator ---------------------------------
    @abc.abstractmethod
    def act(self, point: Point, g) -> Point:
        """The right action p·g (linear in p, so it also pushes tangent vectors forward)."""

    def act_dual(self, covector: Tangent, g) -> Tangent:
        """The action on Euclidean gradients: ∇f(p·g) = act_dual(∇f(p), g) for invariant f.

        The gradient is a covector: it transforms by the inverse transpose of the linear map
        p ↦ p·g, which for these matrix-group actions is p ↦ p·g⁻ᵀ.
        """
        return self.act(covector, self.inverse_transpose(g))

    def inverse(self, g):
        """g⁻¹ (batched), in the working precision; orthogonal groups override it."""
        return inverse(g)

    def inverse_transpose(self, g):
        """g⁻ᵀ (batched); orthogonal groups override with the identity map."""
        return inverse(g).mT

    @abc.abstractmethod
    def vertical(self, point: Point, xi) -> Tangent:
        """d/dt p·exp(tξ) at t = 0."""

    def at(self, point: Point, data=None):
        """The frame handle at ``point`` (``manifolds.frame.Frame``): the point with its
        factorisation (``data`` if the caller holds it, else computed on first use) and every
        operation an optimiser needs there."""
        from .frame import Frame

        return Frame(self, point, data)

    def factorise(self, point: Point):
        """The factorisation of ``point`` that projections, gradients and moments reuse (a
        frame's ``data``), or None for bundles that need none."""
        return None

    # ---- metric and splitting: public on a point, hooks on its frame --------------------------
    def inner(self, point: Point, u: Tangent, v: Tangent) -> torch.Tensor:
        """The metric on P at ``point`` (a scalar tensor)."""
        return self.at(point).inner(u, v)

    def norm(self, point: Point, v: Tangent) -> torch.Tensor:
        """The metric norm of a tangent vector."""
        return self.at(point).norm(v)

    def project_vertical(self, point: Point, v: Tangent) -> Tangent:
        """Metric-orthogonal projection onto the vertical space (tangent to the orbit)."""
        return self.at(point).vertical_part(v)

    def project_horizontal(self, point: Point, v: Tangent) -> Tangent:
        """Metric-orthogonal projection onto the horizontal space, v - P_V v."""
        return self.at(point).horizontal(v)

    def riemannian_gradient(self, point: Point, egrad: Tangent) -> Tangent:
        """The metric's gradient from the Euclidean one (identity for the Euclidean metric)."""
        return self.at(point).riemannian_gradient(egrad)

    def horizontal_gradient(self, point: Point, egrad: Tangent) -> Tangent:
        """Horizontal lift of the quotient gradient: the Riemannian gradient, projected.

        For a G-invariant loss the Riemannian gradient is already horizontal; the projection
        removes the round-off and makes the result exact for non-invariant losses too.
        """
        self.check_tangent(point, egrad, "gradient")
        return self.at(point).horizontal_gradient(egrad)

    def slice_mean_square(self, point: Point, v: Tangent) -> Tangent:
        """Gauge-invariant mean squared magnitudes of v, one per slice that no symmetry mixes.

        Returns a tuple of tensors broadcastable to the point's tensors, normalised per
        coordinate (a mean, not a sum) so that the Euclidean case matches Adam's scale. Adaptive
        optimisers divide by their running average: because these magnitudes are invariant, the
        preconditioner commutes with the group action (per-coordinate second moments would pick
        a basis the symmetry rotates). The default is one magnitude for the whole point.
        """
        return self.at(point).mean_square(v)

    @abc.abstractmethod
    def _inner(self, frame, u: Tangent, v: Tangent) -> torch.Tensor:
        """``inner`` at ``frame.point`` (``frame.data``: its factorisation, on first use)."""

    @abc.abstractmethod
    def _project_vertical(self, frame, v: Tangent) -> Tangent:
        """``project_vertical`` at ``frame.point``."""

    def _project_horizontal(self, frame, v: Tangent) -> Tangent:
        vert = self._project_vertical(frame, v)
        return tuple(a - b for a, b in zip(v, vert))

    def _riemannian_gradient(self, frame, egrad: Tangent) -> Tangent:
        return tuple(egrad)

    def _gradient_and_moments(self, frame, egrad: Tangent) -> tuple[Tangent, Tangent]:
        """(Riemannian gradient, its ``_slice_mean_square``), overridden where that is cheaper."""
        rgrad = tuple(self._riemannian_gradient(frame, egrad))
        return rgrad, tuple(self._slice_mean_square(frame, rgrad))

    def _slice_mean_square(self, frame, v: Tangent) -> Tangent:
        point = frame.point
        mean = self._inner(frame, v, v) / sum(t.numel() for t in point)
        return tuple(mean.reshape((1,) * t.dim()) for t in point)

    # ---- moving along the bundle -------------------------------------------------------
    def retract(self, point: Point, v: Tangent) -> Point:
        """Retraction: p + v (the total space is an open subset of a vector space)."""
        return tuple(p + d for p, d in zip(point, v))

    def transport(self, point: Point, new_point: Point, v: Tangent) -> Tangent:
        """Vector transport by horizontal projection at the new point."""
        return self.project_horizontal(new_point, v)

    def limit_step(self, point: Point, step: Tangent) -> Tangent:
        """The step an optimiser may take from ``point`` along ``-step``: the bundle's bound on
        how far one step may move the invariants (default: no bound)."""
        return self._limit_step(self.at(point), step)

    def _limit_step(self, frame, step: Tangent) -> Tangent:
        return tuple(step)

    def scale_invariants(self, point: Point, factor) -> Point:
        """Weight decay on the orbit: the invariant linear maps are multiplied by ``factor``.

        The default scales every tensor, which commutes with any linear action.
        """
        return tuple(p * factor for p in point)

    def deficient_heads(self, data):
        """Per head (bool), whether the point whose factorisation is ``data`` (``factorise``)
        is rank-deficient to working precision; None for bundles without such a notion."""
        return None

    def dead_heads(self, point: Point):
        """Per head (bool), whether every tensor of the head is zero: a critical point of every
        loss of the invariants, which no gradient step leaves; None for bundles without heads."""
        return None

    def balance_gap(self, point: Point):
        """Relative distance of ``point`` from the dressed section measured without dressing:
        the norm of the bundle's moment map (or its analogue), relative."""
        raise self.missing("balance_gap")

    # ---- canonical representatives ----------------------------------------------------
    @abc.abstractmethod
    def dressing(self, point: Point):
        """The dressing field u(p) ∈ G, with u(p·g) = g⁻¹u(p)."""

    def dress(self, point: Point) -> Point:
        """The canonical representative p·u(p); constant on each orbit."""
        return self.act(point, self.dressing(point))

    def gauge_drift(self, point: Point):
        """‖p − dress(p)‖ / ‖p‖: per head (H,) where ``per_head``, else a scalar."""
        point = self.check_point(point)
        dressed = self.dress(point)
        dims = lambda t: tuple(range(1, t.dim())) if self.per_head else tuple(range(t.dim()))  # noqa: E731
        diff = sum((p - q).square().sum(dims(p)) for p, q in zip(point, dressed))
        size = sum(p.square().sum(dims(p)) for p in point)
        return (diff / size.clamp_min(torch.finfo(size.dtype).tiny)).sqrt()

    def stack_key(self):
        """A hashable two bundles share exactly when their points can be stacked along the head
        axis and stepped as one bundle of all their heads (``stacked``), or None (alone)."""
        return None

    def stacked(self, n_heads: int) -> Bundle:
        """The bundle of ``n_heads`` heads on which stacked points of bundles with this
        ``stack_key`` live, in factor form (optimisers batch layers through it)."""
        raise self.missing("stacked")

    def with_geometry(self, geometry: str) -> Bundle:
        """This bundle with its frames computed by ``geometry`` (``"exact"`` or
        ``"iterative"``); a bundle returns itself for the geometry it has."""
        if geometry == self.geometry:
            return self
        raise self.missing("with_geometry")

    def with_row_reduction(self, sum_rows, signs_of_rows) -> Bundle:
        """This bundle on points whose rows are split across processes (factored bundles)."""
        raise self.missing("with_row_reduction")

    def with_heads(self, n_heads: int) -> Bundle:
        """This bundle on ``n_heads`` of its heads (a shard of whole heads; head bundles)."""
        raise self.missing("with_heads")

    def factors(self, point: Point):
        """(A, B) of a factored bundle's point (two-factor bundles only)."""
        raise self.missing("factors")

    def dressing_or_identity(self, point: Point):
        """(u, dressable): the dressing where it is defined and the identity elsewhere, with a
        boolean tensor saying where (per head for head bundles). Never synchronises: what
        optimisers use (``Frame.dressing_or_identity`` reuses the frame's factorisation where
        the dressing needs the same one). The default: every point is dressable."""
        return self.at(point).dressing_or_identity()

    def _dressing_or_identity(self, frame):
        u = self.dressing(frame.point)
        return u, torch.ones((), dtype=torch.bool, device=frame.point[0].device)

    # ---- re-dressing: the point, its gradient, tangents and r×r statistics ----------------------
    def redress(self, point: Point, covector: Tangent, tangents: tuple, statistics=None):
        """(p·u, act_dual(covector, u), tangents·u) for u = dressing_or_identity(p), and with
        ``statistics`` (``(index, kind, S)`` triples) a fourth entry, the statistics carried by
        ``act_statistic``: ``Frame.redressed`` on a point."""
        out = self.at(point).redressed(covector, tangents, statistics)
        return (out[0].point, *out[1:])

    def act_statistic(self, statistic: torch.Tensor, g, index: int, kind: str) -> torch.Tensor:
        """The action of g on an r×r statistic of tensor ``index`` of a point's vectors:
        ``kind="covector"`` for statistics built from gradients (E[GᵢᵀGᵢ] of factor i),
        ``"tangent"`` for those built from tangent vectors or inverse to a covector statistic
        (a preconditioner). Each transforms by congruence, S ↦ cᵀ S c, with c the matrix by
        which g multiplies factor i of such a vector (``docs/theory/dressing.md``). Optional."""
        raise self.missing("act_statistic")

    def _redress(self, frame, covector: Tangent, tangents: tuple, statistics: tuple):
        """(p·u, act_dual(covector, u), tangents·u, carried statistics, factorisation of p·u)
        at ``frame``: the generic route, by the action and a fresh factorisation. Bundles that
        know the dressed factorisation in closed form override it."""
        u, _ = self._dressing_or_identity(frame)
        moved, carried = self.act(frame.point, u), tuple(self.act(t, u) for t in tangents)
        stats = tuple(self.act_statistic(s, u, i, kind) for i, kind, s in statistics)
        return moved, self.act_dual(covector, u), carried, stats, self.factorise(moved)

    @abc.abstractmethod
    def ambiguity(self, point: Point) -> torch.Tensor:
        """Smallest relative spectral gap the dressing relies on (per head, or a scalar).

        Below ``AMBIGUITY_TOLERANCE`` the canonical representative is not unique: the bundle
        breaks the tie deterministically but the result depends on round-off.
        """

    def is_ambiguous(self, point: Point, tolerance: float = AMBIGUITY_TOLERANCE) -> torch.Tensor:
        """Boolean tensor: where the dressing is ambiguous (see ``ambiguity``)."""
        return self.ambiguity(point) < tolerance

    @abc.abstractmethod
    def invariants(self, point: Point) -> tuple[torch.Tensor, ...]:
        """Tensors that identify the orbit of ``point``."""

    # ---- sampling ---------------------------------------------------------------------
    @abc.abstractmethod
    def random_point(self, *, generator=None, dtype=None, device=None) -> Point:
        """A random point in general position."""

    @abc.abstractmethod
    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        """A random group element (condition number ``condition`` where G is not compact)."""

    def random_tangent(self, point: Point, *, generator=None) -> Tangent:
        """A standard Gaussian tangent vector at ``point``."""
        return tuple(randn(p.shape, generator, p.dtype, p.device) for p in point)

    # ---- helpers for subclasses -------------------------------------------------------
    _dtype_device = staticmethod(dtype_device)
    _log_spaced = staticmethod(log_spaced)
