r"""GL(r) re-parametrisations of attention heads: ``HeadQK`` and ``HeadOV``.

Both are the fixed-rank factorisation quotient of Mishra, Meyer, Bonnabel & Sepulchre,
"Fixed-rank matrix factorizations and Riemannian low-rank optimization" (Comput. Stat., 2014),
batched over heads. Per head write the point as two factors A, B ∈ R^{d×r} of full rank r ≤ d:

* total space  P = {(A, B)} (an open set: full-rank pairs), invariant M = A Bᵀ (rank r, d×d);
* group        G = GL(r) per head, acting on the right as (A, B)·g = (A g, B g⁻ᵀ);
* vertical     V_p = {(A ξ, -B ξᵀ) : ξ ∈ gl(r)}; quotient dimension per head 2dr - r²;
* metrics      ``"euclidean"``: ⟨U, V⟩ = tr(U₁ᵀV₁) + tr(U₂ᵀV₂) (only O(r)-invariant, so it does
  not descend to P/G: gradient steps are gauge-equivariant only on the dressed section);
  ``"invariant"``: ⟨U, V⟩ = tr(BᵀB U₁ᵀV₁) + tr(AᵀA U₂ᵀV₂), GL(r)-invariant, so P/G inherits it
  and gradient steps commute with the action;
* horizontal   H_p = V_p^⊥. The vertical part of Z = (Z₁, Z₂) is (Aξ, -Bξᵀ) with
  Euclidean:  (AᵀA) ξ + ξ (BᵀB) = AᵀZ₁ - Z₂ᵀB   (Sylvester, solved by two batched eigh),
  invariant:  ξ = ½[(AᵀA)⁻¹AᵀZ₁ - Z₂ᵀB(BᵀB)⁻¹]   (closed form);
* gradient     Euclidean: (∇_A, ∇_B); invariant: (∇_A (BᵀB)⁻¹, ∇_B (AᵀA)⁻¹). For a loss of M,
  ∇ = (G B, Gᵀ A) with G = ∂f/∂M is already horizontal under both metrics;
* dressing     the balanced section AᵀA = BᵀB = S (diagonal): with thin QR factors
  A = Q_A R_A, B = Q_B R_B and R_A R_Bᵀ = Ũ S Ṽᵀ, u(p) = R_A⁻¹ Ũ S^½ and
  p·u(p) = (Q_A Ũ S^½, Q_B Ṽ S^½), the compact SVD of M split evenly. R_A, R_B come from the
  Cholesky factors of AᵀA, BᵀB (O(dr²) per head). Residual ambiguity: a joint sign flip of
  column i of both factors (fixed: the largest-|entry| of each column of the first factor is
  positive) and rotations inside groups of equal singular values (reported by ``ambiguity``).

``HeadOV`` is the same bundle in the value/output layout (W_v (H, d, r), W_o (H, r, d)) with
B = W_oᵀ: action (W_v g, g⁻¹W_o), vertical (W_v ξ, -ξ W_o), invariant W_v W_o.
"""

from __future__ import annotations

import torch

from .base import Bundle, Point, Tangent, checks_enabled, random_orthogonal
from .linalg import (
    gram,
    numerical_rank,
    orthonormal_columns_sign_fixed,
    relative_gaps,
    solve_sylvester_spd,
    spd_solve_right,
)

__all__ = ["HeadQK", "HeadOV", "METRICS"]

METRICS = ("euclidean", "invariant")


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class HeadQK(Bundle):
    """GL(d_head) symmetry of query/key heads; see the module docstring for the mathematics.

    Point ``(Wq, Wk)``, each ``(n_heads, d_model, d_head)``; head h scores
    ``(X Wq[h]) (X Wk[h])ᵀ``. A group element is ``g`` of shape ``(n_heads, d_head, d_head)``.
    """

    n_tensors = 2

    def __init__(
        self,
        n_heads: int,
        d_model: int,
        d_head: int,
        metric: str = "euclidean",
        *,
        factor_rows: tuple[int, int] | None = None,
    ):
        self.n_heads = _positive_int("n_heads", n_heads)
        self.d_model = _positive_int("d_model", d_model)
        self.d_head = _positive_int("d_head", d_head)
        if d_head > d_model:
            raise ValueError(f"d_head ({d_head}) must not exceed d_model ({d_model})")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        self.metric = metric
        if factor_rows is None:
            factor_rows = (d_model, d_model)
        rows_a, rows_b = factor_rows
        #: rows of the factors A and B (more than d_model where bias rows or grouped query
        #: heads stack onto a factor)
        self.factor_rows = (_positive_int("rows_a", rows_a), _positive_int("rows_b", rows_b))

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_heads={self.n_heads}, d_model={self.d_model}, "
            f"d_head={self.d_head}, metric={self.metric!r}, factor_rows={self.factor_rows})"
        )

    # ---- layout: the factor pair (A, B) behind a point -------------------------------
    def point_shapes(self):
        (rows_a, rows_b), h, r = self.factor_rows, self.n_heads, self.d_head
        return ((h, rows_a, r), (h, rows_b, r))

    def factors(self, point) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, B) of a point or tangent vector in this bundle's layout."""
        return point[0], point[1]

    def from_factors(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The point or tangent vector in this bundle's layout with factors (A, B)."""
        return (a, b)

    # ---- sizes --------------------------------------------------------------------------
    @property
    def group_dim(self) -> int:
        return self.n_heads * self.d_head**2

    @property
    def algebra_shape(self) -> tuple[int, ...]:
        return (self.n_heads, self.d_head, self.d_head)

    # ---- checks -------------------------------------------------------------------------
    def _check_full_rank(self, a: torch.Tensor, b: torch.Tensor, purpose: str) -> None:
        """ValueError naming the first rank-deficient head (synchronises; skipped when
        checks are disabled)."""
        if not checks_enabled():
            return
        for name, factor in zip(self._factor_names(), (a, b)):
            ranks = numerical_rank(factor)
            deficient = torch.nonzero(ranks < self.d_head)
            if deficient.numel():
                head = int(deficient[0, 0])
                raise ValueError(
                    f"{type(self).__name__}: {purpose} needs full rank d_head={self.d_head}, but "
                    f"head {head} of {name} has rank {int(ranks[head])}"
                )

    def _factor_names(self) -> tuple[str, str]:
        return ("Wq", "Wk")

    # ---- action ---------------------------------------------------------------------------
    def act(self, point: Point, g: torch.Tensor) -> Point:
        point = self.check_point(point)
        self.check_group_element(point, g)
        a, b = self.factors(point)
        # B g⁻ᵀ = (g⁻¹ Bᵀ)ᵀ: a solve, not an explicit inverse
        work = torch.float64 if g.dtype == torch.float64 else torch.float32  # no bf16 LU
        b_new = torch.linalg.solve(g.to(work), b.mT.to(work)).mT.to(b.dtype)
        return self.from_factors(a @ g, b_new)

    def vertical(self, point: Point, xi: torch.Tensor) -> Tangent:
        point = self.check_point(point)
        self.check_group_element(point, xi, "Lie-algebra element")
        a, b = self.factors(point)
        return self.from_factors(a @ xi, -(b @ xi.mT))

    # ---- metric -----------------------------------------------------------------------------
    def inner(self, point: Point, u: Tangent, v: Tangent) -> torch.Tensor:
        a, b = self.factors(self.check_point(point))
        u1, u2 = self.factors(self.check_tangent(point, u, "u"))
        v1, v2 = self.factors(self.check_tangent(point, v, "v"))
        if self.metric == "euclidean":
            return (u1 * v1).sum() + (u2 * v2).sum()
        self._check_full_rank(a, b, "the invariant metric")
        return ((u1 @ gram(b)) * v1).sum() + ((u2 @ gram(a)) * v2).sum()

    def riemannian_gradient(self, point: Point, egrad: Tangent) -> Tangent:
        if self.metric == "euclidean":
            return tuple(egrad)
        a, b = self.factors(self.check_point(point))
        g1, g2 = self.factors(self.check_tangent(point, egrad, "gradient"))
        self._check_full_rank(a, b, "the invariant metric")
        return self.from_factors(spd_solve_right(g1, gram(b)), spd_solve_right(g2, gram(a)))

    def _vertical_generator(self, a, b, z1, z2) -> torch.Tensor:
        """ξ such that (Aξ, -Bξᵀ) is the metric-orthogonal vertical part of (Z₁, Z₂)."""
        if self.metric == "euclidean":
            return solve_sylvester_spd(gram(a), gram(b), a.mT @ z1 - z2.mT @ b)
        self._check_full_rank(a, b, "the invariant metric")
        left = spd_solve_right((a.mT @ z1).mT, gram(a)).mT  # (AᵀA)⁻¹AᵀZ₁
        right = spd_solve_right(z2.mT @ b, gram(b))
        return 0.5 * (left - right)

    def project_vertical(self, point: Point, v: Tangent) -> Tangent:
        a, b = self.factors(self.check_point(point))
        z1, z2 = self.factors(self.check_tangent(point, v))
        xi = self._vertical_generator(a, b, z1, z2)
        return self.from_factors(a @ xi, -(b @ xi.mT))

    def project_horizontal(self, point: Point, v: Tangent) -> Tangent:
        a, b = self.factors(self.check_point(point))
        z1, z2 = self.factors(self.check_tangent(point, v))
        xi = self._vertical_generator(a, b, z1, z2)
        # Z - (Aξ, -Bξᵀ) as fused multiply-adds: one memory pass over each factor, not three
        return self.from_factors(torch.baddbmm(z1, a, xi, alpha=-1), torch.baddbmm(z2, b, xi.mT))

    def moment_sq(self, point: Point, v: Tangent) -> Tangent:
        """Per-row mean squared magnitude of each factor under the metric, (H, d, 1) per factor.

        The row (model-space) axis is not mixed by GL(r); under the invariant metric the row
        norms u_i (BᵀB) u_iᵀ are GL-invariant, under the Euclidean one only O(r)-invariant.
        Divided by r so that the Euclidean case is Adam's per-coordinate mean square.
        """
        a, b = self.factors(self.check_point(point))
        u1, u2 = self.factors(self.check_tangent(point, v))
        if self.metric == "euclidean":
            w1, w2 = u1, u2
        else:
            w1, w2 = u1 @ gram(b), u2 @ gram(a)
        return self.from_factors(
            (w1 * u1).mean(-1, keepdim=True), (w2 * u2).mean(-1, keepdim=True)
        )

    def decay(self, point: Point, factor) -> Point:
        """Multiply every head's M = A Bᵀ by ``factor``: each factor by √factor."""
        root = factor**0.5 if not isinstance(factor, torch.Tensor) else factor.sqrt()
        return tuple(p * root for p in point)

    # ---- dressing ---------------------------------------------------------------------------
    def _balanced_frames(self, a: torch.Tensor, b: torch.Tensor):
        """u = R_A⁻¹ Ũ S^½, its inverse transpose R_B⁻¹ Ṽ S^½, and S (descending)."""
        self._check_full_rank(a, b, "dressing")
        work = torch.float64 if a.dtype == torch.float64 else torch.float32
        chol_a = torch.linalg.cholesky_ex(gram(a.to(work)))[0]  # AᵀA = L_A L_Aᵀ, R_A = L_Aᵀ
        chol_b = torch.linalg.cholesky_ex(gram(b.to(work)))[0]
        left, s, right_h = torch.linalg.svd(chol_a.mT @ chol_b)  # R_A R_Bᵀ = Ũ S Ṽᵀ
        root = s.sqrt().unsqueeze(-2)
        u = torch.linalg.solve_triangular(chol_a.mT, left * root, upper=True)
        u_inv_t = torch.linalg.solve_triangular(chol_b.mT, right_h.mT * root, upper=True)
        signs = orthonormal_columns_sign_fixed(torch.ones_like(root), a.to(work) @ u)
        return (u * signs).to(a.dtype), (u_inv_t * signs).to(a.dtype), s.to(a.dtype)

    def dressing(self, point: Point) -> torch.Tensor:
        a, b = self.factors(self.check_point(point))
        return self._balanced_frames(a, b)[0]

    def dress(self, point: Point) -> Point:
        a, b = self.factors(self.check_point(point))
        u, u_inv_t, _ = self._balanced_frames(a, b)
        return self.from_factors(a @ u, b @ u_inv_t)

    def ambiguity(self, point: Point) -> torch.Tensor:
        """Per head: smallest relative gap between the singular values of M = A Bᵀ."""
        a, b = self.factors(self.check_point(point))
        return relative_gaps(self._balanced_frames(a, b)[2])

    def invariants(self, point: Point) -> tuple[torch.Tensor, ...]:
        a, b = self.factors(self.check_point(point))
        return (a @ b.mT,)

    # ---- sampling -----------------------------------------------------------------------------
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

    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        """Q₁ diag(s) Q₂ per head with Haar Q₁, Q₂ and max(s)/min(s) = ``condition``."""
        dtype, device = self._dtype_device(dtype, device)
        h, r = self.n_heads, self.d_head
        q1 = random_orthogonal((h,), r, generator, dtype, device)
        q2 = random_orthogonal((h,), r, generator, dtype, device)
        s = self._log_spaced((h,), r, condition, generator, dtype, device)
        return (q1 * s.unsqueeze(-2)) @ q2


class HeadOV(HeadQK):
    """GL(d_head) symmetry of value/output heads: point ``(Wv (H, d, r), Wo (H, r, d))``,
    action ``(Wv g, g⁻¹ Wo)``, vertical ``(Wv ξ, -ξ Wo)``, invariant ``Wv Wo``.

    The mathematics is ``HeadQK``'s with B = Woᵀ; only the layout differs.
    """

    def point_shapes(self):
        (rows_a, rows_b), h, r = self.factor_rows, self.n_heads, self.d_head
        return ((h, rows_a, r), (h, r, rows_b))

    def factors(self, point):
        return point[0], point[1].mT

    def from_factors(self, a, b):
        return (a, b.mT)

    def _factor_names(self) -> tuple[str, str]:
        return ("Wv", "Wo")
