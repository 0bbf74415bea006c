r"""The joint quotient by O(d) on the model axis and GL(r) on the head axis (docs/theory/joint.md).

``JointBundle(residual, heads)`` — ``residual`` is a ``ResidualRotation`` over *every* tensor of
the point (with ``shapes``); ``heads`` lists ``(head_bundle, (i, j))``: a GL(r)-per-head bundle
(``HeadQK`` / ``HeadOV`` layout) acting on tensors i and j, whose factor rows are the model axis.

* group      O(d) × Π_h GL(r_h); (R, g) acts on a head pair by (A, B) ↦ (RᵀA g, RᵀB g⁻ᵀ) and on
  every other tensor by T ×_axis R. The two actions commute (rows vs columns);
* vertical   V = {V_O(Ω) + Σ_h V_h(ξ_h)}: V_O(Ω) = T ×_axis Ω on every tensor (δA = −ΩA on a
  factor), V_h(ξ) = (Aξ, −Bξᵀ); dimension d(d−1)/2 + Σ_h r_h² where the action is free;
* metric     the heads' metric on their factors — ``"euclidean"`` or ``"invariant"``
  tr(BᵀB U₁ᵀV₁) + tr(AᵀA U₂ᵀV₂), which is also O(d)-invariant, hence invariant under the whole
  joint group — and the Euclidean one on every other tensor;
* horizontal the exact metric-orthogonal projection. With G = metric operator (U₁W_B, U₂W_A),
  V_h*Z = AᵀZ₁W_B − W_A Z₂ᵀB, L_h = V_h*V_h (Sylvester AᵀAξ + ξBᵀB, or 2AᵀAξBᵀB for the
  invariant metric), V_O*Z = skew(Σ T̂ᵀ(GZ)^) and P_h = Σ_h V_h L_h⁻¹ V_h* the (mutually
  orthogonal) head projections, the normal equations are block-arrow shaped; eliminating the
  heads leaves the Schur system on skew Ω
      S Ω = V_O*(I − P_h) V_O Ω = V_O*(I − P_h) Z,     ξ_h = L_h⁻¹ V_h*(Z − V_O Ω).
  S is symmetric positive semi-definite on so(d) (null exactly on the stabiliser). For
  d ≤ ``DIRECT_MAX_D`` it is formed and solved by a pseudo-inverse (``solver="direct"``); above,
  by conjugate gradients preconditioned by the Lyapunov operator V_O*V_O, stopping at a
  backward error of ``cg_tol`` or where S is null on the search direction (the solver table
  of docs/theory/joint.md); ``last_solve`` records method, iterations and residual;
* dressing   O(d) first, from the GL-invariant, O(d)-covariant Gram C = Σ_(other tensors) T̂ᵀT̂
  + Σ_h (M_h M_hᵀ + M_hᵀM_h), M_h = ABᵀ: its eigenframe (descending), signs fixed on the rows of
  the tensors that only O(d) acts on (covariant and GL-invariant); then every head on its
  balanced section in that frame. ``ambiguity`` is the smaller of C's relative eigen-gap and the
  heads' singular-value gaps;
* invariants X Xᵀ and X M_h Xᵀ per head, X the stacked model-space rows of the other tensors
  (they identify the orbit where X has rank d).

Heads of equal r are stacked: every operation is batched over them (``manifolds.joint_linalg``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import joint_linalg as jl
from .base import Bundle, Point, Tangent, randn, random_orthogonal
from .linalg import orthonormal_columns_sign_fixed, relative_gaps, skew, sym

__all__ = ["JointBundle", "DIRECT_MAX_D"]

#: Largest d for which the Schur system on so(d) is formed and solved directly.
DIRECT_MAX_D = 8
SOLVERS = ("auto", "direct", "cg")


class JointBundle(Bundle):
    """O(d) on every tensor's model axis jointly with GL(r) per head (see the module docstring)."""

    group_is_compact = False

    def __init__(self, residual, heads: Sequence, *, solver: str = "auto", cg_tol=None):
        self.residual = residual
        self.heads = tuple((h, (int(i), int(j))) for h, (i, j) in heads)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        self.solver, self.cg_tol = solver, cg_tol
        self.d_model = residual.d_model
        shapes = residual.point_shapes()
        self.n_tensors = len(shapes)
        used: set[int] = set()
        metrics = set()
        for k, (head, slots) in enumerate(self.heads):
            if len(set(slots)) != 2 or not all(0 <= s < self.n_tensors for s in slots):
                raise ValueError(f"heads[{k}]: slots {slots} must be two distinct tensor indices")
            if used & set(slots):
                raise ValueError(f"heads[{k}]: slots {slots} overlap another head's tensors")
            used |= set(slots)
            if tuple(map(tuple, head.point_shapes())) != tuple(shapes[s] for s in slots):
                raise ValueError(
                    f"heads[{k}]: {head!r} has shapes {head.point_shapes()}, but the tensors "
                    f"{slots} of the residual bundle have {[shapes[s] for s in slots]}"
                )
            n, r, r2 = head.algebra_shape
            if r != r2 or head.group_dim != n * r * r:
                raise ValueError(f"heads[{k}]: {head!r} is not GL(r) per head")
            if head.metric not in ("euclidean", "invariant"):
                raise ValueError(f"heads[{k}]: metric {head.metric!r} is not supported")
            if getattr(head, "damping", 0.0):
                raise ValueError(f"heads[{k}]: a damped metric is not GL-invariant; use damping=0")
            metrics.add(head.metric)
            self._check_head_layout(k, head, slots)
        if len(metrics) > 1:
            raise ValueError(f"all heads must share one metric, got {sorted(metrics)}")
        self.metric = metrics.pop() if metrics else "euclidean"
        self.others = tuple(i for i in range(self.n_tensors) if i not in used)
        if not self.others:
            raise ValueError(
                "JointBundle needs at least one tensor that only O(d) acts on (an embedding): "
                "without one, (−I, −I) fixes every point and the dressing's signs are undefined"
            )
        self.last_solve: dict = {}

    def _check_head_layout(self, k, head, slots):
        """The factors' rows must be the model axis, the vertical field (Aξ, −Bξᵀ)."""
        gen = torch.Generator().manual_seed(0)
        sub = tuple(randn(s, gen, torch.float64) for s in head.point_shapes())
        rot = random_orthogonal((), self.d_model, gen, torch.float64)
        axes = [self.residual.axes[s] for s in slots]
        turned = tuple((t.movedim(x, -1) @ rot).movedim(-1, x) for t, x in zip(sub, axes))
        xi = randn(head.algebra_shape, gen, torch.float64)
        a, b = head.factors(sub)
        want = head.from_factors(a @ xi, -(b @ xi.mT))
        ok = all(torch.allclose(x, rot.mT @ y) for x, y in zip(head.factors(turned), (a, b)))
        ok = ok and all(torch.allclose(x, y) for x, y in zip(head.vertical(sub, xi), want))
        if not ok:
            raise ValueError(
                f"heads[{k}]: the factor rows of {head!r} are not the model axes {axes} of "
                f"tensors {slots}, or its vertical field is not (Aξ, −Bξᵀ)"
            )

    def __repr__(self) -> str:
        heads = ", ".join(f"{h!r}@{s}" for h, s in self.heads)
        return f"JointBundle({self.residual!r}, [{heads}], solver={self.solver!r})"

    # ---- sizes and members ---------------------------------------------------------------
    @property
    def group_dim(self) -> int:
        return self.residual.group_dim + sum(h.group_dim for h, _ in self.heads)

    @property
    def compact_dim(self) -> int:
        """Dimension of O(d) × Π O(r): the subgroup that preserves ‖θ‖²."""
        return self.residual.group_dim + sum(
            h.algebra_shape[0] * h.algebra_shape[1] * (h.algebra_shape[1] - 1) // 2
            for h, _ in self.heads
        )

    @property
    def metric_is_invariant(self) -> bool:
        return self.metric == "invariant"

    @property
    def algebra_shape(self):
        return (
            tuple(self.residual.algebra_shape),
            *(tuple(h.algebra_shape) for h, _ in self.heads),
        )

    def point_shapes(self):
        return self.residual.point_shapes()

    def _sub(self, tensors, slots):
        return tuple(tensors[s] for s in slots)

    def _with(self, tensors, updates) -> tuple:
        out = list(tensors)
        for slots, values in updates:
            for s, v in zip(slots, values):
                out[s] = v
        return tuple(out)

    def _blocks(self, tensors):
        """{r: (stacked A, stacked B, [(head, slots, n_heads)])} of a point or tangent."""
        groups: dict = {}
        for head, slots in self.heads:
            groups.setdefault(head.algebra_shape[1], []).append((head, slots))
        out = {}
        for r, members in groups.items():
            pairs = [h.factors(self._sub(tensors, s)) for h, s in members]
            a = torch.cat([p[0] for p in pairs])
            b = torch.cat([p[1] for p in pairs])
            out[r] = (a, b, members)
        return out

    def _unstack(self, members, z1, z2):
        """Per-head tensors (in each bundle's layout) from stacked factors."""
        sizes = [h.algebra_shape[0] for h, _ in members]
        return [
            (s, h.from_factors(x, y))
            for (h, s), x, y in zip(members, z1.split(sizes), z2.split(sizes))
        ]

    def _rows(self, tensors) -> torch.Tensor:
        d, axes = self.d_model, self.residual.axes
        return torch.cat([tensors[i].movedim(axes[i], -1).reshape(-1, d) for i in self.others])

    # ---- group and action -------------------------------------------------------------------
    def check_group_element(self, point, g, what: str = "group element") -> None:
        if not isinstance(g, tuple) or len(g) != 1 + len(self.heads):
            raise ValueError(
                f"JointBundle: a {what} is a tuple (R, g_1, …, g_{len(self.heads)}), got "
                f"{type(g).__name__} of length {len(g) if isinstance(g, tuple) else '-'}"
            )
        self.residual.check_group_element(point, g[0], what)
        for (h, s), gh in zip(self.heads, g[1:]):
            h.check_group_element(self._sub(point, s), gh, what)

    def act(self, point: Point, g) -> Point:
        point = self.check_point(point)
        self.check_group_element(point, g)
        moved = [(s, h.act(self._sub(point, s), gh)) for (h, s), gh in zip(self.heads, g[1:])]
        return self.residual.act(self._with(point, moved), g[0])

    def inverse(self, g):
        """The parts act on commuting factors of the action: each is inverted on its own."""
        heads = (h.inverse(gh) for (h, _), gh in zip(self.heads, g[1:]))
        return (self.residual.inverse(g[0]), *heads)

    def inverse_transpose(self, g):
        return (g[0], *(h.inverse_transpose(gh) for (h, _), gh in zip(self.heads, g[1:])))

    def vertical(self, point: Point, xi) -> Tangent:
        point = self.check_point(point)
        self.check_group_element(point, xi, "Lie-algebra element")
        out = list(self.residual.vertical(point, xi[0]))
        for (h, s), x in zip(self.heads, xi[1:]):
            for slot, t in zip(s, h.vertical(self._sub(point, s), x)):
                out[slot] = out[slot] + t
        return tuple(out)

    def random_algebra_element(self, *, generator=None, dtype=None, device=None):
        omega = randn(self.residual.algebra_shape, generator, dtype, device)
        heads = tuple(randn(h.algebra_shape, generator, dtype, device) for h, _ in self.heads)
        return (omega - omega.mT, *heads)

    def group_exp(self, xi):
        return tuple(torch.linalg.matrix_exp(x) for x in xi)

    def algebra_basis(self, *, dtype=None, device=None):
        """A basis of so(d) × Π gl(r), stacked on a leading axis of length ``group_dim``: a
        tuple with one stacked tensor per factor, zero outside that factor's block."""
        dtype = dtype or torch.get_default_dtype()
        so = jl.skew_basis(self.d_model, dtype, device)
        parts = [so] + [
            torch.eye(h.group_dim, dtype=dtype, device=device).reshape(-1, *h.algebra_shape)
            for h, _ in self.heads
        ]
        total, start, out = self.group_dim, 0, []
        for part in parts:
            n = part.shape[0]
            pad = (part.new_zeros((start, *part.shape[1:])), part)
            out.append(torch.cat(pad + (part.new_zeros((total - start - n, *part.shape[1:])),)))
            start += n
        return tuple(out)

    # ---- metric and projection ---------------------------------------------------------------
    def factorise(self, point: Point) -> jl.JointFrame:
        """Stacked head factors with their Grams' eigendecompositions, the Gram of the other
        tensors' rows and the eigendecomposition of C (the Lyapunov preconditioner)."""
        point = self.check_point(point)
        blocks = {
            r: (jl.HeadStack(a, b, self.metric), m) for r, (a, b, m) in self._blocks(point).items()
        }
        rows = self._rows(point)
        c_other = sym(rows.mT @ rows)
        c_full = c_other + sum(sym(hd.cross(hd.a, hd.b)) for hd, _ in blocks.values())
        return jl.JointFrame(blocks, rows, c_other, torch.linalg.eigh(c_full))

    def _inner(self, frame, u: Tangent, v: Tangent) -> torch.Tensor:
        point = self.check_point(frame.point)
        u, v = self.check_tangent(point, u, "u"), self.check_tangent(point, v, "v")
        f = frame.data
        total = sum((u[i] * v[i]).sum() for i in self.others)
        ub, vb = self._blocks(u), self._blocks(v)
        for r, (hd, _) in f.blocks.items():
            g1, g2 = hd.metric(*ub[r][:2])
            total = total + (g1 * vb[r][0]).sum() + (g2 * vb[r][1]).sum()
        return total

    def _riemannian_gradient(self, frame, egrad: Tangent) -> Tangent:
        point = self.check_point(frame.point)
        egrad = self.check_tangent(point, egrad, "gradient")
        parts = [
            (s, h.riemannian_gradient(self._sub(point, s), self._sub(egrad, s)))
            for h, s in self.heads
        ]
        return self._with(egrad, parts)

    def _solve_schur(self, schur, rhs: torch.Tensor, spectrum, norm_z) -> torch.Tensor:
        """ω with S(ω) = rhs, direct or by CG (module docstring); ``norm_z`` is the metric norm
        of the vector projected (the scale of CG's stopping test); sets ``last_solve``."""
        direct = self.solver == "direct" or (self.solver == "auto" and self.d_model <= DIRECT_MAX_D)
        iterations = 2 * self.residual.group_dim + 20
        omega, self.last_solve = jl.solve_schur(
            schur, rhs, spectrum, self.d_model if direct else None, self.cg_tol, iterations, norm_z
        )
        return omega

    def _vertical_generator(self, frame, v: Tangent):
        """(Ω, {r: stacked ξ}): the generators of the metric-orthogonal vertical part of v."""
        f = frame.data
        zs = {r: (z1, z2) for r, (z1, z2, _) in self._blocks(v).items()}
        rhs = skew(f.rows.mT @ self._rows(v))
        for r, (hd, _) in f.blocks.items():
            rhs = rhs + skew(hd.cross(*hd.horizontal(*zs[r])[0]))

        def schur(om):  # V_O*(I − P_h)V_O Ω
            out = skew(f.c_other @ om)
            for hd, _ in f.blocks.values():
                out = out + skew(hd.cross(*hd.horizontal(*hd.rotate(om))[0]))
            return out

        omega = self._solve_schur(schur, rhs, f.spectrum, frame.norm(v))
        xis = {}
        for r, (hd, _) in f.blocks.items():
            w1, w2 = hd.rotate(omega)
            xis[r] = hd.solve(hd.adjoint(zs[r][0] - w1, zs[r][1] - w2))
        return omega, xis

    def _project_vertical(self, frame, v: Tangent) -> Tangent:
        point = self.check_point(frame.point)
        v = self.check_tangent(point, v)
        return tuple(self._vertical_from(point, frame.data, *self._vertical_generator(frame, v)))

    def _vertical_from(self, point: Point, f, omega, xis) -> list:
        """The vertical vector (as a list) of the generators Ω and ξ_r."""
        out = list(self.residual.vertical(point, omega))
        for r, (hd, members) in f.blocks.items():
            for slots, tensors in self._unstack(members, hd.a @ xis[r], -(hd.b @ xis[r].mT)):
                for s, t in zip(slots, tensors):
                    out[s] = out[s] + t
        return out

    # ---- optimiser support ------------------------------------------------------------------
    def _slice_mean_square(self, frame, v: Tangent) -> Tangent:
        """Invariant mean squares, one per tensor of the other tensors and one per head and
        factor under the metric ((H, 1, 1): O(d) mixes the rows, GL(r) the columns).

        Not per model-space row: transport re-projects the first moment at the new point,
        which puts O(‖Δp‖) components on rows whose gradient is zero (unused token or
        position rows); per-row second moments there are round-off and the step blew up
        (measured: 6e4 per entry on a tiny Transformer at the second Adam step)."""
        v = self.check_tangent(self.check_point(frame.point), v)
        out = [(t * t).mean().reshape((1,) * t.dim()) for t in v]
        blocks = self._blocks(v)
        for r, (hd, members) in frame.data.blocks.items():
            u1, u2 = blocks[r][:2]
            w1, w2 = hd.metric(u1, u2)
            means = ((w1 * u1).mean((-2, -1), keepdim=True), (w2 * u2).mean((-2, -1), keepdim=True))
            for slots, tensors in self._unstack(members, *means):
                for slot, m in zip(slots, tensors):
                    out[slot] = m
        return tuple(out)

    def scale_invariants(self, point: Point, factor) -> Point:
        """Scale every head composite and every other tensor by ``factor``."""
        root = factor.sqrt() if isinstance(factor, torch.Tensor) else factor**0.5
        heads = {s for _, slots in self.heads for s in slots}
        return tuple(t * (root if i in heads else factor) for i, t in enumerate(point))

    def _limit_step(self, frame, step: Tangent) -> Tangent:
        """Each head bundle's bound on its slots (traces of r×r products: O(d)-invariant too)."""
        point = frame.point
        parts = [(s, h.limit_step(self._sub(point, s), self._sub(step, s))) for h, s in self.heads]
        return self._with(step, parts)

    # ---- dressing and invariants ----------------------------------------------------------------
    def _composites(self, point):
        return [a @ b.mT for a, b, _ in self._blocks(point).values()]  # (N, d, d) per r

    def _frame(self, point):
        work = torch.float64 if point[0].dtype == torch.float64 else torch.float32
        p = tuple(t.to(work) for t in point)
        rows = self._rows(p)
        c = rows.mT @ rows + sum((m @ m.mT + m.mT @ m).sum(0) for m in self._composites(p))
        evals, evecs = torch.linalg.eigh(sym(c))
        evals, evecs = evals.flip(-1), evecs.flip(-1)
        frame = orthonormal_columns_sign_fixed(evecs, rows @ evecs)
        return frame.to(point[0].dtype), evals

    def dressing(self, point: Point):
        point = self.check_point(point)
        frame, _ = self._frame(point)
        turned = self.residual.act(point, frame)
        return (frame, *(h.dressing(self._sub(turned, s)) for h, s in self.heads))

    def ambiguity(self, point: Point) -> torch.Tensor:
        """min(relative eigen-gap of C, every head's singular-value gap): a scalar."""
        point = self.check_point(point)
        gaps = [relative_gaps(self._frame(point)[1]).to(point[0].dtype)]
        gaps += [h.ambiguity(self._sub(point, s)).min() for h, s in self.heads]
        return torch.stack(gaps).min()

    def invariants(self, point: Point) -> tuple[torch.Tensor, ...]:
        rows = self._rows(self.check_point(point))
        out = (rows @ rows.mT,)
        return out + tuple(rows @ m @ rows.mT for m in self._composites(point))

    # ---- sampling -------------------------------------------------------------------------------
    def random_point(self, *, generator=None, dtype=None, device=None) -> Point:
        kw = dict(generator=generator, dtype=dtype, device=device)
        point = self.residual.random_point(**kw)
        return self._with(point, [(s, h.random_point(**kw)) for h, s in self.heads])

    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        kw = dict(generator=generator, dtype=dtype, device=device)
        heads = tuple(h.random_group_element(**kw, condition=condition) for h, _ in self.heads)
        return (self.residual.random_group_element(**kw), *heads)
