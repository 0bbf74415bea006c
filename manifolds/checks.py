"""Validation of points, tangent vectors and group elements against a bundle's shapes.

A mixin of ``manifolds.base.Bundle``: it reads ``n_tensors``, ``point_shapes()`` and
``algebra_shape`` and raises ``ValueError``s naming what was expected and what was given.
Nothing here synchronises with a device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["PointChecks"]

Point = tuple[torch.Tensor, ...]


class PointChecks:
    """Arity, shape, dtype and device checks of a bundle's points and tangents."""

    def check_point(self, point: Sequence[torch.Tensor], what: str = "point") -> Point:
        """Validate arity, shapes, dtypes and devices; return the point as a tuple.

        Raises ``ValueError`` naming what was expected and what was given. Never synchronises.
        """
        point = tuple(point)
        name = type(self).__name__
        if len(point) != self.n_tensors:
            raise ValueError(
                f"{name}: a {what} is a tuple of {self.n_tensors} tensors "
                f"({self._describe_shapes()}), got {len(point)}"
            )
        for i, tensor in enumerate(point):
            if not isinstance(tensor, torch.Tensor):
                raise ValueError(f"{name}: {what}[{i}] must be a tensor, got {type(tensor)}")
            problem = self._shape_problem(i, tuple(tensor.shape))
            if problem is not None:
                raise ValueError(
                    f"{name}: {what}[{i}] has shape {tuple(tensor.shape)}, expected {problem}"
                )
            if not tensor.is_floating_point():
                raise ValueError(
                    f"{name}: {what}[{i}] has dtype {tensor.dtype}, expected a floating-point dtype"
                )
        first = point[0]
        for i, tensor in enumerate(point[1:], start=1):
            if tensor.dtype != first.dtype or tensor.device != first.device:
                raise ValueError(
                    f"{name}: {what}[{i}] is {tensor.dtype} on {tensor.device}, "
                    f"but {what}[0] is {first.dtype} on {first.device}"
                )
        return point

    def check_group_element(self, point: Point, g, what: str = "group element") -> None:
        """Validate a group or Lie-algebra element (shape ``algebra_shape``) against a point."""
        name, shape = type(self).__name__, tuple(self.algebra_shape)
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != shape:
            given = tuple(g.shape) if isinstance(g, torch.Tensor) else type(g).__name__
            raise ValueError(f"{name}: {what} must have shape {shape}, got {given}")
        if g.dtype != point[0].dtype or g.device != point[0].device:
            raise ValueError(
                f"{name}: {what} is {g.dtype} on {g.device}, but the point is "
                f"{point[0].dtype} on {point[0].device}"
            )

    def _shape_problem(self, index: int, shape: tuple[int, ...]) -> str | None:
        """None if tensor ``index`` of a point may have ``shape``, else what was expected."""
        expected = tuple(self.point_shapes()[index])
        return None if shape == expected else str(expected)

    def _describe_shapes(self) -> str:
        return "shapes " + ", ".join(str(tuple(s)) for s in self.point_shapes())

    def check_tangent(self, point: Point, v: Sequence[torch.Tensor], what: str = "tangent"):
        """Validate a tangent vector against a point (same shapes, dtype and device)."""
        v = self.check_point(v, what)
        for i, (t, p) in enumerate(zip(v, point)):
            if t.shape != p.shape:
                raise ValueError(
                    f"{type(self).__name__}: {what}[{i}] has shape {tuple(t.shape)}, expected "
                    f"the shape of point[{i}], {tuple(p.shape)}"
                )
        if v[0].dtype != point[0].dtype or v[0].device != point[0].device:
            raise ValueError(
                f"{type(self).__name__}: {what} is {v[0].dtype} on {v[0].device}, but the point "
                f"is {point[0].dtype} on {point[0].device}"
            )
        return v
