r"""Head and unit factors gathered from projection weights by index — one layout for every family.

A projection stores its output features along one axis of a weight: ``nn.Linear`` (out, in),
``Conv1D`` (in, out), fused q/k/v projections in family-specific orders, experts as (E, out, in).
``Rows`` names, for one factor of a bundle point, which features it takes: an index tensor
``(G, k, r)`` — G orbits (heads, key/value groups, units), k stacked blocks per orbit (the query
heads sharing one key head), r coordinates the group acts on — into the feature axis of the weight
(seen as W′ = W or Wᵀ, features first). With X = W′[index] of shape (G, k, r, n):

* a **reading** factor (query, key, value, fan-in) is X permuted to (G, k·n, r): row ``(i, c)``
  is input coordinate c of block i — the bundle's (H, d, r) convention, right-multiplied by g;
* a **writing** factor (output projection, LoRA's A) is X permuted to (G, r, k·n), left-multiplied
  by g⁻¹.

A bias of the same features is one more input coordinate (``[W; b]`` acts on ``[x, 1]``), so it is
the factor's last row. A feature the index does not name (a key bias inside a fused bias) is not
a coordinate: the layout never reads or writes it. Where an index is one contiguous block with
k = 1 and no bias the factor is a view; otherwise a copy written back by ``write_back``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .base import Layout, copy_into

__all__ = ["MultiheadAttentionHeads", "ProjectionHeads", "Rows", "feature_blocks"]


def feature_blocks(start: int, n_orbits: int, per_orbit: int, width: int, stride=None):
    """Index (G, k, r) of features ``start + g·stride + i·width + c`` (stride = k·width)."""
    stride = per_orbit * width if stride is None else stride
    g = torch.arange(n_orbits).view(-1, 1, 1) * stride
    i = torch.arange(per_orbit).view(1, -1, 1) * width
    return start + g + i + torch.arange(width).view(1, 1, -1)


def _weight_entries(shape: tuple[int, ...], spec: Rows) -> torch.Tensor:
    """Flat (row-major) indices of the entries of a weight of ``shape`` that ``spec`` reads:
    its indexed features, every entry along the remaining axes."""
    strides = [1] * len(shape)
    for axis in range(len(shape) - 2, -1, -1):
        strides[axis] = strides[axis + 1] * shape[axis + 1]
    sizes = list(shape)
    if spec.transposed:  # features are the last axis: the weight seen as W^T
        strides[-1], strides[-2], sizes[-1], sizes[-2] = (
            strides[-2],
            strides[-1],
            shape[-2],
            shape[-1],
        )
    n_indexed = len(spec.indices)
    first = sum(index.long() * s for index, s in zip(spec.indices, strides))
    rest = torch.zeros(1, dtype=torch.long)
    for size, stride in zip(sizes[n_indexed:], strides[n_indexed:]):
        rest = (rest.unsqueeze(-1) + torch.arange(size) * stride).reshape(-1)
    return (first.reshape(-1, 1) + rest).reshape(-1)


@dataclass(frozen=True, eq=False)
class Rows:
    """One factor: ``weight`` (position in the group's params), ``index`` (G, k, r) into its
    feature axis — or a tuple of such indices over several leading axes (experts) —, an optional
    ``bias`` position (indexed by ``bias_index``, default the last of ``index``), ``transposed``
    when features are the weight's last axis (``Conv1D``, an output projection's input features)
    and ``writes`` for a factor acted on from the left (g⁻¹ W)."""

    weight: int
    index: torch.Tensor | tuple[torch.Tensor, ...]
    bias: int | None = None
    bias_index: torch.Tensor | None = None
    transposed: bool = False
    writes: bool = False

    @property
    def indices(self) -> tuple[torch.Tensor, ...]:
        return self.index if isinstance(self.index, tuple) else (self.index,)

    def contiguous_block(self) -> int | None:
        """The first feature when the factor can be a view (one axis, k = 1, one block)."""
        (index, *more) = self.indices
        if more or self.bias is not None or index.shape[1] != 1:
            return None
        flat = index.reshape(-1)
        start = int(flat[0])
        return start if torch.equal(flat, torch.arange(start, start + flat.numel())) else None


class ProjectionHeads(Layout):
    """Point = one factor per ``Rows`` spec, in order (see the module docstring)."""

    def __init__(self, specs: Sequence[Rows], description: str = ""):
        self.specs = tuple(specs)
        self._starts = [s.contiguous_block() for s in self.specs]
        self.needs_scatter = any(start is None for start in self._starts)
        self.description = description or f"{len(self.specs)} factors"
        self._devices: dict = {}

    @staticmethod
    def _features(weight: torch.Tensor, spec: Rows) -> torch.Tensor:
        return weight.transpose(-1, -2) if spec.transposed else weight

    def _index(self, spec: Rows, device) -> tuple[torch.Tensor, ...]:
        key = (id(spec), device)
        if key not in self._devices:
            self._devices[key] = tuple(i.to(device) for i in spec.indices)
        return self._devices[key]

    @staticmethod
    def _arrange(x: torch.Tensor, writes: bool) -> torch.Tensor:
        g, k, r, n = x.shape
        if writes:
            return x.permute(0, 2, 1, 3).reshape(g, r, k * n)  # (G, r, k·n)
        return x.permute(0, 1, 3, 2).reshape(g, k * n, r)  # (G, k·n, r)

    @staticmethod
    def _unarrange(factor: torch.Tensor, shape, writes: bool) -> torch.Tensor:
        g, k, r, n = shape
        if writes:
            return factor.reshape(g, r, k, n).permute(0, 2, 1, 3)
        return factor.reshape(g, k, n, r).permute(0, 1, 3, 2)  # (G, k, r, n)

    def _view(self, feats: torch.Tensor, spec: Rows, start: int) -> torch.Tensor:
        g, _, r = spec.indices[0].shape
        block = feats[start : start + g * r].view(g, r, feats.shape[-1])  # (G, r, n)
        return block if spec.writes else block.transpose(1, 2)

    def _gather_one(self, tensors, spec: Rows, start: int | None) -> torch.Tensor:
        feats = self._features(tensors[spec.weight], spec)
        if start is not None:
            return self._view(feats, spec, start)
        index = self._index(spec, feats.device)
        x = feats[index]  # (G, k, r, n)
        if spec.bias is not None:
            b_index = index[-1] if spec.bias_index is None else spec.bias_index.to(feats.device)
            x = torch.cat([x, tensors[spec.bias][b_index].unsqueeze(-1)], dim=-1)
        return self._arrange(x, spec.writes)

    def gather(self, tensors):
        return tuple(self._gather_one(tensors, s, a) for s, a in zip(self.specs, self._starts))

    def scatter(self, params, point) -> None:
        for spec, start, factor in zip(self.specs, self._starts, point):
            feats = self._features(params[spec.weight], spec)
            if start is not None:
                copy_into(self._view(feats, spec, start), factor)
                continue
            index = self._index(spec, feats.device)
            g, k, r = index[0].shape
            n = feats.shape[-1] + int(spec.bias is not None)
            x = self._unarrange(factor, (g, k, r, n), spec.writes)
            if spec.bias is not None:
                b_index = index[-1] if spec.bias_index is None else spec.bias_index.to(x.device)
                params[spec.bias][b_index] = x[..., -1]
                x = x[..., :-1]
            feats[index] = x

    def entries(self, shapes):
        read: dict[int, list[torch.Tensor]] = {}
        for spec in self.specs:
            read.setdefault(spec.weight, []).append(
                _weight_entries(tuple(shapes[spec.weight]), spec)
            )
            if spec.bias is not None:
                b_index = spec.indices[-1] if spec.bias_index is None else spec.bias_index
                read.setdefault(spec.bias, []).append(b_index.reshape(-1))
        return {i: torch.cat(v).unique() for i, v in read.items()}

    # ---- sharded weights (FSDP2) ------------------------------------------------------------
    def feature_dims(self, params) -> dict[int, int]:
        """{position of a weight: the axis of its features}: split there, a weight's chunks
        hold whole orbits (heads) when the chunk boundaries fall between them."""
        return {s.weight: params[s.weight].dim() - (1 if s.transposed else 2) for s in self.specs}

    def on_shards(self, params) -> ProjectionHeads:
        """The layout of the local shards of ``params`` (DTensors): a weight split on its
        feature axis keeps the orbits whose features its shard holds whole, indices shifted to
        the shard; a weight split on another axis (rows) keeps its indices. Orbits cut by a
        shard boundary, factors holding different orbits, and biases or expert indices on a
        split feature axis raise ``NotImplementedError``."""
        kept, specs, dims = None, [], self.feature_dims(params)
        for spec in self.specs:
            weight, dim = params[spec.weight], dims[spec.weight]
            if [p.dim for p in weight.placements if p.is_shard()] != [dim]:
                specs.append(spec)  # every feature on every rank
                continue
            if spec.bias is not None or len(spec.indices) > 1:
                raise NotImplementedError("biases and expert indices on a split feature axis")
            mesh = weight.device_mesh
            step = -(-weight.shape[dim] // mesh.size())
            start = min(mesh.get_local_rank() * step, weight.shape[dim])
            inside = ((spec.index >= start) & (spec.index < start + step)).flatten(1)
            orbits = inside.all(1)
            if not bool((orbits | ~inside.any(1)).all()):
                raise NotImplementedError("a shard boundary cuts an orbit (a head) in two")
            if kept is not None and not torch.equal(kept, orbits):
                raise NotImplementedError("the factors' shards hold different orbits")
            kept = orbits
            specs.append(replace(spec, index=spec.index[orbits] - start))
        return ProjectionHeads(specs, self.description)


class MultiheadAttentionHeads(ProjectionHeads):
    """``torch.nn.MultiheadAttention`` with packed projections: params ``[in_proj_weight,
    (in_proj_bias), out_proj.weight]`` → point (W_q (H, E[+1], r), W_k (H, E, r), W_v (H, E[+1], r),
    W_o (H, r, E)) of ``ProductBundle([HeadQK, HeadOV])``.

    ``in_proj_weight`` (3E, E) stacks q, k and v; head h uses features h·r:(h+1)·r of each third.
    The query and value biases are one more row of their factors; the key bias is not a
    coordinate (it shifts every score of a query by the same amount, which softmax removes: a pure
    gauge direction, never moved)."""

    def __init__(self, embed_dim: int, n_heads: int, has_bias: bool):
        e, h = embed_dim, n_heads
        r = e // h
        bias = 1 if has_bias else None
        self.embed_dim, self.n_heads, self.has_bias = e, h, has_bias
        super().__init__(
            [
                Rows(0, feature_blocks(0, h, 1, r), bias=bias),
                Rows(0, feature_blocks(e, h, 1, r)),
                Rows(0, feature_blocks(2 * e, h, 1, r), bias=bias),
                Rows(1 + int(has_bias), feature_blocks(0, h, 1, r), transposed=True, writes=True),
            ],
            f"E={e}, H={h}, bias={has_bias}",
        )
