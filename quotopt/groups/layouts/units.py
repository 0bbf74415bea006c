"""Hidden units of two-layer MLPs: the fan-in and fan-out of unit j, for positive rescaling."""

from __future__ import annotations

import torch

from .base import Layout, copy_into

__all__ = ["UnitsOfLinear", "UnitsOfMatmul"]


class UnitsOfMatmul(Layout):
    """Hidden units of ``act(X @ w_in) @ w_out``: fan-in w_in[:, j], fan-out w_out[j, :]."""

    description = "w_in (d, m), w_out (m, d_out)"

    def gather(self, tensors):
        w_in, w_out = tensors
        return (w_in.T.unsqueeze(-1), w_out.unsqueeze(-1))  # (m, d, 1), (m, d_out, 1)

    def on_shards(self, params) -> UnitsOfMatmul:
        return self  # a transpose and an unsqueeze: the same on any chunk of rows or units


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
            copy_into(params[0], fan_in[:, :-1])
            copy_into(params[1], fan_in[:, -1])
        else:
            copy_into(params[0], fan_in)
        copy_into(params[-1].T, point[1].squeeze(-1))
