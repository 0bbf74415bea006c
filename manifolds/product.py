"""Products of bundles acting on disjoint tensors.

``ProductBundle([B₁, …, B_k])``: the point is the concatenation of the components' points, the
group is G₁ × … × G_k acting factor-wise, and vertical/horizontal spaces, metric, dressing and
invariants are the direct sums of the components'. Only *disjoint* tensors are supported: where
two symmetries act on the same tensor (O(d) and a head's GL(r) on W_q) the joint vertical space is
the sum V₁ + V₂, which is not a direct sum of per-tensor projections.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Bundle, Point, Tangent

__all__ = ["ProductBundle"]


class ProductBundle(Bundle):
    """Direct product of bundles on disjoint tensors (see the module docstring)."""

    def __init__(self, components: Sequence[Bundle]):
        self.components = tuple(components)
        if not self.components:
            raise ValueError("ProductBundle needs at least one component bundle")
        for i, component in enumerate(self.components):
            if not isinstance(component, Bundle):
                raise ValueError(f"component {i} is {type(component).__name__}, not a Bundle")
        self.n_tensors = sum(c.n_tensors for c in self.components)
        metrics = {c.metric for c in self.components}
        self.metric = metrics.pop() if len(metrics) == 1 else "mixed"

    def __repr__(self) -> str:
        return f"ProductBundle({list(self.components)!r})"

    def _split(self, tensors) -> list[tuple[torch.Tensor, ...]]:
        tensors = tuple(tensors)
        parts, start = [], 0
        for c in self.components:
            parts.append(tensors[start : start + c.n_tensors])
            start += c.n_tensors
        return parts

    def _per_component(self, method: str, point, *others) -> tuple:
        """Concatenate ``component.method(point_i, other_i, ...)`` over the components."""
        point = self.check_point(point)
        split_others = [self._split(o) if isinstance(o, tuple) else o for o in others]
        out: list = []
        for i, (c, p) in enumerate(zip(self.components, self._split(point))):
            args = [o[i] if isinstance(o, list) else o for o in split_others]
            out.extend(getattr(c, method)(p, *args))
        return tuple(out)

    def _check_group_tuple(self, elements, what: str) -> tuple:
        elements = tuple(elements)
        if len(elements) != len(self.components):
            raise ValueError(
                f"ProductBundle: a {what} is a tuple of {len(self.components)} elements, one per "
                f"component, got {len(elements)}"
            )
        return elements

    @property
    def group_dim(self) -> int:
        return sum(c.group_dim for c in self.components)

    @property
    def algebra_shape(self):
        return tuple(c.algebra_shape for c in self.components)

    def point_shapes(self):
        return tuple(s for c in self.components for s in c.point_shapes())

    def _shape_problem(self, index, shape):
        for c in self.components:
            if index < c.n_tensors:
                return c._shape_problem(index, shape)
            index -= c.n_tensors
        raise IndexError(index)

    def _describe_shapes(self) -> str:
        return "; ".join(c._describe_shapes() for c in self.components)

    def act(self, point: Point, g) -> Point:
        g = self._check_group_tuple(g, "group element")
        point = self.check_point(point)
        return tuple(
            t for c, p, gi in zip(self.components, self._split(point), g) for t in c.act(p, gi)
        )

    def inverse_transpose(self, g):
        g = self._check_group_tuple(g, "group element")
        return tuple(c.inverse_transpose(gi) for c, gi in zip(self.components, g))

    def vertical(self, point: Point, xi) -> Tangent:
        xi = self._check_group_tuple(xi, "Lie-algebra element")
        point = self.check_point(point)
        return tuple(
            t for c, p, x in zip(self.components, self._split(point), xi) for t in c.vertical(p, x)
        )

    def inner(self, point: Point, u: Tangent, v: Tangent) -> torch.Tensor:
        point = self.check_point(point)
        parts = zip(self.components, self._split(point), self._split(u), self._split(v))
        return sum(c.inner(p, a, b) for c, p, a, b in parts)

    def project_vertical(self, point: Point, v: Tangent) -> Tangent:
        return self._per_component("project_vertical", point, tuple(v))

    def project_horizontal(self, point: Point, v: Tangent) -> Tangent:
        return self._per_component("project_horizontal", point, tuple(v))

    def riemannian_gradient(self, point: Point, egrad: Tangent) -> Tangent:
        return self._per_component("riemannian_gradient", point, tuple(egrad))

    def horizontal_gradient(self, point: Point, egrad: Tangent) -> Tangent:
        return self._per_component("horizontal_gradient", point, tuple(egrad))

    def moment_sq(self, point: Point, v: Tangent) -> Tangent:
        return self._per_component("moment_sq", point, tuple(v))

    def decay(self, point: Point, factor) -> Point:
        return self._per_component("decay", point, factor)

    def dressing(self, point: Point):
        point = self.check_point(point)
        return tuple(c.dressing(p) for c, p in zip(self.components, self._split(point)))

    def dress(self, point: Point) -> Point:
        return self._per_component("dress", point)

    def ambiguity(self, point: Point) -> torch.Tensor:
        """The smallest gap of each component, stacked: (n_components,)."""
        point = self.check_point(point)
        return torch.stack(
            [c.ambiguity(p).min() for c, p in zip(self.components, self._split(point))]
        )

    def invariants(self, point: Point) -> tuple[torch.Tensor, ...]:
        return self._per_component("invariants", point)

    def random_point(self, *, generator=None, dtype=None, device=None) -> Point:
        return tuple(
            t
            for c in self.components
            for t in c.random_point(generator=generator, dtype=dtype, device=device)
        )

    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        return tuple(
            c.random_group_element(
                generator=generator, dtype=dtype, device=device, condition=condition
            )
            for c in self.components
        )
