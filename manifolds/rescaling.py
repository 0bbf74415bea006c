r"""Positive rescaling of ReLU hidden units (G-SGD, Path-SGD symmetry).

``PositiveRescaling(n_units, d_in, d_out)``: a ReLU layer relu(x W_in + b) W_out is unchanged by
(W_in diag(s), b·s, diag(s)⁻¹ W_out) for s > 0, because relu(s·z) = s·relu(z). Unit j is a pair
of vectors — its fan-in a_j ∈ R^{d_in} (the bias folded in as one more entry) and its fan-out
b_j ∈ R^{d_out} — so the bundle is ``HeadQK`` with one "head" per unit, r = 1, factor rows
(d_in, d_out), and the group restricted to its identity component R_{>0}:

* point ``(A (m, d_in, 1), B (m, d_out, 1))``, action (a_j s_j, b_j / s_j), invariant a_j b_jᵀ;
* vertical (a_j ξ_j, -b_j ξ_j); quotient dimension per unit d_in + d_out - 1;
* metrics as ``HeadQK``: the invariant one, ‖b_j‖²⟨u₁, v₁⟩ + ‖a_j‖²⟨u₂, v₂⟩, is the
  rescaling-invariant metric behind G-SGD (Meng et al. 2019) and Path-SGD (Neyshabur et al.
  2015);
* dressing: s_j = √(‖b_j‖/‖a_j‖) balances the unit, ‖a_j‖ = ‖b_j‖. There is no sign to fix
  (a negative s is not a symmetry of ReLU) and no ambiguity: ``ambiguity`` is 1.
"""

from __future__ import annotations

import torch

from .base import Point
from .heads import HeadQK, _positive_int

__all__ = ["PositiveRescaling"]


class PositiveRescaling(HeadQK):
    """R_{>0} rescaling of each of ``n_units`` ReLU units (see the module docstring)."""

    def __init__(self, n_units: int, d_in: int, d_out: int, metric: str = "euclidean"):
        rows = (_positive_int("d_in", d_in), _positive_int("d_out", d_out))
        super().__init__(n_units, max(rows), 1, metric=metric, factor_rows=rows)

    def __repr__(self) -> str:
        rows_a, rows_b = self.factor_rows
        return (
            f"PositiveRescaling(n_units={self.n_heads}, d_in={rows_a}, d_out={rows_b}, "
            f"metric={self.metric!r})"
        )

    def _factor_names(self) -> tuple[str, str]:
        return ("fan-in", "fan-out")

    def dressing(self, point: Point) -> torch.Tensor:
        a, b = self.factors(self.check_point(point))
        self._check_full_rank(a, b, "dressing")
        norm_a = a.square().sum(dim=(-2, -1), keepdim=True).sqrt()
        norm_b = b.square().sum(dim=(-2, -1), keepdim=True).sqrt()
        return (norm_b / norm_a).sqrt()

    def dress(self, point: Point) -> Point:
        return self.act(point, self.dressing(point))

    def ambiguity(self, point: Point) -> torch.Tensor:
        a, _ = self.factors(self.check_point(point))
        return torch.ones(a.shape[0], dtype=a.dtype, device=a.device)

    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        """Positive scales, log-uniform in [1/√condition, √condition]."""
        dtype, device = self._dtype_device(dtype, device)
        gen_device = generator.device if generator is not None else "cpu"
        t = torch.rand(self.n_heads, generator=generator, dtype=torch.float64, device=gen_device)
        s = torch.exp((t - 0.5) * torch.log(torch.tensor(float(condition), dtype=torch.float64)))
        return s.to(dtype=dtype, device=device).reshape(-1, 1, 1)
