r"""Every exact continuous symmetry of ``RelationalTransformer`` that a bundle models.

Three groups act on the relational model's parameters (docs/theory/joint.md,
docs/theory/relational.md):

* O(D), the gauge: rotates the gauge axis of the embedding tables ``tok_emb``, ``pos_emb``
  (the only tensors with that axis);
* O(k), the channels: rotating the k channel vectors of every token, X_i ↦ X_i Q (Q ∈ O(k)),
  is exact too. Every weight reads or writes channels linearly — W ↦ QᵀW on the channel axis of
  ``wq, wk, wv, w_in, w_gate`` (their fan-in), W ↦ W Q on that of ``wo, w_out`` (their fan-out),
  E ↦ E ×_k Q on the tables — the norm N is over (D, k) and so invariant, and the read-out
  ⟨N(X_T), E_v⟩ over (D, k) is invariant when E rotates with the stream. Its dimension is
  k(k−1)/2;
* GL(r) per head on (W_q, W_k) and (W_v, W_o), acting on the head axis of the same tensors.

O(k) acts on the same tensors as both others, so the three form one group with one bundle,
``manifolds.joint_rotations.JointWithRotations``: O(k) is its model axis (the channel axis of
every tensor), the heads its GL(r) pairs, O(D) a further rotation of the tables' gauge axis.
``logit_scale`` (a scalar) carries no axis and stays out of the group (it is invariant).

Where O(k) is not declared, and why:

* ``n_classes`` set: the head reads the channel Gram G = X_Tᵀ X_T / D, which O(k) moves to
  QᵀGQ, so ``cls_head`` (n_classes, k²) rotates on *both* of its channel axes (Q ⊗ Q), an
  action no bundle of ``manifolds`` models;
* ``dressed=True``: the canonical frame's signs come from third moments of the embedding rows
  taken one channel at a time, Σ_(v,a) ⟨e_va, u⟩³, which mixing channels changes, so O(k) is not
  a symmetry of the dressed model at all.

There ``channels="auto"`` (the default) leaves O(k) out — the groups are then O(D) on the
tables and GL(r) per head, as before — and ``channels=True`` raises a ``ValueError``.

Not declared either: the gated MLP's rescaling of each hidden channel, (w_in[:, c]·s,
w_gate[:, c]/s, w_out[c]/s), s ≠ 0, which leaves s_c = ⟨g_c, h_c⟩/√D and the output unchanged.
It acts on three tensors at once, while the joint bundle composes O(k) with two-factor actions
(A g, B g⁻ᵀ) and with rotations only; and its w_in, w_gate, w_out are the only tensors that O(k)
alone would act on, which the joint frame needs for its signs. Its compact part is {±1}
(discrete), so under weight decay λ > 0 it leaves no flat direction; at λ = 0 its m directions
per block stay flat and undeclared (``tests/dynamics/test_refine.py`` counts them). Nor the stream
scale,
(``tok_emb``, ``pos_emb``, every ``wo`` and ``w_out``)·c with ``logit_scale``/c, c > 0: every
norm N removes c from the stream it reads, and the tied read-out α⟨N(X_T), E_v⟩ takes c from
E and gives it back through α; only the norm's ε breaks it. ``balance_undeclared`` moves a
model to the minimal-norm point of both orbits, where θ is orthogonal to their generators (with
λ > 0 the balanced point is where weight decay leaves them, ``quotopt.lab.experiments.critical``).
"""

from __future__ import annotations

import torch

import manifolds as M
from manifolds.joint_rotations import JointWithRotations

from ..groups.declare import factored_heads, rotation

#: Channel axis of every relational parameter O(k) acts on (``logit_scale`` has none).
CHANNEL_AXES = {
    "tok_emb": 1,
    "pos_emb": 1,
    "wq": 1,
    "wk": 1,
    "wv": 1,
    "wo": 2,
    "w_in": 0,
    "w_gate": 0,
    "w_out": 1,
}
CHANNEL_OPTIONS = (True, False, "auto")


def channel_refusal(model) -> str | None:
    """Why O(k) is not a symmetry the bundles can model for ``model`` (None: it is)."""
    if model.config.n_classes is not None:
        return (
            "n_classes is set: cls_head reads the channel Gram X_T^T X_T, which O(k) rotates "
            "on both channel axes (Q ⊗ Q), an action no bundle models"
        )
    if model.config.dressed:
        return (
            "dressed=True: the frame's sign rule reads third moments of the embedding rows per "
            "channel, which mixing the channels changes, so O(k) is not a symmetry"
        )
    return None


def relational_symmetry_groups(
    model, metric="euclidean", *, heads=True, residual="auto", rescaling=True, channels="auto"
) -> list[dict]:
    """The groups of ``RelationalTransformer.symmetry_groups`` (see the module docstring).

    ``residual`` (True or "auto": the rotations O(D) and O(k); False: neither), ``heads``
    (GL(r) per head), ``channels`` ("auto": O(k) where it is a modelled symmetry, True: O(k) or
    a ``ValueError`` saying why not, False: never — the groups are then O(D) and the heads,
    disjoint). ``rescaling`` has nothing to add (see the module docstring)."""
    del rescaling
    if channels not in CHANNEL_OPTIONS:
        raise ValueError(f"channels must be one of {CHANNEL_OPTIONS}, got {channels!r}")
    refusal = channel_refusal(model)
    if channels is True and refusal is not None:
        raise ValueError(f"channels=True: the channel rotation O(k) is not declared: {refusal}")
    if channels is False or refusal is not None or residual not in (True, "auto"):
        return relational_groups(model, metric, heads=heads, residual=residual)
    return [_joint_group(model, metric, heads)]


def _joint_group(model, metric, heads) -> dict:
    """One group: O(k) on every channel axis, GL(r) per head, O(D) on the tables' gauge axis."""
    named = [
        (n, p)
        for n, p in model.named_parameters()
        if p.requires_grad and n.rsplit(".", 1)[-1] in CHANNEL_AXES
    ]
    index = {n: i for i, (n, _) in enumerate(named)}
    k = model.config.n_channels
    shapes = [tuple(p.shape) for _, p in named]
    channel = M.ResidualRotation(k, [CHANNEL_AXES[n.rsplit(".", 1)[-1]] for n, _ in named], shapes)
    pairs = []
    if heads:
        for i, block in enumerate(model.blocks):
            at = f"blocks.{i}.attn."
            if at + "wq" not in index:  # frozen attention: nothing to reduce
                continue
            h, _, r = block.attn.wq.shape
            pairs.append((M.HeadQK(h, k, r, metric), (index[at + "wq"], index[at + "wk"])))
            pairs.append((M.HeadOV(h, k, r, metric), (index[at + "wv"], index[at + "wo"])))
    tables = [i for i, (n, _) in enumerate(named) if n in ("tok_emb", "pos_emb")]
    rotations = []
    if tables:
        gauge = model.config.d_gauge
        axis = model.gauge_axis % 3
        gauge_rot = M.ResidualRotation(gauge, [axis] * len(tables), [shapes[i] for i in tables])
        rotations.append((gauge_rot, tuple(tables)))
    bundle = JointWithRotations(channel, pairs, rotations)
    return {"params": [p for _, p in named], "bundle": bundle, "name": "joint"}


@torch.no_grad()
def balance_undeclared(model) -> float:
    """One pass of minimal-norm balancing along the undeclared non-compact symmetries of a
    ``RelationalTransformer`` (see the module docstring), in place; returns max |log s| of the
    scales applied (0 at a balanced point). Function unchanged up to round-off (and ε).

    Each gated hidden channel c: (w_in[:, c]·s, w_gate[:, c]/s, w_out[c]/s) with
    s⁴ = (‖w_gate[:, c]‖² + ‖w_out[c]‖²)/‖w_in[:, c]‖², the minimiser of ‖θ‖² along the orbit.
    Then the stream scale: (tables, wo, w_out)·c, logit_scale/c with c⁴ = α²/Σ‖scaled‖².
    The two act on ``w_out`` both: repeat until the return value is at round-off (the norm is
    convex in the log-scales, so the alternation converges). The stream scale is skipped where
    it is not a symmetry with a balanced point (``n_classes`` set: nothing compensates c), and
    a scale is left at 1 where its orbit has no balanced point (a zero channel or α = 0)."""
    logs = []
    for block in model.blocks:
        mlp = block.mlp
        if not hasattr(mlp, "w_gate"):  # dressed: a coordinate GELU, no rescaling
            continue
        rest = mlp.w_gate.square().sum(0) + mlp.w_out.square().sum(1)
        s = _balancing_scale(rest, mlp.w_in.square().sum(0))  # (m,)
        mlp.w_in.mul_(s)
        mlp.w_gate.div_(s)
        mlp.w_out.div_(s[:, None])
        logs.append(s.log().abs().max())
    if model.config.n_classes is None:
        scaled = [model.tok_emb] + ([model.pos_emb] if hasattr(model, "pos_emb") else [])
        scaled += [w for b in model.blocks for w in (b.attn.wo, b.mlp.w_out)]
        c = _balancing_scale(model.logit_scale.square(), sum(w.square().sum() for w in scaled))
        for w in scaled:
            w.mul_(c)
        model.logit_scale.div_(c)
        logs.append(c.log().abs())
    return float(torch.stack(logs).max()) if logs else 0.0


def _balancing_scale(shrinking: torch.Tensor, growing: torch.Tensor) -> torch.Tensor:
    """s minimising s²·growing + shrinking/s²: (shrinking/growing)^¼, and 1 where either is 0
    (no finite minimiser)."""
    ok = (shrinking > 0) & (growing > 0)
    ratio = torch.where(ok, shrinking, 1.0) / torch.where(ok, growing, 1.0)
    return ratio**0.25


def relational_groups(model, metric="euclidean", *, heads=True, residual="auto", rescaling=True):
    """``RelationalTransformer``'s groups: O(d_gauge) on its ``*emb`` tables — the only tensors
    with the gauge axis (``model.gauge_axis``), disjoint from the heads, so both reductions hold at
    once (``residual`` "auto" or True) — and GL(r) per head of each block's channel attention.
    Its MLPs' GELU units have no rescaling (``rescaling`` has nothing to add)."""
    del rescaling
    groups = []
    if residual in (True, "auto"):
        tables = [(n, p) for n, p in model.named_parameters() if "emb" in n and p.requires_grad]
        d_gauge = tables[0][1].shape[model.gauge_axis]
        groups.append(rotation("gauge", tables, d_gauge, [model.gauge_axis] * len(tables)))
    if heads:
        for i, block in enumerate(model.blocks):
            groups += factored_heads(f"blocks.{i}.attn.", block.attn, metric)
    return groups
