r"""The joint bundle with further rotation groups on other axes (docs/theory/joint.md).

``JointWithRotations(residual, heads, rotations)`` extends ``JointBundle(residual, heads)`` by
``rotations``: ``(rotation, slots)`` pairs, each a ``ResidualRotation`` O(d_b) acting on an axis
*other than the model axis* of the tensors ``slots`` (disjoint from every head's tensors and
from each other's). The relational transformer is the case in point: O(k) rotates the channel
axis of every tensor (the model axis here), GL(r) acts per head on the channel-space factors,
and O(D) rotates the gauge axis of the embedding tables, which O(k) rotates too.

* group      O(d) × Π_h GL(r_h) × Π_b O(d_b). O(d_b) acts on one axis of its tensors and O(d)
  on another, so they commute (T ↦ T ×_axis R ×_axis' Q); both commute with the heads
  (disjoint tensors). Group elements are tuples (R, g_1, …, g_H, Q_1, …, Q_B);
* vertical   V_O(Ω) + Σ_h V_h(ξ_h) + Σ_b V_b(η_b), dimension d(d−1)/2 + Σ r_h² + Σ d_b(d_b−1)/2
  where the action is free;
* metric     the heads' on their factors, Euclidean on every other tensor (the rotations'
  metric), so P_b, the Euclidean projection onto the O(d_b)-vertical space of its tensors, is
  orthogonal to every P_h (disjoint tensors) — the normal equations stay block-arrow shaped;
* projection eliminating the heads and the rotations leaves the Schur system on skew Ω
      S Ω = V_O*(I − Σ_h P_h − Σ_b P_b) V_O Ω = V_O*(I − Σ_h P_h − Σ_b P_b) Z,
  then ξ_h = L_h⁻¹ V_h*(Z − V_O Ω) and the rotations' part P_b(Z − V_O Ω); solved as in
  ``JointBundle`` (direct for d ≤ ``DIRECT_MAX_D``, else CG preconditioned by V_O*V_O);
* dressing   O(d) first, from ``JointBundle``'s Gram — the rows of the tensors nothing else acts
  on and the head composites, invariant under every O(d_b) since it does not read their tensors
  — with signs from those rows; then the heads and each O(d_b) on the turned point (each
  rotation's own eigenframe). Equivariant: every later step sees an O(d)-invariant point;
* invariants ``JointBundle``'s (the rows of the tensors only O(d) acts on and the head
  composites); they do not read the rotations' tensors, so they identify the orbit only up to
  what those tensors carry.

At least one tensor must be acted on by O(d) alone (an MLP weight): it fixes the signs of the
O(d) frame.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import joint_linalg as jl
from .base import Point, Tangent
from .joint import JointBundle
from .linalg import skew, sym

__all__ = ["JointWithRotations"]


class JointWithRotations(JointBundle):
    """``JointBundle`` with O(d_b) rotations of other axes of some tensors (module docstring)."""

    def __init__(self, residual, heads: Sequence, rotations: Sequence, **options):
        super().__init__(residual, heads, **options)
        self.rotations = tuple((rot, tuple(int(s) for s in slots)) for rot, slots in rotations)
        shapes = self.point_shapes()
        taken = {s for _, slots in self.heads for s in slots}
        for k, (rot, slots) in enumerate(self.rotations):
            if not slots or not all(0 <= s < self.n_tensors for s in slots):
                raise ValueError(f"rotations[{k}]: slots {slots} must be tensor indices")
            if taken & set(slots):
                raise ValueError(
                    f"rotations[{k}]: slots {slots} overlap a head's or another rotation's tensors"
                )
            taken |= set(slots)
            if tuple(map(tuple, rot.point_shapes())) != tuple(shapes[s] for s in slots):
                raise ValueError(
                    f"rotations[{k}]: {rot!r} has shapes {rot.point_shapes()}, but tensors "
                    f"{slots} have {[shapes[s] for s in slots]}"
                )
            for s, axis in zip(slots, rot.axes):
                n = len(shapes[s])
                if axis % n == self.residual.axes[s] % n:
                    raise ValueError(
                        f"rotations[{k}]: tensor {s} is rotated on its model axis {axis}; a "
                        "rotation must act on another axis"
                    )
        self.rotation_slots = tuple(s for _, slots in self.rotations for s in slots)
        self.others = tuple(i for i in range(self.n_tensors) if i not in taken)
        if not self.others:
            raise ValueError(
                "JointWithRotations needs at least one tensor that only O(d) acts on: it fixes "
                "the signs of the O(d) frame"
            )
        self._n_fixed = 1 + len(self.heads)

    def __repr__(self) -> str:
        rots = ", ".join(f"{r!r}@{s}" for r, s in self.rotations)
        return f"JointWithRotations({super().__repr__()}, [{rots}])"

    # ---- sizes and members
    @property
    def group_dim(self) -> int:
        return super().group_dim + sum(r.group_dim for r, _ in self.rotations)

    @property
    def compact_dim(self) -> int:
        """Dimension of O(d) × Π O(r) × Π O(d_b): the subgroup that preserves ‖θ‖²."""
        return super().compact_dim + sum(r.group_dim for r, _ in self.rotations)

    @property
    def algebra_shape(self):
        return (*super().algebra_shape, *(tuple(r.algebra_shape) for r, _ in self.rotations))

    def _split(self, g):
        return g[: self._n_fixed], g[self._n_fixed :]

    # ---- group and action
    def check_group_element(self, point, g, what: str = "group element") -> None:
        n = self._n_fixed + len(self.rotations)
        if not isinstance(g, tuple) or len(g) != n:
            raise ValueError(
                f"JointWithRotations: a {what} is a tuple (R, g_1, …, g_{len(self.heads)}, "
                f"Q_1, …, Q_{len(self.rotations)}) of length {n}, got {type(g).__name__} of "
                f"length {len(g) if isinstance(g, tuple) else '-'}"
            )
        fixed, rots = self._split(g)
        self.residual.check_group_element(point, fixed[0], what)
        for (h, s), gh in zip(self.heads, fixed[1:]):
            h.check_group_element(self._sub(point, s), gh, what)
        for (r, s), q in zip(self.rotations, rots):
            r.check_group_element(self._sub(point, s), q, what)

    def act(self, point: Point, g) -> Point:
        point = self.check_point(point)
        self.check_group_element(point, g)
        fixed, rots = self._split(g)
        moved = [(s, h.act(self._sub(point, s), gh)) for (h, s), gh in zip(self.heads, fixed[1:])]
        moved += [(s, r.act(self._sub(point, s), q)) for (r, s), q in zip(self.rotations, rots)]
        return self.residual.act(self._with(point, moved), fixed[0])

    def inverse(self, g):
        """The parts act on commuting factors of the action: each is inverted on its own."""
        fixed, rots = self._split(g)
        heads = tuple(h.inverse(gh) for (h, _), gh in zip(self.heads, fixed[1:]))
        return (
            self.residual.inverse(fixed[0]),
            *heads,
            *(r.inverse(q) for (r, _), q in zip(self.rotations, rots)),
        )

    def inverse_transpose(self, g):
        fixed, rots = self._split(g)
        heads = tuple(h.inverse_transpose(gh) for (h, _), gh in zip(self.heads, fixed[1:]))
        return (
            fixed[0],
            *heads,
            *(r.inverse_transpose(q) for (r, _), q in zip(self.rotations, rots)),
        )

    def vertical(self, point: Point, xi) -> Tangent:
        point = self.check_point(point)
        self.check_group_element(point, xi, "Lie-algebra element")
        fixed, rots = self._split(xi)
        out = list(self.residual.vertical(point, fixed[0]))
        members = [(h, s, x) for (h, s), x in zip(self.heads, fixed[1:])]
        members += [(r, s, x) for (r, s), x in zip(self.rotations, rots)]
        for bundle, slots, x in members:
            for slot, t in zip(slots, bundle.vertical(self._sub(point, slots), x)):
                out[slot] = out[slot] + t
        return tuple(out)

    def random_algebra_element(self, *, generator=None, dtype=None, device=None):
        kw = dict(generator=generator, dtype=dtype, device=device)
        rots = tuple(r.random_algebra_element(**kw) for r, _ in self.rotations)
        return (*super().random_algebra_element(**kw), *rots)

    def algebra_basis(self, *, dtype=None, device=None):
        """A basis of so(d) × Π gl(r) × Π so(d_b), stacked on a leading axis of length
        ``group_dim``: one stacked tensor per factor, zero outside that factor's block."""
        dtype = dtype or torch.get_default_dtype()
        parts = [jl.skew_basis(self.d_model, dtype, device)]
        parts += [
            torch.eye(h.group_dim, dtype=dtype, device=device).reshape(-1, *h.algebra_shape)
            for h, _ in self.heads
        ]
        parts += [r.algebra_basis(dtype=dtype, device=device) for r, _ in self.rotations]
        total, start, out = self.group_dim, 0, []
        for part in parts:
            n = part.shape[0]
            before = part.new_zeros((start, *part.shape[1:]))
            after = part.new_zeros((total - start - n, *part.shape[1:]))
            out.append(torch.cat((before, part, after)))
            start += n
        return tuple(out)

    # ---- metric and projection
    def factorise(self, point: Point) -> jl.JointFrame:
        """``JointBundle``'s frame, with the rotations' tensors in the Lyapunov preconditioner
        and each rotation's own factorisation (``rotation_frames``)."""
        f = super().factorise(point)
        point = self.check_point(point)
        c_full = f.c_other + self._cross(point, point, self.rotation_slots)
        c_full = c_full + sum(sym(hd.cross(hd.a, hd.b)) for hd, _ in f.blocks.values())
        f.spectrum = torch.linalg.eigh(c_full)
        f.rotation_frames = [r.factorise(self._sub(point, s)) for r, s in self.rotations]
        return f

    def _cross(self, u, v, slots) -> torch.Tensor:
        """Σ_{i ∈ slots} Ûᵢᵀ V̂ᵢ over the model axis (d×d)."""
        d, axes = self.d_model, self.residual.axes
        out = u[0].new_zeros(d, d)
        for i in slots:
            out = out + u[i].movedim(axes[i], -1).reshape(-1, d).mT @ v[i].movedim(
                axes[i], -1
            ).reshape(-1, d)
        return out

    def _inner(self, frame, u: Tangent, v: Tangent) -> torch.Tensor:
        total = super()._inner(frame, u, v)
        return total + sum((u[i] * v[i]).sum() for i in self.rotation_slots)

    def _rotation_parts(self, point, z, frames) -> list[tuple[tuple[int, ...], tuple]]:
        """(slots, P_b z_b) for every rotation: the Euclidean O(d_b)-vertical part of z."""
        return [
            (s, r._project_vertical(r.at(self._sub(point, s), fr), self._sub(z, s)))
            for (r, s), fr in zip(self.rotations, frames)
        ]

    def _off_rotations(self, point, z, frames) -> tuple:
        """z with every rotation's vertical part removed from its tensors: (I − Σ_b P_b) z."""
        parts = self._rotation_parts(point, z, frames)
        return self._with(z, [(s, tuple(z[i] - t for i, t in zip(s, ts))) for s, ts in parts])

    def _vertical_generator(self, frame, v: Tangent):
        """(Ω, {r: stacked ξ}, rotation parts): the generators of the metric-orthogonal vertical
        part of v and, per rotation, its (slots, vertical tangents)."""
        point = self.check_point(frame.point)
        f = frame.data
        zs = {r: (z1, z2) for r, (z1, z2, _) in self._blocks(v).items()}
        rot_slots, frames = self.rotation_slots, f.rotation_frames
        rhs = skew(f.rows.mT @ self._rows(v))
        rhs = rhs + skew(self._cross(point, self._off_rotations(point, v, frames), rot_slots))
        for r, (hd, _) in f.blocks.items():
            rhs = rhs + skew(hd.cross(*hd.horizontal(*zs[r])[0]))

        def schur(om):  # V_O*(I − P_h − P_b)V_O Ω, for one Ω or a stack of them
            out = skew(f.c_other @ om)
            for hd, _ in f.blocks.values():
                out = out + skew(hd.cross(*hd.horizontal(*hd.rotate(om))[0]))
            if not rot_slots:
                return out
            singles = om.reshape(-1, self.d_model, self.d_model)
            extra = []
            for o in singles:
                turned = self.residual.vertical(point, o)
                off = self._off_rotations(point, turned, frames)
                extra.append(skew(self._cross(point, off, rot_slots)))
            return out + torch.stack(extra).reshape(om.shape)

        omega = self._solve_schur(schur, rhs, f.spectrum, frame.norm(v))
        xis = {}
        for r, (hd, _) in f.blocks.items():
            w1, w2 = hd.rotate(omega)
            xis[r] = hd.solve(hd.adjoint(zs[r][0] - w1, zs[r][1] - w2))
        turned = self.residual.vertical(point, omega)
        rest = tuple(a - b for a, b in zip(v, turned))
        return omega, xis, self._rotation_parts(point, rest, frames)

    def _project_vertical(self, frame, v: Tangent) -> Tangent:
        point = self.check_point(frame.point)
        v = self.check_tangent(point, v)
        omega, xis, rots = self._vertical_generator(frame, v)
        out = self._vertical_from(point, frame.data, omega, xis)
        for slots, tensors in rots:
            for s, t in zip(slots, tensors):
                out[s] = out[s] + t
        return tuple(out)

    # ---- dressing
    def dressing(self, point: Point):
        point = self.check_point(point)
        frame, _ = self._frame(point)
        turned = self.residual.act(point, frame)
        heads = tuple(h.dressing(self._sub(turned, s)) for h, s in self.heads)
        return (frame, *heads, *(r.dressing(self._sub(turned, s)) for r, s in self.rotations))

    def ambiguity(self, point: Point) -> torch.Tensor:
        """min(``JointBundle``'s ambiguity, every rotation's eigen-gap on the turned point)."""
        point = self.check_point(point)
        frame, _ = self._frame(point)
        turned = self.residual.act(point, frame)
        gaps = [super().ambiguity(point).reshape(())]
        gaps += [r.ambiguity(self._sub(turned, s)).reshape(()) for r, s in self.rotations]
        return torch.stack(gaps).min()

    def invariants(self, point: Point) -> tuple[torch.Tensor, ...]:
        """``JointBundle``'s, and per rotated tensor T the Gram over its rotated axis of
        X·T̂ (X the rows only O(d) acts on, T̂ (rest, d, d_b)): X T̂ᵣ T̂ₛᵀ Xᵀ for all r, s."""
        point = self.check_point(point)
        rows = self._rows(point)  # (N, d)
        out = super().invariants(point)
        for rot, slots in self.rotations:
            for i, axis in zip(slots, rot.axes):
                t = point[i].movedim((self.residual.axes[i], axis), (-2, -1))
                z = rows @ t.reshape(-1, *t.shape[-2:])  # (rest, N, d_b)
                flat = z.reshape(-1, z.shape[-1])
                out = out + (flat @ flat.mT,)
        return out

    # ---- sampling
    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        kw = dict(generator=generator, dtype=dtype, device=device)
        fixed = super().random_group_element(**kw, condition=condition)
        return (*fixed, *(r.random_group_element(**kw) for r, _ in self.rotations))
