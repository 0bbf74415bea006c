r"""Candidate symmetries of modules quotopt does not own, proposed by structure.

A detector returns ``Slot``\ s: one per (module, part) — a head's query/key pair, its value/output
pair, an MLP's units — each with ``Option``\ s in order of preference (the most general group
first: full GL(r) before the RoPE commutant). ``quotopt.symmetries`` keeps, per slot, the first
option that ``quotopt.checks.check_in_module`` verifies, so a structure that matches by shape but
not by function (a GELU MLP offered rescaling, RoPE offered full GL(r)) is rejected and reported,
never returned.

Biases by role (``docs/theory/bundles.md``): a query or value bias is the last row of its factor;
a key bias is not a coordinate when the scores have no RoPE — it adds q·b_k to every score of a
query, which softmax removes — so an option lists it in ``frozen`` (its own group, ``lr = 0``, no
decay) or, inside a fused bias, leaves it out of the point. Under RoPE the key bias is rotated by
the key's position and matters: then it is a row of the key factor.

This module knows ``torch.nn``'s own layers; ``quotopt.hf`` and ``quotopt.lora`` add theirs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

import manifolds as M

from .layouts import ComposedLayout, MultiheadAttentionHeads, ProjectionHeads, Rows, UnitsOfLinear
from .layouts import feature_blocks as blocks

__all__ = ["Option", "Slot", "compose_groups", "torch_slots", "coordinates_of"]


@dataclass
class Option:
    """A candidate group (``params``, ``bundle``, ``layout``, ``name``), what it assumes, and the
    key-bias parameters to freeze if it is accepted."""

    group: dict
    structure: str
    frozen: tuple = ()


@dataclass
class Slot:
    """Where a symmetry may be: ``module`` (the smallest module holding every option's
    parameters, run to verify), its ``path``, ``kind`` (attention, mlp, experts, lora), ``part``
    (qk, ov, units, adapters), ``options``; ``probe(generator) -> (args, kwargs)`` calls the
    module on its own (else a call recorded from the model is used, else ``fallback``); ``note``
    explains a slot without options or whose options all fail; ``compose`` names the group that
    accepted slots of one module sharing tensors become; ``params`` are the tensors a slot
    without options concerns (no enclosing module proposes them again)."""

    module: nn.Module
    path: str
    kind: str
    part: str
    options: list[Option] = field(default_factory=list)
    probe: Callable | None = None
    fallback: Callable | None = None
    note: str = ""
    family: str = ""
    compose: str = ""
    params: tuple = ()


def head_options(name, params, specs_qk, bundle_args, metric, frozen=(), rotary=(), partial=None):
    """Options of a query/key slot, the larger group first: full GL(r) (``HeadQK``); with
    ``partial`` = k rotary coordinates of r, the commutant of rotations on the first k only —
    RoPE's on those, GL(r − k) on the rest (a ``ProductBundle``); then the RoPE commutant on all
    r, for each pairing in ``rotary``. Under RoPE the key bias is a row (``specs_qk`` is (q, k
    without bias, k with bias))."""
    n, rows_a, r, rows_b = bundle_args
    (q_spec, k_plain), k_rotary = specs_qk[:2], specs_qk[2] if len(specs_qk) > 2 else None
    options = [
        Option(
            {
                "params": params,
                "bundle": M.HeadQK(n, rows_a, r, metric, factor_rows=(rows_a, rows_b)),
                "layout": ProjectionHeads([q_spec, k_plain], "query/key heads"),
                "name": name,
            },
            "GL(r) per head",
            frozen,
        )
    ]
    k_spec, rows_k = (k_rotary, rows_b + 1) if k_rotary is not None else (k_plain, rows_b)
    full = []
    for pairing in rotary if r % 2 == 0 else ():
        bundle = M.RotaryQK(n, rows_a, r, metric, pairing=pairing, factor_rows=(rows_a, rows_k))
        layout = ProjectionHeads([q_spec, k_spec], f"query/key heads, RoPE {pairing}")
        full.append(
            Option(
                {"params": params, "bundle": bundle, "layout": layout, "name": name},
                f"RoPE commutant ({pairing})",
            )
        )
    if partial is not None and 0 < partial < r and partial % 2 == 0:

        def cut(spec: Rows, rotated: bool) -> Rows:  # the rotated or the passed coordinates
            return replace(
                spec, index=spec.index[..., :partial] if rotated else spec.index[..., partial:]
            )

        for pairing in rotary:
            rope = M.RotaryQK(n, rows_a, partial, metric, pairing=pairing,
                              factor_rows=(rows_a, rows_k))  # fmt: skip
            rest = M.HeadQK(n, rows_a, r - partial, metric, factor_rows=(rows_a, rows_b))
            specs = [cut(q_spec, True), cut(k_spec, True), cut(q_spec, False), cut(k_plain, False)]
            layout = ProjectionHeads(specs, f"query/key heads, partial RoPE {pairing}")
            options.append(
                Option(
                    {
                        "params": params,
                        "bundle": M.ProductBundle([rope, rest]),
                        "layout": layout,
                        "name": name,
                    },  # fmt: skip
                    f"partial RoPE commutant ({pairing} on {partial} of {r}) x GL({r - partial})",
                )
            )
    return options + full  # the larger group first: GL(r), partial commutant, (C*)^(r/2)


def _mha_probe(module: nn.MultiheadAttention):
    def probe(generator):
        shape = lambda d: (2, 5, d) if module.batch_first else (5, 2, d)  # noqa: E731
        dtype = module.out_proj.weight.dtype
        q, k, v = (
            torch.randn(shape(d), generator=generator, dtype=dtype)
            for d in (module.embed_dim, module.kdim, module.vdim)
        )
        return (q, k, v), {"need_weights": True}

    return probe


def _multihead_attention(path, module, metric) -> list[Slot]:
    e, h = module.embed_dim, module.num_heads
    r = e // h
    probe = _mha_probe(module)
    if module.bias_k is not None:
        note = "add_bias_kv adds learned key/value tokens that no head layout holds; declare it"
        return [Slot(module, path, "attention", "heads", probe=probe, note=note)]
    has_bias = module.in_proj_bias is not None
    b = 1 if has_bias else None
    if module._qkv_same_embed_dim:
        params = [module.in_proj_weight] + ([module.in_proj_bias] if has_bias else [])
        params.append(module.out_proj.weight)
        layout = MultiheadAttentionHeads(e, h, has_bias)
        qk = M.HeadQK(h, e + int(has_bias), r, metric, factor_rows=(e + int(has_bias), e))
        ov = M.HeadOV(h, e + int(has_bias), r, metric, factor_rows=(e + int(has_bias), e))
        group = {
            "params": params,
            "bundle": M.ProductBundle([qk, ov]),
            "layout": layout,
            "name": f"{path}heads",
        }
        return [
            Slot(
                module,
                path,
                "attention",
                "heads",
                [Option(group, "GL(r) per head")],
                probe,
                family="nn.MultiheadAttention, packed q/k/v",
            )
        ]
    # separate q/k/v weights (kdim or vdim != embed_dim); biases stay packed in in_proj_bias
    bias = [module.in_proj_bias] if has_bias else []
    qw, kw, vw = module.q_proj_weight, module.k_proj_weight, module.v_proj_weight
    specs = [Rows(0, blocks(0, h, 1, r), bias=b), Rows(1 + len(bias), blocks(0, h, 1, r))]
    qk_params = [qw, *bias, kw]
    qk = head_options(f"{path}qk", qk_params, specs, (h, e + len(bias), r, module.kdim), metric)
    v_spec = Rows(0, blocks(0, h, 1, r), bias=b, bias_index=blocks(2 * e, h, 1, r))
    o_spec = Rows(1 + len(bias), blocks(0, h, 1, r), transposed=True, writes=True)
    ov = M.HeadOV(h, module.vdim + len(bias), r, metric, factor_rows=(module.vdim + len(bias), e))
    ov_group = {
        "params": [vw, *bias, module.out_proj.weight],
        "bundle": ov,
        "layout": ProjectionHeads([v_spec, o_spec], "value/output heads"),
        "name": f"{path}ov",
    }
    family = "nn.MultiheadAttention, separate q/k/v (kdim/vdim)"
    return [
        Slot(module, path, "attention", "qk", qk, probe, family=family, compose=f"{path}heads"),
        Slot(
            module,
            path,
            "attention",
            "ov",
            [Option(ov_group, "GL(r) per head")],
            probe,
            family=family,
            compose=f"{path}heads",
        ),
    ]


def _layer_probe(module):
    def probe(generator):
        d = module.linear1.in_features
        dtype = module.linear1.weight.dtype
        shape = (2, 5, d) if getattr(module.self_attn, "batch_first", False) else (5, 2, d)
        x = torch.randn(shape, generator=generator, dtype=dtype)
        if isinstance(module, nn.TransformerDecoderLayer):
            return (x, torch.randn(shape, generator=generator, dtype=dtype)), {}
        return (x,), {}

    return probe


def _layer_units(path, module, metric) -> list[Slot]:
    lin1, lin2 = module.linear1, module.linear2
    act = module.activation
    name = getattr(act, "__name__", type(act).__name__)
    slot = Slot(
        module,
        path,
        "mlp",
        "units",
        probe=_layer_probe(module),
        family=f"linear1/linear2, activation {name}",
    )
    if act is not F.relu and not isinstance(act, nn.ReLU):
        slot.note = f"activation {name} is not positively homogeneous: no rescaling"
        return [slot]
    bias = lin1.bias is not None
    params = [lin1.weight] + ([lin1.bias] if bias else []) + [lin2.weight]
    m, d = lin1.weight.shape
    bundle = M.PositiveRescaling(m, d + int(bias), lin2.weight.shape[0], metric)
    group = {
        "params": params,
        "bundle": bundle,
        "layout": UnitsOfLinear(bias),
        "name": f"{path}units",
    }
    slot.options.append(Option(group, "positive rescaling per unit"))
    return [slot]


def torch_slots(path: str, module: nn.Module, metric: str, heads=True, rescaling=True):
    """Slots of ``torch.nn``'s attention and encoder/decoder layers (``path`` ends with a dot)."""
    if heads and isinstance(module, nn.MultiheadAttention):
        return _multihead_attention(path, module, metric)
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    if rescaling and isinstance(module, layers):
        return _layer_units(path, module, metric)
    return []


# ---- groups that share tensors ---------------------------------------------------------------
def coordinates_of(group: dict, ids: dict[int, torch.Tensor]) -> set[int]:
    """The entries of shared tensors that ``group``'s layout selects, as global integer labels:
    the layout is applied to label tensors (a layout only selects and reorders entries)."""
    labels = [
        ids.get(id(p), torch.full(p.shape, -1.0, dtype=torch.float64)) for p in group["params"]
    ]
    layout = group.get("layout")
    point = layout(labels) if layout is not None else labels
    values = torch.cat([t.reshape(-1) for t in point]).long().tolist()
    return {v for v in values if v >= 0}


def _label_tensors(shared: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    out, start = {}, 0
    for p in shared:
        out[id(p)] = torch.arange(start, start + p.numel(), dtype=torch.float64).view(p.shape)
        start += p.numel()
    return out


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
        labels = _label_tensors(shared)
        kept, taken = [], set()
        for g in members:
            coords = coordinates_of(g, labels)
            if coords & taken:
                other = next(k["name"] for k in kept if coordinates_of(k, labels) & coords)
                tensor = next(
                    names.get(id(p), "?") for p in shared if any(q is p for q in g["params"])
                )
                reason = (
                    f"declared group {g['name']} overlaps another ({other}) on the same "
                    f"entries of {tensor}"
                )
                if refuse:
                    raise ValueError(
                        f"{reason}: two groups may share a tensor only on disjoint entries; "
                        "declare one bundle for both (their joint group), or give each group "
                        "the entries it acts on through its layout"
                    )
                dropped.append((g, reason))
                continue
            taken |= coords
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
