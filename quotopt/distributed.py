r"""Data-parallel and sharded training with quotient optimisers.

**DistributedDataParallel (DDP)** works as it is. DDP all-reduces (averages) the gradients
during ``backward()``; every rank then runs the same deterministic ``QuotientAdam`` /
``QuotientSGD`` step on the same parameters and the same averaged gradients, so the
replicas stay identical — dressing, horizontal projections and the non-finite guard included
(every rank sees the same values and takes the same decision). Build the param groups from the
wrapped module (``symmetries(ddp.module)``): DDP shares the module's parameters.
``tests/test_distributed.py`` checks 2 CPU processes (gloo) against one process with the same
global batch, 5 steps, on ``quotopt.models.Transformer``.

**Sharded parameters (FSDP, tensor parallelism).** Plain groups update elementwise, so they run on
shards exactly as ``torch.optim.AdamW`` does. A bundle group needs per-orbit quantities; whether
they are local depends on which axis is sharded:

* *Head axis* (FSDP2's ``Shard(0)`` on quotopt's (H, d, r) parameters, H divisible by the world
  size, both factors of a head on the same rank): every head's geometry is local — no
  communication.
* *Row axis* — the model-space index d of a head factor (e.g. ``o_proj.weight`` (d, H·r) sharded
  on dim 0 is W_o's row axis): ``HeadQK``/``HeadOV``/``PositiveRescaling`` need only r×r
  Gram-type matrices, sums over rows of per-shard products: AᵀA, BᵀB and AᵀZ₁, Z₂ᵀB (Z the
  vector being projected, or the Euclidean gradient). One all-reduce of 4·H·r² numbers per
  group and step gives the Riemannian gradient under both metrics, the horizontal projection
  (Sylvester solve or closed form, replicated), the invariant metric and its per-row second
  moments. Dressing needs the same Gram matrices plus an r×r Cholesky/SVD replicated on every
  rank, and a tiny all-gather for the sign convention (the largest-|entry| of each dressed
  column). ``RowShardedHeads`` implements this; it is tested with 2 gloo processes against the
  unsharded bundle. ``RotaryQK`` is the same with its per-plane 2×2 products (Euclidean) or
  AᵀA, BᵀB and D = AᵀZ₁BᵀB − AᵀAZ₂ᵀB (invariant).
* ``ResidualRotation`` with rows sharded (any axis but the model axis): C = Σ T̂ᵀT̂ and
  Σ T̂ᵀẐ are d×d sums over rows — one all-reduce of 2·d² numbers, the d×d ``eigh`` replicated.
* *The acted-on axis itself* (r of a head factor — e.g. ``q_proj.weight`` (H·r, d) sharded on
  dim 0 with shard boundaries inside a head — or d of an O(d) tensor): the Gram matrices need
  the other ranks' columns, an all-gather of the factor. Not supported: align shards with heads.

Optimiser state follows the parameters' sharding: first moments are tangent vectors (sharded
like the point), the per-row second moments of ``moment_sq`` are sharded like the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from manifolds import HeadOV, HeadQK
from manifolds.linalg import (
    gram,
    orthonormal_columns_sign_fixed,
    solve_sylvester_spd,
    spd_solve_right,
    sym,
)

__all__ = ["RowShardedHeads", "all_reduce_sum"]


def all_reduce_sum(tensors: Sequence[torch.Tensor], group=None) -> list[torch.Tensor]:
    """Sum every tensor over the ranks of ``group`` with ONE all-reduce (a flat buffer).

    Returns new tensors; without an initialised process group the inputs are returned (one
    process holds everything)."""
    tensors = list(tensors)
    if not (dist.is_available() and dist.is_initialized()):
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    return [chunk.view_as(t) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


class RowShardedHeads:
    """``HeadQK``/``HeadOV`` geometry on factors whose rows (model-space axis) are sharded.

    Each rank passes its own rows of the point and of the tangent vector (the bundle's layout:
    for ``HeadOV`` the rows of W_oᵀ, i.e. W_o's last axis); results are the rank's rows of the
    unsharded result. Per call: one all-reduce of the r×r products, the small solves replicated.
    Shapes are not checked against the bundle (a shard has fewer rows).
    """

    def __init__(self, bundle: HeadQK, group=None):
        if type(bundle) not in (HeadQK, HeadOV):
            raise ValueError(
                f"RowShardedHeads supports HeadQK and HeadOV, got {type(bundle).__name__}"
            )
        self.bundle, self.group = bundle, group

    def _reduced_products(self, a, b, z1, z2):
        """AᵀA, BᵀB, AᵀZ₁, Z₂ᵀB summed over the ranks (one all-reduce)."""
        return all_reduce_sum([gram(a), gram(b), a.mT @ z1, z2.mT @ b], self.group)

    def _generator(self, gram_a, gram_b, az1, z2b) -> torch.Tensor:
        """ξ of the vertical part of Z from the reduced products (``HeadQK``'s formulas)."""
        if self.bundle.metric == "euclidean":
            return solve_sylvester_spd(sym(gram_a), sym(gram_b), az1 - z2b)
        left = spd_solve_right(az1.mT, gram_a).mT  # (AᵀA)⁻¹AᵀZ₁
        return 0.5 * (left - spd_solve_right(z2b, gram_b))

    def project_horizontal(self, point_shard, v_shard) -> tuple[torch.Tensor, ...]:
        a, b = self.bundle.factors(point_shard)
        z1, z2 = self.bundle.factors(v_shard)
        xi = self._generator(*self._reduced_products(a, b, z1, z2))
        return self.bundle.from_factors(z1 - a @ xi, z2 + b @ xi.mT)

    def horizontal_gradient(self, point_shard, egrad_shard) -> tuple[torch.Tensor, ...]:
        """P_H(Riemannian gradient) — one all-reduce for both metrics: under the invariant one
        Z = (∇_A (BᵀB)⁻¹, ∇_B (AᵀA)⁻¹), so AᵀZ₁ = (Aᵀ∇_A)(BᵀB)⁻¹ and Z₂ᵀB = (AᵀA)⁻¹(∇_BᵀB)."""
        a, b = self.bundle.factors(point_shard)
        g1, g2 = self.bundle.factors(egrad_shard)
        gram_a, gram_b, ag1, g2b = self._reduced_products(a, b, g1, g2)
        if self.bundle.metric == "euclidean":
            z1, z2, az1, z2b = g1, g2, ag1, g2b
        else:
            z1, z2 = spd_solve_right(g1, gram_b), spd_solve_right(g2, gram_a)
            az1 = spd_solve_right(ag1, gram_b)
            z2b = spd_solve_right(g2b.mT, gram_a).mT
        xi = self._generator(gram_a, gram_b, az1, z2b)
        return self.bundle.from_factors(z1 - a @ xi, z2 + b @ xi.mT)

    def inner(self, point_shard, u_shard, v_shard) -> torch.Tensor:
        """The metric, summed over the ranks."""
        if self.bundle.metric == "euclidean":
            local = sum((x * y).sum() for x, y in zip(u_shard, v_shard))
            return all_reduce_sum([local.reshape(1)], self.group)[0][0]
        a, b = self.bundle.factors(point_shard)
        u1, u2 = self.bundle.factors(u_shard)
        v1, v2 = self.bundle.factors(v_shard)
        gram_a, gram_b, uv1, uv2 = all_reduce_sum(
            [gram(a), gram(b), u1.mT @ v1, u2.mT @ v2], self.group
        )
        return (gram_b * uv1).sum() + (gram_a * uv2).sum()

    def dressing(self, point_shard) -> torch.Tensor:
        """u(p), replicated: the balanced frames of ``HeadQK`` from the reduced Gram matrices;
        the sign of each column from the entry of largest magnitude over all ranks."""
        a, b = self.bundle.factors(point_shard)
        gram_a, gram_b = all_reduce_sum([gram(a), gram(b)], self.group)
        chol_a = torch.linalg.cholesky_ex(gram_a)[0]
        chol_b = torch.linalg.cholesky_ex(gram_b)[0]
        left, s, _ = torch.linalg.svd(chol_a.mT @ chol_b)
        u = torch.linalg.solve_triangular(chol_a.mT, left * s.sqrt().unsqueeze(-2), upper=True)
        coords = a @ u  # this rank's rows of the dressed first factor
        index = coords.abs().argmax(dim=-2, keepdim=True)
        candidate = torch.gather(coords, -2, index)  # (H, 1, r), signed
        if dist.is_available() and dist.is_initialized():
            gathered = [torch.empty_like(candidate) for _ in range(dist.get_world_size(self.group))]
            dist.all_gather(gathered, candidate, group=self.group)
            stacked = torch.cat(gathered, dim=-2)  # (H, ranks, r), in rank (= row) order
            candidate = torch.gather(
                stacked, -2, stacked.abs().argmax(dim=-2, keepdim=True)
            )  # the first rank holding the global maximum, as argmax over all rows would pick
        return orthonormal_columns_sign_fixed(u, candidate)
