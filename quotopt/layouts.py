"""Layouts: how a model's own parameters map to a bundle's point coordinates.

A layout is called on a list of tensors shaped like the group's parameters (the parameters, or
their gradients) and returns the bundle's point in order. View layouts return views, so writing
into the point writes into the parameters. Layouts whose coordinates concatenate several
parameters (a weight with its bias) cannot be views; they also define ``scatter(params,
point)`` to write a point back. Every layout is a linear change of coordinates that only selects
and reorders entries, so the same map sends Euclidean gradients to the point's gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["Layout", "MultiheadAttentionHeads", "UnitsOfLinear", "UnitsOfMatmul"]


class Layout:
    """Base class: ``gather(tensors) -> point``; layouts that are not views set
    ``needs_scatter`` and define ``scatter(params, point)``."""

    description = "identity"
    needs_scatter = False

    def __call__(self, tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return self.gather(list(tensors))

    def gather(self, tensors: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        return tuple(tensors)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description})"


def _linear_rows_as_heads(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """An ``nn.Linear`` weight (H·r, d) producing per-head features → (H, d, r) view."""
    out_features, d = weight.shape
    return weight.view(n_heads, out_features // n_heads, d).transpose(1, 2)


class MultiheadAttentionHeads(Layout):
    """The heads of ``nn.MultiheadAttention``: params ``[in_proj_weight, (in_proj_bias),
    out_proj.weight]`` → point (W_q, W_k, W_v (H, E[+1], r), W_o (H, r, E)).

    ``in_proj_weight`` (3E, E) stacks the ``nn.Linear`` weights of q, k and v; head h uses rows
    h·r:(h+1)·r of each. With a bias, each of W_q, W_k, W_v gets one more row holding it
    ([W; b] acts on [x, 1]) — a copy, written back by ``scatter``; without, all four are views.
    The point is that of ``ProductBundle([HeadQK, HeadOV])``: the two act on disjoint
    coordinates of the same fused tensor.
    """

    def __init__(self, embed_dim: int, n_heads: int, has_bias: bool):
        self.embed_dim, self.n_heads, self.has_bias = embed_dim, n_heads, has_bias
        self.needs_scatter = has_bias
        self.description = f"E={embed_dim}, H={n_heads}, bias={has_bias}"

    def _thirds(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        e = self.embed_dim
        return [tensor[i * e : (i + 1) * e] for i in range(3)]

    def _out(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.view(self.embed_dim, self.n_heads, -1).permute(1, 2, 0)  # (H, r, E)

    def gather(self, tensors):
        factors = [_linear_rows_as_heads(w, self.n_heads) for w in self._thirds(tensors[0])]
        if self.has_bias:
            rows = [b.view(self.n_heads, 1, -1) for b in self._thirds(tensors[1])]  # (H, 1, r)
            factors = [torch.cat([f, b], dim=1) for f, b in zip(factors, rows)]  # (H, E+1, r)
        return (*factors, self._out(tensors[-1]))

    def scatter(self, params, point) -> None:
        weights = self._thirds(params[0])
        biases = self._thirds(params[1])
        for weight, bias, factor in zip(weights, biases, point[:3]):
            _linear_rows_as_heads(weight, self.n_heads).copy_(factor[:, :-1])
            bias.view(self.n_heads, 1, -1).copy_(factor[:, -1:])
        self._out(params[-1]).copy_(point[3])


class UnitsOfMatmul(Layout):
    """Hidden units of ``act(X @ w_in) @ w_out``: fan-in w_in[:, j], fan-out w_out[j, :]."""

    description = "w_in (d, m), w_out (m, d_out)"

    def gather(self, tensors):
        w_in, w_out = tensors
        return (w_in.T.unsqueeze(-1), w_out.unsqueeze(-1))  # (m, d, 1), (m, d_out, 1)


class UnitsOfLinear(Layout):
    """Hidden units of ``linear2(act(linear1(x)))``: fan-in [W1[j, :], b1[j]] (the bias folded
    in as the last row), fan-out W2[:, j]. Not a view when there is a bias."""

    def __init__(self, has_bias: bool):
        self.has_bias = self.needs_scatter = has_bias
        self.description = f"linear1/linear2, bias={has_bias}"

    def gather(self, tensors):
        w1, *rest = tensors
        fan_in = w1 if not self.has_bias else torch.cat([w1, rest[0].unsqueeze(1)], dim=1)
        return (fan_in.unsqueeze(-1), rest[-1].T.unsqueeze(-1))  # (m, d[+1], 1), (m, d, 1)

    def scatter(self, params, point) -> None:
        fan_in = point[0].squeeze(-1)
        if self.has_bias:
            params[0].copy_(fan_in[:, :-1])
            params[1].copy_(fan_in[:, -1])
        else:
            params[0].copy_(fan_in)
        params[-1].T.copy_(point[1].squeeze(-1))
