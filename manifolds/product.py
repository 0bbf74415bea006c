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
from .frame import Frame

__all__ = ["ProductBundle", "ProductFrame"]


class ProductFrame(Frame):
    """The frame handle of a product: one frame per component (``parts``), each factorised on
    first use; ``data`` is the tuple of theirs (``ProductBundle.factorise``)."""

    __slots__ = ("parts",)

    def __init__(self, bundle, point, data=None):
        super().__init__(bundle, point, data)
        datas = (None,) * len(bundle.components) if data is None else data
        points = bundle._split(self.point)
        self.parts = tuple(c.at(p, d) for c, p, d in zip(bundle.components, points, datas))

    @property
    def data(self):
        return tuple(f.data for f in self.parts)

    @property
    def cached(self):
        return tuple(f.cached for f in self.parts)


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

    def at(self, point: Point, data=None) -> ProductFrame:
        return ProductFrame(self, point, data)

    def _each(self, hook: str, frame: ProductFrame, v) -> tuple:
        """Concatenate ``component.hook(frame_i, v_i)`` over the components."""
        self.check_point(frame.point)
        parts = zip(self.components, frame.parts, self._split(tuple(v)))
        return tuple(t for c, f, x in parts for t in getattr(c, hook)(f, x))

    def _inner(self, frame: ProductFrame, u: Tangent, v: Tangent) -> torch.Tensor:
        self.check_point(frame.point)
        parts = zip(self.components, frame.parts, self._split(u), self._split(v))
        return sum(c._inner(f, a, b) for c, f, a, b in parts)

    def _project_vertical(self, frame, v: Tangent) -> Tangent:
        return self._each("_project_vertical", frame, v)

    def _project_horizontal(self, frame, v: Tangent) -> Tangent:
        return self._each("_project_horizontal", frame, v)

    def _riemannian_gradient(self, frame, egrad: Tangent) -> Tangent:
        return self._each("_riemannian_gradient", frame, egrad)

    def _slice_mean_square(self, frame, v: Tangent) -> Tangent:
        return self._each("_slice_mean_square", frame, v)

    def _limit_step(self, frame, step: Tangent) -> Tangent:
        return self._each("_limit_step", frame, step)

    def scale_invariants(self, point: Point, factor) -> Point:
        return self._per_component("scale_invariants", point, factor)

    def deficient_heads(self, data):
        """The components' flags, concatenated (components without heads contribute none)."""
        parts = [c.deficient_heads(d) for c, d in zip(self.components, data)]
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

    def _dressing_or_identity(self, frame: ProductFrame):
        """((u₁, …), (dressable₁, …)) per component."""
        self.check_point(frame.point)
        parts = [c._dressing_or_identity(f) for c, f in zip(self.components, frame.parts)]
        return tuple(u for u, _ in parts), tuple(ok for _, ok in parts)

    def _locate(self, index: int) -> tuple[int, int]:
        """(component, its tensor index) of tensor ``index`` of a point."""
        for i, c in enumerate(self.components):
            if 0 <= index < c.n_tensors:
                return i, index
            index -= c.n_tensors
        raise ValueError(f"ProductBundle: no tensor {index} among its {self.n_tensors}")

    def act_statistic(self, statistic: torch.Tensor, g, index: int, kind: str) -> torch.Tensor:
        """The owning component's ``act_statistic`` (``index`` counts the product's tensors)."""
        g = self._check_group_tuple(g, "group element")
        i, local = self._locate(index)
        return self.components[i].act_statistic(statistic, g[i], local, kind)

    def _redress(self, frame: ProductFrame, covector: Tangent, tangents: tuple, statistics):
        """Each component's own ``_redress`` (closed-form frames where a component has one)."""
        self.check_point(frame.point)
        split = [self._split(tuple(t)) for t in tangents]
        located = [(self._locate(i), kind, st) for i, kind, st in statistics]
        parts = [
            c._redress(
                f,
                g,
                tuple(s[i] for s in split),
                [(j, k, st) for (n, j), k, st in located if n == i],
            )
            for i, (c, f, g) in enumerate(
                zip(self.components, frame.parts, self._split(tuple(covector)))
            )
        ]
        stats = [iter(part[3]) for part in parts]
        return (
            tuple(t for part in parts for t in part[0]),
            tuple(t for part in parts for t in part[1]),
            tuple(tuple(t for part in parts for t in part[2][j]) for j in range(len(tangents))),
            tuple(next(stats[n]) for (n, _), _, _ in located),
            tuple(part[4] for part in parts),
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
