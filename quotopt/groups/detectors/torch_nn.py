r"""Candidate symmetries of ``torch.nn``'s own layers: ``nn.MultiheadAttention`` (GL(r) per
head, packed or separate projections) and the units of ``nn.TransformerEncoderLayer`` /
``nn.TransformerDecoderLayer`` (positive rescaling where the activation is ReLU).

Biases by role (``docs/theory/bundles.md``): a query or value bias is the last row of its
factor; the key bias inside the packed bias is not a coordinate (``quotopt.groups.detectors.
heads``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import manifolds as M

from ..candidates import Option, Request, Slot
from ..layouts import MultiheadAttentionHeads, ProjectionHeads, Rows, UnitsOfLinear
from ..layouts import feature_blocks as blocks
from .heads import head_options

__all__ = ["torch_slots"]


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


def torch_slots(path: str, module: nn.Module, request: Request) -> list[Slot]:
    """Slots of ``torch.nn``'s attention and encoder/decoder layers (``path`` ends with a dot)."""
    if request.heads and isinstance(module, nn.MultiheadAttention):
        return _multihead_attention(path, module, request.metric)
    layers = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)
    if request.rescaling and isinstance(module, layers):
        return _layer_units(path, module, request.metric)
    return []
