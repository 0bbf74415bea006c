"""Helpers with which a model declares its own symmetry groups (``symmetry_groups``).

A model that knows its symmetries says so, as nanoGPT's model owns ``configure_optimizers``:
``quotopt.symmetries`` calls ``module.symmetry_groups(metric=..., heads=..., residual=...,
rescaling=...)`` on the outermost module that has it, takes the groups it returns as declared, and
does not look inside that module. These helpers build the usual groups from a module's own
parameters, so a model's method is a few lines.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

import manifolds as M

from .layouts import UnitsOfMatmul

__all__ = ["factored_heads", "joint", "matmul_units", "rotation"]


def factored_heads(prefix: str, attn: nn.Module, metric: str) -> list[dict]:
    """GL(r) per head of an attention with factors ``wq, wk, wv`` (H, d, r) and ``wo`` (H, r, d).

    A fixed query (value) bias b shrinks the QK (OV) group to the stabiliser {g : b g = b}, which
    no bundle models, so that pair is left out (to the plain group)."""
    h, d, r = attn.wq.shape
    groups = []
    if getattr(attn, "q_bias", None) is None:
        groups.append(
            {
                "params": [attn.wq, attn.wk],
                "bundle": M.HeadQK(h, d, r, metric),
                "name": f"{prefix}qk",
            }
        )
    if getattr(attn, "v_bias", None) is None:
        groups.append(
            {
                "params": [attn.wv, attn.wo],
                "bundle": M.HeadOV(h, d, r, metric),
                "name": f"{prefix}ov",
            }
        )
    return groups


def matmul_units(prefix: str, mlp: nn.Module, metric: str) -> list[dict]:
    """Positive rescaling of the units of ``act(X @ w_in) @ w_out`` when ``act`` is ReLU."""
    if getattr(mlp, "act", None) is not F.relu:
        return []
    d, m = mlp.w_in.shape
    bundle = M.PositiveRescaling(m, d, mlp.w_out.shape[1], metric)
    return [
        {
            "params": [mlp.w_in, mlp.w_out],
            "bundle": bundle,
            "layout": UnitsOfMatmul(),
            "name": f"{prefix}units",
        }
    ]


def rotation(name: str, named: list[tuple[str, nn.Parameter]], d: int, axes: list[int]) -> dict:
    """O(d) acting on axis ``axes[i]`` of each tensor (``manifolds.ResidualRotation``)."""
    bundle = M.ResidualRotation(d, axes, shapes=[p.shape for _, p in named])
    return {"params": [p for _, p in named], "bundle": bundle, "name": name}


def joint(
    named: list[tuple[str, nn.Parameter]],
    d: int,
    axes: list[int],
    heads: list[nn.Module],
    metric: str,
    solver: str = "auto",
) -> dict:
    """O(d) acting on axis ``axes[i]`` of every tensor of ``named`` jointly with GL(r) per head of
    each attention in ``heads`` (factors ``wq, wk, wv`` (H, d, r), ``wo`` (H, r, d), all among
    ``named``): one group with a ``manifolds.JointBundle`` (docs/theory/joint.md). A pair whose
    fixed ``q_bias`` / ``v_bias`` is set, or whose factors are frozen, keeps only O(d)."""
    index = {id(p): i for i, (_, p) in enumerate(named)}
    residual = M.ResidualRotation(d, axes, shapes=[tuple(p.shape) for _, p in named])
    pairs = []
    for attn in heads:
        h, _, r = attn.wq.shape
        if getattr(attn, "q_bias", None) is None and id(attn.wq) in index:
            pairs.append((M.HeadQK(h, d, r, metric), (index[id(attn.wq)], index[id(attn.wk)])))
        if getattr(attn, "v_bias", None) is None and id(attn.wv) in index:
            pairs.append((M.HeadOV(h, d, r, metric), (index[id(attn.wv)], index[id(attn.wo)])))
    bundle = M.JointBundle(residual, pairs, solver=solver)
    return {"params": [p for _, p in named], "bundle": bundle, "name": "joint"}
