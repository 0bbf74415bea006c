r"""Optimisers of the fine-tuning runs, by name, over the trainable LoRA adapters of a model.

Every factory is ``factory(model, lr, *, ratio, damping, weight_decay)`` and sees a model whose
only trainable parameters are adapter factors (B, A), B = 0 at the start:

* ``adamw`` — ``torch.optim.AdamW`` on the adapters.
* ``loraplus`` — LoRA+ (Hayou, Ghosh & Yu, ICML 2024): AdamW with η_B = ``ratio``·η_A
  (``quotopt.baselines.loraplus.lora_plus``).
* ``qadam`` / ``qadam-inv`` — ``QuotientAdam`` over ``quotopt.symmetries(model, ...)``: one
  GL(r) bundle group per adapter shape, the Euclidean metric (dressed) or the invariant metric
  damped by ``damping``: ⟨U, V⟩ = tr((AAᵀ + δI)U_BᵀV_B) + tr((BᵀB + δI)U_A V_Aᵀ).
* ``scaledgd`` — Riemannian-preconditioned AdamW of Zhang & Pilanci (ICML 2024) as published
  and as ``peft`` ships it (``peft.optimizers.create_riemannian_optimizer``): the gradients are
  replaced by (∇_B (AAᵀ + δI)⁻¹, (BᵀB + δI)⁻¹ ∇_A), δ = ``damping``, then AdamW runs on them
  per coordinate. This is *not* a quotopt configuration: QuotientAdam keeps the second moments
  per row (weighted by the other factor's Gram) and projects the step horizontally, where this
  rule's per-coordinate normalisation undoes most of the r × r scaling. (Its SGD form with
  δ = 0 is QuotientSGD under the invariant metric: ``tests/test_loraplus.py``.)
* ``qsgd-inv`` — ``QuotientSGD`` (momentum 0.9) under the damped invariant metric: scaled GD
  with momentum on the quotient.

* ``lora-rite`` — LoRA-RITE (Yen et al., ICLR 2025) with the defaults of the authors' PyTorch
  reimplementation (``quotopt.baselines.lora_rite``): an r×r second moment of each factor's
  gradient in the QR frame of the other factor, clip 1, skip 1, ε = 1e-6, no escaped mass.
* ``balora`` — BaLoRA (Castin, Nadjahi, Ablin & Peyré, ICML 2026): AdamW, then each adapter
  moved to its balanced representative BᵀB = AAᵀ (``quotopt.baselines.balora``).
* ``qmuon`` — ``QuotientMuon`` over the same GL(r) adapter groups (Euclidean metric, dressed
  every step, per adapter: ``scope="head"``), its update scaled to AdamW's RMS
  (``adjust_lr_fn="match_rms_adamw"``) so that the lr grid carries over; momentum 0.95.
  Adapters at B = 0, which have no dressing, are first moved along their orbit to A with
  orthonormal rows (``quotopt.lora.orthonormal_start``: the same function), so that the
  first step does not depend on A's initial gauge either.

* ``qadam-mat`` — ``QuotientMatrixAdam`` (``quotopt.lora_adam``): r×r second moments of each
  factor's gradient at the dressed (balanced) representative, moments pushed by the dressing,
  horizontal direction; how it differs from LoRA-RITE is in its module docstring.

* ``riemannion`` — Riemannion (Bogachev et al., ICLR 2026): Muon on the manifold of rank-r
  matrices (``quotopt.baselines.riemannion``), momentum 0.9, its step scaled to AdamW's RMS
  (``adjust_lr_fn="match_rms_adamw"``) so that the lr grid carries over; ``riemannion-mom``:
  the same with Muon's momentum buffer carried between steps instead of the paper's
  orthogonalised direction (``store="momentum"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..baselines.balora import balora
from ..baselines.lora_rite import lora_rite
from ..baselines.loraplus import lora_plus
from ..baselines.riemannion import riemannion
from ..lora import lora_pairs, orthonormal_start
from ..lora_adam import QuotientMatrixAdam
from ..optim import QuotientAdam, QuotientMuon, QuotientSGD
from ..symmetries import symmetries

__all__ = ["FINETUNE_OPTIMIZERS", "SECONDARY", "build_optimizer"]

BETAS = (0.9, 0.999)


def _adapters(model: nn.Module) -> list[nn.Parameter]:
    pairs = lora_pairs(model)
    if not pairs:
        raise ValueError("the model has no trainable LoRA adapters to optimise")
    return [p for _, b, a in pairs for p in (a, b)]


def _adamw(model, lr, *, ratio, damping, weight_decay):
    return torch.optim.AdamW(_adapters(model), lr, BETAS, weight_decay=weight_decay)


def _loraplus(model, lr, *, ratio, damping, weight_decay):
    return lora_plus(model, lr, weight_decay, BETAS, ratio=ratio)


def _qadam(metric):
    def make(model, lr, *, ratio, damping, weight_decay):
        groups = symmetries(model, metric=metric, lora_damping=damping, plain=False)
        return QuotientAdam(groups, lr, BETAS, weight_decay=weight_decay)

    return make


def _scaledgd(model, lr, *, ratio, damping, weight_decay):
    from peft.optimizers import create_riemannian_optimizer

    _adapters(model)
    return create_riemannian_optimizer(
        model, torch.optim.AdamW, lr=lr, reg=damping, betas=BETAS, weight_decay=weight_decay
    )


def _qsgd(model, lr, *, ratio, damping, weight_decay):
    groups = symmetries(model, metric="invariant", lora_damping=damping, plain=False)
    return QuotientSGD(groups, lr, momentum=0.9, weight_decay=weight_decay)


def _lora_rite(model, lr, *, ratio, damping, weight_decay):
    return lora_rite(model, lr, weight_decay, BETAS)


def _balora(model, lr, *, ratio, damping, weight_decay):
    return balora(model, lr, weight_decay, BETAS)


def _qmuon(model, lr, *, ratio, damping, weight_decay):
    orthonormal_start(model)
    groups = symmetries(model, metric="euclidean", plain=False)
    return QuotientMuon(groups, lr, weight_decay, scope="head", adjust_lr_fn="match_rms_adamw")


def _qadam_mat(model, lr, *, ratio, damping, weight_decay):
    return QuotientMatrixAdam(model, lr, BETAS, weight_decay=weight_decay)


Factory = Callable[..., torch.optim.Optimizer]
FINETUNE_OPTIMIZERS: dict[str, Factory] = {
    "adamw": _adamw,
    "loraplus": _loraplus,
    "qadam": _qadam("euclidean"),
    "qadam-inv": _qadam("invariant"),
    "scaledgd": _scaledgd,
    "qsgd-inv": _qsgd,
    "lora-rite": _lora_rite,
    "balora": _balora,
    "qmuon": _qmuon,
    "qadam-mat": _qadam_mat,
}


def _riemannion(store):
    def make(model, lr, *, ratio, damping, weight_decay):
        return riemannion(model, lr, weight_decay, BETAS, adjust_lr_fn="match_rms_adamw",
                          store=store)  # fmt: skip

    return make


FINETUNE_OPTIMIZERS["riemannion"] = _riemannion("direction")
FINETUNE_OPTIMIZERS["riemannion-mom"] = _riemannion("momentum")
#: the second hyperparameter of an optimiser, tuned after its learning rate: name -> field
SECONDARY = {"loraplus": "ratio", "qadam-inv": "damping", "qsgd-inv": "damping"}


def build_optimizer(
    name: str,
    model: nn.Module,
    lr: float,
    *,
    ratio: float = 16.0,
    damping: float = 1e-2,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """The optimiser ``name`` over the adapters of ``model`` (module docstring); ``ValueError``
    for an unknown name or a model without trainable adapters."""
    if name not in FINETUNE_OPTIMIZERS:
        raise ValueError(
            f"unknown fine-tuning optimiser {name!r}; valid names are "
            f"{', '.join(sorted(FINETUNE_OPTIMIZERS))}"
        )
    return FINETUNE_OPTIMIZERS[name](
        model, lr, ratio=ratio, damping=damping, weight_decay=weight_decay
    )
