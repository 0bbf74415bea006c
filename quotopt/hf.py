r"""Hugging Face ``transformers`` models: their parameter symmetries as quotopt param groups.

Optional extra ``hf`` (``pip install quotopt[hf]``). This module never imports ``transformers``:
it recognises the library's modules by class name, so importing it (and calling its detectors
on other models) costs nothing. ``symmetries_hf(model)`` is ``quotopt.symmetries(model)`` with
these detectors added; ``hf_attention`` and ``hf_units`` have the signature of the detectors in
``quotopt.symmetries``, ``(prefix, module, metric) -> list[group dict]``.

What is detected (float64 checks in ``tests/test_hf.py``: logits unchanged to round-off):

* **GPT-2** (``GPT2Attention``): one fused ``c_attn`` ``Conv1D`` (weight (d, 3d), y = x W + b)
  holds q, k and v; ``c_proj`` (d, d) reads the concatenated heads. Per head GL(r) on
  (W_q, W_k) and on (W_v, W_o), the query and value biases folded in as one more row of their
  input factors ([W; b] acts on [x, 1]). A tensor may sit in one optimiser group only, so the
  layer is ONE group, ``ProductBundle([HeadQK, HeadOV])`` (layout ``Conv1DHeads``;
  ``c_proj.bias`` is written into the residual stream and stays plain).
  The key bias b_k is left out of the point (``Conv1DHeads(..., key_bias=False)``): it enters
  the scores only as q·b_k, the same for every key, which the softmax ignores — it has no effect
  on the output and its gradient is identically zero, so the action may leave it alone (still
  an exact symmetry). Folded into W_k, it is a flat row inside the GL(r) bundle: per-row Adam
  moments blow its round-off-level gradient up to O(1) steps, and ``QuotientAdam`` with
  ``metric="invariant"`` diverged within 3–7 steps at lr 1e-3 (factors growing ×10³ per step),
  while without it the same run trains. (With RoPE the key bias is rotated by the key's
  position and matters, so the LLaMA-family layouts fold it.)
* **LLaMA family** (``LlamaAttention``, ``MistralAttention``, ``Qwen2Attention``): separate
  ``nn.Linear`` q/k/v/o projections (weights (out, in), optional q/k/v biases folded in as rows),
  grouped-query attention (n_rep = n_heads / n_kv query heads share one key/value head: head h
  uses key/value head h // n_rep) and RoPE in the ``rotate_half`` convention (coordinate i pairs
  with i + r/2). Per key/value head j:

  - Q/K: ``manifolds.RotaryQK`` — RoPE shrinks GL(r) to the commutant of the rotations,
    (C*)^{r/2}; every query head of the group must use the same g (the key is shared), so A
    stacks the group's query heads along its rows, A = [W_q,h₁; W_q,h₂; …] (n_kv, n_rep·d, r),
    B = W_k (n_kv, d, r) (layout ``GroupedQueryKey``);
  - V/O: ``manifolds.HeadOV`` with full GL(r) (RoPE does not touch values): W_v (n_kv, d, r)
    gets g, and the n_rep output blocks W_o,h (r, d) of the group's query heads all get g⁻¹,
    stacked as W_o (n_kv, r, n_rep·d) (layout ``GroupedValueOutput``).

  With n_rep > 1 (or biases) the stacked coordinates are copies that the layouts scatter back.
* **Gated MLPs** (``LlamaMLP``, ``MistralMLP``, ``Qwen2MLP``): down(act(gate(x)) ⊙ up(x)) is
  unchanged by (up row j × s, down column j / s) for any s ≠ 0, whatever the activation: a
  ``PositiveRescaling`` group (its identity component s > 0) on ``up_proj``/``down_proj``
  (``gate_proj`` stays plain).

What is not reduced, and why:

* **GPT-2's MLP** uses GELU: no rescaling symmetry.
* **Norms.** LayerNorm's centering breaks O(d) of the residual stream down to the stabiliser of
  the all-ones vector, O(d-1). RMSNorm (LLaMA) keeps all of O(d), and neither norm's gains γ
  remove what is left: with D = diag(γ) of the norm feeding a weight, x ↦ xR on the stream
  together with W ↦ W·D R D⁻¹ on the ``nn.Linear`` weights that read the norm (and the LayerNorm
  bias β ↦ β D⁻¹RD) is exact — but that action is not orthogonal on those weights, so it is not
  ``manifolds.ResidualRotation``. Folding the gains into the next weights (W ← W D, γ ← 1; for
  the final norm, into an *untied* lm_head) is a reparametrisation that changes parameters;
  after it, O(d) (RMSNorm) or O(d-1) (LayerNorm) acts by plain rotation of every tensor's
  model-space axis (SliceGPT's computational invariance). With tied embeddings and a
  non-constant final gain only the rotations commuting with D survive (generically a finite
  group). Either way that group acts jointly with the heads' GL(r) on q/k/v/o — the joint
  reduction quotopt does not implement — so norms are left as they are, in the plain group.
  (Likewise the diagonal rescaling γⱼ ↦ γⱼsⱼ, W[:, j] ↦ W[:, j]/sⱼ between a gain and the
  weights reading it is exact but overlaps the head groups.)
* Cross-attention GPT-2 blocks, partial rotary embeddings and q/k norms (Qwen3, OLMo-2) are not
  recognised: their parameters stay in the plain group.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

import manifolds as M
from manifolds.rotary import RotaryQK

from .layouts import Layout, UnitsOfLinear, _linear_rows_as_heads

__all__ = [
    "Conv1DHeads",
    "GroupedQueryKey",
    "GroupedValueOutput",
    "ROTARY_ATTENTION",
    "GATED_MLP",
    "hf_attention",
    "hf_units",
    "symmetries_hf",
]

#: Attention classes with separate q/k/v/o ``nn.Linear`` projections and full-width RoPE, by
#: class name, with the RoPE pairing they use (``"half"``: HF's ``rotate_half``).
ROTARY_ATTENTION = {"LlamaAttention": "half", "MistralAttention": "half", "Qwen2Attention": "half"}
#: Gated MLPs down(act(gate(x)) * up(x)) with ``nn.Linear`` projections, by class name.
GATED_MLP = ("LlamaMLP", "MistralMLP", "Qwen2MLP")
_GPT2_ATTENTION = ("GPT2Attention",)


# ---- layouts ----------------------------------------------------------------------------------
def _with_bias_row(heads: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(H, d, r) factors and a (H·r,) bias → (H, d+1, r) ([W; b] acts on [x, 1]); no bias: as is."""
    if bias is None:
        return heads
    return torch.cat([heads, bias.view(heads.shape[0], 1, -1)], dim=1)


def _write_heads(weight_heads: torch.Tensor, bias: torch.Tensor | None, factor: torch.Tensor):
    """Inverse of ``_with_bias_row``: copy a (H, d[+1], r) factor into its weight view and bias."""
    if bias is None:
        weight_heads.copy_(factor)
        return
    weight_heads.copy_(factor[:, :-1])
    bias.view(factor.shape[0], 1, -1).copy_(factor[:, -1:])


class Conv1DHeads(Layout):
    """GPT-2 attention: params ``[c_attn.weight (d, 3d), c_attn.bias (3d,), c_proj.weight (d, d)]``
    → point (W_q (H, d+1, r), W_k (H, d[+1], r), W_v (H, d+1, r), W_o (H, r, d)) of
    ``ProductBundle([HeadQK, HeadOV])``.

    ``Conv1D`` computes x W + b, so head h of q reads columns h·r:(h+1)·r of the first third of
    ``c_attn.weight``; its bias entries become the last row. The key bias is a row of W_k only
    with ``key_bias=True`` (see the module docstring for why the default leaves it alone). The
    input factors with a bias row are copies (scattered back); W_k without one and W_o are
    views.
    """

    needs_scatter = True

    def __init__(self, embed_dim: int, n_heads: int, key_bias: bool = False):
        self.embed_dim, self.n_heads, self.key_bias = embed_dim, n_heads, key_bias
        self.description = f"E={embed_dim}, H={n_heads}, key_bias={key_bias}"

    def _input_heads(self, weight: torch.Tensor) -> list[torch.Tensor]:
        e, h = self.embed_dim, self.n_heads
        return [weight[:, i * e : (i + 1) * e].view(e, h, -1).transpose(0, 1) for i in range(3)]

    def _biases(self, bias: torch.Tensor) -> list[torch.Tensor | None]:
        """The q, k, v biases that are rows of their factors (k's only with ``key_bias``)."""
        e = self.embed_dim
        thirds = [bias[i * e : (i + 1) * e] for i in range(3)]
        return [thirds[0], thirds[1] if self.key_bias else None, thirds[2]]

    def _out(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.view(self.n_heads, -1, self.embed_dim)  # (H, r, E)

    def gather(self, tensors):
        weight, bias, out = tensors
        inputs = self._input_heads(weight)  # 3 × (H, E, r) views
        factors = [_with_bias_row(w, b) for w, b in zip(inputs, self._biases(bias))]
        return (*factors, self._out(out))

    def scatter(self, params, point) -> None:
        weight, bias, out = params
        for heads, b, factor in zip(self._input_heads(weight), self._biases(bias), point[:3]):
            _write_heads(heads, b, factor)
        self._out(out).copy_(point[3])


class GroupedQueryKey(Layout):
    """Grouped-query Q/K: params ``[q_proj.weight, (q_proj.bias), k_proj.weight, (k_proj.bias)]``
    → point (A (n_kv, n_rep·(d[+1]), r), B (n_kv, d[+1], r)) of ``RotaryQK``.

    A stacks the query heads h = j·n_rep, …, (j+1)·n_rep − 1 of key head j along its rows. Views
    when n_rep = 1 and there is no bias; otherwise copies, written back by ``scatter``.
    """

    def __init__(self, n_heads: int, n_kv: int, has_bias: bool):
        self.n_heads, self.n_kv, self.has_bias = n_heads, n_kv, has_bias
        self.needs_scatter = has_bias or n_heads != n_kv
        self.description = f"H={n_heads}, H_kv={n_kv}, bias={has_bias}"

    def _split(self, tensors):
        """(q weight, q bias | None, k weight, k bias | None)."""
        if self.has_bias:
            return tuple(tensors)
        q, k = tensors
        return q, None, k, None

    def gather(self, tensors):
        q, q_bias, k, k_bias = self._split(tensors)
        a = _with_bias_row(_linear_rows_as_heads(q, self.n_heads), q_bias)  # (H, d[+1], r)
        b = _with_bias_row(_linear_rows_as_heads(k, self.n_kv), k_bias)  # (H_kv, d[+1], r)
        return (a.reshape(self.n_kv, -1, a.shape[-1]), b)

    def scatter(self, params, point) -> None:
        q, q_bias, k, k_bias = self._split(params)
        a = point[0].reshape(self.n_heads, -1, point[0].shape[-1])
        _write_heads(_linear_rows_as_heads(q, self.n_heads), q_bias, a)
        _write_heads(_linear_rows_as_heads(k, self.n_kv), k_bias, point[1])


class GroupedValueOutput(Layout):
    """Grouped-query V/O: params ``[v_proj.weight, (v_proj.bias), o_proj.weight (d, H·r)]`` →
    point (W_v (n_kv, d[+1], r), W_o (n_kv, r, n_rep·d)) of ``HeadOV`` with factor rows
    (d[+1], n_rep·d).

    W_o of key/value head j puts the output blocks W_o,h = o_proj.weight[:, h·r:(h+1)·r]ᵀ of its
    query heads side by side. Views when n_rep = 1 and there is no bias.
    """

    def __init__(self, n_heads: int, n_kv: int, has_bias: bool):
        self.n_heads, self.n_kv, self.has_bias = n_heads, n_kv, has_bias
        self.needs_scatter = has_bias or n_heads != n_kv
        self.description = f"H={n_heads}, H_kv={n_kv}, bias={has_bias}"

    def _out_blocks(self, weight: torch.Tensor) -> torch.Tensor:
        d = weight.shape[0]
        n_rep = self.n_heads // self.n_kv
        return weight.view(d, self.n_kv, n_rep, -1).permute(1, 3, 2, 0)  # (H_kv, r, n_rep, d)

    def gather(self, tensors):
        v, *rest = tensors
        v_bias = rest[0] if self.has_bias else None
        wv = _with_bias_row(_linear_rows_as_heads(v, self.n_kv), v_bias)
        blocks = self._out_blocks(rest[-1])
        return (wv, blocks.reshape(self.n_kv, blocks.shape[1], -1))

    def scatter(self, params, point) -> None:
        v, *rest = params
        v_bias = rest[0] if self.has_bias else None
        _write_heads(_linear_rows_as_heads(v, self.n_kv), v_bias, point[0])
        blocks = self._out_blocks(rest[-1])
        blocks.copy_(point[1].view(blocks.shape))


# ---- detectors ----------------------------------------------------------------------------
def _gpt2_attention(prefix: str, module: nn.Module, metric: str) -> list[dict]:
    if getattr(module, "is_cross_attention", False):
        return []
    e, h = module.embed_dim, module.num_heads
    r = e // h
    # the key bias is not a row (see the module docstring); c_proj reads no bias row
    qk = M.HeadQK(h, e + 1, r, metric, factor_rows=(e + 1, e))
    ov = M.HeadOV(h, e + 1, r, metric, factor_rows=(e + 1, e))
    return [
        {
            "params": [module.c_attn.weight, module.c_attn.bias, module.c_proj.weight],
            "bundle": M.ProductBundle([qk, ov]),
            "layout": Conv1DHeads(e, h),
            "name": f"{prefix}heads",
        }
    ]


def _linear(module: nn.Module, name: str) -> nn.Linear | None:
    layer = getattr(module, name, None)
    return layer if isinstance(layer, nn.Linear) else None


def _weight_and_bias(layer: nn.Linear) -> list[nn.Parameter]:
    return [layer.weight] if layer.bias is None else [layer.weight, layer.bias]


def _rotary_attention(prefix: str, module: nn.Module, metric: str, pairing: str) -> list[dict]:
    q, k, v, o = (_linear(module, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
    config = getattr(module, "config", None)
    partial = getattr(config, "partial_rotary_factor", 1.0) or 1.0
    if None in (q, k, v, o) or partial != 1.0 or hasattr(module, "q_norm"):
        return []
    r = module.head_dim
    d = q.in_features
    n_heads, n_kv = q.out_features // r, k.out_features // r
    bias = q.bias is not None
    if (k.bias is not None) != bias or (v.bias is not None) != bias:
        return []  # mixed biases: not a layout we have
    rows = d + int(bias)
    n_rep = n_heads // n_kv
    qk = RotaryQK(n_kv, rows, r, metric, pairing=pairing, factor_rows=(n_rep * rows, rows))
    ov = M.HeadOV(n_kv, rows, r, metric, factor_rows=(rows, n_rep * d))  # o_proj: no bias row
    return [
        {
            "params": _weight_and_bias(q) + _weight_and_bias(k),
            "bundle": qk,
            "layout": GroupedQueryKey(n_heads, n_kv, bias),
            "name": f"{prefix}qk",
        },
        {
            "params": _weight_and_bias(v) + [o.weight],
            "bundle": ov,
            "layout": GroupedValueOutput(n_heads, n_kv, bias),
            "name": f"{prefix}ov",
        },
    ]


def _known_class(module: nn.Module, names) -> str | None:
    """The first class of ``type(module)``'s MRO named in ``names`` (so subclasses such as older
    releases' ``LlamaSdpaAttention(LlamaAttention)`` are recognised), or None."""
    return next((c.__name__ for c in type(module).__mro__ if c.__name__ in names), None)


def hf_attention(prefix: str, module: nn.Module, metric: str) -> list[dict]:
    """Head groups of one Hugging Face attention module (GPT-2, LLaMA family); [] otherwise."""
    if _known_class(module, _GPT2_ATTENTION):
        return _gpt2_attention(prefix, module, metric)
    name = _known_class(module, ROTARY_ATTENTION)
    if name is not None:
        return _rotary_attention(prefix, module, metric, ROTARY_ATTENTION[name])
    return []


def hf_units(prefix: str, module: nn.Module, metric: str) -> list[dict]:
    """Rescaling of the hidden units of a gated MLP (up row × s, down column / s); [] otherwise."""
    if _known_class(module, GATED_MLP) is None:
        return []
    up, down = _linear(module, "up_proj"), _linear(module, "down_proj")
    if up is None or down is None or _linear(module, "gate_proj") is None:
        return []
    bias = up.bias is not None
    m, d = up.weight.shape
    return [
        {
            "params": [up.weight] + ([up.bias] if bias else []) + [down.weight],
            "bundle": M.PositiveRescaling(m, d + int(bias), down.out_features, metric),
            "layout": UnitsOfLinear(bias),
            "name": f"{prefix}units",
        }
    ]


def symmetries_hf(
    model: nn.Module,
    *,
    metric: str = "euclidean",
    heads: bool = True,
    rescaling: bool = True,
    declared: Sequence[dict] = (),
    **kwargs,
) -> list[dict]:
    """``quotopt.symmetries(model, ...)`` with the Hugging Face detectors of this module.

    The detected groups are passed as declared groups after ``declared`` (which win on
    overlap); other keyword arguments go to ``quotopt.symmetries``.
    """
    from .symmetries import symmetries

    found: list[dict] = []
    for prefix, module in model.named_modules():
        prefix = f"{prefix}." if prefix else ""
        if heads:
            found += hf_attention(prefix, module, metric)
        if rescaling:
            found += hf_units(prefix, module, metric)
    taken = {id(p) for g in declared for p in g["params"]}
    found = [g for g in found if not taken & {id(p) for p in g["params"]}]
    return symmetries(
        model,
        metric=metric,
        heads=heads,
        rescaling=rescaling,
        declared=[*declared, *found],
        **kwargs,
    )
