r"""GL(r) re-parametrisations of attention heads: ``HeadQK`` and ``HeadOV``.

Both are the fixed-rank factorisation quotient of Mishra, Meyer, Bonnabel & Sepulchre,
"Fixed-rank matrix factorizations and Riemannian low-rank optimization" (Comput. Stat., 2014),
batched over heads. Per head write the point as two factors A, B ∈ R^{d×r} of full rank r ≤ d
(metrics, gradients, second moments and the step bound are ``FactoredBundle``'s):

* total space  P = {(A, B)} (an open set: full-rank pairs), invariant M = A Bᵀ (rank r, d×d);
* group        G = GL(r) per head, acting on the right as (A, B)·g = (A g, B g⁻ᵀ);
* vertical     V_p = {(A ξ, -B ξᵀ) : ξ ∈ gl(r)}; quotient dimension per head 2dr - r²;
* horizontal   H_p = V_p^⊥. With P = AᵀA = UΛUᵀ and Q = BᵀB = VMVᵀ (the frame), the vertical
  part of Z = (Z₁, Z₂) is (Aξ, -Bξᵀ) with ξ = U[(Uᵀ D V) ⊘ Δ]Vᵀ, where
  Euclidean:  D = AᵀZ₁ − Z₂ᵀB,                    Δᵢⱼ = λᵢ + μⱼ   (Sylvester PξᐩξQ = D);
  invariant:  D = AᵀZ₁(Q + δ_Q) − (P + δ_P)Z₂ᵀB,   Δᵢⱼ = 2λᵢμⱼ + λᵢδ_Q + δ_Pμⱼ
  (the normal equations Pξ(Q + δ_Q) + (P + δ_P)ξQ = D; at δ = 0 the closed form
  ξ = ½[P⁻¹AᵀZ₁ − Z₂ᵀBQ⁻¹]). Zero Δᵢⱼ (rank-deficient heads) get the minimum-norm solution;
* dressing     the balanced section AᵀA = BᵀB = S (diagonal): with R_A = Λ^½Uᵀ, R_B = M^½Vᵀ
  (so P = R_AᵀR_A) and R_A R_Bᵀ = Ũ S Ṽᵀ, u(p) = R_A⁻¹ Ũ S^½ and p·u(p) = (A u, B u⁻ᵀ), the
  compact SVD of M split evenly; u⁻ᵀ = R_B⁻¹ Ṽ S^½. Computed from the frame's eigenvectors in
  float64 (O(dr²) per head). Residual ambiguity: a joint sign flip of column i of both factors
  (fixed: the largest-|entry| of each column of the first factor is positive) and rotations
  inside groups of equal singular values (reported by ``ambiguity``). Heads whose Grams are
  singular to working precision have no dressing (``dressing`` raises naming the head;
  ``dressing_or_identity`` leaves them in place and flags them).

``HeadOV`` is the same bundle in the value/output layout (W_v (H, d, r), W_o (H, r, d)) with
B = W_oᵀ: action (W_v g, g⁻¹W_o), vertical (W_v ξ, -ξ W_o), invariant W_v W_o.
"""

from __future__ import annotations

import torch

from .base import Point, Tangent, random_orthogonal
from .factored import (
    METRICS,
    FactoredBundle,
    FactorFrame,
    balanced_frame,
    congruence,
    frame_from_grams,
    merge_frames,
)
from .frames import iterative_frame, warm_frame, with_fallback
from .iterative import balancing, supported_condition
from .linalg import gram, relative_gaps, solve_left, work_dtype
from .pair_frame import (
    DRESSABLE_TOLERANCE,
    PairFrame,
    balanced_dressing,
    gl_vertical_generator,
    signed_frame,
)

__all__ = [
    "HeadQK",
    "HeadOV",
    "METRICS",
    "gl_vertical_generator",
    "frame_from_grams",
    "balanced_dressing",
    "GEOMETRIES",
    "WARM_REFRESH",
]

#: how a GL(r) pair's frames and re-dressing are computed (module docstring)
GEOMETRIES = ("exact", "iterative")

#: steps after which a warm frame's bases are refreshed by an exact factorisation
#: (``GeneralLinearPair.reuses_bases``)
WARM_REFRESH = 16


class GeneralLinearPair(FactoredBundle):
    """GL(r) per head acting on a factor pair; the group half shared by ``HeadQK`` and
    ``HeadOV``, which differ only in layout (module docstring)."""

    def __init__(self, *args, geometry: str = "exact", **kwargs):
        super().__init__(*args, **kwargs)
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}, got {geometry!r}")
        if geometry == "iterative" and self.damping:
            raise ValueError(
                f"geometry='iterative' serves the Euclidean and the undamped invariant metric; "
                f"damping={self.damping:g} needs geometry='exact' (or damping=0)"
            )
        self.geometry = geometry

    def _repr_fields(self) -> str:
        extra = "" if self.geometry == "exact" else f", geometry={self.geometry!r}"
        return super()._repr_fields() + extra

    def with_geometry(self, geometry: str) -> GeneralLinearPair:
        """This bundle with its frames and re-dressing computed by ``geometry``
        (``GEOMETRIES``)."""
        return type(self)(
            self.n_heads,
            self.d_model,
            self.d_head,
            self.metric,
            factor_rows=self.factor_rows,
            damping=self.damping,
            geometry=geometry,
        )._with_hooks(self)

    def _with_hooks(self, other: GeneralLinearPair) -> GeneralLinearPair:
        self._sum_rows, self._signs_of_rows = other._sum_rows, other._signs_of_rows
        self.warm_frames = other.warm_frames
        return self

    @property
    def group_dim(self) -> int:
        return self.n_heads * self.d_head**2

    @property
    def compact_dim(self) -> int:
        return self.n_heads * self.d_head * (self.d_head - 1) // 2

    @property
    def algebra_shape(self) -> tuple[int, ...]:
        return (self.n_heads, self.d_head, self.d_head)

    def at(self, point: Point, data=None) -> PairFrame:
        return PairFrame(self, point, data)

    def _stack_family(self):
        return ("GL(r) pair", self.geometry, self.warm_frames)

    def stacked(self, n_heads: int) -> HeadQK:
        """``n_heads`` heads of this shape and metric in factor form (A, B), whatever the
        layout of this bundle (``HeadOV`` stores B transposed), its frames warm or not as
        this bundle's."""
        stacked = HeadQK(
            n_heads,
            self.d_model,
            self.d_head,
            self.metric,
            factor_rows=self.factor_rows,
            damping=self.damping,
            geometry=self.geometry,
        )
        stacked.warm_frames = self.warm_frames
        return stacked

    # ---- action ---------------------------------------------------------------------------
    def act(self, point: Point, g: torch.Tensor) -> Point:
        point = self.check_point(point)
        self.check_group_element(point, g)
        a, b = self.factors(point)
        b_new = solve_left(g, b.mT).mT  # B g⁻ᵀ = (g⁻¹ Bᵀ)ᵀ: a solve, not an explicit inverse
        return self.from_factors(a @ g, b_new)

    def vertical(self, point: Point, xi: torch.Tensor) -> Tangent:
        point = self.check_point(point)
        self.check_group_element(point, xi, "Lie-algebra element")
        a, b = self.factors(point)
        return self.from_factors(a @ xi, -(b @ xi.mT))

    # ---- splitting ------------------------------------------------------------------------
    def _vertical_generator(self, frame, v: Tangent) -> torch.Tensor:
        a, b = self.factors(frame.point)
        z1, z2 = self.factors(v)
        products = self.row_sums(a.mT @ z1, z2.mT @ b)
        return gl_vertical_generator(self.metric, frame.data, *products, frame.point).to(a.dtype)

    def _minus_vertical(self, a, b, z1, z2, frame, v: Tangent):
        xi = self._vertical_generator(frame, v)
        return torch.baddbmm(z1, a, xi, alpha=-1), torch.baddbmm(z2, b, xi.mT)  # Z − (Aξ, −Bξᵀ)

    def _moment(self, symmetric: torch.Tensor) -> torch.Tensor:
        return symmetric  # gl(r) is all of R^{r×r}

    def moment_map(self, point: Point) -> torch.Tensor:
        """Per head AᵀA − BᵀB (H, r, r): the imbalance conserved by gradient flow."""
        a, b = self.factors(self.check_point(point))
        p, q = self.row_sums(gram(a), gram(b))
        return p - q

    # ---- dressing ------------------------------------------------------------------------------
    def _dressing_parts(self, point: Point, data: FactorFrame | None = None, float64_s=False):
        """(u, u⁻ᵀ, S, dressable) with the sign rule applied, in the point's dtype (S in
        float64 with ``float64_s``). A float64 spectral factorisation of the point (``data``:
        ``factorise``'s) holds the eigendecompositions of its Grams, the very ones computed
        here otherwise, and is reused."""
        a, b = self.factors(point)
        if data is None or data.lam is None or data.p.dtype != torch.float64:
            # the dressing keeps M = ABᵀ to float64 round-off whatever the frames' precision
            grams = self.row_sums(gram(a.double()), gram(b.double()))
            data = frame_from_grams(*grams, 0.0, weighted=False)
        u, u_inv_t, s, dressable = balanced_dressing(data)
        signs = self.column_signs(a.double() @ u)
        dtype = a.dtype
        s = s if float64_s else s.to(dtype)
        return (u * signs).to(dtype), (u_inv_t * signs).to(dtype), s, dressable

    def factorise(self, point: Point) -> FactorFrame:
        """``FactoredBundle.factorise``; on the iterative route the frame of the iterations
        (``iterative_frame``), with the exact frame put in for the heads they flag where the
        flags live on the CPU (reading them costs nothing there; on accelerators flagged heads
        keep the iterations' frame and are reported as rank-deficient)."""
        if self.geometry == "exact":
            return super().factorise(point)
        point = self.check_point(point)
        if self.metric == "invariant":
            self.check_full_rank(point, "the invariant metric")  # undefined at a rank drop
        a, b = self.factors(point)
        work = work_dtype(a.dtype)
        frame = iterative_frame(*self.row_sums(gram(a.to(work)), gram(b.to(work))), self.metric)
        if frame.fallback.device.type == "cpu" and bool(frame.fallback.any()):
            frame = with_fallback(frame, super().factorise(point))
        return frame

    def reuses_bases(self, dtype: torch.dtype) -> bool:
        """Warm frames (``manifolds.frames.warm_frame``): on the exact route under the
        Euclidean metric, in the working precisions ``warm_dtypes`` (float64 runs, the
        reference, are factorised exactly at every step), on unsharded rows. A step's new
        frame is then built from the last exact frame's eigenbases, up to ``WARM_REFRESH``
        steps old: the Grams, rotated into those bases, and a few conjugate-gradient
        iterations per projection, instead of two eigendecompositions per head. The warm
        solve meets ``manifolds.iterative.WARM_TOLERANCE`` (``manifolds.pair_frame.warm_solve``,
        checked on the CPU, where a head beyond it is solved exactly and the next frame
        refactorised); its error is a vertical vector, so the horizontal part is exact."""
        return (
            self.warm_frames
            and self.metric == "euclidean"
            and self.geometry == "exact"
            and self._sum_rows is None
            and work_dtype(dtype) in self.warm_dtypes
            and self.d_head >= self.warm_min_rank
        )

    #: whether this bundle's frames may be warm (``reuses_bases``); the optimisers' sharding
    #: turns it off on the local bundle of a sharded group, whose state keeps no bases
    warm_frames: bool = True
    #: working precisions whose frames may be warm: float64 runs, the reference, are
    #: factorised exactly at every step (a test may add float64)
    warm_dtypes: tuple = (torch.float32,)
    #: the smallest head dimension whose frames may be warm: below it the batch's exact
    #: eigendecompositions cost less than the warm solves' many small kernels (a step of a
    #: width-64 model with 4 heads of 16: 4.1 ms exact, 5.6 ms warm; at r = 32 level, at
    #: r = 64 warm ahead)
    warm_min_rank: int = 32

    def frame_basis(self, data):
        """``((U, V), age)``: the eigenbases of an exact spectral frame in the working
        precision (age 0; a balanced frame's are written down), or those a warm frame was
        built from (its age) — or, where one of its solves needed the exact frame, that
        frame's (age 0). None for other frames and for bundles that do not reuse bases."""
        if data is None or not self.reuses_bases(data.p.dtype):
            return None
        if data.warm is not None:
            if data.warm.exact is not None:
                return self.frame_basis(data.warm.exact)
            return (data.warm.u, data.warm.v), data.warm.age
        if data.u is None or data.sylvester is not None or data.u.dtype != data.p.dtype:
            return None
        return (data.u, data.v), 0

    def empty_basis(self, point: Point):
        ref = point[0]
        if not self.reuses_bases(ref.dtype):
            return None
        zeros = torch.zeros(self.algebra_shape, dtype=work_dtype(ref.dtype), device=ref.device)
        return (zeros, zeros.clone())

    def factorise_from(self, point: Point, bases: tuple, age: int):
        """A warm frame of ``point`` from eigenbases ``bases`` = (U, V) that are ``age``
        steps old (``reuses_bases``); exact (``factorise``) at age 0 — bases that were exact
        at this very point — and from ``WARM_REFRESH`` on, for bases in another precision and
        where bases are not reused. A warm frame computes the exact one, once, where a solve
        on it needs it (``manifolds.pair_frame.warm_solve``)."""
        point = self.check_point(point)
        a, b = self.factors(point)
        work = work_dtype(a.dtype)
        u, v = bases
        if not 0 < age < WARM_REFRESH or not self.reuses_bases(a.dtype) or u.dtype != work:
            return self.factorise(point)
        p, q = self.row_sums(gram(a.to(work)), gram(b.to(work)))
        frame = warm_frame(p, q, u, v, age)
        frame.warm.refactorise = self.factorise  # of the point, where a solve needs it
        return frame

    def _balancing(self, point: Point):
        """(g, g⁻ᵀ) of the iterative route's re-dressing in the point's dtype: the balancing
        element where the iterations meet their bound; elsewhere the exact dressing (CPU, as
        ``factorise``) or the identity (accelerators; such heads are not dressed)."""
        a, b = self.factors(point)
        work = work_dtype(a.dtype)
        p, q = self.row_sums(gram(a.to(work)), gram(b.to(work)))
        g, g_inv_t, ok = balancing(p, q, supported_condition(work, self.d_head))
        if ok.device.type == "cpu" and not bool(ok.all()):
            other, other_inv_t, _, _ = self._dressing_parts(point)
        else:
            other = other_inv_t = torch.eye(g.shape[-1], dtype=a.dtype, device=a.device)
        keep = ok.view(-1, 1, 1)
        g, g_inv_t = g.to(a.dtype), g_inv_t.to(a.dtype)
        return torch.where(keep, g, other), torch.where(keep, g_inv_t, other_inv_t)

    def _dressing_or_identity(self, frame):
        """(u, dressable): the dressing where a head's factors have full rank to working
        precision, the identity (and ``dressable`` False) elsewhere. Never synchronises; reuses
        a float64 spectral factorisation the frame already holds (it computes none)."""
        u, _, _, dressable = self._dressing_parts(self.check_point(frame.point), frame.cached)
        return u, dressable

    def _redress(self, frame, covector: Tangent, tangents: tuple, statistics: tuple):
        """``Bundle._redress`` without a second factorisation: the dressed point is balanced,
        AᵀA = BᵀB = diag(S), so its spectral frame is written down (``balanced_frame``), and
        u⁻ᵀ comes with the dressing, so neither the action nor the statistics need a solve.
        Heads that cannot be dressed only have their columns' signs fixed (u a diagonal of
        ±1): their frame is the old one conjugated by it. (The undamped invariant metric's
        Cholesky frame is refactorised.)"""
        point = self.check_point(frame.point)
        if self.geometry == "iterative":  # balanced up to O(r); the new frame by iterations
            u, u_inv_t = self._balancing(point)
        else:
            data = frame.data
            u, u_inv_t, s, dressable = self._dressing_parts(point, data, float64_s=True)

        def move(v: Tangent, left: torch.Tensor, right: torch.Tensor) -> Tangent:
            a, b = self.factors(v)
            return self.from_factors(a @ left.to(a.dtype), b @ right.to(b.dtype))

        moved = move(point, u, u_inv_t)
        carried = tuple(move(t, u, u_inv_t) for t in tangents)
        covector = move(covector, u_inv_t, u)  # act_dual: the action of u⁻ᵀ
        stats = tuple(
            congruence(st, self._statistic_map(u, u_inv_t, i, kind).to(st.dtype))
            for i, kind, st in statistics
        )
        if self.geometry == "iterative" or (data.lam is None and data.warm is None):
            return moved, covector, carried, stats, self.factorise(moved)  # no closed form
        weighted = self.metric != "euclidean"
        balanced = balanced_frame(s.to(data.p.dtype), self.damping, weighted=weighted)
        if data.warm is not None:  # no eigenvectors to sign-flip for the undressable heads
            if dressable.device.type == "cpu" and bool(dressable.all()):  # free on the CPU
                return moved, covector, carried, stats, balanced
            return (
                moved,
                covector,
                carried,
                stats,
                merge_frames(dressable, balanced, self.factorise(moved)),
            )
        data = merge_frames(dressable, balanced, signed_frame(data, u))
        return moved, covector, carried, stats, data

    def dressing(self, point: Point) -> torch.Tensor:
        point = self.check_point(point)
        self.check_full_rank(point, "dressing", DRESSABLE_TOLERANCE**0.5)
        return self._dressing_parts(point)[0]

    def dress(self, point: Point) -> Point:
        point = self.check_point(point)
        self.check_full_rank(point, "dressing", DRESSABLE_TOLERANCE**0.5)
        a, b = self.factors(point)
        u, u_inv_t, _, _ = self._dressing_parts(point)
        return self.from_factors(a @ u, b @ u_inv_t)

    def ambiguity(self, point: Point) -> torch.Tensor:
        """Per head: smallest relative gap between the singular values of M = A Bᵀ."""
        point = self.check_point(point)
        self.check_full_rank(point, "dressing", DRESSABLE_TOLERANCE**0.5)
        return relative_gaps(self._dressing_parts(point)[2])

    def invariants(self, point: Point) -> tuple[torch.Tensor, ...]:
        a, b = self.factors(self.check_point(point))
        return (a @ b.mT,)

    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        """Q₁ diag(s) Q₂ per head with Haar Q₁, Q₂ and max(s)/min(s) = ``condition``."""
        dtype, device = self._dtype_device(dtype, device)
        h, r = self.n_heads, self.d_head
        q1 = random_orthogonal((h,), r, generator, dtype, device)
        q2 = random_orthogonal((h,), r, generator, dtype, device)
        s = self._log_spaced((h,), r, condition, generator, dtype, device)
        return (q1 * s.unsqueeze(-2)) @ q2


class HeadQK(GeneralLinearPair):
    """GL(d_head) symmetry of query/key heads: point ``(Wq, Wk)``, each
    ``(n_heads, rows, d_head)`` (rows = d_model unless ``factor_rows`` says otherwise); head h
    scores ``(X Wq[h]) (X Wk[h])ᵀ``. Group elements ``(n_heads, d_head, d_head)``."""

    factor_names = ("Wq", "Wk")


class HeadOV(GeneralLinearPair):
    """GL(d_head) symmetry of value/output heads: point ``(Wv (H, d, r), Wo (H, r, d))``,
    action ``(Wv g, g⁻¹ Wo)``, vertical ``(Wv ξ, -ξ Wo)``, invariant ``Wv Wo`` (B = Woᵀ)."""

    factor_names = ("Wv", "Wo")
    b_transposed = True
