"""LoRA+: AdamW on LoRA adapters with a larger learning rate on B.

Hayou, Ghosh & Yu, "LoRA+: Efficient Low Rank Adaptation of Large Models" (ICML 2024): for
ΔW = B A with B = 0 at the start, the two factors want step sizes of different orders in the
width; LoRA+ sets η_B = λ·η_A with a ratio λ (≈ 16 in their experiments) and is otherwise AdamW.
With λ = 1 it is AdamW on the adapters. The adapters are found as quotopt's LoRA detection finds
them (``peft`` layers and ``LoRALinear``): every trainable (B, A) pair; everything else must be
frozen, as in LoRA fine-tuning.
"""

from __future__ import annotations

import torch
from torch import nn

from ...groups import lora_pairs

__all__ = ["lora_plus"]


def lora_plus(
    model: nn.Module,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    *,
    ratio: float = 16.0,
) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` with two groups: every adapter's A at ``lr``, every B at
    ``ratio·lr``. Raises ``ValueError`` for a non-positive ratio, a model without trainable LoRA
    adapters, or trainable parameters that are not adapter factors."""
    if not isinstance(ratio, (int, float)) or not ratio > 0:
        raise ValueError(f"lora_plus: ratio must be a positive number, got {ratio!r}")
    pairs = lora_pairs(model)
    if not pairs:
        raise ValueError("lora_plus: the model has no trainable LoRA adapters")
    a_params = [a for _, _, a in pairs]
    b_params = [b for _, b, _ in pairs]
    adapters = {id(p) for p in a_params + b_params}
    others = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in adapters]
    if others:
        raise ValueError(
            f"lora_plus: trainable parameters outside the adapters ({', '.join(others[:3])}"
            f"{', …' if len(others) > 3 else ''}); freeze them or give them their own optimiser"
        )
    groups = [
        {"params": a_params, "lr": lr, "name": "lora_A"},
        {"params": b_params, "lr": ratio * lr, "name": "lora_B"},
    ]
    return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, betas=betas)
