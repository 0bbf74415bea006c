r"""Hugging Face ``transformers`` models: their head and unit symmetries, found by structure.

Optional extra ``hf``. This module never imports ``transformers``: it reads module *structure* —
which linear maps a module holds under which role names, their shapes, the head counts the module
or its config states — and proposes candidate groups (``quotopt.groups.candidates.Slot``);
``quotopt.symmetries`` keeps each candidate only once it verifies numerically on a float64 copy
of the module. One description covers the families:

* **separate projections** q/k/v/o (names ``q_proj|query|q|q_lin``, ``k_proj|key|k|k_lin``,
  ``v_proj|value|v|v_lin``, ``o_proj|out_proj|o|out_lin|dense|c_proj``, children or grandchildren
  — BERT's ``self.query`` and ``output.dense``): BERT, RoBERTa, DistilBERT, ViT, OPT, BART, T5,
  Whisper, Gemma, Phi, GPT-J, LLaMA/Mistral/Qwen2, cross-attention of encoder–decoders;
* **fused** q/k/v (``query_key_value|qkv_proj|c_attn|Wqkv``, ``nn.Linear`` or GPT-2's transposed
  ``Conv1D``) in either order the families use — blocks [Q | K | V] (Phi-3, GPT-BigCode, GPT-2,
  Falcon multi-query) or per key/value group [q₁ … q_n, k, v] (GPT-NeoX, BLOOM, Falcon's new
  architecture) — the one that verifies is kept;
* **grouped/multi-query** attention: query heads h = j·n_rep … (j+1)·n_rep − 1 share key/value
  head j, so they share its g: the query factor stacks them along its rows (n_kv, n_rep·d, r), the
  output factor puts their blocks side by side (n_kv, r, n_rep·d);
* **RoPE**: full GL(r) does not commute with the rotations; the commutant (one complex scalar per
  rotary plane, ``manifolds.RotaryQK``, pairing ``half`` or ``interleaved``) is tried next.
  Partial rotary (``rotary_ndims``, ``rotary_dim``, ``partial_rotary_factor``): the commutant of
  rotations on the first k coordinates only, RoPE's there and GL(r − k) on the rest (a
  ``ProductBundle`` on the two parts of each head). QK-norm with per-coordinate gains leaves
  only sign flips on the query/key pair (reported); the value/output pair keeps GL(r);
* **MLPs**: two-layer (``fc1/fc2``, ``lin1/lin2``, ``wi/wo``, ``c_fc/c_proj``,
  ``dense_h_to_4h/dense_4h_to_h``, ``fc_in/fc_out``, ``intermediate.dense/output.dense``) offered
  positive rescaling, which verifies for ReLU (OPT, T5) and is rejected for GELU/SiLU (ReLU²,
  degree-2 homogeneous, needs the (s, s⁻²) rescaling: ``quotopt.groups.detectors.mlp``); gated
  (``gate_proj/up_proj/down_proj``, ``wi_0/wi_1/wo``, ``w1/w3/w2``, fused ``gate_up_proj``):
  rescaling of (up row j, down column j), exact whatever the activation; **mixture-of-experts**
  experts stored as (E, 2m, d) / (E, d, m) tensors: the same per expert and unit;
* **by structure**, where no role name matches, in modules whose class name says attention or
  MLP: projections read by shape in registration order (ModernBERT's ``Wqkv``/``Wo`` and
  ``Wi``/``Wo``, DeBERTa-v2's ``query_proj`` … ``output.dense``), kept only if they verify.

Biases by role: a query or value bias is the last row of its factor, a key bias is frozen
(no RoPE) or a row of the key factor (RoPE), see ``quotopt.groups.detectors.heads``.

``example_inputs(model)`` (``quotopt.groups.detectors.hf_inputs``) builds the inputs the
detection probes the model with, from its config; ``float64_fix(module)`` names the known fix
where a module's float64 copy does not run.
"""

from __future__ import annotations

import torch
from torch import nn

import manifolds as M

from ..candidates import Option, Request, Slot
from ..layouts import ProjectionHeads, Rows
from ..layouts import feature_blocks as blocks
from .heads import head_options
from .mlp import conv1d, in_features, linears, looks_like, mlp_slots, out_features, projection

__all__ = ["attention_slots", "float64_fix", "hf_slots"]

Q, K, V = (
    ("q_proj", "query", "q", "q_lin"),
    ("k_proj", "key", "k", "k_lin"),
    ("v_proj", "value", "v", "v_lin"),
)
O = ("o_proj", "out_proj", "o", "out_lin", "dense", "c_proj")
FUSED = ("query_key_value", "qkv_proj", "c_attn", "Wqkv")
QK_NORMS = ("q_norm", "k_norm", "q_layernorm", "k_layernorm", "query_layernorm")


def _attr(objects, names):
    for obj in objects:
        for name in names:
            value = getattr(obj, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _sizes(module, q_out, hidden):
    owners = [module, *module.children()]
    where = owners + [c for c in (getattr(m, "config", None) for m in owners) if c is not None]
    n_heads = _attr(where, ("num_heads", "num_attention_heads", "n_heads", "n_head"))
    r = _attr(where, ("head_dim", "head_size", "attention_head_size", "key_value_proj_dim"))
    if n_heads is None:
        return None
    r = r or (hidden // n_heads)
    n_kv = _attr(where, ("num_key_value_heads", "num_kv_heads", "n_head_kv"))
    return n_heads, r, n_kv


def rotary_dims(module, r: int) -> int | None:
    """How many of a head's r coordinates RoPE rotates, where the module or its config says it
    rotates fewer than r (``rotary_ndims``, ``rotary_dim``, ``partial_rotary_factor``)."""
    config = getattr(module, "config", None)
    rope = getattr(config, "rope_parameters", None)
    factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    factor = factor or getattr(config, "partial_rotary_factor", None)
    rot = getattr(module, "rotary_ndims", None) or getattr(module, "rotary_dim", None)
    rot = rot or getattr(config, "rotary_dim", None)
    if not rot and factor is not None and factor < 1:
        rot = int(r * factor)
    return rot if isinstance(rot, int) and 0 < rot < r else None


def _qk_note(module) -> str:
    norms = [n for n in QK_NORMS if getattr(module, n, None) is not None]
    if norms:
        return f"QK-norm ({', '.join(norms)}) with per-coordinate gains: only sign flips survive"
    return "no query/key group verified"


def _separate(path, module, metric, proj) -> list[Slot]:
    (qn, q), (kn, k), (vn, v), (on, o) = proj
    d, conv = (q.weight.shape[0] if conv1d(q) else q.weight.shape[1]), conv1d(q)
    sizes = _sizes(module, out_features(q), d)
    if sizes is None:
        return []
    n_heads, r, _ = sizes
    if out_features(q) != n_heads * r or out_features(k) % r or out_features(k) != out_features(v):
        return []
    n_kv = out_features(k) // r
    if n_heads % n_kv:
        return []
    n_rep, family = n_heads // n_kv, f"separate q/k/v ({qn}, {kn}, {vn}, {on})"
    if n_kv != n_heads:
        family += f", {n_heads} query / {n_kv} key heads"
    qb, kb, vb = (x.bias is not None for x in (q, k, v))
    q_params = [q.weight] + ([q.bias] if qb else [])
    q_spec = Rows(0, blocks(0, n_kv, n_rep, r), bias=1 if qb else None, transposed=conv)
    k_pos = len(q_params)
    k_plain = Rows(k_pos, blocks(0, n_kv, 1, r), transposed=conv)
    k_rot = Rows(k_pos, blocks(0, n_kv, 1, r), bias=k_pos + 1, transposed=conv) if kb else None
    rows_q = n_rep * (d + int(qb))
    frozen = ((f"{path}{kn}.bias", k.bias),) if kb else ()
    qk = head_options(
        f"{path}qk", q_params + [k.weight], (q_spec, k_plain), (n_kv, rows_q, r, d), metric, frozen
    )
    rot_params = q_params + [k.weight] + ([k.bias] if kb else [])
    qk += head_options(
        f"{path}qk",
        rot_params,
        (q_spec, k_plain, k_rot),
        (n_kv, rows_q, r, d),
        metric,
        rotary=("half", "interleaved"),
        partial=rotary_dims(module, r),
    )[1:]
    v_params = [v.weight] + ([v.bias] if vb else [])
    v_spec = Rows(0, blocks(0, n_kv, 1, r), bias=1 if vb else None, transposed=conv)
    o_spec = Rows(len(v_params), blocks(0, n_kv, n_rep, r), transposed=not conv1d(o), writes=True)
    d_out = o.weight.shape[1] if conv1d(o) else o.weight.shape[0]
    ov = M.HeadOV(n_kv, d + int(vb), r, metric, factor_rows=(d + int(vb), n_rep * d_out))
    ov_group = {
        "params": v_params + [o.weight],
        "bundle": ov,
        "name": f"{path}ov",
        "layout": ProjectionHeads([v_spec, o_spec], "value/output heads"),
    }
    return [
        Slot(module, path, "attention", "qk", qk, note=_qk_note(module), family=family),
        Slot(module, path, "attention", "ov", [Option(ov_group, "GL(r) per head")], family=family),
    ]


def _fused_orders(n_heads, n_kv, r):
    """(name, q index, k index, v index) of each fused order, features of (H + 2·n_kv)·r."""
    n_rep = n_heads // n_kv
    width = (n_rep + 2) * r
    orders = [
        (
            "blocks [Q|K|V]",
            blocks(0, n_kv, n_rep, r),
            blocks(n_heads * r, n_kv, 1, r),
            blocks((n_heads + n_kv) * r, n_kv, 1, r),
        )
    ]
    if n_kv > 1:
        orders.append(
            (
                "per group [q..q,k,v]",
                blocks(0, n_kv, n_rep, r, width),
                blocks(n_rep * r, n_kv, 1, r, width),
                blocks((n_rep + 1) * r, n_kv, 1, r, width),
            )
        )
    if n_kv == n_heads and n_heads % 4 == 0:  # CodeGen: 4 model-parallel blocks [q | v | k]
        local = n_heads // 4 * r
        start = lambda off: (  # noqa: E731
            (torch.arange(n_heads) // (n_heads // 4) * 3 * local).view(-1, 1, 1)
            + (torch.arange(n_heads) % (n_heads // 4) * r).view(-1, 1, 1)
            + off
            + torch.arange(r).view(1, 1, -1)
        )
        orders.append(("4 blocks [q|v|k] (CodeGen)", start(0), start(2 * local), start(local)))
    return orders


def _fused(path, module, metric, fused, out) -> list[Slot]:
    (fn, qkv), (on, o) = fused, out
    conv = conv1d(qkv)
    d = qkv.weight.shape[0] if conv else qkv.weight.shape[1]
    sizes = _sizes(module, None, d)
    if sizes is None:
        return []
    n_heads, r, n_kv = sizes
    total = out_features(qkv)
    n_kv = n_kv or (total // r - n_heads) // 2
    if total != (n_heads + 2 * n_kv) * r or n_heads % n_kv:
        return []
    n_rep, has_bias = n_heads // n_kv, qkv.bias is not None
    base = [qkv.weight] + ([qkv.bias] if has_bias else [])
    b = 1 if has_bias else None
    family = f"fused q/k/v ({fn}, {on})" + (f", {n_heads}/{n_kv} heads" if n_rep > 1 else "")
    qk, ov = [], []
    d_out = o.weight.shape[1] if conv1d(o) else o.weight.shape[0]
    rows = d + int(has_bias)
    for order, qi, ki, vi in _fused_orders(n_heads, n_kv, r):
        q_spec = Rows(0, qi, bias=b, transposed=conv)
        k_plain, k_rot = Rows(0, ki, transposed=conv), Rows(0, ki, bias=b, transposed=conv)
        for option in head_options(
            f"{path}qk",
            base,
            (q_spec, k_plain, k_rot if b else None),
            (n_kv, n_rep * rows, r, d),
            metric,
            rotary=("half", "interleaved"),
            partial=rotary_dims(module, r),
        ):
            option.structure += f", {order}"
            qk.append(option)
        o_spec = Rows(len(base), blocks(0, n_kv, n_rep, r), transposed=not conv1d(o), writes=True)
        layout = ProjectionHeads([Rows(0, vi, bias=b, transposed=conv), o_spec], "value/output")
        bundle = M.HeadOV(n_kv, rows, r, metric, factor_rows=(rows, n_rep * d_out))
        group = {
            "params": base + [o.weight],
            "bundle": bundle,
            "layout": layout,
            "name": f"{path}ov",
        }
        ov.append(Option(group, f"GL(r) per head, {order}"))
    compose = f"{path}heads"
    return [
        Slot(
            module,
            path,
            "attention",
            "qk",
            qk,
            note=_qk_note(module),
            family=family,
            compose=compose,
        ),
        Slot(module, path, "attention", "ov", ov, family=family, compose=compose),
    ]


def _roles_by_structure(module: nn.Module):
    """(fused, out) or (q, k, v, out) of an attention-named module whose projections have no
    known role names, from their shapes in registration order: two projections, the first wider
    than the second's input (fused q/k/v, output), or four, the key and value of one shape and
    the output reading what the query writes; None otherwise."""
    found = linears(module)
    if len(found) == 2:
        (_, qkv), (_, o) = found
        return found if out_features(qkv) > in_features(o) else None
    if len(found) == 4:
        (_, q), (_, k), (_, v), (_, o) = found
        if k.weight.shape == v.weight.shape and out_features(q) == in_features(o):
            return found
    return None


def attention_slots(path: str, module: nn.Module, metric: str) -> list[Slot]:
    """The query/key and value/output slots of an attention module found by role names, else
    by structure where its class name says attention (``_roles_by_structure``)."""
    out, fused = projection(module, O), projection(module, FUSED)
    found = [projection(module, names) for names in (Q, K, V)]
    if out is not None and fused is not None and fused[0] != out[0]:
        return _fused(path, module, metric, fused, out)
    if out is not None and None not in found and len({p for p, _ in found + [out]}) == 4:
        return _separate(path, module, metric, (*found, out))
    roles = _roles_by_structure(module) if looks_like(module, "attention") else None
    if roles is None:
        return []
    slots = (_fused if len(roles) == 2 else _separate)(path, module, metric, *_split(roles))
    for slot in slots:
        slot.family += ", by structure"
    return slots


def _split(roles):
    return (roles[0], roles[1]) if len(roles) == 2 else (tuple(roles[:4]),)


def hf_slots(path: str, module: nn.Module, request: Request) -> list[Slot]:
    """Attention and MLP slots of one module (``path`` ends with a dot); [] if none."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return []
    found = attention_slots(path, module, request.metric) if request.heads else []
    return found + (mlp_slots(path, module, request.metric) if request.rescaling else [])


def float64_fix(module: nn.Module) -> str:
    """The known fix where a Hugging Face module's float64 copy does not run, or ''."""
    for sub in module.modules():
        implementation = getattr(getattr(sub, "config", None), "_experts_implementation", None)
        if isinstance(implementation, str) and implementation != "eager":
            return (
                f"its experts run as {implementation}, which has no float64 kernel: build or load "
                'the model with experts_implementation="eager" (the same function, per expert)'
            )
    return ""
