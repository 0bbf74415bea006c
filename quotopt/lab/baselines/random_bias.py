r"""Symmetry breaking of the heads' GL(r) with fixed random query and value biases.

Silverstein–Kunin–Shyam 2026, "Symmetry Breaking in Transformers for Efficient and
Interpretable Training", arXiv:2601.22257. Every head adds an unlearned bias to its queries and
values, q = X W_Q + b_q and v = X W_V + b_v with b_q, b_v ∈ ℝ^r.

What is left of the symmetry: under (W_Q g, W_K g⁻ᵀ) the scores become
(X W_Q + b_q g⁻¹) W_Kᵀ Xᵀ, and under (W_V g, g⁻¹ W_O) the head writes
softmax(·) X W_V W_O + b_v g⁻¹ W_O (attention rows sum to 1). So a fixed b shrinks GL(r) to its
stabiliser {g : b g = b}, for instance g = I + w zᵀ with b w = 0 and 1 + zᵀw ≠ 0: a subgroup of
dimension r² − r. One bias vector removes r of the r² flat directions of each pair, not all of
them. The paper samples the biases afresh for every batch, so that no g fixes them all; the
variant here draws them once and keeps them as buffers (saved in the state dict).
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.transformer import CausalSelfAttention

__all__ = ["add_random_biases", "random_bias_adamw"]


@torch.no_grad()
def add_random_biases(
    model: nn.Module, scale: float = 1.0, generator: torch.Generator | None = None
) -> None:
    """Set ``q_bias`` and ``v_bias`` (H, r) of every ``CausalSelfAttention`` to N(0, scale²).

    The biases are buffers, not parameters: no optimiser moves them. Drawn on the generator's
    device (torch's global CPU generator when ``generator`` is None) in the weights' dtype,
    module by module, query before value. To load a state dict saved with biases, call this
    first on the fresh model (any values: ``load_state_dict`` overwrites them).
    """
    modules = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    if not modules:
        raise ValueError(f"{type(model).__name__} has no CausalSelfAttention module")
    device = generator.device if generator is not None else torch.device("cpu")
    for module in modules:
        heads, _, r = module.wq.shape
        for name in ("q_bias", "v_bias"):
            noise = torch.randn(heads, r, generator=generator, dtype=module.wq.dtype, device=device)
            setattr(module, name, (scale * noise).to(module.wq.device))


def random_bias_adamw(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.AdamW:
    """``add_random_biases(model)`` from torch's global RNG (so the seed decides them), then
    ``torch.optim.AdamW`` over all parameters."""
    add_random_biases(model)
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
