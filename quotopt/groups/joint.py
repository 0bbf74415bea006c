"""The joint reduction of O(d) and the heads' GL(r): one param group with a ``JointBundle``.

``joint_groups(model)`` is what ``quotopt.symmetries(model, residual=True, heads=True)`` uses
for ``quotopt.models.Transformer``: O(d_model) rotates the model axis of every trainable tensor
while GL(r) acts on the head axis of every (W_q, W_k) and (W_v, W_o) pair; the actions commute
and act on the same tensors, so the vertical space is a sum and the group is one
``manifolds.JointBundle`` over all the model's parameters (docs/theory/joint.md). A pair whose fixed
``q_bias`` / ``v_bias`` is set keeps only O(d). Positive rescaling of ReLU units is not part
of the joint group (its units would need a layout inside the joint point): with
``activation="relu"`` it is not reduced.

LLaMA-family Hugging Face models: ``fold_rms_gains(model)`` folds every RMSNorm gain into the
linear maps that read the norm (a reparametrisation that leaves the logits unchanged, checked),
after which ``llama_joint_groups(model)`` gives O(d) on every tensor jointly with GL(r) per
value/output head (pass it as ``quotopt.symmetries(model, declared=...)``). Query/key heads keep
O(d) only (RoPE shrinks their GL(r) to a subgroup the joint bundle does not model). LayerNorm
models are refused: centring breaks O(d) to O(d-1). Note that HF's ``LlamaRMSNorm`` computes in
float32 even for float64 inputs, so output checks of O(d) on it stop at ≈1e-7.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

import manifolds as M

from .layouts import Layout

__all__ = ["joint_groups", "fold_rms_gains", "llama_joint_groups"]


def joint_groups(model: nn.Module, metric: str = "euclidean", solver: str = "auto") -> list[dict]:
    """[{"params", "bundle": JointBundle, "name": "joint"}] for a ``Transformer``.

    ``metric`` is the heads' metric (``"euclidean"`` or ``"invariant"``), ``solver`` the joint
    projection's (``"auto"``, ``"direct"``, ``"cg"``; see ``manifolds.joint``). Raises
    ``ValueError`` for other models, naming the model and what is supported.
    """
    declares = getattr(model, "symmetry_groups", None)
    if not callable(declares) or "solver" not in inspect.signature(declares).parameters:
        raise ValueError(
            f"the joint O(d) x GL(r) reduction is declared by quotopt.models.Transformer only, "
            f"got {type(model).__name__}; build a manifolds.JointBundle and pass it in declared="
        )
    return declares(metric, heads=True, residual=True, solver=solver)


# ---- LLaMA-family models: fold the RMSNorm gains, then O(d) with the value/output heads -----
def _class_names(module) -> set[str]:
    return {c.__name__ for c in type(module).__mro__}


def _refuse_layernorm(model: nn.Module) -> None:
    for path, module in model.named_modules():
        if isinstance(module, nn.LayerNorm) or any("LayerNorm" in c for c in _class_names(module)):
            raise ValueError(
                f"{path or type(model).__name__} is a LayerNorm: its centring breaks O(d) of the "
                "residual stream down to the stabiliser of the all-ones vector, O(d-1), so the "
                "joint O(d) x GL(r) reduction does not apply"
            )


def _llama_layers(model: nn.Module):
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None or not hasattr(inner, "norm") or not hasattr(inner, "embed_tokens"):
        raise ValueError(
            f"{type(model).__name__}: expected a LLaMA-family causal LM (model.embed_tokens, "
            "model.layers with input_layernorm/post_attention_layernorm, model.norm, lm_head)"
        )
    return inner, layers


@torch.no_grad()
def fold_rms_gains(model: nn.Module, tokens=None, tolerance: float | None = None) -> nn.Module:
    """Fold every RMSNorm gain γ of a LLaMA-family causal LM into the linear maps reading the
    norm (W ← W diag(γ), γ ← 1, frozen), in place, and verify that the logits are unchanged.

    The norms feed q/k/v (``input_layernorm``), gate/up (``post_attention_layernorm``) and the
    read-out (``model.norm``); a tied read-out is untied first (the embedding reads no norm).
    After folding every norm is gain-free, which commutes with O(d). ``tokens`` (B, T) are the
    check's inputs (default: random); ``tolerance`` the largest relative change of the logits
    (default 1e-10 in float64, 1e-5 otherwise). Raises ``ValueError`` for LayerNorm models.
    """
    _refuse_layernorm(model)
    inner, layers = _llama_layers(model)
    weight = inner.embed_tokens.weight
    if tokens is None:
        gen = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, weight.shape[0], (2, 8), generator=gen).to(weight.device)
    before = model(tokens, use_cache=False).logits
    if model.lm_head.weight is weight:
        model.lm_head.weight = nn.Parameter(weight.detach().clone())
        model.config.tie_word_embeddings = False
    pairs = [(inner.norm, [model.lm_head])]
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        pairs.append((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj]))
        pairs.append((layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj]))
    for norm, readers in pairs:
        for linear in readers:
            linear.weight.mul_(norm.weight)  # (out, in) · γ on the input axis
        norm.weight.fill_(1.0)
        norm.weight.requires_grad_(False)
    after = model(tokens, use_cache=False).logits
    change = float((after - before).norm() / before.norm())
    tol = tolerance if tolerance is not None else (1e-10 if weight.dtype == torch.float64 else 1e-5)
    if not change <= tol:
        raise ValueError(f"folding the RMSNorm gains changed the logits by {change:.3g} > {tol:g}")
    return model


class _JointViews(Layout):
    """Layout of the LLaMA joint group: the parameters, with each (v_proj, o_proj) pair as the
    head-layout views W_v (H, d, r) and W_o (H, r, d)."""

    description = "llama joint views"
    needs_scatter = False

    def __init__(self, heads: dict[int, tuple[str, int]]):
        self.heads = heads  # param index -> ("v" | "o", n_heads)

    def gather(self, tensors):
        out = []
        for i, t in enumerate(tensors):
            kind, h = self.heads.get(i, (None, 0))
            if kind == "v":  # (H·r, d) → (H, d, r)
                t = t.view(h, t.shape[0] // h, t.shape[1]).transpose(1, 2)
            elif kind == "o":  # (d, H·r) → (H, r, d)
                t = t.view(t.shape[0], h, t.shape[1] // h).permute(1, 2, 0)
            out.append(t)
        return tuple(out)


def llama_joint_groups(model: nn.Module, metric: str = "euclidean") -> list[dict]:
    """The joint group of a LLaMA-family causal LM whose gains are folded (``fold_rms_gains``):
    O(d) on every tensor's model axis with GL(r) per value/output head. Query/key heads keep
    O(d) only: RoPE shrinks their GL(r) to a subgroup that ``JointBundle`` does not model;
    grouped-query layers (n_kv < n_heads) and biases are refused."""
    _refuse_layernorm(model)
    inner, layers = _llama_layers(model)
    norms = [inner.norm] + [
        n for l_ in layers for n in (l_.input_layernorm, l_.post_attention_layernorm)
    ]
    if any(n.weight.requires_grad or not bool((n.weight == 1).all()) for n in norms):
        raise ValueError("RMSNorm gains break O(d): call quotopt.groups.fold_rms_gains(model)")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    index = {n: i for i, (n, _) in enumerate(named)}
    axis_of = {"o_proj": 0, "down_proj": 0}  # these write the stream: (d, ·); the rest read it
    axes, heads, views = [], [], {}
    for name, _ in named:
        if name.endswith(".bias"):
            raise ValueError(
                f"{name}: biases carry no model axis; not supported by the joint group"
            )
        axes.append(axis_of.get(name.rsplit(".", 2)[-2], 1))
    d = inner.embed_tokens.weight.shape[1]
    for i, layer in enumerate(layers):
        attn, at = layer.self_attn, f"model.layers.{i}.self_attn."
        r = attn.head_dim
        h, h_kv = attn.q_proj.out_features // r, attn.k_proj.out_features // r
        if h_kv != h:
            raise ValueError(f"{at}: grouped-query attention ({h} query, {h_kv} key heads)")
        v, o = index[at + "v_proj.weight"], index[at + "o_proj.weight"]
        views[v], views[o] = ("v", h), ("o", h)
        axes[v], axes[o] = 1, 2
        heads.append((M.HeadOV(h, d, r, metric), (v, o)))
    layout = _JointViews(views)
    shapes = [tuple(t.shape) for t in layout([p for _, p in named])]
    bundle = M.JointBundle(M.ResidualRotation(d, axes, shapes=shapes), heads)
    return [{"params": [p for _, p in named], "bundle": bundle, "layout": layout, "name": "joint"}]
