"""Several layouts over one list of parameters: the point of a ``ProductBundle`` whose components
act on disjoint coordinates of shared tensors (a fused q/k/v weight)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .base import Layout, copy_into

__all__ = ["ComposedLayout"]


class ComposedLayout(Layout):
    """``parts`` = ``(layout | None, positions, n_coordinates)``: part i reads the parameters at
    ``positions`` through ``layout`` and contributes ``n_coordinates`` tensors to the point, in
    order (the component order of the ``ProductBundle``)."""

    def __init__(self, parts: Sequence[tuple[Layout | None, tuple[int, ...], int]]):
        self.parts = tuple((layout, tuple(pos), int(n)) for layout, pos, n in parts)
        self.needs_scatter = any(getattr(p[0], "needs_scatter", False) for p in self.parts)
        self.description = " + ".join(repr(p[0]) for p in self.parts)

    def gather(self, tensors):
        point = []
        for layout, positions, _ in self.parts:
            sub = [tensors[i] for i in positions]
            point += list(layout(sub)) if layout is not None else sub
        return tuple(point)

    def scatter(self, params, point) -> None:
        offset = 0
        for layout, positions, n in self.parts:
            sub, coords = [params[i] for i in positions], tuple(point[offset : offset + n])
            offset += n
            if layout is not None:
                layout.write_back(sub, coords)
            else:
                for target, value in zip(sub, coords):
                    copy_into(target, value)

    def entries(self, shapes):
        read: dict[int, list] = {}
        for layout, positions, _ in self.parts:
            sub = [shapes[i] for i in positions]
            part = layout.entries(sub) if layout is not None else dict.fromkeys(range(len(sub)))
            for j, index in part.items():
                read.setdefault(positions[j], []).append(index)
        return {i: _union(v) for i, v in read.items()}


def _union(indices: list) -> torch.Tensor | None:
    """Every entry if any part reads every entry, else the union of the parts' indices."""
    if any(index is None for index in indices):
        return None
    return torch.cat([index.reshape(-1) for index in indices]).unique()
