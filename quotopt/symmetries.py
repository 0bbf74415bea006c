"""Find a model's continuous parameter symmetries and group its parameters by them.

``symmetries(model)`` returns torch param groups covering every trainable parameter exactly
once. Groups with a symmetry carry ``"bundle"`` (a ``manifolds.Bundle``), ``"name"`` and, where
the model's storage differs from the bundle's coordinates, ``"layout"`` (``quotopt.layouts``);
their ``"params"`` are the model's own ``nn.Parameter``s. The result plugs straight into
``QuotientAdam(groups, ...)``.

What is detected:

* attention with per-head factors ``wq, wk, wv`` (H, d, r) and ``wo`` (H, r, d) —
  ``quotopt.models.Transformer`` and ``RelationalTransformer`` — as ``HeadQK`` + ``HeadOV``
  (each pair only while its fixed ``q_bias`` / ``v_bias`` is unset);
* ``torch.nn.MultiheadAttention`` (packed projections, also inside ``nn.TransformerEncoderLayer``
  / ``DecoderLayer``): GL(r) per head on the fused ``in_proj_weight`` and ``out_proj.weight``;
  biases are folded into the factors as one more row ([W; b] acts on [x, 1]);
* ReLU MLPs (``act(X @ w_in) @ w_out`` with ReLU, and ``linear1``/``linear2`` of ReLU
  ``nn.TransformerEncoderLayer``/``DecoderLayer``): positive rescaling of each hidden unit;
* Hugging Face GPT-2 and LLaMA-family attention and gated MLPs (``quotopt.hf``; RoPE shrinks
  each head's GL(r) to the rotary commutant, ``manifolds.rotary.RotaryQK``);
* O(d_gauge) on the embedding tables of ``RelationalTransformer`` — the only tensors that carry
  the gauge axis, disjoint from the heads, so both reductions hold at once;
* O(d_model) on every tensor of ``Transformer`` (``residual=True, heads=False``). O(d) and the
  heads' GL(r) act *jointly* on the attention weights there (the vertical space is a sum, not a
  direct sum); that joint reduction is not implemented, so ask for one or the other.

Not detected, by design: LayerNorm models' O(d) (gains and centering break it; at most the
stabiliser of the all-ones vector survives), GELU/SiLU MLP rescaling (not a symmetry). Custom
modules: pass ``declared=[{"params": [...], "bundle": ..., "layout": ..., "name": ...}]``; those
parameters are taken out of detection.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

import manifolds as M

from .hf import hf_attention, hf_units
from .layouts import MultiheadAttentionHeads, UnitsOfLinear, UnitsOfMatmul

__all__ = ["symmetries", "gauge_transform", "verify", "group_point"]

# Model-space axis of each parameter of quotopt.models.Transformer, by name suffix.
_TRANSFORMER_AXES = {
    "tok_emb": 1,
    "pos_emb": 1,
    "wq": 1,
    "wk": 1,
    "wv": 1,
    "wo": 2,
    "w_in": 0,
    "w_out": 1,
    "lm_head": 1,
    "cls_head": 1,
}


def _own_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    return dict(module.named_parameters(recurse=False))


def _factored_attention(prefix, module, metric):
    """quotopt-style attention: parameters wq, wk, wv (H, d, r) and wo (H, r, d).

    A fixed query (value) bias b shrinks the QK (OV) group to the stabiliser {g : b g = b},
    which no bundle models, so that pair is left to the plain group.
    """
    own = _own_parameters(module)
    if not {"wq", "wk", "wv", "wo"} <= own.keys():
        return []
    h, d, r = own["wq"].shape
    groups = []
    if getattr(module, "q_bias", None) is None:
        groups.append(
            {
                "params": [own["wq"], own["wk"]],
                "bundle": M.HeadQK(h, d, r, metric),
                "name": f"{prefix}qk",
            }
        )
    if getattr(module, "v_bias", None) is None:
        groups.append(
            {
                "params": [own["wv"], own["wo"]],
                "bundle": M.HeadOV(h, d, r, metric),
                "name": f"{prefix}ov",
            }
        )
    return groups


def _multihead_attention(prefix, module, metric):
    if not isinstance(module, nn.MultiheadAttention):
        return []
    if not module._qkv_same_embed_dim or module.bias_k is not None:
        raise ValueError(
            f"{prefix.rstrip('.')}: nn.MultiheadAttention with separate q/k/v dimensions or "
            "add_bias_kv is not supported; declare its bundles with declared=[...]"
        )
    e, h = module.embed_dim, module.num_heads
    bias = module.in_proj_bias is not None
    rows = e + int(bias)  # a bias is one more row of each input factor
    ov = M.HeadOV(h, rows, e // h, metric, factor_rows=(rows, e))  # out_proj reads no bias row
    bundle = M.ProductBundle([M.HeadQK(h, rows, e // h, metric), ov])
    params = [module.in_proj_weight] + ([module.in_proj_bias] if bias else [])
    return [
        {
            "params": params + [module.out_proj.weight],
            "bundle": bundle,
            "layout": MultiheadAttentionHeads(e, h, bias),
            "name": f"{prefix}heads",
        }
    ]


def _relu_units(prefix, module, metric):
    own = _own_parameters(module)
    if {"w_in", "w_out"} <= own.keys() and getattr(module, "act", None) is F.relu:
        d, m = own["w_in"].shape
        bundle = M.PositiveRescaling(m, d, own["w_out"].shape[1], metric)
        layout = UnitsOfMatmul()
        return [
            {
                "params": [own["w_in"], own["w_out"]],
                "bundle": bundle,
                "layout": layout,
                "name": f"{prefix}units",
            }
        ]
    layer_types = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    if isinstance(module, layer_types) and module.activation is F.relu:
        lin1, lin2 = module.linear1, module.linear2
        bias = lin1.bias is not None
        params = [lin1.weight] + ([lin1.bias] if bias else []) + [lin2.weight]
        m, d = lin1.weight.shape
        bundle = M.PositiveRescaling(m, d + int(bias), lin2.weight.shape[0], metric)
        return [
            {
                "params": params,
                "bundle": bundle,
                "layout": UnitsOfLinear(bias),
                "name": f"{prefix}units",
            }
        ]
    return []


def _relational_gauge(model, metric):
    from .models import RelationalTransformer

    if not isinstance(model, RelationalTransformer):
        return []
    tables = [(n, p) for n, p in model.named_parameters() if "emb" in n and p.requires_grad]
    d_gauge = tables[0][1].shape[-1]
    bundle = M.ResidualRotation(d_gauge, [-1] * len(tables), shapes=[p.shape for _, p in tables])
    return [{"params": [p for _, p in tables], "bundle": bundle, "name": "gauge"}]


def _transformer_residual(model):
    from .models import Transformer

    if not isinstance(model, Transformer):
        raise ValueError(
            f"residual=True: O(d) is detected for quotopt.models.Transformer only, got "
            f"{type(model).__name__}; declare it with manifolds.ResidualRotation"
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    axes = [_TRANSFORMER_AXES[n.rsplit(".", 1)[-1]] for n, _ in named]
    bundle = M.ResidualRotation(model.config.d_model, axes, shapes=[p.shape for _, p in named])
    return [{"params": [p for _, p in named], "bundle": bundle, "name": "residual"}]


def symmetries(
    model: nn.Module,
    *,
    metric: str = "euclidean",
    heads: bool = True,
    residual: bool | str = "auto",
    rescaling: bool = True,
    declared: Sequence[dict] = (),
    plain: bool = True,
) -> list[dict]:
    """Param groups of ``model`` by symmetry (see the module docstring).

    Args:
        metric: metric of the head and rescaling bundles (``"euclidean"`` or ``"invariant"``).
        heads: detect GL(r) per attention head.
        residual: O(d) — ``"auto"`` reduces it where it is disjoint from the heads
            (``RelationalTransformer``'s embeddings); ``True`` also for ``Transformer`` (then
            ``heads`` must be False); ``False`` never.
        rescaling: detect positive rescaling of ReLU units.
        declared: user-declared groups, taken first.
        plain: put every remaining trainable parameter in one group without a bundle
            (``name="plain"``); with ``False`` a remaining parameter is an error.

    Raises ``ValueError`` naming any parameter covered twice or (``plain=False``) not at all.
    """
    from .models import RelationalTransformer, Transformer

    if residual is True and heads and isinstance(model, Transformer):
        raise ValueError(
            "O(d_model) and the heads' GL(r) act jointly on Transformer's attention weights; "
            "the joint reduction is not supported: pass heads=False or residual=False"
        )
    groups = [dict(g) for g in declared]
    if residual is True and not isinstance(model, RelationalTransformer):
        groups += _transformer_residual(model)
    elif residual in (True, "auto"):
        groups += _relational_gauge(model, metric)
    for prefix, module in model.named_modules():
        prefix = f"{prefix}." if prefix else ""
        if heads:
            groups += _factored_attention(prefix, module, metric)
            groups += _multihead_attention(prefix, module, metric)
            groups += hf_attention(prefix, module, metric)
        if rescaling:
            groups += _relu_units(prefix, module, metric)
            groups += hf_units(prefix, module, metric)
    groups = _drop_claimed(groups, n_declared=len(declared))
    return _complete(model, groups, plain)


def _drop_claimed(groups: list[dict], n_declared: int) -> list[dict]:
    """Detected groups overlapping an earlier group are dropped (declared groups win; the
    O(d) group of ``residual=True`` claims whole models before the heads are seen)."""
    claimed: set[int] = set()
    kept = []
    for index, group in enumerate(groups):
        ids = {id(p) for p in group["params"]}
        if ids & claimed:
            if index < n_declared:
                raise ValueError(f"declared group {group.get('name', index)} overlaps another")
            continue
        claimed |= ids
        kept.append(group)
    return kept


def _complete(model: nn.Module, groups: list[dict], plain: bool) -> list[dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for group in groups:
        for p in group["params"]:
            label = names.get(id(p), "<a tensor that is not a parameter of the model>")
            if id(p) in seen:
                raise ValueError(f"parameter {label} is in both {seen[id(p)]} and {group['name']}")
            seen[id(p)] = group.get("name", "?")
    rest = [p for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if rest and not plain:
        missing = ", ".join(names[id(p)] for p in rest)
        raise ValueError(f"parameters not covered by any symmetry group: {missing}")
    if rest:
        groups.append({"params": rest, "name": "plain"})
    return groups


# ---- acting on a model ----------------------------------------------------------------------


def group_point(group: dict) -> tuple[torch.Tensor, ...]:
    """The bundle point of a group (views of the parameters where the layout allows)."""
    layout = group.get("layout")
    params = list(group["params"])
    return tuple(layout(params)) if layout is not None else tuple(params)


def _write_point(group: dict, point: Sequence[torch.Tensor]) -> None:
    layout = group.get("layout")
    if getattr(layout, "needs_scatter", False):
        layout.scatter(list(group["params"]), tuple(point))
    else:
        for target, value in zip(group_point(group), point):
            target.copy_(value)


@torch.no_grad()
def gauge_transform(
    model: nn.Module, groups: Sequence[dict], generator=None, condition: float = 10.0
) -> dict:
    """Apply a random element of every bundle group's group to the model, in place.

    Returns ``{group name: group element}``. Elements of non-compact groups have condition
    number ``condition``.
    """
    del model  # the groups hold the model's own parameters
    applied = {}
    for group in groups:
        bundle = group.get("bundle")
        if bundle is None:
            continue
        point = group_point(group)
        g = bundle.random_group_element(
            generator=generator, dtype=point[0].dtype, device=point[0].device, condition=condition
        )
        _write_point(group, bundle.act(point, g))
        applied[group["name"]] = g
    return applied


def _outputs(model, inputs, kwargs):
    out = model(*inputs, **kwargs)
    return out if isinstance(out, tuple) else (out,)


@torch.no_grad()
def verify(
    model: nn.Module,
    groups: Sequence[dict],
    *inputs,
    generator=None,
    condition: float = 10.0,
    trials: int = 1,
    **kwargs,
) -> dict[str, float]:
    """Largest relative output change per group under random group elements.

    Works on a deep copy: the model itself is left untouched. Returns ``{group name: change}``;
    a true symmetry gives round-off (≈1e-15 in float64, ≈1e-6 in float32).
    """
    twin = copy.deepcopy(model)
    twin_params = dict(twin.named_parameters())
    by_id = {id(p): twin_params[n] for n, p in model.named_parameters()}
    reference = _outputs(twin, inputs, kwargs)
    scale = torch.sqrt(sum((r.double() ** 2).sum() for r in reference))
    changes = {}
    for group in groups:
        if group.get("bundle") is None:
            continue
        twin_group = dict(group, params=[by_id[id(p)] for p in group["params"]])
        saved = [p.detach().clone() for p in twin_group["params"]]
        worst = 0.0
        for _ in range(trials):
            gauge_transform(twin, [twin_group], generator=generator, condition=condition)
            moved = _outputs(twin, inputs, kwargs)
            diff = torch.sqrt(
                sum(((a.double() - b.double()) ** 2).sum() for a, b in zip(moved, reference))
            )
            worst = max(worst, float(diff / scale.clamp_min(1e-300)))
            for p, s in zip(twin_group["params"], saved):
                p.copy_(s)
        changes[group["name"]] = worst
    return changes
