r"""Bundle groups of one shape, stepped in one batched call.

A model gives the optimiser one head group per layer and kind (query/key, value/output), all of
one shape; stepping them one by one runs the same sequence of small kernels once per group.
Groups whose bundles share a ``Bundle.stack_key`` (one group and metric on factors of one shape:
``HeadQK`` and ``HeadOV`` stack with each other, ``RotaryQK`` with ``RotaryQK`` of the same
pairing) and whose hyperparameters, dressing phase, dtype and device agree are concatenated
along the head axis in factor form (A, B), stepped as one bundle of all their heads
(``Bundle.stacked``) and split again.

Each head's arithmetic is the same as in its own group, so a trajectory does not depend on
stacking (tested to 1e-12 in float64); the state stays each group's own (a step counter per
group, moments in the group's own layout), so ``state_dict`` has one layout whether groups were
stacked or not, and a state saved by either loads into the other. A group's step counter is
broadcast per head inside the batch: groups created at different times stack.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from manifolds import Bundle

__all__ = [
    "STACK_ELEMENTS",
    "Member",
    "batch_key",
    "bounded",
    "gather",
    "gather_state",
    "split",
    "split_state",
]

#: most elements of the points stepped in one call: a step holds several tensors of a batch's
#: size at once (gathered point, gradient and moment, the projected direction, the new point
#: and moment), so large models step their heads in batches of about this size — as fast
#: (the kernels are large already) with a bounded transient memory
STACK_ELEMENTS = 1 << 21


@dataclass
class Member:
    """One bundle group's part in a step: where it is (``index``, ``group``), its parameters,
    their views in the bundle's point order, the gradient's views, its state (``fresh``: made
    for this step, not yet the optimiser's) and its hyperparameters."""

    index: int
    group: dict
    params: list
    point: tuple
    grad: tuple
    state: dict
    fresh: bool
    hyper: dict
    dress: bool
    key: tuple | None = field(default=None)

    @property
    def bundle(self) -> Bundle:
        return self.group["bundle"]

    @property
    def heads(self) -> int:
        return self.point[0].shape[0]


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, torch.Tensor):
        return None  # a tensor hyperparameter: never stacked
    return value


def batch_key(member: Member):
    """What must agree for ``member`` to be stepped with others, or None if it is stepped
    alone (its bundle does not stack, or a hyperparameter is a tensor)."""
    stack = member.bundle.stack_key()
    if stack is None:
        return None
    hyper = tuple(sorted((k, _hashable(v)) for k, v in member.hyper.items()))
    if any(isinstance(v, torch.Tensor) for v in member.hyper.values()):
        return None
    ref = member.point[0]
    frames = member.group.get("frame_age")
    return (stack, hyper, member.dress, frames, ref.dtype, ref.device)


def bounded(members: list[Member]) -> list[list[Member]]:
    """``members`` in consecutive batches of at most ``STACK_ELEMENTS`` point elements (a
    larger group alone)."""
    batches, batch, size = [], [], 0
    for m in members:
        elements = sum(t.numel() for t in m.point)
        if batch and size + elements > STACK_ELEMENTS:
            batches.append(batch)
            batch, size = [], 0
        batch.append(m)
        size += elements
    if batch:
        batches.append(batch)
    return batches


def gather(members: list[Member], tensors: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """The factors (A, B) of every member's ``tensors`` (points or tangents in the member's
    layout), concatenated along the head axis."""
    parts = [m.bundle.factors(t) for m, t in zip(members, tensors)]
    return _concatenated([a for a, _ in parts]), _concatenated([b for _, b in parts])


def _concatenated(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts)``, or without a copy the tensor they were split from when they are
    its consecutive head slices in order (a state entry the last stacked step wrote:
    ``split_state`` hands out views)."""
    base = parts[0]._base
    if base is not None and all(p._base is base for p in parts) and _tiles(base, parts):
        return base
    return torch.cat(parts)


def _tiles(base: torch.Tensor, parts: list[torch.Tensor]) -> bool:
    if base.dim() != parts[0].dim() or sum(p.shape[0] for p in parts) != base.shape[0]:
        return False
    offset = base.storage_offset()
    for p in parts:
        if p.shape[1:] != base.shape[1:] or p.stride() != base.stride():
            return False
        if p.storage_offset() != offset:
            return False
        offset += p.shape[0] * base.stride(0)
    return True


def split(members: list[Member], stacked: tuple) -> list[tuple]:
    """Each member's part of a stacked point or tangent (factor form), in its own layout
    (views of the stacked tensors)."""
    out, start = [], 0
    a, b = stacked
    for m in members:
        stop = start + m.heads
        out.append(tuple(m.bundle.from_factors(a[start:stop], b[start:stop])))
        start = stop
    return out


def _per_head(members: list[Member], values: list[torch.Tensor]) -> torch.Tensor:
    """Scalar state entries (step counters), one per member, broadcast to (heads, 1, 1)."""
    flat = torch.cat([v.reshape(1).expand(m.heads) for m, v in zip(members, values)])
    return flat.view(-1, 1, 1)


#: state entries that are tuples of per-head tensors (head axis first) in no layout: stacked
#: and split as they are (the frame bases of ``QuotientOptimizer._initial_state``)
HEADWISE_STATE = ("frame_basis",)


def gather_state(members: list[Member]) -> dict:
    """The members' states as one: tuples of tensors (moments) in factor form concatenated,
    headwise entries concatenated as they are, scalar tensors (step counters) broadcast per
    head."""
    out = {}
    for key, first in members[0].state.items():
        values = [m.state[key] for m in members]
        if key in HEADWISE_STATE:
            out[key] = tuple(_concatenated(list(parts)) for parts in zip(*values))
        elif isinstance(first, tuple):
            out[key] = gather(members, values)
        else:
            out[key] = _per_head(members, values)
    return out


def split_state(members: list[Member], state: dict) -> list[dict]:
    """Each member's part of a stacked new state, shaped like its own state."""
    out = [{} for _ in members]
    for key, value in state.items():
        if key in HEADWISE_STATE:
            start = 0
            for entry, m in zip(out, members):
                entry[key] = tuple(t[start : start + m.heads] for t in value)
                start += m.heads
            continue
        if isinstance(value, tuple):
            for entry, part in zip(out, split(members, value)):
                entry[key] = part
            continue
        start = 0
        for entry, m in zip(out, members):
            entry[key] = value[start].reshape(m.state[key].shape)
            start += m.heads
    return out
