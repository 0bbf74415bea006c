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
        self.per_head = False  # components have heads of their own; a product is one orbit

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
    def compact_dim(self) -> int:
        return sum(c.compact_dim for c in self.components)

    @property
    def metric_is_invariant(self) -> bool:
        return all(c.metric_is_invariant for c in self.components)

    @property
    def algebra_shape(self):
        return tuple(c.algebra_shape for c in self.components)

    def algebra_basis(self, *, dtype=None, device=None):
        """A tuple with one stacked basis per component, zero outside that component's block:
        the basis of 𝔤₁ × … × 𝔤_k, each entry with a leading axis of length ``group_dim``."""
        parts = [c.algebra_basis(dtype=dtype, device=device) for c in self.components]
        sizes = [c.group_dim for c in self.components]
        total, out, start = sum(sizes), [], 0
        for part, size in zip(parts, sizes):
            out.append(_pad_leading(part, start, total - start - size))
            start += size
        return tuple(out)

    def random_algebra_element(self, *, generator=None, dtype=None, device=None):
        return tuple(
            c.random_algebra_element(generator=generator, dtype=dtype, device=device)
            for c in self.components
        )

    def group_exp(self, xi):
        xi = self._check_group_tuple(xi, "Lie-algebra element")
        return tuple(c.group_exp(x) for c, x in zip(self.components, xi))

    def components_of(self, tensors) -> list[tuple[torch.Tensor, ...]]:
        """The components' parts of a point or tangent vector, in component order."""
        return self._split(tensors)

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

    def inverse(self, g):
        g = self._check_group_tuple(g, "group element")
        return tuple(c.inverse(gi) for c, gi in zip(self.components, g))

    def inverse_transpose(self, g):
        g = self._check_group_tuple(g, "group element")
        return tuple(c.inverse_transpose(gi) for c, gi in zip(self.components, g))

    def vertical(self, point: Point, xi) -> Tangent:
        xi = self._check_group_tuple(xi, "Lie-algebra element")
        point = self.check_point(point)
        return tuple(
            t for c, p, x in zip(self.components, self._split(point), xi) for t in c.vertical(p, x)
        )

    def factorise(self, point: Point):
        point = self.check_point(point)
        return tuple(c.factorise(p) for c, p in zip(self.components, self._split(point)))

    def _frames(self, point, frame):
        return self.factorise(point) if frame is None else frame

    def _with_frames(self, method: str, point, v, frame) -> tuple:
        """Concatenate ``component.method(p_i, v_i, frame_i)`` over the components."""
        point = self.check_point(point)
        frames = self._frames(point, frame)
        parts = zip(self.components, self._split(point), self._split(tuple(v)), frames)
        return tuple(t for c, p, x, f in parts for t in getattr(c, method)(p, x, f))

    def inner(self, point: Point, u: Tangent, v: Tangent, frame=None) -> torch.Tensor:
        point = self.check_point(point)
        frames = self._frames(point, frame)
        parts = zip(self.components, self._split(point), self._split(u), self._split(v), frames)
        return sum(c.inner(p, a, b, f) for c, p, a, b, f in parts)

    def project_vertical(self, point: Point, v: Tangent, frame=None) -> Tangent:
        return self._with_frames("project_vertical", point, v, frame)

    def project_horizontal(self, point: Point, v: Tangent, frame=None) -> Tangent:
        return self._with_frames("project_horizontal", point, v, frame)

    def riemannian_gradient(self, point: Point, egrad: Tangent, frame=None) -> Tangent:
        return self._with_frames("riemannian_gradient", point, egrad, frame)

    def horizontal_gradient(self, point: Point, egrad: Tangent, frame=None) -> Tangent:
        return self._with_frames("horizontal_gradient", point, egrad, frame)

    def slice_mean_square(self, point: Point, v: Tangent, frame=None) -> Tangent:
        return self._with_frames("slice_mean_square", point, v, frame)

    def limit_step(self, point: Point, step: Tangent, frame=None) -> Tangent:
        return self._with_frames("limit_step", point, step, frame)

    def transport(self, point: Point, new_point: Point, v: Tangent, frame=None) -> Tangent:
        return self.project_horizontal(new_point, v, frame)

    def scale_invariants(self, point: Point, factor) -> Point:
        return self._per_component("scale_invariants", point, factor)

    def deficient_heads(self, frame):
        """The components' flags, concatenated (components without heads contribute none)."""
        parts = [c.deficient_heads(f) for c, f in zip(self.components, frame)]
        parts = [p.reshape(-1) for p in parts if p is not None]
        return torch.cat(parts) if parts else None

    def dead_heads(self, point: Point):
        """The components' flags, concatenated like ``deficient_heads``."""
        parts = [c.dead_heads(part) for c, part in zip(self.components, self.components_of(point))]
        parts = [p.reshape(-1) for p in parts if p is not None]
        return torch.cat(parts) if parts else None

    def balance_gap(self, point: Point):
        """A tuple: each component's ``balance_gap``."""
        point = self.check_point(point)
        return tuple(c.balance_gap(p) for c, p in zip(self.components, self._split(point)))

    def gauge_drift(self, point: Point):
        """A tuple: each component's ``gauge_drift``."""
        point = self.check_point(point)
        return tuple(c.gauge_drift(p) for c, p in zip(self.components, self._split(point)))

    def dressing_or_identity(self, point: Point, frame=None):
        """((u₁, …), (dressable₁, …)) per component."""
        point = self.check_point(point)
        parts = [c.dressing_or_identity(p) for c, p in zip(self.components, self._split(point))]
        return tuple(u for u, _ in parts), tuple(ok for _, ok in parts)

    def redress(self, point: Point, covector: Tangent, tangents: tuple, frame=None):
        """Each component's own ``redress`` (closed-form frames where a component has one)."""
        point = self.check_point(point)
        frames = self._frames(point, frame)
        split = [self._split(tuple(t)) for t in tangents]
        parts = [
            c.redress(p, g, tuple(s[i] for s in split), f)
            for i, (c, p, g, f) in enumerate(
                zip(self.components, self._split(point), self._split(tuple(covector)), frames)
            )
        ]
        moved = tuple(t for part in parts for t in part[0])
        carried = tuple(
            tuple(t for part in parts for t in part[2][j]) for j in range(len(tangents))
        )
        return (
            moved,
            tuple(t for part in parts for t in part[1]),
            carried,
            tuple(p[3] for p in parts),
        )

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


def _pad_leading(tree, before: int, after: int):
    """Zero rows before and after a stacked basis (or a tuple of them) along axis 0."""
    if isinstance(tree, tuple):
        return tuple(_pad_leading(t, before, after) for t in tree)
    zeros = tree.new_zeros
    return torch.cat([zeros((before, *tree.shape[1:])), tree, zeros((after, *tree.shape[1:]))])
