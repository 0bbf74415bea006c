r"""Positive rescaling of the hidden units of a homogeneous activation (G-SGD, Path-SGD symmetry).

``PositiveRescaling(n_units, d_in, d_out, degree=k)``: a layer act(x W_in + b) W_out whose
activation is positively homogeneous of degree k (act(s·z) = sᵏ·act(z) for s > 0: ReLU k = 1,
ReLU² k = 2) is unchanged by (W_in diag(s), b·s, diag(s)⁻ᵏ W_out). Unit j is a pair of vectors —
its fan-in a_j ∈ R^{d_in} (the bias folded in as one more entry) and its fan-out b_j ∈ R^{d_out}
— so the bundle is a ``FactoredBundle`` with one "head" per unit, r = 1, factor rows
(d_in, d_out), and group R_{>0}. Per unit, with P = ‖a‖², Q = ‖b‖²:

* action (a s, b s⁻ᵏ), s > 0; vertical (a ξ, −k b ξ); quotient dimension d_in + d_out − 1;
* invariant I = ‖a‖ᵏ⁻¹ a bᵀ (a bᵀ for k = 1): rank one, ‖I‖ = ‖a‖ᵏ‖b‖ the unit's output scale;
  it identifies the orbit up to (a, b) ↦ (−a, −b), as a bᵀ does for k = 1. Weight decay
  (``scale_invariants(p, c)``) scales both factors by c^{1/(k+1)}, so I ↦ c·I;
* metrics ``"euclidean"`` and ``"invariant"``, the latter with weights ρ·k²/P on the fan-in and
  ρ/Q on the fan-out, ρ = PᵏQ: R_{>0}-invariant for every k, and for k = 1 the invariant metric
  Q⟨u₁, v₁⟩ + P⟨u₂, v₂⟩ of ``FactoredBundle`` behind G-SGD (Meng et al. 2019) and Path-SGD
  (Neyshabur et al. 2015). Vertical part of z = (z₁, z₂): ξ = (w₁⟨a, z₁⟩ − k w₂⟨b, z₂⟩) /
  (w₁P + k²w₂Q) with the factors' weights (w₁, w₂) — (1, 1) Euclidean, ½(⟨a, z₁⟩/P −
  ⟨b, z₂⟩/(kQ)) invariant;
* moment map P − kQ (conserved by Euclidean gradient flow); dressing s = (kQ/P)^{1/(2k+2)}
  balances the unit, ‖a s‖² = k‖b s⁻ᵏ‖². There is no sign to fix (a negative s is not a
  symmetry) and no ambiguity: ``ambiguity`` is 1. The compact part of R_{>0} is trivial
  (``compact_dim`` 0): with weight decay no rescaling stays flat.

The choice of metric and invariants for k ≠ 1, and the step bound: ``docs/theory/bundles.md``.
"""

from __future__ import annotations

from math import factorial

import torch

from .base import Point, Tangent
from .factored import FactoredBundle, FactorFrame, frame_from_grams
from .linalg import cross, gram, positive_int

__all__ = ["PositiveRescaling"]


class PositiveRescaling(FactoredBundle):
    """R_{>0} rescaling (a s, b s⁻ᵏ) of each of ``n_units`` units of an activation positively
    homogeneous of degree k = ``degree`` (see the module docstring)."""

    factor_names = ("fan-in", "fan-out")

    def __init__(
        self,
        n_units: int,
        d_in: int,
        d_out: int,
        metric: str = "euclidean",
        *,
        damping=0.0,
        degree: int = 1,
    ):
        if not isinstance(degree, int) or isinstance(degree, bool) or degree < 1:
            raise ValueError(
                "degree must be a positive integer, the activation's degree of homogeneity "
                f"(1 for ReLU, 2 for ReLU²), got {degree!r}"
            )
        rows = (positive_int("d_in", d_in), positive_int("d_out", d_out))
        super().__init__(
            positive_int("n_units", n_units),
            max(rows),
            1,
            metric,
            factor_rows=rows,
            damping=damping,
        )
        #: k: the action is (a s, b s⁻ᵏ)
        self.degree = degree

    def __repr__(self) -> str:
        rows_a, rows_b = self.factor_rows
        extra = f", degree={self.degree}" if self.degree != 1 else ""
        extra += f", damping={self.damping:g}" if self.damping else ""
        return (
            f"PositiveRescaling(n_units={self.n_heads}, d_in={rows_a}, d_out={rows_b}, "
            f"metric={self.metric!r}{extra})"
        )

    @property
    def group_dim(self) -> int:
        return self.n_heads

    @property
    def compact_dim(self) -> int:
        return 0

    @property
    def algebra_shape(self) -> tuple[int, ...]:
        return (self.n_heads, 1, 1)

    def _norms_squared(self, point: Point) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, Q) = (‖a‖², ‖b‖²) per unit, (m, 1, 1)."""
        a, b = self.factors(point)
        return self.row_sums(gram(a), gram(b))

    # ---- action ---------------------------------------------------------------------------
    def act(self, point: Point, g: torch.Tensor) -> Point:
        point = self.check_point(point)
        self.check_group_element(point, g)
        a, b = self.factors(point)
        return self.from_factors(a * g, b / (g if self.degree == 1 else g**self.degree))

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        return 1 / g

    def inverse_transpose(self, g: torch.Tensor) -> torch.Tensor:
        return 1 / g  # the action is diagonal: its inverse transpose is the action of 1/g

    def vertical(self, point: Point, xi: torch.Tensor) -> Tangent:
        point = self.check_point(point)
        self.check_group_element(point, xi, "Lie-algebra element")
        a, b = self.factors(point)
        return self.from_factors(a * xi, -self.degree * (b * xi))

    # ---- metric ---------------------------------------------------------------------------
    def _weights(self, p: torch.Tensor, q: torch.Tensor):
        """(w₁, w₂): the invariant metric's weights ρk²/P = k²Pᵏ⁻¹Q of the fan-in and ρ/Q = Pᵏ
        of the fan-out, from P = ‖a‖², Q = ‖b‖² (for k = 1: Q and P)."""
        k = self.degree
        return k * k * p ** (k - 1) * q, p**k

    def factorise(self, point: Point) -> FactorFrame:
        """``FactoredBundle``'s frame; for k ≠ 1 under the invariant metric its inverses and
        square roots are those of the weights (w₁, w₂) (``_weights``) in place of Q
        and P, which ``inner``, ``riemannian_gradient`` and ``slice_mean_square`` read; the
        Grams P, Q stay."""
        frame = super().factorise(point)
        if self.degree == 1 or self.metric == "euclidean":
            return frame
        w1, w2 = self._weights(frame.p, frame.q)
        weighted = frame_from_grams(w2, w1, self.damping, spectral=frame.lam is not None)
        return weighted._replace(p=frame.p, q=frame.q)

    def _vertical_generator(self, frame, v: Tangent) -> torch.Tensor:
        """ξ = (w₁⟨a, z₁⟩ − k w₂⟨b, z₂⟩) / (w₁P + k²w₂Q) per unit (module docstring), zero where
        the denominator vanishes; for k = 1 it equals the Sylvester solution of the r×r
        heads at r = 1, under both metrics and any damping (a damping δ·P, δ·Q multiplies
        numerator and denominator by 1 + δ). Inner products over the rows as reductions:
        r = 1 makes every product a batch of 1×1 matrices."""
        a, b = self.factors(frame.point)
        z1, z2 = self.factors(v)
        k, p, q = self.degree, frame.data.p, frame.data.q
        dots = self.row_sums((a * z1).sum(-2, keepdim=True), (z2 * b).sum(-2, keepdim=True))
        az1, z2b = (t.to(p.dtype) for t in dots)
        if self.metric == "euclidean":
            w1, w2 = torch.ones_like(p), torch.ones_like(q)
        else:
            w1, w2 = self._weights(p, q)
        numerator, denominator = w1 * az1 - k * w2 * z2b, w1 * p + k * k * w2 * q
        safe = torch.where(denominator > 0, denominator, 1.0)
        return torch.where(denominator > 0, numerator / safe, 0.0).to(a.dtype)

    def _minus_vertical(self, a, b, z1, z2, frame, v: Tangent):
        xi = self._vertical_generator(frame, v)  # Z − (a ξ, −k b ξ)
        return torch.addcmul(z1, a, xi, value=-1), torch.addcmul(z2, b, xi, value=self.degree)

    def _stack_family(self):
        return ("positive rescaling", self.degree)

    def stacked(self, n_heads: int) -> PositiveRescaling:
        """``n_heads`` units of this shape, degree, metric and damping."""
        rows_a, rows_b = self.factor_rows
        return PositiveRescaling(
            n_heads, rows_a, rows_b, self.metric, damping=self.damping, degree=self.degree
        )

    def decay_multiplier(self, factor):
        """Multiplying every unit's invariant ‖a‖ᵏ⁻¹ a bᵀ by ``factor`` multiplies both factors
        by factor^{1/(k+1)} (a scalar, so it commutes with the action and keeps P − kQ = 0)."""
        return factor ** (1 / (self.degree + 1))

    def _step_scale(self, frame, step: Tangent, factor: float = 1.0):
        """For k = 1 ``FactoredBundle``'s. For k ≠ 1 (invariant metric) the same rule
        on the unit's tensor T = a^{⊗k} ⊗ b (‖T‖ = ‖I‖): T(a + t v₁, b + t v₂) = Σ tʲ Tⱼ, and the
        step is scaled by min(1, ½‖T₁‖/‖T₂‖), so its second-order change is at most half its
        first-order one. Tⱼ = Sⱼ ⊗ b + Sⱼ₋₁ ⊗ v₂ with Sⱼ the tʲ coefficient of (a + t v₁)^{⊗k};
        their norms are polynomials in P, Q, ⟨a, v₁⟩, ‖v₁‖², ⟨b, v₂⟩, ‖v₂‖²
        (``_power_products``), each Tⱼ unchanged by the action, so the rule commutes with it."""
        if self.degree == 1 or self.metric == "euclidean":
            return super()._step_scale(frame, step, factor)
        a, b = self.factors(frame.point)
        v1, v2 = self.factors(step)
        f = frame.data
        products = self.row_sums(cross(a, v1), gram(v1), cross(b, v2), gram(v2))
        av1, vv1, bv2, vv2 = (  # of V = factor·step: ⟨a, v₁⟩, ‖v₁‖², ⟨b, v₂⟩, ‖v₂‖²
            t.to(f.p.dtype) * c for t, c in zip(products, (factor, factor**2, factor, factor**2))
        )
        s = _power_products(self.degree, f.p, av1, vv1)  # s[i, j] = ⟨Sᵢ, Sⱼ⟩
        linear = s[1, 1] * f.q + 2 * s[1, 0] * bv2 + s[0, 0] * vv2  # ‖T₁‖²
        quadratic = s[2, 2] * f.q + 2 * s[2, 1] * bv2 + s[1, 1] * vv2  # ‖T₂‖²
        lin, quad = linear.clamp_min(0).sqrt(), quadratic.clamp_min(0).sqrt()
        scale = torch.where(quad > 0.5 * lin, 0.5 * lin / quad.clamp_min(1e-300), 1.0)
        return scale.to(v1.dtype)

    # ---- balance and dressing -----------------------------------------------------------------
    def moment_map(self, point: Point) -> torch.Tensor:
        """Per unit ‖a_j‖² − k‖b_j‖², (m, 1, 1)."""
        p, q = self._norms_squared(self.check_point(point))
        return p - self.degree * q

    def balance_gap(self, point: Point) -> torch.Tensor:
        """Per unit |P − kQ| / (P + kQ), (m,): zero exactly on the dressed section."""
        p, q = self._norms_squared(self.check_point(point))
        k = self.degree
        size = (p + k * q).view(-1)
        return (p - k * q).abs().view(-1) / size.clamp_min(torch.finfo(size.dtype).tiny)

    def _scales(self, point: Point):
        a, b = self.factors(point)
        sq_a, sq_b = self.row_sums(
            a.square().sum(dim=(-2, -1), keepdim=True), b.square().sum(dim=(-2, -1), keepdim=True)
        )
        norm_a, norm_b = sq_a.sqrt(), sq_b.sqrt()
        dressable = (norm_a > 0) & (norm_b > 0)
        k = self.degree
        ratio = norm_b / torch.where(dressable, norm_a, 1.0)  # s = (√k ‖b‖/‖a‖)^{1/(k+1)}
        scale = ratio.sqrt() if k == 1 else (k**0.5 * ratio) ** (1 / (k + 1))
        return torch.where(dressable, scale, 1.0), dressable.view(-1)

    def dressing(self, point: Point) -> torch.Tensor:
        point = self.check_point(point)
        self.check_full_rank(point, "dressing")
        return self._scales(point)[0]

    def _dressing_or_identity(self, frame):
        return self._scales(self.check_point(frame.point))

    def _statistic_map(self, g, g_inv_t, index: int, kind: str):
        """For k ≠ 1 the fan-out moves by g⁻ᵏ (tangents) and gᵏ (covectors)."""
        c = super()._statistic_map(g, g_inv_t, index, kind)
        return c if self.degree == 1 or index == 0 else c**self.degree

    def ambiguity(self, point: Point) -> torch.Tensor:
        a, _ = self.factors(self.check_point(point))
        return torch.ones(a.shape[0], dtype=a.dtype, device=a.device)

    def invariants(self, point: Point) -> tuple[torch.Tensor, ...]:
        """Per unit ‖a‖ᵏ⁻¹ a bᵀ, (m, d_in, d_out)."""
        a, b = self.factors(self.check_point(point))
        if self.degree == 1:
            return (a @ b.mT,)
        (p,) = self.row_sums(gram(a))
        return (p ** ((self.degree - 1) / 2) * (a @ b.mT),)

    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        """Positive scales, log-uniform in [1/√condition, √condition]."""
        dtype, device = self._dtype_device(dtype, device)
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.rand(self.n_heads, generator=generator, dtype=torch.float64, device=gen_device)
        s = torch.exp((t - 0.5) * torch.log(torch.tensor(float(condition), dtype=torch.float64)))
        return s.to(dtype=dtype, device=device).reshape(-1, 1, 1)


def _power_products(k: int, p, alpha, beta) -> dict:
    """⟨Sᵢ, Sⱼ⟩ for i, j ≤ 2, Sᵢ the tⁱ coefficient of (a + t v)^{⊗k}, from P = ‖a‖², α = ⟨a, v⟩,
    β = ‖v‖²: the tⁱuʲ coefficient of ⟨(a + tv)^{⊗k}, (a + uv)^{⊗k}⟩ = (P + (t + u)α + tuβ)ᵏ,
    Σₙ k!/((k−m)!(i−n)!(j−n)!n!) Pᵏ⁻ᵐ α^{i+j−2n} βⁿ over n ≤ min(i, j), m = i + j − n ≤ k."""
    out = {}
    for i in range(3):
        for j in range(i + 1):
            total = torch.zeros_like(p)
            for n in range(j + 1):
                m = i + j - n
                if m <= k:
                    c = factorial(k) // (
                        factorial(k - m) * factorial(i - n) * factorial(j - n) * factorial(n)
                    )
                    total = total + c * p ** (k - m) * alpha ** (i + j - 2 * n) * beta**n
            out[i, j] = out[j, i] = total
    return out
