r"""Positive rescaling of ReLU hidden units (G-SGD, Path-SGD symmetry).

``PositiveRescaling(n_units, d_in, d_out)``: a ReLU layer relu(x W_in + b) W_out is unchanged by
(W_in diag(s), b·s, diag(s)⁻¹ W_out) for s > 0, because relu(s·z) = s·relu(z). Unit j is a pair
of vectors — its fan-in a_j ∈ R^{d_in} (the bias folded in as one more entry) and its fan-out
b_j ∈ R^{d_out} — so the bundle is a ``FactoredBundle`` with one "head" per unit, r = 1, factor
rows (d_in, d_out), and group R_{>0} (the identity component of GL(1); projections use the GL(r)
kernel of ``manifolds.heads`` at r = 1):

* point ``(A (m, d_in, 1), B (m, d_out, 1))``, action (a_j s_j, b_j / s_j), invariant a_j b_jᵀ;
* vertical (a_j ξ_j, -b_j ξ_j); quotient dimension per unit d_in + d_out - 1;
* metrics those of ``FactoredBundle``: the invariant one, ‖b_j‖²⟨u₁, v₁⟩ + ‖a_j‖²⟨u₂, v₂⟩, is the
  rescaling-invariant metric behind G-SGD (Meng et al. 2019) and Path-SGD (Neyshabur et al.
  2015);
* dressing: s_j = √(‖b_j‖/‖a_j‖) balances the unit, ‖a_j‖ = ‖b_j‖. There is no sign to fix
  (a negative s is not a symmetry of ReLU) and no ambiguity: ``ambiguity`` is 1. The compact
  part of R_{>0} is trivial (``compact_dim`` 0): with weight decay no rescaling stays flat.
"""

from __future__ import annotations

import torch

from .base import Point, Tangent
from .factored import FactoredBundle, FactorFrame
from .heads import gl_vertical_generator
from .linalg import gram, positive_int

__all__ = ["PositiveRescaling"]


class PositiveRescaling(FactoredBundle):
    """R_{>0} rescaling of each of ``n_units`` ReLU units (see the module docstring)."""

    factor_names = ("fan-in", "fan-out")

    def __init__(
        self, n_units: int, d_in: int, d_out: int, metric: str = "euclidean", *, damping=0.0
    ):
        rows = (positive_int("d_in", d_in), positive_int("d_out", d_out))
        super().__init__(
            positive_int("n_units", n_units),
            max(rows),
            1,
            metric,
            factor_rows=rows,
            damping=damping,
        )

    def __repr__(self) -> str:
        rows_a, rows_b = self.factor_rows
        extra = f", damping={self.damping:g}" if self.damping else ""
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

    def act(self, point: Point, g: torch.Tensor) -> Point:
        point = self.check_point(point)
        self.check_group_element(point, g)
        a, b = self.factors(point)
        return self.from_factors(a * g, b / g)

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        return 1 / g

    def inverse_transpose(self, g: torch.Tensor) -> torch.Tensor:
        return 1 / g

    def vertical(self, point: Point, xi: torch.Tensor) -> Tangent:
        point = self.check_point(point)
        self.check_group_element(point, xi, "Lie-algebra element")
        a, b = self.factors(point)
        return self.from_factors(a * xi, -(b * xi))

    def vertical_generator(self, point: Point, v: Tangent, frame: FactorFrame) -> torch.Tensor:
        a, b = self.factors(point)
        z1, z2 = self.factors(v)
        return gl_vertical_generator(self.metric, frame, a.mT @ z1, z2.mT @ b).to(a.dtype)

    def _moment(self, symmetric: torch.Tensor) -> torch.Tensor:
        return symmetric  # the algebra of R_{>0} is all of R = gl(1)

    def moment_map(self, point: Point) -> torch.Tensor:
        """Per unit ‖a_j‖² − ‖b_j‖², (m, 1, 1)."""
        a, b = self.factors(self.check_point(point))
        p, q = self.row_sums(gram(a), gram(b))
        return p - q

    def _scales(self, point: Point):
        a, b = self.factors(point)
        sq_a, sq_b = self.row_sums(
            a.square().sum(dim=(-2, -1), keepdim=True), b.square().sum(dim=(-2, -1), keepdim=True)
        )
        norm_a, norm_b = sq_a.sqrt(), sq_b.sqrt()
        dressable = (norm_a > 0) & (norm_b > 0)
        scale = (norm_b / torch.where(dressable, norm_a, 1.0)).sqrt()
        return torch.where(dressable, scale, 1.0), dressable.view(-1)

    def dressing(self, point: Point) -> torch.Tensor:
        point = self.check_point(point)
        self.check_full_rank(point, "dressing")
        return self._scales(point)[0]

    def dressing_or_identity(self, point: Point, frame=None):
        return self._scales(self.check_point(point))

    def ambiguity(self, point: Point) -> torch.Tensor:
        a, _ = self.factors(self.check_point(point))
        return torch.ones(a.shape[0], dtype=a.dtype, device=a.device)

    def invariants(self, point: Point) -> tuple[torch.Tensor, ...]:
        a, b = self.factors(self.check_point(point))
        return (a @ b.mT,)

    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        """Positive scales, log-uniform in [1/√condition, √condition]."""
        dtype, device = self._dtype_device(dtype, device)
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.rand(self.n_heads, generator=generator, dtype=torch.float64, device=gen_device)
        s = torch.exp((t - 0.5) * torch.log(torch.tensor(float(condition), dtype=torch.float64)))
        return s.to(dtype=dtype, device=device).reshape(-1, 1, 1)
