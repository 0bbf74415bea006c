"""Groups that share a tensor: one ``ProductBundle`` group where they act on disjoint entries.

A fused q/k/v weight holds the query/key and the value/output heads of one attention; their
groups act on disjoint entries of it, so their product is a bundle and the two become one group
with a ``ComposedLayout``. Which entries a group acts on is what its layout reads
(``Layout.entries``: index arithmetic on the parameters' shapes, no tensor pushed through it).
"""

from __future__ import annotations

import torch

import manifolds as M

from .layouts import ComposedLayout

__all__ = ["compose_groups", "entries_read"]


def entries_read(group: dict) -> dict[int, torch.Tensor | None]:
    """{position in ``group["params"]``: flat indices of the entries its point reads, or None
    for every entry} (``Layout.entries``; a layout without it reads every entry)."""
    layout = group.get("layout")
    shapes = [tuple(p.shape) for p in group["params"]]
    if layout is None or not hasattr(layout, "entries"):
        return dict.fromkeys(range(len(shapes)))
    return layout.entries(shapes)


def _read(group: dict, shared: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """{id of a shared tensor: boolean mask of the entries ``group`` reads}."""
    out = {}
    for position, index in entries_read(group).items():
        p = group["params"][position]
        if id(p) not in shared:
            continue
        mask = out.get(id(p), torch.zeros(p.numel(), dtype=torch.bool))
        if index is None:
            mask[:] = True
        else:
            mask[index.reshape(-1)] = True
        out[id(p)] = mask
    return out


def _meets(reads: dict[int, torch.Tensor], i: int, mask: torch.Tensor) -> bool:
    return i in reads and bool((reads[i] & mask).any())


def compose_groups(groups: list[dict], names: dict[int, str], refuse: bool, compose_name=None):
    """Groups sharing a tensor on disjoint coordinates become one ``ProductBundle`` group with a
    ``ComposedLayout`` (named ``compose_name(members)`` or after the first); on the same
    coordinates they are refused (``refuse``: ValueError naming both and the fix) or the later
    group is dropped. Returns (groups, [(dropped group, reason)])."""
    result, dropped = [], []
    pending = list(groups)
    while pending:
        first = pending.pop(0)
        members, ids = [first], {id(p) for p in first["params"]}
        changed = True
        while changed:
            changed = False
            for g in list(pending):
                if ids & {id(p) for p in g["params"]}:
                    members.append(g)
                    ids |= {id(p) for p in g["params"]}
                    pending.remove(g)
                    changed = True
        if len(members) == 1:
            result.append(first)
            continue
        shared = [
            p
            for p in dict.fromkeys(p for g in members for p in g["params"])
            if sum(any(q is p for q in g["params"]) for g in members) > 1
        ]
        kept, taken = [], {id(p): torch.zeros(p.numel(), dtype=torch.bool) for p in shared}
        for g in members:
            read = _read(g, taken)
            hit = next((i for i, mask in read.items() if _meets(taken, i, mask)), None)
            if hit is not None:
                other = next(k["name"] for k in kept if _meets(_read(k, taken), hit, read[hit]))
                reason = (
                    f"declared group {g['name']} overlaps another ({other}) on the same "
                    f"entries of {names.get(hit, '?')}"
                )
                if refuse:
                    raise ValueError(
                        f"{reason}: two groups may share a tensor only on disjoint entries; "
                        "declare one bundle for both (their joint group), or give each group "
                        "the entries it acts on through its layout"
                    )
                dropped.append((g, reason))
                continue
            for i, mask in read.items():
                taken[i] |= mask
            kept.append(g)
        result.append(_product(kept, compose_name))
    return result, dropped


def _product(members: list[dict], compose_name) -> dict:
    if len(members) == 1:
        return members[0]
    params = list(dict.fromkeys(p for g in members for p in g["params"]))
    position = {id(p): i for i, p in enumerate(params)}
    parts = []
    for g in members:
        point = g["layout"](list(g["params"])) if g.get("layout") is not None else g["params"]
        parts.append((g.get("layout"), tuple(position[id(p)] for p in g["params"]), len(point)))
    name = compose_name(members) if compose_name else members[0]["name"]
    factors = [
        c for g in members for c in getattr(g["bundle"], "components", None) or [g["bundle"]]
    ]
    bundle = M.ProductBundle(factors)  # a product of products, flattened: the same point order
    return {
        "params": params,
        "bundle": bundle,
        "layout": ComposedLayout(parts),
        "name": name,
        "members": [g["name"] for g in members],
    }
