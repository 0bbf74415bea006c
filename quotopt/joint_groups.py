"""The joint reduction of O(d) and the heads' GL(r): one param group with a ``JointBundle``.

``joint_groups(model)`` is what ``quotopt.symmetries(model, residual=True, heads=True)`` uses
for ``quotopt.models.Transformer``: O(d_model) rotates the model axis of every trainable tensor
while GL(r) acts on the head axis of every (W_q, W_k) and (W_v, W_o) pair; the actions commute
and act on the same tensors, so the vertical space is a sum and the group is one
``manifolds.JointBundle`` over all the model's parameters (DESIGN.md 1.5). A pair whose fixed
``q_bias`` / ``v_bias`` is set keeps only O(d). Positive rescaling of ReLU units is not part
of the joint group (its units would need a layout inside the joint point): with
``activation="relu"`` it is not reduced.
"""

from __future__ import annotations

from torch import nn

import manifolds as M

__all__ = ["joint_groups"]


def joint_groups(model: nn.Module, metric: str = "euclidean", solver: str = "auto") -> list[dict]:
    """[{"params", "bundle": JointBundle, "name": "joint"}] for a ``Transformer``.

    ``metric`` is the heads' metric (``"euclidean"`` or ``"invariant"``), ``solver`` the joint
    projection's (``"auto"``, ``"direct"``, ``"cg"``; see ``manifolds.joint``). Raises
    ``ValueError`` for other models, naming the model and what is supported.
    """
    from .models import Transformer
    from .models.transformer import MODEL_AXES

    if not isinstance(model, Transformer):
        raise ValueError(
            f"the joint O(d) x GL(r) reduction is detected for quotopt.models.Transformer only, "
            f"got {type(model).__name__}; build a manifolds.JointBundle and pass it in declared="
        )
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    index = {n: i for i, (n, _) in enumerate(named)}
    axes = [MODEL_AXES[n.rsplit(".", 1)[-1]] for n, _ in named]
    residual = M.ResidualRotation(
        model.config.d_model, axes, shapes=[tuple(p.shape) for _, p in named]
    )
    heads = []
    for prefix, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if not {"wq", "wk", "wv", "wo"} <= own.keys():
            continue
        h, d, r = own["wq"].shape
        at = f"{prefix}." if prefix else ""
        if getattr(module, "q_bias", None) is None and own["wq"].requires_grad:
            heads.append((M.HeadQK(h, d, r, metric), (index[at + "wq"], index[at + "wk"])))
        if getattr(module, "v_bias", None) is None and own["wv"].requires_grad:
            heads.append((M.HeadOV(h, d, r, metric), (index[at + "wv"], index[at + "wo"])))
    bundle = M.JointBundle(residual, heads, solver=solver)
    return [{"params": [p for _, p in named], "bundle": bundle, "name": "joint"}]
