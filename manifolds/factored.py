r"""Two-factor bundles: the shared geometry of head and unit symmetries.

A *factored* bundle has points that are, per head h, two factors A_h ∈ R^{rows_a×r} and
B_h ∈ R^{rows_b×r} (stored in a layout: ``HeadOV`` keeps B transposed), with a subgroup
G ⊆ GL(r) per head acting on the right as (A g, B g⁻ᵀ), so M = A Bᵀ is invariant. ``HeadQK`` /
``HeadOV`` (G = GL(r)), ``RotaryQK`` (the RoPE commutant) and ``PositiveRescaling`` (r = 1,
G = R_{>0}) are siblings of ``FactoredBundle``; each defines only its group. What they share
lives here, once:

* metrics      ``"euclidean"``: ⟨U, V⟩ = tr(U₁ᵀV₁) + tr(U₂ᵀV₂), O(r)-invariant only;
  ``"invariant"`` (Mishra, Meyer, Bonnabel & Sepulchre 2014): with P = AᵀA, Q = BᵀB,
  ⟨U, V⟩ = tr((Q + δ_Q) U₁ᵀV₁) + tr((P + δ_P) U₂ᵀV₂), δ_P = ``damping``·tr(P)/r (likewise Q).
  With ``damping = 0`` it is GL(r)-invariant and descends to P/G (gradient steps are gauge-
  equivariant exactly); with ``damping > 0`` it is only O(r)-invariant, but stays positive
  definite at rank-deficient points (a LoRA adapter at B = 0) — the scaled-GD preconditioner
  of Zhang & Pilanci (2024), relative so that it commutes with scaling;
* gradient     Euclidean: (∇_A, ∇_B); invariant: (∇_A (Q + δ_Q)⁺, ∇_B (P + δ_P)⁺);
* second moments  ``slice_mean_square``: per row of each factor the metric's squared row norm
  divided by r — rows are never mixed by the group (invariant metric: GL-invariant);
* decay        ``scale_invariants(p, c)``: M ↦ c·M by scaling both factors by √c;
* frames       ``factorise(p)``: per head the Grams P = AᵀA, Q = BᵀB (in the working precision,
  float64 where that cannot resolve a head's rank) and one factorisation of each —
  eigendecompositions P = UΛUᵀ, Q = VMVᵀ for the Euclidean and the damped metrics, Cholesky
  factors for the undamped invariant one — shared by everything at p (``FactorFrame``);
* step bound   ``limit_step(p, v)`` (invariant metric): the new invariant after the step
  p ↦ p + v is M' = M + (V₁Bᵀ + AV₂ᵀ) + V₁V₂ᵀ; per head the step is scaled by
  s = min(1, ½‖L‖/‖N‖) with L = V₁Bᵀ + AV₂ᵀ, N = V₁V₂ᵀ, so the second-order change never
  exceeds half the first-order one. Both norms are gauge-invariant traces of r×r products, so
  the rule commutes with the action. It acts only where the factors are ill-conditioned;
* balance      ``moment_map(p)``: the moment map of G at p, AᵀA − BᵀB projected onto G's Lie
  algebra (Noether charge of gradient flow; zero exactly on the dressed section).
"""

from __future__ import annotations

import copy

import torch

from .base import Bundle, Point, Tangent, checks_enabled, random_orthogonal
from .frames import FactorFrame, balanced_frame, frame_from_grams, merge_frames, step_scale
from .linalg import (
    congruence,
    cross,
    gram,
    numerical_rank,
    positive_int,
    row_mean_square,
    sign_fix_columns,
    times,
    work_dtype,
)

__all__ = [
    "FactoredBundle",
    "FactorFrame",
    "METRICS",
    "STATISTIC_KINDS",
    "frame_from_grams",
    "balanced_frame",
    "merge_frames",
]

METRICS = ("euclidean", "invariant")
#: how an r×r statistic of a factor transforms (``FactoredBundle.act_statistic``)
STATISTIC_KINDS = ("covector", "tangent")


class FactoredBundle(Bundle):
    """Per-head factor pairs (A, B) with a subgroup of GL(r) acting as (A g, B g⁻ᵀ).

    Subclasses set ``factor_names``, ``b_transposed`` (the layout of the second tensor) and the
    group: ``act``, ``vertical``, the vertical generator, dressing, ``moment_map`` and sampling.
    """

    n_tensors = 2
    per_head = True
    #: whether the second tensor of a point stores Bᵀ (H, r, rows_b) instead of B
    b_transposed = False
    factor_names: tuple[str, str] = ("A", "B")
    #: hooks for factors whose rows are split across processes (set by ``with_row_reduction``
    #: where a sibling offers it; the shared formulas route every row sum through them)
    _sum_rows = None
    _signs_of_rows = None

    def __init__(
        self,
        n_heads: int,
        d_model: int,
        d_head: int,
        metric: str = "euclidean",
        *,
        factor_rows: tuple[int, int] | None = None,
        damping: float = 0.0,
    ):
        self.n_heads = positive_int("n_heads", n_heads)
        self.d_model = positive_int("d_model", d_model)
        self.d_head = positive_int("d_head", d_head)
        if d_head > d_model:
            raise ValueError(f"d_head ({d_head}) must not exceed d_model ({d_model})")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        if not isinstance(damping, (int, float)) or not 0.0 <= float(damping) < float("inf"):
            raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
        if damping and metric != "invariant":
            raise ValueError(f"damping applies to the invariant metric only (metric={metric!r})")
        self.metric = metric
        self.damping = float(damping)
        rows_a, rows_b = (d_model, d_model) if factor_rows is None else factor_rows
        #: rows of A and of B (more than d_model where bias rows or grouped query heads stack)
        self.factor_rows = (positive_int("rows_a", rows_a), positive_int("rows_b", rows_b))
        for name, rows in zip(self.factor_names, self.factor_rows):
            if rows < d_head:
                raise ValueError(
                    f"{type(self).__name__}: factor {name} has {rows} rows, fewer than d_head="
                    f"{d_head}: it cannot have rank d_head (give d_head <= {rows})"
                )

    def _repr_fields(self) -> str:
        extra = f", damping={self.damping:g}" if self.damping else ""
        return (
            f"n_heads={self.n_heads}, d_model={self.d_model}, d_head={self.d_head}, "
            f"metric={self.metric!r}, factor_rows={self.factor_rows}{extra}"
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._repr_fields()})"

    # ---- rows or heads held by several processes -----------------------------------------
    def with_row_reduction(self, sum_rows, signs_of_rows) -> FactoredBundle:
        """This bundle on factors whose rows are sharded: ``sum_rows(list)`` completes partial
        sums over rows (an all-reduce), ``signs_of_rows(coords)`` applies the sign rule to the
        largest entry over all rows. Every row sum of the geometry — Grams, cross products,
        the metric — goes through the first; points of any row count are accepted."""
        sharded = copy.copy(self)
        sharded._sum_rows, sharded._signs_of_rows = sum_rows, signs_of_rows
        return sharded

    @property
    def rows_split(self) -> bool:
        """Whether the factor rows are split across processes (``with_row_reduction``)."""
        return self._sum_rows is not None

    def with_heads(self, n_heads: int) -> FactoredBundle:
        """This bundle on ``n_heads`` of its heads (a shard of whole heads): heads are
        independent, so the same bundle with fewer heads is the geometry of the shard."""
        local = copy.copy(self)
        local.n_heads = positive_int("n_heads", n_heads)
        return local

    def row_sums(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Sums over the factor rows, completed across processes for sharded rows."""
        return tensors if self._sum_rows is None else tuple(self._sum_rows(list(tensors)))

    def column_signs(self, coords: torch.Tensor) -> torch.Tensor:
        """The sign rule over all rows of ``coords`` (largest-|entry| of each column positive)."""
        return (
            sign_fix_columns(coords) if self._signs_of_rows is None else self._signs_of_rows(coords)
        )

    def _shape_problem(self, index: int, shape: tuple[int, ...]):
        if self._sum_rows is None:
            return super()._shape_problem(index, shape)
        expected = list(self.point_shapes()[index])
        row_axis = 2 if (index == 1 and self.b_transposed) else 1
        expected[row_axis] = shape[row_axis] if len(shape) == 3 else -1
        return None if tuple(expected) == shape else f"{tuple(expected)} (rows sharded)"

    # ---- layout ---------------------------------------------------------------------------
    def point_shapes(self):
        (rows_a, rows_b), h, r = self.factor_rows, self.n_heads, self.d_head
        second = (h, r, rows_b) if self.b_transposed else (h, rows_b, r)
        return ((h, rows_a, r), second)

    def factors(self, point) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B), each (H, rows, r), of a point or tangent vector in this bundle's layout."""
        return (point[0], point[1].mT) if self.b_transposed else (point[0], point[1])

    def from_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The point or tangent vector in this bundle's layout with factors (A, B)."""
        return (a, b.mT) if self.b_transposed else (a, b)

    @property
    def metric_is_invariant(self) -> bool:
        return self.metric == "invariant" and self.damping == 0.0

    # ---- stacking: the heads of many layers in one batch ------------------------------------
    def stack_key(self):
        """Bundles of one family (``_stack_family``), factor shapes, metric and damping stack:
        their points, in factor form (A, B), concatenate along the head axis (a transposed
        layout such as ``HeadOV``'s is no obstacle). Row-sharded factors do not stack."""
        family = self._stack_family()
        if family is None or self._sum_rows is not None:
            return None
        return (family, self.factor_rows, self.d_head, self.metric, self.damping)

    def _stack_family(self):
        """What must agree, besides shapes and metric, for two bundles to stack (None: never)."""
        return None

    # ---- checks -----------------------------------------------------------------------------
    def check_full_rank(self, point: Point, purpose: str, rel_tol: float | None = None) -> None:
        """ValueError naming the first rank-deficient head (synchronises; skipped when
        checks are disabled, and on row-sharded factors, whose rank needs every row)."""
        if not checks_enabled() or self._sum_rows is not None:
            return
        for name, factor in zip(self.factor_names, self.factors(point)):
            ranks = numerical_rank(factor, rel_tol)
            deficient = torch.nonzero(ranks < self.d_head)
            if deficient.numel():
                head = int(deficient[0, 0])
                raise ValueError(
                    f"{type(self).__name__}: {purpose} needs full rank d_head={self.d_head}, but "
                    f"head {head} of {name} has rank {int(ranks[head])}"
                )

    # ---- the frame: one factorisation per head ------------------------------------------------
    def factorise(self, point: Point) -> FactorFrame:
        """The frame at ``point``: two d×r² Gram products and one r×r factorisation of each
        Gram per head, in the factors' working precision (``work_dtype``: float32 for float32
        and bfloat16 factors). Where that precision cannot resolve a head's rank (a Gram
        eigenvalue or Cholesky pivot below 8·r·eps of its largest: factors of condition above
        about 130 in float32) the frame is formed again in float64, which resolves factors of
        condition up to about 1e7 — decided by reading the flags on the CPU, where that read
        costs nothing; on accelerators the working-precision frame is kept (flagged heads are
        reported as rank-deficient). The dressing, which must keep every invariant exactly,
        works in float64 whatever the parameters' precision (``GeneralLinearPair.redress``)."""
        point = self.check_point(point)
        if self.metric == "invariant" and not self.damping:
            self.check_full_rank(point, "the invariant metric")  # undefined at a rank drop
        factors = self.factors(point)
        work = work_dtype(factors[0].dtype)
        frame = self._frame_in(factors, work)
        resolve = work != torch.float64 and frame.deficient.device.type == "cpu"
        if resolve and bool(frame.deficient.any()):
            frame = self._frame_in(factors, torch.float64)
        return frame

    def _frame_in(self, factors, dtype: torch.dtype) -> FactorFrame:
        a, b = (t.to(dtype) for t in factors)
        p, q = self.row_sums(gram(a), gram(b))
        closed_form = self.metric == "invariant" and not self.damping
        weighted = self.metric != "euclidean"
        return frame_from_grams(p, q, self.damping, spectral=not closed_form, weighted=weighted)

    def deficient_heads(self, data: FactorFrame) -> torch.Tensor:
        """(H,) bool: a factor Gram with smallest eigenvalue (or Cholesky pivot) at round-off
        level of its largest (8·r·eps of the factorisation's working precision)."""
        return data.deficient

    def dead_heads(self, point: Point) -> torch.Tensor:
        """(H,) bool: heads with A = 0 and B = 0. The gradients (G B, Gᵀ A) of any loss of
        M = A Bᵀ vanish there, under every metric, so such a head never moves; one zero factor
        (LoRA's B = 0) is a valid start."""
        a, b = self.factors(self.check_point(point))
        size_a, size_b = self.row_sums(a.square().sum((-2, -1)), b.square().sum((-2, -1)))
        return (size_a == 0) & (size_b == 0)

    # ---- metric ------------------------------------------------------------------------------
    def _inner(self, frame, u: Tangent, v: Tangent) -> torch.Tensor:
        point = self.check_point(frame.point)
        u1, u2 = self.factors(self.check_tangent(point, u, "u"))
        v1, v2 = self.factors(self.check_tangent(point, v, "v"))
        if self.metric == "euclidean":
            local = (u1 * v1).sum() + (u2 * v2).sum()
        else:
            f = frame.data
            root_1, root_2 = f.root_q.to(u1.dtype), f.root_p.to(u1.dtype)
            local = (times(u1, root_1) * times(v1, root_1)).sum()
            local = local + (times(u2, root_2) * times(v2, root_2)).sum()
        return self.row_sums(local.reshape(1))[0][0]

    def _riemannian_gradient(self, frame, egrad: Tangent) -> Tangent:
        if self.metric == "euclidean":
            return tuple(egrad)
        point = self.check_point(frame.point)
        g1, g2 = self.factors(self.check_tangent(point, egrad, "gradient"))
        f = frame.data  # (Q + δ)⁺, (P + δ)⁺
        return self.from_factors(times(g1, f.inv_q.to(g1.dtype)), times(g2, f.inv_p.to(g2.dtype)))

    def _gradient_and_moments(self, frame, egrad: Tangent) -> tuple[Tangent, Tangent]:
        """Invariant metric: the mean squares without the root's product, ‖u R‖² = u (Q + δ) uᵀ
        = g (Q + δ)⁺ gᵀ = rowsum(u ∘ g) for u = g (Q + δ)⁺ and R Rᵀ = Q + δ."""
        if self.metric == "euclidean":
            return super()._gradient_and_moments(frame, egrad)
        rgrad = self._riemannian_gradient(frame, egrad)
        pairs = zip(self.factors(rgrad), self.factors(tuple(egrad)))
        return rgrad, self.from_factors(*(row_mean_square(u, g) for u, g in pairs))

    def _slice_mean_square(self, frame, v: Tangent) -> Tangent:
        """Per-row mean squared magnitude of each factor under the metric, (H, rows, 1) per
        factor (transposed like the layout); a mean over r: Euclidean, Adam's mean square."""
        point = self.check_point(frame.point)
        u1, u2 = self.factors(self.check_tangent(point, v))
        if self.metric != "euclidean":  # ‖u_i R‖² with R Rᵀ the metric's Gram
            f = frame.data
            u1, u2 = times(u1, f.root_q.to(u1.dtype)), times(u2, f.root_p.to(u2.dtype))
        return self.from_factors(row_mean_square(u1), row_mean_square(u2))

    def scale_invariants(self, point: Point, factor) -> Point:
        """Multiply every head's M = A Bᵀ by ``factor``: each factor by √factor."""
        root = self.decay_multiplier(factor)
        return tuple(t * root for t in point)

    def decay_multiplier(self, factor):
        return factor.sqrt() if isinstance(factor, torch.Tensor) else factor**0.5

    def _limit_step(self, frame, step: Tangent) -> Tangent:
        """Scale each head's step so its second-order change of M is ≤ ½ its first-order one
        (module docstring); the identity under the Euclidean metric."""
        scale = self._step_scale(frame, step)
        return tuple(step) if scale is None else tuple(t * scale for t in step)

    def _step_scale(self, frame, step: Tangent, factor: float = 1.0):
        if self.metric == "euclidean":
            return None
        a, b = self.factors(frame.point)
        v1, v2 = self.factors(step)
        f = frame.data
        products = self.row_sums(gram(v1), gram(v2), cross(a, v1), cross(b, v2))
        vv1, vv2, av1, bv2 = (  # of V = factor·step: V₁ᵀV₁, V₂ᵀV₂, AᵀV₁, BᵀV₂
            t.to(f.p.dtype) * c for t, c in zip(products, (factor**2, factor**2, factor, factor))
        )
        return step_scale(f, vv1, vv2, av1, bv2).to(v1.dtype).view(-1, 1, 1)

    # ---- the group part shared by the siblings ------------------------------------------------
    def _project_vertical(self, frame, v: Tangent) -> Tangent:
        point = self.check_point(frame.point)
        v = self.check_tangent(point, v)
        return self.vertical(point, self._vertical_generator(frame, v))

    def _project_horizontal(self, frame, v: Tangent) -> Tangent:
        point = self.check_point(frame.point)
        v = self.check_tangent(point, v)
        (a, b), (z1, z2) = self.factors(point), self.factors(v)
        return self.from_factors(*self._minus_vertical(a, b, z1, z2, frame, v))

    def _vertical_generator(self, frame, v: Tangent):
        """The Lie-algebra element ξ with V(ξ) the metric-orthogonal vertical part of v at
        ``frame.point`` (a checked tangent)."""
        raise self.missing("vertical generator")

    def _minus_vertical(self, a, b, z1, z2, frame, v: Tangent):
        """(Z₁, Z₂) less the factors of V(ξ) (``vertical``, ξ from ``_vertical_generator``), one
        fused pass over each factor."""
        raise self.missing("horizontal projection")

    def act_statistic(self, statistic: torch.Tensor, g, index: int, kind: str) -> torch.Tensor:
        """``Bundle.act_statistic`` for the action (A g, B g⁻ᵀ): a tangent vector's factors move
        by (g, g⁻ᵀ), a covector's by (g⁻ᵀ, g); an r×r statistic S of factor ``index``
        (E[VᵢᵀVᵢ], E[GᵢᵀGᵢ], or a preconditioner) by S ↦ cᵀ S c with c its factor's matrix."""
        return congruence(statistic, self._statistic_map(g, None, index, kind))

    def _statistic_map(self, g, g_inv_t, index: int, kind: str):
        """The matrix c of ``act_statistic`` (``g_inv_t``: g⁻ᵀ where the caller holds it)."""
        if index not in (0, 1) or kind not in STATISTIC_KINDS:
            raise ValueError(
                f"{type(self).__name__}: a statistic needs index 0 or 1 (the factor) and kind in "
                f"{STATISTIC_KINDS}, got index={index!r}, kind={kind!r}"
            )
        g_inv_t = self.inverse_transpose(g) if g_inv_t is None else g_inv_t
        tangent = (g, g_inv_t)
        return tangent[index] if kind == "tangent" else tangent[1 - index]

    def moment_map(self, point: Point) -> torch.Tensor:
        """AᵀA − BᵀB projected onto the group's Lie algebra, per head (subclass defines)."""
        raise self.missing("moment_map")

    def balance_gap(self, point: Point) -> torch.Tensor:
        """Per head ‖μ(A, B)‖ / ‖μ₊(A, B)‖: the moment map relative to the same projection of
        AᵀA + BᵀB. Zero exactly where the moment map vanishes (the dressed section up to the
        compact part of G); independent of the dressing, so smooth where it is ambiguous."""
        point = self.check_point(point)
        a, b = self.factors(point)
        p, q = self.row_sums(gram(a), gram(b))
        gap = self._moment(p - q).flatten(1).norm(dim=-1)
        size = self._moment(p + q).flatten(1).norm(dim=-1)
        return gap / size.clamp_min(torch.finfo(size.dtype).tiny)

    def _moment(self, symmetric: torch.Tensor) -> torch.Tensor:
        """The orthogonal projection of (H, r, r) matrices onto the Lie algebra (per head)."""
        raise self.missing("moment_map")

    # ---- sampling -------------------------------------------------------------------------------
    def random_point(self, *, generator=None, dtype=None, device=None, condition=4.0) -> Point:
        """Factors Q diag(s) Q' per head: Haar frames, singular values log-spaced in
        [1, ``condition``] (distinct almost surely) and scaled by 1/√d like a Gaussian init."""
        dtype, device = self._dtype_device(dtype, device)
        rows_a, rows_b = self.factor_rows
        return self.from_factors(
            self._random_factor(rows_a, generator, dtype, device, condition),
            self._random_factor(rows_b, generator, dtype, device, condition),
        )

    def _random_factor(self, d, generator, dtype, device, condition) -> torch.Tensor:
        h, r = self.n_heads, self.d_head
        frame = random_orthogonal((h,), d, generator, dtype, device)[..., :r]
        s = self._log_spaced((h,), r, condition, generator, dtype, device)
        rotation = random_orthogonal((h,), r, generator, dtype, device)
        return (frame * s.unsqueeze(-2)) @ rotation * (r / d) ** 0.5
