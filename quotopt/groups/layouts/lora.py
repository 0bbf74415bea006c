"""LoRA adapter pairs stacked by shape: the point of ``HeadOV`` with one head per adapter."""

from __future__ import annotations

import torch

from .base import Layout, copy_into

__all__ = ["LoRAPairs"]


class LoRAPairs(Layout):
    """params ``[B₁, A₁, B₂, A₂, …]`` (B (d_out, r), A (r, d_in), all of one shape) → point
    (B (n, d_out, r), A (n, r, d_in)): ΔWᵢ = Bᵢ Aᵢ is unchanged by (Bᵢ g, g⁻¹ Aᵢ), the action of
    ``HeadOV`` with n heads. One pair: views; several: stacked copies."""

    def __init__(self, n_pairs: int):
        self.n_pairs = n_pairs
        self.needs_scatter = n_pairs > 1
        self.description = f"{n_pairs} adapter pair(s)"

    def gather(self, tensors):
        bs, as_ = tensors[0::2], tensors[1::2]
        if self.n_pairs == 1:
            return (bs[0].unsqueeze(0), as_[0].unsqueeze(0))
        return (torch.stack(bs), torch.stack(as_))

    def scatter(self, params, point) -> None:
        for i, (b, a) in enumerate(zip(params[0::2], params[1::2])):
            copy_into(b, point[0][i])
            copy_into(a, point[1][i])
