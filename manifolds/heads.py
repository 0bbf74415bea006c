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
    frame_from_grams,
    merge_frames,
    step_scale,
)
from .frame import Frame
from .linalg import gram, relative_gaps, solve_in_eigenbases, solve_left

__all__ = [
    "HeadQK",
    "HeadOV",
    "METRICS",
    "gl_vertical_generator",
    "frame_from_grams",
    "balanced_dressing",
]

#: Relative eigenvalue floor of the float64 Grams below which a head cannot be dressed (a
#: relative singular value of 1e-6): the dressing's Λ^-½ would amplify round-off beyond use.
DRESSABLE_TOLERANCE = 1e-12


def gl_vertical_generator(
    metric: str, frame: FactorFrame, az1: torch.Tensor, z2b: torch.Tensor
) -> torch.Tensor:
    """ξ ∈ gl(r) of the vertical part of Z from AᵀZ₁ and Z₂ᵀB (module docstring)."""
    az1, z2b = az1.to(frame.p.dtype), z2b.to(frame.p.dtype)
    if frame.u is None:  # undamped invariant metric: ξ = ½[P⁻¹AᵀZ₁ − Z₂ᵀBQ⁻¹] (closed form;
        # on heads the frame had to damp, the same formula with the damped inverses)
        return 0.5 * (frame.inv_p @ az1 - z2b @ frame.inv_q)
    lam, mu = frame.lam.unsqueeze(-1), frame.mu.unsqueeze(-2)
    if metric == "euclidean":
        rhs, denominator = az1 - z2b, lam + mu
    else:
        eye = torch.eye(lam.shape[-2], dtype=lam.dtype, device=lam.device)
        q_damped = frame.q + frame.damp_q.unsqueeze(-1) * eye
        p_damped = frame.p + frame.damp_p.unsqueeze(-1) * eye
        rhs = az1 @ q_damped - p_damped @ z2b
        dq, dp = frame.damp_q.unsqueeze(-1), frame.damp_p.unsqueeze(-1)
        denominator = 2 * lam * mu + lam * dq + dp * mu
    return solve_in_eigenbases(frame.u, frame.v, rhs, denominator)


def balanced_dressing(frame: FactorFrame):
    """(u, u⁻ᵀ, S, dressable) of the balanced section, signs not yet fixed; heads that are not
    dressable (singular Grams) get u = u⁻ᵀ = I."""
    lam, mu = frame.lam, frame.mu
    floor_p = DRESSABLE_TOLERANCE * lam[..., -1:].abs()
    floor_q = DRESSABLE_TOLERANCE * mu[..., -1:].abs()
    dressable = (lam[..., :1] > floor_p).squeeze(-1) & (mu[..., :1] > floor_q).squeeze(-1)
    ok = dressable.view(-1, 1)
    root_p = torch.where(ok, lam, 1.0).sqrt()
    root_q = torch.where(ok, mu, 1.0).sqrt()
    core = (frame.u.mT * root_p.unsqueeze(-1)) @ (frame.v * root_q.unsqueeze(-2))  # R_A R_Bᵀ
    left, s, right_h = torch.linalg.svd(core)
    half = s.sqrt().unsqueeze(-2)
    u = (frame.u / root_p.unsqueeze(-2)) @ (left * half)
    u_inv_t = (frame.v / root_q.unsqueeze(-2)) @ (right_h.mT * half)
    eye = torch.eye(lam.shape[-1], dtype=lam.dtype, device=lam.device)
    keep = ok.unsqueeze(-1)
    return torch.where(keep, u, eye), torch.where(keep, u_inv_t, eye), s, dressable


def _signed(frame: FactorFrame, signs: torch.Tensor) -> FactorFrame:
    """The frame of p·D for a diagonal D of ±1 (H, r, r): Grams and inverses conjugated,
    square-root factors and eigenvectors multiplied on the left (eigenvalues unchanged).
    Where ``signs`` is not such a diagonal the result is meaningless (callers discard it)."""
    d = signs.to(frame.p.dtype)

    def conj(x):
        return None if x is None else d.mT @ x @ d

    def left(x):
        return None if x is None else d.mT @ x

    return frame._replace(
        p=conj(frame.p), q=conj(frame.q), inv_p=conj(frame.inv_p), inv_q=conj(frame.inv_q),
        root_p=left(frame.root_p), root_q=left(frame.root_q), u=left(frame.u), v=left(frame.v),
    )  # fmt: skip


class PairFrame(Frame):
    """The frame handle of a GL(r) head pair (``manifolds.frame``): the invariant metric's
    gradient with its second moments in one product, and the projection, step bound, decay and
    retraction of a step in one pass that reuses the projection's r×r products."""

    __slots__ = ()

    def gradient_and_moments(self, egrad):
        bundle = self.bundle
        if bundle.metric == "euclidean":
            return super().gradient_and_moments(egrad)
        rgrad = self.riemannian_gradient(egrad)
        # ‖u R‖² = u (Q + δ) uᵀ = g (Q + δ)⁺ gᵀ = rowsum(u ∘ g) for u = g (Q + δ)⁺
        r = bundle.d_head
        moments = tuple(
            (u * g).sum(-1, keepdim=True).clamp_min(0) / r
            for u, g in zip(bundle.factors(rgrad), bundle.factors(tuple(egrad)))
        )
        return rgrad, tuple(bundle.from_factors(*moments))

    def descend(self, direction, lr: float, weight_decay: float, project: bool = True):
        bundle = self.bundle
        if not project:
            return super().descend(direction, lr, weight_decay, project)
        f = self.data
        a, b = bundle.factors(self.point)
        z1, z2 = bundle.factors(tuple(direction))
        az1, z2b = bundle.row_sums(a.mT @ z1, z2.mT @ b)
        xi = gl_vertical_generator(bundle.metric, f, az1, z2b)
        x = xi.to(a.dtype)
        h1, h2 = torch.baddbmm(z1, a, x, alpha=-1), torch.baddbmm(z2, b, x.mT)  # P_H(Z)
        if bundle.metric == "euclidean":
            scale = -lr
        else:  # the bound on V = −lr·H, with AᵀH₁ = AᵀZ₁ − Pξ and BᵀH₂ = BᵀZ₂ + Qξᵀ
            work = f.p.dtype
            hh1, hh2 = (t.to(work) for t in bundle.row_sums(gram(h1), gram(h2)))
            ah1 = az1.to(work) - f.p @ xi
            bh2 = z2b.mT.to(work) + f.q @ xi.mT
            s = step_scale(f, lr * lr * hh1, lr * lr * hh2, -lr * ah1, -lr * bh2)
            scale = (-lr * s).to(a.dtype).view(-1, 1, 1)
        base = self.point
        if weight_decay:  # M ↦ (1 − lr·wd)M
            base = bundle.scale_invariants(base, 1 - lr * weight_decay)
        new = []
        for p, h in zip(base, bundle.from_factors(h1, h2)):
            if not isinstance(scale, torch.Tensor):
                new.append(torch.add(p, h, alpha=scale))
            else:
                new.append(torch.addcmul(p, h, scale))
        return tuple(new)


class GeneralLinearPair(FactoredBundle):
    """GL(r) per head acting on a factor pair; the group half shared by ``HeadQK`` and
    ``HeadOV``, which differ only in layout (module docstring)."""

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
        return "GL(r) pair"

    def stacked(self, n_heads: int) -> HeadQK:
        """``n_heads`` heads of this shape and metric in factor form (A, B), whatever the
        layout of this bundle (``HeadOV`` stores B transposed)."""
        return HeadQK(
            n_heads, self.d_model, self.d_head, self.metric,
            factor_rows=self.factor_rows, damping=self.damping,
        )  # fmt: skip

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
    def vertical_generator(self, point: Point, v: Tangent, frame: FactorFrame) -> torch.Tensor:
        a, b = self.factors(point)
        z1, z2 = self.factors(v)
        xi = gl_vertical_generator(self.metric, frame, *self.row_sums(a.mT @ z1, z2.mT @ b))
        return xi.to(a.dtype)

    def project_horizontal(self, point: Point, v: Tangent, frame=None) -> Tangent:
        point = self.check_point(point)
        v = self.check_tangent(point, v)
        a, b = self.factors(point)
        z1, z2 = self.factors(v)
        xi = self.vertical_generator(point, v, self._frame(point, frame))
        # Z - (Aξ, -Bξᵀ) as fused multiply-adds: one memory pass over each factor, not three
        return self.from_factors(torch.baddbmm(z1, a, xi, alpha=-1), torch.baddbmm(z2, b, xi.mT))

    def _moment(self, symmetric: torch.Tensor) -> torch.Tensor:
        return symmetric  # gl(r) is all of R^{r×r}

    def moment_map(self, point: Point) -> torch.Tensor:
        """Per head AᵀA − BᵀB (H, r, r): the imbalance conserved by gradient flow."""
        a, b = self.factors(self.check_point(point))
        p, q = self.row_sums(gram(a), gram(b))
        return p - q

    # ---- dressing ------------------------------------------------------------------------------
    def _dressing_parts(self, point: Point, frame: FactorFrame | None = None, float64_s=False):
        """(u, u⁻ᵀ, S, dressable) with the sign rule applied, in the point's dtype (S in
        float64 with ``float64_s``). A spectral ``frame`` of the point (``factorise``) holds the
        eigendecompositions of its Grams, the very ones computed here otherwise, and is
        reused."""
        a, b = self.factors(point)
        if frame is None or frame.lam is None or frame.p.dtype != torch.float64:
            # the dressing keeps M = ABᵀ to float64 round-off whatever the frames' precision
            grams = self.row_sums(gram(a.double()), gram(b.double()))
            frame = frame_from_grams(*grams, 0.0, weighted=False)
        u, u_inv_t, s, dressable = balanced_dressing(frame)
        signs = self.column_signs(a.double() @ u)
        dtype = a.dtype
        s = s if float64_s else s.to(dtype)
        return (u * signs).to(dtype), (u_inv_t * signs).to(dtype), s, dressable

    def dressing_or_identity(self, point: Point, frame: FactorFrame | None = None):
        """(u, dressable): the dressing where a head's factors have full rank to working
        precision, the identity (and ``dressable`` False) elsewhere. Never synchronises."""
        u, _, _, dressable = self._dressing_parts(self.check_point(point), frame)
        return u, dressable

    def redress(self, point: Point, covector: Tangent, tangents: tuple, frame=None):
        """``Bundle.redress`` without a second factorisation: the dressed point is balanced,
        AᵀA = BᵀB = diag(S), so its spectral frame is written down (``balanced_frame``), and
        u⁻ᵀ comes with the dressing, so the action needs no solve. Heads that cannot be dressed
        only have their columns' signs fixed (u a diagonal of ±1): their frame is the old one
        conjugated by it. (The undamped invariant metric's Cholesky frame is refactorised.)"""
        point = self.check_point(point)
        frame = self._frame(point, frame)
        u, u_inv_t, s, dressable = self._dressing_parts(point, frame, float64_s=True)

        def move(v: Tangent, left: torch.Tensor, right: torch.Tensor) -> Tangent:
            a, b = self.factors(v)
            return self.from_factors(a @ left.to(a.dtype), b @ right.to(b.dtype))

        moved = move(point, u, u_inv_t)
        carried = tuple(move(t, u, u_inv_t) for t in tangents)
        covector = move(covector, u_inv_t, u)  # act_dual: the action of u⁻ᵀ
        if frame.lam is None:  # Cholesky frames: no closed form kept here
            return moved, covector, carried, self.factorise(moved)
        weighted = self.metric != "euclidean"
        balanced = balanced_frame(s.to(frame.p.dtype), self.damping, weighted=weighted)
        return moved, covector, carried, merge_frames(dressable, balanced, _signed(frame, u))

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
