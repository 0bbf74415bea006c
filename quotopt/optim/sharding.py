r"""Param groups on sharded parameters: the DTensors of PyTorch's ``fully_shard`` (FSDP2).

A group whose parameters are DTensors is stepped on the local shards, never unsharded. What a
shard holds is read from the DTensor placements (one mesh dimension, ``Shard(dim)``), in the
bundle's coordinates (the group's layout applied to the local tensors):

* **whole heads** — every tensor of the point holds the same heads (the head axis split as
  ``torch.chunk`` splits it; for ``quotopt.models.Transformer`` FSDP2's default ``Shard(0)``):
  the group is the same bundle on fewer heads (``Bundle.with_heads``) and needs no
  communication, since heads are independent;
* **rows** — every tensor holds all heads and a chunk of its rows (the model-space axis of a
  head factor): the bundle's own formulas run on the local rows, every sum over rows (Gram
  matrices, cross products, the metric, the step bound's products) completed by one all-reduce
  and the dressing's sign rule by a tiny all-gather (``Bundle.with_row_reduction``,
  ``quotopt.distributed``): per projection 2·H·r² numbers per factor pair;
* anything else — the acted-on axis split inside a head, factors of one head on different
  ranks, several mesh dimensions — is refused with the reason: align the shards with heads
  (``quotopt.distributed.shard_heads``) or with rows.

Plain groups are elementwise and run on the local shards as ``torch.optim.AdamW`` /
``torch.optim.SGD`` do on DTensors. ``torch.optim.Muon``'s rule on a plain matrix needs the whole
matrix: its Newton–Schulz input is all-gathered (``Shards.matrix``), orthogonalised on every
rank, and each rank keeps its own rows — the pattern of the distributed Muon implementations
(Dion's, torchtitan's); Newton–Schulz on a shard alone would be a different, wrong update.

The state lives on the local shards (tensors of the local shapes); ``state_dict`` presents the
sharded entries as DTensors with the parameters' mesh, so ``torch.distributed.checkpoint`` saves
and reloads each rank's part (``Shards.global_state`` / ``local_state``).
"""

from __future__ import annotations

import copy
import functools
import math

import torch

from quotopt.distributed import all_reduce_sum, global_column_signs

__all__ = ["Shards", "is_sharded", "local", "sharded_group"]


@functools.cache
def _dtensor():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without torch.distributed
        return None
    return DTensor


def is_sharded(tensor) -> bool:
    """Whether ``tensor`` is a DTensor (a parameter of a ``fully_shard``-ed module)."""
    cls = _dtensor()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The rank's own part of ``tensor`` (a view sharing its storage), or ``tensor``."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def sharded_group(params) -> bool:
    return any(is_sharded(p) for p in params)


def _chunk(size: int, world: int, rank: int) -> tuple[int, int]:
    """(offset, length) of ``rank``'s part of an axis of ``size`` split as ``torch.chunk``."""
    step = math.ceil(size / world)
    start = min(rank * step, size)
    return start, max(0, min(step, size - start))


class Shards:
    """How the tensors of one param group are split over the ranks of a 1-D device mesh.

    ``bundle`` and ``layout``: what the step runs on the local tensors (``None`` for plain
    groups); ``description``: the unsharded bundle, as ``state_dict`` names it."""

    def __init__(self, name: str, group: dict, params: list):
        self.name = name
        sharded = [p for p in params if is_sharded(p)]
        if len(sharded) < len(params) or any(
            p.device_mesh != sharded[0].device_mesh for p in sharded
        ):
            raise ValueError(
                f"{name}: every parameter of a group must be a DTensor of one device mesh (the "
                "same fully_shard call or mesh), got a mix; build the groups after fully_shard"
            )
        self.mesh = params[0].device_mesh
        if self.mesh.ndim != 1:
            raise ValueError(
                f"{name}: parameters on a {self.mesh.ndim}-D device mesh; the quotient "
                "optimisers support one mesh dimension (fully_shard without replication, HSDP)"
            )
        self.process_group = self.mesh.get_group()
        self.world, self.rank = self.mesh.size(), self.mesh.get_local_rank()
        self._meta = {id(p): (p.shape, p.stride(), tuple(p.placements)) for p in params}
        for p in params:
            if not all(pl.is_shard() or pl.is_replicate() for pl in p.placements):
                raise ValueError(
                    f"{name}: a parameter with placements {p.placements}; only Shard and "
                    "Replicate placements are supported"
                )
        bundle = group.get("bundle")
        self.bundle, self.layout, self.description = None, None, None
        self._axes: list[tuple[int, int]] | None = None
        if bundle is not None:
            self.description = repr(bundle)
            self._bundle_shards(name, group, bundle, params)

    # ---- bundle groups: which axis of the point is split ----------------------------------
    def _bundle_shards(self, name: str, group: dict, bundle, params: list) -> None:
        layout = group.get("layout")
        if layout is not None:
            try:
                layout = layout.on_shards(params)
            except (AttributeError, NotImplementedError):
                raise ValueError(
                    f"{name}: layout {layout!r} does not say how it maps sharded parameters; "
                    "only layouts that are views without indexing run on shards"
                ) from None
        self.layout = layout
        views = self.views(params)
        shapes = [tuple(s) for s in bundle.point_shapes()]
        local_shapes = [tuple(v.shape) for v in views]
        if local_shapes == shapes:  # nothing split (replicated, or one rank)
            self.bundle, self._axes = _exact_frames(bundle), []
            return
        heads = getattr(bundle, "n_heads", None)
        if heads is not None and all(s[1:] == g[1:] for s, g in zip(local_shapes, shapes)):
            self._whole_heads(name, bundle, heads, local_shapes)
        elif heads is not None and all(s[0] == heads for s in local_shapes):
            self._rows(name, bundle, local_shapes, shapes)
        else:
            self._refuse(name, local_shapes, shapes)
        if group.get("scope") == "tensor":
            raise ValueError(
                f"{name}: scope='tensor' orthogonalises the matrix of all heads side by side, "
                "which needs every rank's heads or columns; use scope='head' on sharded groups"
            )

    def _whole_heads(self, name, bundle, heads: int, local_shapes) -> None:
        counts = {s[0] for s in local_shapes}
        _, expected = _chunk(heads, self.world, self.rank)
        if counts != {expected} or expected == 0:
            self._refuse(name, local_shapes, [tuple(s) for s in bundle.point_shapes()])
        try:
            self.bundle = _exact_frames(bundle.with_heads(expected))
        except NotImplementedError:
            raise ValueError(
                f"{name}: {bundle!r} cannot be stepped on a shard of its heads"
            ) from None
        self._axes = [(0, heads)] * len(local_shapes)

    def _rows(self, name, bundle, local_shapes, shapes) -> None:
        axes = []
        for s, g in zip(local_shapes, shapes):
            split = [i for i, (a, b) in enumerate(zip(s, g)) if a != b]
            axis = split[0] if len(split) == 1 else None
            if axis not in (1, 2) or s[axis] != _chunk(g[axis], self.world, self.rank)[1]:
                self._refuse(name, local_shapes, shapes)
            axes.append((axis, g[axis]))
        group = self.process_group
        try:
            self.bundle = bundle.with_row_reduction(
                lambda tensors: all_reduce_sum(tensors, group),
                lambda coords: global_column_signs(coords, group),
            )
        except NotImplementedError:
            raise ValueError(
                f"{name}: {bundle!r} has no row reduction; shard its parameters by whole heads"
            ) from None
        self._axes = axes

    def _refuse(self, name, local_shapes, shapes):
        raise ValueError(
            f"{name}: on rank {self.rank} of {self.world} the point's tensors have local shapes "
            f"{local_shapes} of {shapes}: the shards split neither whole heads (the same heads "
            "in every tensor) nor only the rows of every factor (the axis the group acts on is "
            "split, or the factors are split differently). Shard the group's parameters on "
            "their head axis (quotopt.distributed.shard_heads) or on their rows"
        )

    # ---- local tensors ----------------------------------------------------------------------
    def views(self, tensors) -> tuple[torch.Tensor, ...]:
        """The local point (or tangent) of a list of (sharded) tensors shaped like the params."""
        tensors = [local(t) for t in tensors]
        return tuple(self.layout(tensors)) if self.layout is not None else tuple(tensors)

    # ---- state: local in the optimiser, DTensors in state_dict --------------------------------
    def _wrap(self, value: torch.Tensor, placements, shape, stride=None):
        cls = _dtensor()
        stride = stride if stride is not None else _contiguous_stride(shape)
        return cls.from_local(
            value, self.mesh, placements, shape=torch.Size(shape), stride=stride, run_check=False
        )

    def global_state(self, param, state: dict) -> dict:
        """The state of ``param`` (plain) or of the group (bundle) with every sharded entry a
        DTensor (tuples of a bundle point as lists, which ``torch.distributed.checkpoint``
        traverses)."""
        from torch.distributed.tensor import Shard

        out = {}
        for key, value in state.items():
            if self._axes is not None and isinstance(value, tuple):
                wrapped = [
                    self._wrap(t, [Shard(axis)], _replace(t.shape, axis, size))
                    for t, (axis, size) in zip(value, self._axes)
                ]
                out[key] = wrapped if self._axes else list(value)
            elif self._axes is None and isinstance(value, torch.Tensor) and value.dim():
                shape, stride, placements = self._meta[id(param)]
                out[key] = self._wrap(value, placements, shape, stride)
            else:
                out[key] = value
        return out

    @staticmethod
    def local_state(state: dict) -> dict:
        """Inverse of ``global_state``: DTensors to their local parts, lists to tuples."""
        return {
            k: tuple(local(t) for t in v) if isinstance(v, list) else local(v)
            for k, v in state.items()
        }

    # ---- plain matrices gathered whole ----------------------------------------------------------
    def matrix(self, param) -> Gathered:
        """The gather of ``param``'s whole matrix and the rank's part of a whole one."""
        return Gathered(self, *self._meta[id(param)])


class Gathered:
    """``full(local)``: the whole matrix on every rank (one all-gather); ``part(full)``: the
    rank's own rows of a whole matrix, as its shard holds them."""

    def __init__(self, shards: Shards, shape, stride, placements):
        self.shards, self.shape, self.stride, self.placements = shards, shape, stride, placements

    def full(self, tensor: torch.Tensor) -> torch.Tensor:
        if all(p.is_replicate() for p in self.placements):
            return tensor
        return self.shards._wrap(tensor, self.placements, self.shape, self.stride).full_tensor()

    def part(self, whole: torch.Tensor) -> torch.Tensor:
        for placement in self.placements:
            if placement.is_shard():
                dim = placement.dim
                start, length = _chunk(whole.shape[dim], self.shards.world, self.shards.rank)
                whole = whole.narrow(dim, start, length)
        return whole


def _replace(shape, axis: int, size: int) -> tuple[int, ...]:
    shape = list(shape)
    shape[axis] = size
    return tuple(shape)


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= max(n, 1)
    return tuple(reversed(stride))


def _exact_frames(bundle):
    """``bundle``, or a copy of it whose frames are factorised at every step: a sharded group's
    state keeps no frame bases (``manifolds.heads.GeneralLinearPair.reuses_bases``)."""
    if not getattr(bundle, "warm_frames", False):
        return bundle
    local = copy.copy(bundle)
    local.warm_frames = False
    return local


def create_state(optimizer) -> None:
    """Give every group of ``optimizer`` without state the state its first step would create
    (``QuotientOptimizer.init_state``)."""
    for group in optimizer.param_groups:
        params = [p for p in group["params"] if p.requires_grad and p not in optimizer.state]
        if not params or group.get("frozen", False):
            continue
        if group.get("bundle") is not None:
            state = optimizer._initial_state(group, optimizer._views(group, params))
            optimizer.state[params[0]] = state
            continue
        for p in params:
            optimizer.state[p] = optimizer._init_state(group, (local(p),))


def globalise(optimizer, states: dict) -> None:
    """The entries of a ``state_dict``'s ``states`` (keyed by parameter index, as torch keys
    them) as ``torch.distributed.checkpoint`` reads them: sharded ones as DTensors
    (``Shards.global_state``), a bundle's tuples of tensors as lists (it traverses lists, not
    tuples), sharded or not, so that a checkpoint of N ranks loads on any number."""
    index = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            if "shards" in group and index in states:
                states[index] = group["shards"].global_state(p, states[index])
            elif index in states:
                states[index] = {
                    k: list(v) if isinstance(v, tuple) else v for k, v in states[index].items()
                }
            index += 1
