r"""Data-parallel and sharded training with quotient optimisers.

**DistributedDataParallel (DDP)** works as it is. DDP all-reduces (averages) the gradients
during ``backward()``; every rank then runs the same deterministic ``QuotientAdam`` /
``QuotientSGD`` step on the same parameters and the same averaged gradients, so the
replicas stay identical — dressing, horizontal projections and the non-finite guard included
(every rank sees the same values and takes the same decision). Build the param groups from the
wrapped module (``symmetries(ddp.module)``): DDP shares the module's parameters.
``tests/optim/test_distributed.py`` checks 2 CPU processes (gloo) against one process with the same
global batch, 5 steps, on ``quotopt.models.Transformer``.

**Sharded parameters (FSDP2, tensor parallelism).** ``QuotientSGD``, ``QuotientAdam`` and
``QuotientMuon`` step the DTensor parameters of ``fully_shard`` on their local shards, reading the
split axis from the placements (``quotopt.optim.sharding``); ``fully_shard_groups`` shards a model
so that every bundle group is split by whole heads (or by rows) and returns its groups holding the
sharded parameters. Plain groups update elementwise, so they run on shards exactly as
``torch.optim.AdamW`` does. A bundle group needs per-orbit quantities; whether they are local
depends on which axis is sharded:

* *Head axis* (FSDP2's ``Shard(0)`` on quotopt's (H, d, r) parameters, H divisible by the world
  size, both factors of a head on the same rank): every head's geometry is local — no
  communication.
* *Row axis* — the model-space index d of a head factor (e.g. ``o_proj.weight`` (d, H·r) sharded
  on dim 0 is W_o's row axis): ``HeadQK``/``HeadOV``/``PositiveRescaling`` need only r×r
  Gram-type matrices, sums over rows of per-shard products: AᵀA, BᵀB (the frame, one
  all-reduce of 2·H·r² numbers per point) and AᵀZ₁, Z₂ᵀB (one of 2·H·r² per projection). They
  give the Riemannian gradient under both metrics, the horizontal projection (replicated small
  solves), the invariant metric and its per-row second moments. Dressing needs the same Gram
  matrices plus an r×r eigendecomposition/SVD replicated on every rank, and a tiny all-gather
  for the sign convention (the largest-|entry| of each dressed
  column). ``RowShardedHeads`` implements this; it is tested with 2 gloo processes against the
  unsharded bundle. ``RotaryQK`` is the same with its per-plane 2×2 products (Euclidean) or
  AᵀA, BᵀB and D = AᵀZ₁BᵀB − AᵀAZ₂ᵀB (invariant).
* ``ResidualRotation`` with rows sharded (any axis but the model axis): C = Σ T̂ᵀT̂ and
  Σ T̂ᵀẐ are d×d sums over rows — one all-reduce of 2·d² numbers, the d×d ``eigh`` replicated.
* *The acted-on axis itself* (r of a head factor — e.g. ``q_proj.weight`` (H·r, d) sharded on
  dim 0 with shard boundaries inside a head — or d of an O(d) tensor): the Gram matrices need
  the other ranks' columns, an all-gather of the factor. Not supported (refused when the
  optimiser is built): align shards with heads.

The bundle classes hold every formula; ``RowShardedHeads`` only supplies the two reductions
(``Bundle.with_row_reduction``), so the sharded geometry cannot drift from the unsharded one.

Optimiser state follows the parameters' sharding: first moments are tangent vectors (sharded
like the point), the per-row second moments of ``slice_mean_square`` are sharded like the rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from manifolds import Bundle
from manifolds.linalg import sign_fix_columns

__all__ = ["RowShardedHeads", "all_reduce_sum", "fully_shard_groups", "shard_heads", "shard_rows"]


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


def global_column_signs(coords: torch.Tensor, group=None) -> torch.Tensor:
    """The sign rule over the rows of all ranks: each rank's largest-|entry| candidate per
    column is all-gathered (a tiny (ranks, r) exchange) and the first rank holding the global
    maximum decides, as an argmax over all rows in rank order would."""
    index = coords.abs().argmax(dim=-2, keepdim=True)
    candidate = torch.gather(coords, -2, index)  # (H, 1, r), signed
    if dist.is_available() and dist.is_initialized():
        gathered = [torch.empty_like(candidate) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, candidate, group=group)
        stacked = torch.cat(gathered, dim=-2)  # (H, ranks, r), in rank (= row) order
        candidate = torch.gather(stacked, -2, stacked.abs().argmax(dim=-2, keepdim=True))
    return sign_fix_columns(candidate)


class RowShardedHeads:
    """A factored bundle's geometry on factors whose rows (model-space axis) are sharded.

    Each rank passes its own rows of the point and of the tangent vector (the bundle's layout:
    for ``HeadOV`` the rows of W_oᵀ, i.e. W_o's last axis); results are the rank's rows of the
    unsharded result. The bundle's own formulas run unchanged: every sum over rows they form
    (Grams, cross products, the metric) is completed by ``all_reduce_sum``, and the sign rule
    of the dressing by ``global_column_signs`` (``Bundle.with_row_reduction``).
    """

    def __init__(self, bundle: Bundle, group=None):
        try:
            self.bundle = bundle.with_row_reduction(
                lambda tensors: all_reduce_sum(tensors, group),
                lambda coords: global_column_signs(coords, group),
            )
        except NotImplementedError:
            raise ValueError(
                f"RowShardedHeads supports factored bundles (HeadQK, HeadOV, RotaryQK, "
                f"PositiveRescaling), got {bundle!r}"
            ) from None
        self.group = group

    def project_horizontal(self, point_shard, v_shard) -> tuple[torch.Tensor, ...]:
        return self.bundle.project_horizontal(point_shard, v_shard)

    def horizontal_gradient(self, point_shard, egrad_shard) -> tuple[torch.Tensor, ...]:
        """P_H(Riemannian gradient): one factorisation (from all-reduced Grams) serves both."""
        return self.bundle.horizontal_gradient(point_shard, egrad_shard)

    def inner(self, point_shard, u_shard, v_shard) -> torch.Tensor:
        """The metric, summed over the ranks."""
        return self.bundle.inner(point_shard, u_shard, v_shard)

    def dressing(self, point_shard) -> torch.Tensor:
        """u(p), replicated on every rank."""
        return self.bundle.dressing(point_shard)


def _placements(groups, axis_of, heads: bool) -> dict:
    """{parameter: Shard(dim)} for the parameters of the bundle groups of ``groups``, ``dim``
    the parameter axis that ``axis_of(bundle, views)`` names in each view (found by strides on
    meta tensors, so any layout of views reshaping or transposing without a copy works)."""
    from torch.distributed.tensor import Shard

    out = {}
    for group in groups:
        bundle, params = group.get("bundle"), list(group["params"])
        if bundle is None:
            continue
        layout = group.get("layout")
        if hasattr(layout, "feature_dims"):  # projections indexed by feature
            for index, dim in layout.feature_dims(params).items():
                last = params[index].dim() - 1  # features on one of the last two axes
                out[params[index]] = Shard(dim if heads else (last - 1 if dim == last else last))
            continue
        metas = [torch.empty(p.shape, device="meta") for p in params]
        views = tuple(layout(metas)) if layout is not None else tuple(metas)
        for view, axis in zip(*axis_of(bundle, views)):
            base = view if view._base is None else view._base
            index = next(i for i, m in enumerate(metas) if m is base)
            dims = [d for d, st in enumerate(base.stride()) if st == view.stride(axis)]
            dims = [d for d in dims if base.shape[d] == view.shape[axis]]
            out[params[index]] = Shard(dims[0])
    return out


def _placement_fn(table: dict):
    return lambda param: table.get(param)


def shard_heads(groups):
    """A ``shard_placement_fn`` for ``fully_shard`` that splits the tensors of every bundle
    group on their head axis (whole heads per rank: no communication in the quotient step);
    other parameters keep FSDP2's default ``Shard(0)``. ``groups``: ``quotopt.symmetries``."""
    return _placement_fn(
        _placements(groups, lambda bundle, views: (views, [0] * len(views)), heads=True)
    )


def shard_rows(groups):
    """A ``shard_placement_fn`` that splits every factor of the bundle groups on its rows (the
    model-space axis): one all-reduce of r×r Grams per head and operation in the step."""

    def rows(bundle, views):
        factors = bundle.factors(views)
        return factors, [1] * len(factors)

    return _placement_fn(_placements(groups, rows, heads=False))


def fully_shard_groups(model, groups, mesh, blocks=(), by: str = "heads") -> list[dict]:
    """``fully_shard`` each module of ``blocks`` and then ``model`` on ``mesh``, the bundle
    groups' tensors split on their heads (``by="heads"``) or rows (``"rows"``), and return
    ``groups`` (``quotopt.symmetries(model)``, built before sharding) holding the sharded
    parameters, which ``fully_shard`` puts in place of the module's own.

    Detection that verifies a model by running it (Hugging Face models) needs the unsharded
    model: build the groups first, shard with this, then build the optimiser."""
    from torch.distributed.fsdp import fully_shard

    if by not in ("heads", "rows"):
        raise ValueError(f"by must be 'heads' or 'rows', got {by!r}")
    place = (shard_heads if by == "heads" else shard_rows)(groups)
    names = {id(p): name for name, p in model.named_parameters()}
    for block in blocks:
        fully_shard(block, mesh=mesh, shard_placement_fn=place)
    fully_shard(model, mesh=mesh, shard_placement_fn=place)
    now = dict(model.named_parameters())
    return [dict(group, params=[now[names[id(p)]] for p in group["params"]]) for group in groups]
