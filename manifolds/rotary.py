r"""Query/key heads under rotary position embeddings (RoPE): ``RotaryQK``.

RoPE (Su et al., "RoFormer", 2021) rotates the r = 2m coordinates of every query and key in m
planes, plane i by the angle θᵢ·position. Write the two coordinates of plane i as one complex
number; the planes are either the halves (i, i + m) — ``pairing="half"``, the ``rotate_half``
convention of Hugging Face's LLaMA, Mistral, Qwen2, GPT-NeoX — or adjacent coordinates
(2i, 2i + 1) — ``pairing="interleaved"``, the original RoFormer / Meta LLaMA convention. A factor
A ∈ R^{d×r} is then m complex columns αᵢ = A[:, i₀] + i·A[:, i₁] ∈ C^d, RoPE multiplies the
query feature x αᵢ by e^{iθᵢp}, and for a query at p and a key at p' the score is

    Σᵢ Re( x αᵢ conj(y βᵢ) e^{iθᵢ(p − p')} ) = Σᵢ x [cos(θᵢΔ) Mᵢ + sin(θᵢΔ) Nᵢ] yᵀ,  Δ = p − p',

with Mᵢ = Aᵢ Bᵢᵀ and Nᵢ = Aᵢ K Bᵢᵀ, where Aᵢ = A[:, (i₀, i₁)] (d×2) and K = [[0, 1], [-1, 0]].
So the GL(r) symmetry of a plain head (``HeadQK``) shrinks to the g ∈ GL(r) that commute with
every rotation block: for distinct frequencies, block-diagonal g with blocks
[[a, b], [-b, a]] — multiplication of plane i by the complex scalar cᵢ = a + ib. Hence:

* total space  P = {(A, B)}: A (H, rows_a, r), B (H, rows_b, r), every plane of A and of B
  nonzero; ``factor_rows`` lets several query heads that share one key head (grouped-query
  attention) stack along A's rows;
* group        G = (C*)^m per head (real dimension r), acting as αᵢ ↦ αᵢcᵢ, βᵢ ↦ βᵢ/conj(cᵢ) —
  in real form (A g, B g⁻ᵀ) with g = diag of the blocks, g⁻ᵀ = g/|c|² blockwise;
* invariants   per plane the two score forms (Mᵢ, Nᵢ), i.e. the complex rank-one αᵢβᵢᴴ; their
  sum over planes Σ Mᵢ = A Bᵀ is the GL(r) invariant, which RoPE refines;
* vertical     (A ξ, -B ξᵀ) with ξ = diag of blocks xᵢI + yᵢK (the Lie algebra C^m);
* metrics      those of ``HeadQK`` (the Euclidean one; the GL(r)-invariant one
  tr(BᵀB U₁ᵀV₁) + tr(AᵀA U₂ᵀV₂), a fortiori G-invariant), with the same Riemannian gradient;
* horizontal   the vertical part of Z is V(ξ) with ξ = Σ xₖEₖ over the basis Eₖ ∈ {I, K} of each
  plane, solving the normal equations Σₗ g(V(Eₖ), V(Eₗ)) xₗ = g(V(Eₖ), Z):
  Euclidean: the system is diagonal — per plane (‖Aᵢ‖² + ‖Bᵢ‖²)(xᵢ, yᵢ) = (tr Cᵢᵢ, ⟨K, Cᵢᵢ⟩)
  with Cᵢᵢ = AᵢᵀZ₁ᵢ − Z₂ᵢᵀBᵢ (2×2), i.e. the complex scalar
  ζᵢ = (αᵢᴴz₁ᵢ − conj(βᵢᴴz₂ᵢ)) / (‖αᵢ‖² + ‖βᵢ‖²);
  invariant: with P = AᵀA, Q = BᵀB in 2×2 plane blocks, the r×r system
  Gₖₗ = 2 tr(Eₛᵀ Pᵢⱼ Eₜ Qⱼᵢ) (k = (i, s), l = (j, t)), right-hand side ⟨Eₛ, Dᵢᵢ⟩ with
  D = AᵀZ₁Q − PZ₂ᵀB, one Cholesky solve per head (it is the restriction of ``HeadQK``'s
  2PξQ = D to the subalgebra; it couples the planes because P and Q do);
* dressing     per plane: |cᵢ| = (‖βᵢ‖/‖αᵢ‖)^½ balances ‖αᵢ‖ = ‖βᵢ‖; the phase puts the
  query plane on its principal axes (αᵢᵀαᵢ real positive: the two real columns of Aᵢ
  orthogonal, the longer first) and the remaining sign makes the largest-|entry| of the first
  column positive. Ambiguity: the phase is undetermined when the 2-column block Aᵢ has equal
  singular values; ``ambiguity`` reports min over planes of |αᵢᵀαᵢ|/‖αᵢ‖² =
  (σ₁² − σ₂²)/(σ₁² + σ₂²), invariant on orbits.

Group and Lie-algebra elements are arrays of real 2×2 blocks, shape (H, m, 2, 2) (the
realification of C^m, so ``torch.linalg.matrix_exp`` is the group exponential). Any 2×2 block is
read through its complex-linear part c(M) = (M + K M Kᵀ)/2 — the orthogonal projection of gl(2)
onto C — which is M itself on the group and the algebra; this lets generic tooling
(``manifolds.testing`` exponentiates Gaussian matrices) exercise the bundle. ``matrix(g)``
returns the full r×r matrix in the head's own coordinates.

If frequencies coincide (some RoPE scalings) the true symmetry group is larger; (C*)^m is
always a subgroup of it, so this bundle stays exact, only not maximal.
"""

from __future__ import annotations

import math

import torch

from .base import Point, Tangent, checks_enabled, randn
from .factored import FactoredBundle
from .frames import FactorFrame, grams_frame
from .linalg import gram
from .rotary_blocks import _basis, _plane_system, complex_blocks, complex_part

__all__ = ["RotaryQK", "PAIRINGS"]

PAIRINGS = ("half", "interleaved")


class RotaryQK(FactoredBundle):
    """(C*)^{d_head/2} symmetry of RoPE query/key heads; see the module docstring.

    Point ``(Wq, Wk)``: ``(n_heads, rows_a, d_head)`` and ``(n_heads, rows_b, d_head)`` with
    ``factor_rows = (rows_a, rows_b)`` (default ``(d_model, d_model)``). ``pairing`` names which
    coordinates RoPE rotates together: ``"half"`` (i, i + d_head/2) or ``"interleaved"``
    (2i, 2i + 1). Group elements: ``(n_heads, d_head // 2, 2, 2)`` real blocks. The damped
    invariant metric of ``FactoredBundle`` is not offered here (``damping`` must be 0).
    """

    factor_names = ("Wq", "Wk")

    def __init__(
        self,
        n_heads: int,
        d_model: int,
        d_head: int,
        metric: str = "euclidean",
        *,
        pairing: str = "half",
        factor_rows: tuple[int, int] | None = None,
    ):
        super().__init__(n_heads, d_model, d_head, metric, factor_rows=factor_rows)
        if d_head % 2:
            raise ValueError(
                f"RoPE rotates pairs of coordinates: d_head must be even, got {d_head}"
            )
        if pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {pairing!r}")
        self.pairing = pairing
        self.n_pairs = d_head // 2

    def _stack_family(self):
        return ("RoPE commutant", self.pairing)

    def stacked(self, n_heads: int) -> RotaryQK:
        """``n_heads`` heads of this shape, pairing and metric."""
        return RotaryQK(
            n_heads,
            self.d_model,
            self.d_head,
            self.metric,
            pairing=self.pairing,
            factor_rows=self.factor_rows,
        )

    def __repr__(self) -> str:
        return f"RotaryQK({self._repr_fields()}, pairing={self.pairing!r})"

    def _frame_in(self, factors, dtype: torch.dtype) -> FactorFrame:
        """The Euclidean metric's projection is diagonal in the planes (module docstring), so
        its frame is the Grams with no factorisation (``grams_frame``); a head is deficient
        when a plane of either factor is at round-off level — the one regularity the bundle
        needs (``check_point``), whatever the rank of the whole factor. The invariant metric's
        frame is ``FactoredBundle``'s (its system couples the planes through P and Q), with
        that system's Cholesky factor (``FactorFrame.system``), which both projections at the
        point solve with."""
        if self.metric != "euclidean":
            frame = super()._frame_in(factors, dtype)
            return frame._replace(system=self._system_factor(frame.p, frame.q))
        a, b = (t.to(dtype) for t in factors)
        p, q = self.row_sums(gram(a), gram(b))
        return grams_frame(p, q, self._plane_sizes(p), self._plane_sizes(q))

    def _plane_sizes(self, g: torch.Tensor) -> torch.Tensor:
        """(H, m): each plane's squared norm ‖αᵢ‖², the traces of the Gram's 2×2 diagonal
        blocks."""
        return self._planes(torch.diagonal(g, dim1=-2, dim2=-1)).sum(-1)

    # ---- planes: the head axis r as m complex coordinates --------------------------------------
    def _planes(self, x: torch.Tensor) -> torch.Tensor:
        """(…, r) → (…, m, 2), plane-major (a view)."""
        m = self.n_pairs
        if self.pairing == "interleaved":
            return x.unflatten(-1, (m, 2))
        return x.unflatten(-1, (2, m)).transpose(-1, -2)

    def _unplanes(self, y: torch.Tensor) -> torch.Tensor:
        """(…, m, 2) → (…, r), the inverse of ``_planes``."""
        if self.pairing == "interleaved":
            return y.flatten(-2)
        return y.transpose(-1, -2).flatten(-2)

    def _plane_blocks(self, mat: torch.Tensor) -> torch.Tensor:
        """(…, r, r) → (…, m, 2, m, 2) with out[i, a, j, b] = mat[(i, a), (j, b)]."""
        rows = self._planes(mat.mT).movedim(-3, -1)  # (…, m, 2, r): the row axis as planes
        return self._planes(rows)  # (…, m, 2, m, 2)

    def _block_entries(self, mat: torch.Tensor) -> torch.Tensor:
        """(H, r, r) → (H, 4, m, m), contiguous: entry 2a + b of every 2 × 2 plane block,
        out[:, 2a + b, i, j] = mat[(i, a), (j, b)]."""
        h, m = mat.shape[0], self.n_pairs
        return self._plane_blocks(mat).permute(0, 2, 4, 1, 3).reshape(h, 4, m, m)

    def _multiply(self, x: torch.Tensor, re: torch.Tensor, im: torch.Tensor) -> torch.Tensor:
        """Every plane i of x (…, rows, r) times the complex scalar re[i] + i·im[i] (H, m)."""
        planes = self._planes(x)  # (H, rows, m, 2)
        re, im = re.unsqueeze(-2), im.unsqueeze(-2)  # (H, 1, m)
        x0, x1 = planes[..., 0], planes[..., 1]
        return self._unplanes(torch.stack((x0 * re - x1 * im, x0 * im + x1 * re), -1))

    def matrix(self, g: torch.Tensor) -> torch.Tensor:
        """The full (H, r, r) matrix of a group or algebra element in head coordinates."""
        h, m, r = self.n_heads, self.n_pairs, self.d_head
        blocks = complex_blocks(*complex_part(g))  # (H, m, 2, 2)
        eye = torch.eye(m, dtype=g.dtype, device=g.device)
        full = torch.einsum("hiab,ij->hiajb", blocks, eye)  # (H, m, 2, m, 2), plane-major
        if self.pairing == "interleaved":
            return full.reshape(h, r, r)
        return full.permute(0, 2, 1, 4, 3).reshape(h, r, r)  # (H, 2, m, 2, m) → half layout

    # ---- sizes ---------------------------------------------------------------------------------
    @property
    def group_dim(self) -> int:
        return self.n_heads * self.d_head

    @property
    def compact_dim(self) -> int:
        return self.n_heads * self.n_pairs  # U(1) per plane: the unit complex scalars

    @property
    def algebra_shape(self) -> tuple[int, ...]:
        return (self.n_heads, self.n_pairs, 2, 2)

    def algebra_basis(self, *, dtype=None, device=None) -> torch.Tensor:
        """(group_dim, H, m, 2, 2): E₀ = I and E₁ = K in one plane of one head, zero elsewhere
        (the basis of C^m per head, in (head, plane, {I, K}) order)."""
        dtype = dtype if dtype is not None else torch.get_default_dtype()
        h, m = self.n_heads, self.n_pairs
        blocks = _basis(torch.empty((), dtype=dtype, device=device))  # (2, 2, 2)
        basis = torch.zeros((h, m, 2, h, m, 2, 2), dtype=dtype, device=device)
        heads, planes = torch.meshgrid(
            torch.arange(h, device=device), torch.arange(m, device=device), indexing="ij"
        )
        basis[heads, planes, :, heads, planes] = blocks
        return basis.reshape(self.group_dim, h, m, 2, 2)

    def random_algebra_element(self, *, generator=None, dtype=None, device=None):
        shape = (self.n_heads, self.n_pairs)
        return complex_blocks(
            randn(shape, generator, dtype, device), randn(shape, generator, dtype, device)
        )

    def _check_planes_nonzero(self, a: torch.Tensor, b: torch.Tensor, purpose: str) -> None:
        """ValueError naming the first vanishing plane (skipped when checks are disabled)."""
        if not checks_enabled():
            return
        for name, factor in zip(self.factor_names, (a, b)):
            norms = self._planes(factor).square().sum(dim=(-3, -1))  # (H, m)
            zero = torch.nonzero(norms <= torch.finfo(norms.dtype).tiny)
            if zero.numel():
                head, plane = (int(i) for i in zero[0])
                raise ValueError(
                    f"RotaryQK: {purpose} needs every rotary plane nonzero, but plane {plane} of "
                    f"head {head} of {name} vanishes"
                )

    # ---- action ----------------------------------------------------------------------------------
    def act(self, point: Point, g: torch.Tensor) -> Point:
        point = self.check_point(point)
        self.check_group_element(point, g)
        a, b = self.factors(point)
        re, im = complex_part(g)
        size = re.square() + im.square()
        return self.from_factors(self._multiply(a, re, im), self._multiply(b, re / size, im / size))

    def inverse(self, g: torch.Tensor) -> torch.Tensor:
        """z⁻¹ = z̄ / |z|² per rotary plane."""
        re, im = complex_part(g)
        size = re.square() + im.square()
        return complex_blocks(re / size, -im / size)

    def inverse_transpose(self, g: torch.Tensor) -> torch.Tensor:
        re, im = complex_part(g)
        size = re.square() + im.square()
        return complex_blocks(re / size, im / size)

    def _statistic_map(self, g, g_inv_t, index: int, kind: str):
        """``FactoredBundle``'s, on the full r×r matrices of the blocks (``matrix``)."""
        g_inv_t = self.inverse_transpose(g) if g_inv_t is None else g_inv_t
        return super()._statistic_map(self.matrix(g), self.matrix(g_inv_t), index, kind)

    def vertical(self, point: Point, xi: torch.Tensor) -> Tangent:
        point = self.check_point(point)
        self.check_group_element(point, xi, "Lie-algebra element")
        a, b = self.factors(point)
        re, im = complex_part(xi)
        return self.from_factors(self._multiply(a, re, im), -self._multiply(b, re, -im))

    # ---- splitting ---------------------------------------------------------------------------
    def _minus_vertical(self, a, b, z1, z2, frame, v: Tangent):
        g = self.matrix(self._vertical_generator(frame, v)).to(a.dtype)  # (H, r, r)
        return torch.baddbmm(z1, a, g, alpha=-1), torch.baddbmm(z2, b, g.mT)  # Z − (A g, −B gᵀ)

    def _vertical_generator(self, frame, v: Tangent) -> torch.Tensor:
        """Σ xᵢI + yᵢK (blocks (H, m, 2, 2)) with V(·) the vertical part of v."""
        a, b = self.factors(frame.point)
        z1, z2 = self.factors(v)
        return complex_blocks(*self._vertical_coefficients(a, b, z1, z2, frame))

    def _vertical_coefficients(self, a, b, z1, z2, frame) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y), each (H, m): the vertical part of (Z₁, Z₂) is V(Σ xᵢI + yᵢK)."""
        if self.metric == "euclidean":
            # Cᵢᵢ = αᵢᵀζ₁ᵢ − ζ₂ᵢᵀβᵢ per plane; x, y take its trace and its turn C₀₁ − C₁₀, as
            # products summed over the rows (a contraction of 2 × 2 blocks is three times slower)
            pa, pb = self._planes(a), self._planes(b)  # (H, rows, m, 2)
            p1, p2 = self._planes(z1), self._planes(z2)
            trace = self._planes((a * z1).sum(-2) - (z2 * b).sum(-2)).sum(-1)  # (H, m)
            turn = (pa[..., 0] * p1[..., 1] - pa[..., 1] * p1[..., 0]).sum(-2)  # rows of A
            turn = turn - (p2[..., 0] * pb[..., 1] - p2[..., 1] * pb[..., 0]).sum(-2)  # of B
            trace, turn = self.row_sums(trace, turn)
            f = frame.data  # the Grams (``_frame_in``): the planes' squared norms, row-summed
            size = (self._plane_sizes(f.p) + self._plane_sizes(f.q)).to(trace.dtype)  # (H, m)
            return trace / size, turn / size
        f = frame.data
        p, q = f.p.to(a.dtype), f.q.to(a.dtype)
        az1, z2b = self.row_sums(a.mT @ z1, z2.mT @ b)
        d = az1 @ q - p @ z2b  # (H, r, r)
        h, m = self.n_heads, self.n_pairs
        chol = f.system if f.system is not None else self._system_factor(f.p, f.q)
        diag = torch.diagonal(self._plane_blocks(d), dim1=-4, dim2=-2)  # (H, 2, 2, m)
        rhs = torch.stack((diag[:, 0, 0] + diag[:, 1, 1], diag[:, 0, 1] - diag[:, 1, 0]), -1)
        coef = torch.cholesky_solve(rhs.reshape(h, 2 * m, 1).to(chol.dtype), chol)
        coef = coef.to(a.dtype).view(h, m, 2)
        return coef[..., 0], coef[..., 1]

    def _system_factor(self, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """(H, r, r): the Cholesky factor of the invariant metric's plane system at the frame's
        Grams P, Q (module docstring), in their precision (the frame's: float32 at least). A
        singular system gives non-finite entries, which the solves carry to the step's guard
        (the point's rank is checked first unless checks are disabled)."""
        h, r = p.shape[0], self.d_head
        system = _plane_system(self._block_entries(p), self._block_entries(q.mT))
        return torch.linalg.cholesky_ex(system.reshape(h, r, r))[0]

    # ---- dressing ----------------------------------------------------------------------------
    def _dressing_scalars(self, a: torch.Tensor, b: torch.Tensor, check: bool = True):
        """(re, im) of u(p) per plane and the phase gaps |αᵢᵀαᵢ|/‖αᵢ‖² (each (H, m))."""
        if check:
            self._check_planes_nonzero(a, b, "dressing")
        pa, pb = self._planes(a), self._planes(b)  # (H, rows, m, 2)
        sq_a, sq_b = self.row_sums(pa.square().sum(dim=(-3, -1)), pb.square().sum(dim=(-3, -1)))
        modulus = (sq_b / sq_a).pow(0.25)  # |c|² = ‖β‖/‖α‖
        x0, x1 = pa[..., 0], pa[..., 1]
        s_re, s_im = self.row_sums(
            (x0.square() - x1.square()).sum(-2), 2 * (x0 * x1).sum(-2)
        )  # αᵀα = Σ (x0 + i x1)²
        phase = -0.5 * torch.atan2(s_im, s_re)  # makes e^{2iφ} αᵀα real positive
        first = x0 * torch.cos(phase).unsqueeze(-2) - x1 * torch.sin(phase).unsqueeze(-2)
        sign = self.column_signs(first).squeeze(-2)
        re, im = modulus * sign * torch.cos(phase), modulus * sign * torch.sin(phase)
        gap = torch.sqrt(s_re.square() + s_im.square()) / sq_a
        return re, im, gap

    def dressing(self, point: Point) -> torch.Tensor:
        a, b = self.factors(self.check_point(point))
        re, im, _ = self._dressing_scalars(a, b)
        return complex_blocks(re, im)

    def _dressing_or_identity(self, frame):
        a, b = self.factors(self.check_point(frame.point))
        planes_a, planes_b = self._planes(a), self._planes(b)
        tiny = torch.finfo(a.dtype).tiny
        nonzero = (planes_a.square().sum(dim=(-3, -1)) > tiny) & (
            planes_b.square().sum(dim=(-3, -1)) > tiny
        )  # (H, m)
        safe_a = self._unplanes(torch.where(nonzero[:, None, :, None], planes_a, 1.0))
        safe_b = self._unplanes(torch.where(nonzero[:, None, :, None], planes_b, 1.0))
        re, im, _ = self._dressing_scalars(safe_a, safe_b, check=False)
        re, im = torch.where(nonzero, re, 1.0), torch.where(nonzero, im, 0.0)
        return complex_blocks(re, im), nonzero.all(dim=-1)

    def _moment(self, symmetric: torch.Tensor) -> torch.Tensor:
        """(H, m, 2): the I and K coordinates of each plane's diagonal block, orthonormalised."""
        blocks = torch.diagonal(self._plane_blocks(symmetric), dim1=-4, dim2=-2)  # (H, 2, 2, m)
        trace = blocks[:, 0, 0] + blocks[:, 1, 1]
        turn = blocks[:, 0, 1] - blocks[:, 1, 0]
        return torch.stack((trace, turn), -1) / 2**0.5

    def moment_map(self, point: Point) -> torch.Tensor:
        """Per head and plane the (I, K) components of AᵀA − BᵀB: (‖αᵢ‖² − ‖βᵢ‖²)·√2, 0."""
        a, b = self.factors(self.check_point(point))
        return self._moment(a.mT @ a - b.mT @ b)

    def ambiguity(self, point: Point) -> torch.Tensor:
        """Per head: the smallest phase gap (σ₁² − σ₂²)/(σ₁² + σ₂²) over the query planes."""
        a, b = self.factors(self.check_point(point))
        return self._dressing_scalars(a, b)[2].amin(dim=-1)

    def invariants(self, point: Point) -> tuple[torch.Tensor, ...]:
        """(M, N), each (H, m, rows_a, rows_b): Mᵢ = AᵢBᵢᵀ and Nᵢ = AᵢKBᵢᵀ per plane."""
        a, b = self.factors(self.check_point(point))
        pa, pb = self._planes(a), self._planes(b)  # (H, rows, m, 2)
        m_forms = torch.einsum("hxia,hyia->hixy", pa, pb)
        n_forms = torch.einsum("hxi,hyi->hixy", pa[..., 0], pb[..., 1]) - torch.einsum(
            "hxi,hyi->hixy", pa[..., 1], pb[..., 0]
        )
        return (m_forms, n_forms)

    # ---- sampling ----------------------------------------------------------------------------
    def random_group_element(self, *, generator=None, dtype=None, device=None, condition=10.0):
        """Complex scalars per plane: moduli log-spaced in [1, ``condition``] across the planes
        (so the r×r matrix has condition number ``condition``), phases uniform."""
        dtype, device = self._dtype_device(dtype, device)
        h, m = self.n_heads, self.n_pairs
        modulus = self._log_spaced((h,), m, condition, generator, dtype, device)
        gen_device = generator.device if generator is not None else "cpu"
        turn = torch.rand((h, m), generator=generator, dtype=torch.float64, device=gen_device)
        phase = (2 * math.pi * turn).to(dtype=dtype, device=device)
        return complex_blocks(modulus * torch.cos(phase), modulus * torch.sin(phase))
