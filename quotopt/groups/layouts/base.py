"""The ``Layout`` contract: a model's own parameters ↔ a bundle's point coordinates.

A layout is called on a list of tensors shaped like its group's parameters (the parameters, or
their gradients) and returns the bundle's point in order. Every layout is a linear change of
coordinates that only **selects and reorders entries**, so the same map sends Euclidean gradients
to the point's gradients, and entries it does not select (a key bias inside a fused bias, see
``docs/theory/bundles.md``) are never written.

Writing a point back is ONE method, ``write_back(params, point)``, used by the optimiser, the
distributed code and ``quotopt.gauge_transform`` alike. It is correct whether the coordinates are
views of the parameters (then the copy is skipped: the point already is the parameter) or copies
(then they are scattered back). ``needs_scatter`` is True when some coordinate is a copy
(code that works on the point without writing it back, such as ``quotopt.dynamics``, asks).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Layout", "copy_into"]


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """a and b address the same entries in the same order (strides of size-1 axes ignored)."""
    if a.data_ptr() != b.data_ptr() or a.shape != b.shape:
        return False
    return all(sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()) if n > 1)


def copy_into(target: torch.Tensor, value: torch.Tensor) -> None:
    """``target.copy_(value)`` that is safe when ``value`` aliases ``target``.

    Skipped when both address the same entries; ``value`` is cloned first when it shares storage
    with ``target`` in another arrangement (``copy_`` refuses partially overlapping memory)."""
    if _same_view(target, value):
        return
    if target.untyped_storage().data_ptr() == value.untyped_storage().data_ptr():
        value = value.clone()
    target.copy_(value)


class Layout:
    """Base class: the identity layout (the point is the parameters themselves).

    Subclasses define ``gather(tensors) -> point``; layouts whose coordinates include copies
    override ``scatter(params, point)`` (the inverse of ``gather`` on the selected entries) and set
    ``needs_scatter``. Callers write a point back with ``write_back`` only.
    """

    description = "identity"
    needs_scatter = False

    def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.gather(list(tensors))

    def gather(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(tensors)

    @torch.no_grad()
    def write_back(self, params: Sequence[torch.Tensor], point: Sequence[torch.Tensor]) -> None:
        """Write the coordinates ``point`` into ``params`` (in place, under ``no_grad``).

        Coordinates that are views of ``params`` are skipped when ``point`` holds those very
        views; everything else is copied. Entries the layout does not select are left alone."""
        self.scatter(list(params), tuple(point))

    def scatter(self, params: list[torch.Tensor], point: tuple[torch.Tensor, ...]) -> None:
        """Default for view layouts: copy each coordinate into its view of the parameters."""
        for target, value in zip(self.gather(params), point):
            copy_into(target, value)

    def entries(self, shapes: Sequence[tuple[int, ...]]) -> dict[int, torch.Tensor | None]:
        """Which entries of each parameter the point reads, from the parameters' ``shapes``:
        {position: flat (row-major) indices, or None for every entry}; a position absent is not
        read. The identity reads every entry; a layout that reads part of a tensor overrides
        this (groups sharing a tensor compose only where their entries are disjoint)."""
        return dict.fromkeys(range(len(shapes)))

    def on_shards(self, params: Sequence[torch.Tensor]) -> Layout:
        """The layout of the local shards of ``params`` (DTensors; ``quotopt.optim.sharding``):
        itself for layouts of views that reshape or transpose without indexing a fixed size;
        ``NotImplementedError`` for the others."""
        raise NotImplementedError(f"{type(self).__name__} does not run on shards")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"
