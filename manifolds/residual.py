r"""O(d) rotations of the residual stream (model space), on any tuple of tensors.

``ResidualRotation(d_model, axes)`` — the point is a tuple of tensors T₁, …, T_m and ``axes[i]``
names the axis of Tᵢ that carries the model-space index. One rule covers every tensor:

* action      T'[…, j, …] = Σᵢ T[…, i, …] R[i, j], R ∈ O(d) (contract that axis with R's first
  index). Right for embeddings (V, d) (axis 1), a W that reads the stream in ``X @ W`` (axis 0)
  or writes it in ``Z @ W`` (axis 1), ``nn.Linear`` weights (out, in) reading (axis 1) or
  writing (axis 0) the stream, and biases written into it (axis 0);
* vertical    δT = T ×_axis Ω with Ω ∈ so(d) skew-symmetric;
* metric      the Euclidean one, already O(d)-invariant, so it descends to the quotient;
* horizontal  let T̂ be T with the model axis moved last and flattened to (-1, d) and
  C = Σ T̂ᵀT̂ (d×d, positive semi-definite). The vertical part of Z is T ×_axis Ω where Ω solves
  the Lyapunov equation C Ω + Ω C = 2 skew(Σ T̂ᵀẐ): with C = UΛUᵀ,
  Ω = U[(Uᵀ 2K U) ⊘ (λᵢ + λⱼ)]Uᵀ (minimum norm where λᵢ + λⱼ = 0: those rotations fix the point);
* invariants  the Gram matrix X Xᵀ of all model-space rows X = [T̂₁; …; T̂_m] (it determines the
  rows up to one rotation);
* dressing    the eigenframe of C, eigenvalues descending: u(p) = U·diag(±1), so p·u(p) has
  C' = Λ. Signs are fixed so that the largest-|entry| of each dressed column is positive.
  Ambiguity: equal eigenvalues of C (e.g. fewer rows than d, or an isotropic point) leave a
  rotation free; ``ambiguity`` reports the smallest relative eigenvalue gap.

The symmetry is exact only for architectures whose model-space operations commute with O(d):
RMSNorm without per-coordinate gains (fold gains into the next weights), no LayerNorm centering.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Bundle, Point, Tangent, randn, random_orthogonal
from .linalg import (
    orthonormal_columns_sign_fixed,
    relative_gaps,
    skew,
    solve_in_eigenbases,
    sym,
    work_dtype,
)

__all__ = ["ResidualRotation"]


class ResidualRotation(Bundle):
    """O(d_model) acting on the declared model-space axis of every tensor of a point.

    ``shapes`` (optional) fixes the full shape of each tensor; it is needed by
    ``random_point`` and makes ``check_point`` strict. See the module docstring.
    """

    metric = "euclidean"
    metric_is_invariant = True  # the Euclidean metric is O(d)-invariant

    def __init__(
        self,
        d_model: int,
        axes: Sequence[int],
        shapes: Sequence[Sequence[int]] | None = None,
    ):
        if not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive integer, got {d_model!r}")
        self.d_model = d_model
        self.axes = tuple(int(a) for a in axes)
        if not self.axes:
            raise ValueError("axes must name at least one tensor's model-space axis")
        self.n_tensors = len(self.axes)
        self.shapes = None if shapes is None else tuple(tuple(int(n) for n in s) for s in shapes)
        if self.shapes is not None:
            if len(self.shapes) != self.n_tensors:
                raise ValueError(
                    f"shapes names {len(self.shapes)} tensors but axes names {self.n_tensors}"
                )
            for i, (shape, axis) in enumerate(zip(self.shapes, self.axes)):
                if not -len(shape) <= axis < len(shape) or shape[axis] != d_model:
                    raise ValueError(
                        f"tensor {i} of shape {shape} has no axis {axis} of size d_model={d_model}"
                    )

    def __repr__(self) -> str:
        return f"ResidualRotation(d_model={self.d_model}, axes={self.axes})"

    # ---- sizes and shapes -------------------------------------------------------------
    @property
    def group_dim(self) -> int:
        return self.d_model * (self.d_model - 1) // 2

    @property
    def compact_dim(self) -> int:
        return self.group_dim  # O(d) is compact

    @property
    def algebra_shape(self) -> tuple[int, ...]:
        return (self.d_model, self.d_model)

    def algebra_basis(self, *, dtype=None, device=None) -> torch.Tensor:
        """E_ij − E_ji for i < j, stacked: (d(d−1)/2, d, d)."""
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        d = self.d_model
        i, j = torch.triu_indices(d, d, offset=1, device=device)
        basis = torch.zeros((i.numel(), d, d), dtype=dtype, device=device)
        rows = torch.arange(i.numel(), device=device)
        basis[rows, i, j], basis[rows, j, i] = 1.0, -1.0
        return basis

    def random_algebra_element(self, *, generator=None, dtype=None, device=None):
        xi = randn(self.algebra_shape, generator, dtype, device)
        return xi - xi.mT

    def point_shapes(self):
        if self.shapes is None:
            raise ValueError("ResidualRotation was built without shapes; pass shapes=...")
        return self.shapes

    def _shape_problem(self, index, shape):
        if self.shapes is not None:
            return super()._shape_problem(index, shape)
        axis = self.axes[index]
        if -len(shape) <= axis < len(shape) and shape[axis] == self.d_model:
            return None
        return f"a tensor whose axis {axis} has size d_model={self.d_model}"

    def _describe_shapes(self) -> str:
        if self.shapes is not None:
            return super()._describe_shapes()
        return f"model-space axes {self.axes} of size {self.d_model}"

    # ---- model-axis algebra ---------------------------------------------------------------
    def _times(self, tensors, matrix: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Contract each tensor's model axis with ``matrix``'s first index."""
        return tuple((t.movedim(a, -1) @ matrix).movedim(-1, a) for t, a in zip(tensors, self.axes))

    def _rows(self, tensors) -> torch.Tensor:
        """All model-space rows, stacked: (N, d)."""
        d = self.d_model
        return torch.cat([t.movedim(a, -1).reshape(-1, d) for t, a in zip(tensors, self.axes)])

    def _cross(self, u, v) -> torch.Tensor:
        """Σ Ûᵀ V̂ over the tensors (d×d)."""
        return sum(
            a.movedim(ax, -1).reshape(-1, self.d_model).mT
            @ b.movedim(ax, -1).reshape(-1, self.d_model)
            for a, b, ax in zip(u, v, self.axes)
        )

    # ---- bundle interface -------------------------------------------------------------------
    def act(self, point: Point, g: torch.Tensor) -> Point:
        point = self.check_point(point)
        self.check_group_element(point, g)
        return self._times(point, g)

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        """R⁻¹ = Rᵀ on O(d)."""
        return g.mT

    def inverse_transpose(self, g: torch.Tensor) -> torch.Tensor:
        """R⁻ᵀ = R on O(d): gradients rotate like points."""
        return g

    def vertical(self, point: Point, xi: torch.Tensor) -> Tangent:
        point = self.check_point(point)
        self.check_group_element(point, xi, "Lie-algebra element")
        return self._times(point, xi)

    def _inner(self, frame, u: Tangent, v: Tangent) -> torch.Tensor:
        point = self.check_point(frame.point)
        u = self.check_tangent(point, u, "u")
        v = self.check_tangent(point, v, "v")
        return sum((a * b).sum() for a, b in zip(u, v))

    def factorise(self, point: Point):
        """(C, λ, U): the model-space Gram C = Σ T̂ᵀT̂ and its eigendecomposition (ascending)."""
        point = self.check_point(point)
        c = sym(self._cross(point, point)).to(work_dtype(point[0].dtype))
        evals, evecs = torch.linalg.eigh(c)
        return c, evals, evecs

    def _vertical_generator(self, frame, v: Tangent) -> torch.Tensor:
        """Ω solving the Lyapunov equation C Ω + Ω C = 2 skew(Σ T̂ᵀẐ) (minimum norm)."""
        point = frame.point
        _, lam, u = frame.data
        rhs = 2 * skew(self._cross(point, v)).to(u.dtype)
        omega = solve_in_eigenbases(u, u, rhs, lam.unsqueeze(-1) + lam.unsqueeze(-2))
        return omega.to(point[0].dtype)

    def _project_vertical(self, frame, v: Tangent) -> Tangent:
        point = self.check_point(frame.point)
        v = self.check_tangent(point, v)
        return self._times(point, self._vertical_generator(frame, v))

    def _slice_mean_square(self, frame, v: Tangent) -> Tangent:
        """Mean square of every model-space row of v (O(d)-invariant), keepdim on the axis."""
        point = self.check_point(frame.point)
        v = self.check_tangent(point, v)
        return tuple((t * t).mean(dim=a, keepdim=True) for t, a in zip(v, self.axes))

    def _eigenframe(self, point: Point) -> tuple[torch.Tensor, torch.Tensor]:
        work = work_dtype(point[0].dtype)
        work_point = tuple(t.to(work) for t in point)
        evals, evecs = torch.linalg.eigh(sym(self._cross(work_point, work_point)))
        evals, evecs = evals.flip(-1), evecs.flip(-1)  # descending
        frame = orthonormal_columns_sign_fixed(evecs, self._rows(work_point) @ evecs)
        return frame.to(point[0].dtype), evals.to(point[0].dtype)

    def dressing(self, point: Point) -> torch.Tensor:
        return self._eigenframe(self.check_point(point))[0]

    def balance_gap(self, point: Point) -> torch.Tensor:
        """‖C − diag C‖_F / ‖C‖_F with C = Σ T̂ᵀT̂: zero where the frame diagonalises C, as the
        dressing does (O(d) has no moment map for the Euclidean metric: C is symmetric)."""
        c = self._cross(*(self.check_point(point),) * 2)
        off = c - torch.diag_embed(torch.diagonal(c))
        norm = torch.linalg.matrix_norm(c)
        return torch.linalg.matrix_norm(off) / norm.clamp_min(torch.finfo(norm.dtype).tiny)

    def ambiguity(self, point: Point) -> torch.Tensor:
        """Smallest relative gap between the eigenvalues of C = Σ T̂ᵀT̂ (a scalar)."""
        return relative_gaps(self._eigenframe(self.check_point(point))[1])

    def invariants(self, point: Point) -> tuple[torch.Tensor, ...]:
        rows = self._rows(self.check_point(point))
        return (rows @ rows.mT,)

    def random_point(self, *, generator=None, dtype=None, device=None) -> Point:
        dtype, device = self._dtype_device(dtype, device)
        scale = self.d_model**-0.5
        return tuple(randn(s, generator, dtype, device) * scale for s in self.point_shapes())

    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=None):
        """A Haar-random element of O(d) (``condition`` is ignored: the group is compact)."""
        dtype, device = self._dtype_device(dtype, device)
        return random_orthogonal((), self.d_model, generator, dtype, device)
