"""Layouts of Hugging Face GPT-2 and LLaMA-family attention kept for their names and views.

New families go through ``quotopt.layouts.ProjectionHeads``; these three predate it and keep the
LLaMA layouts' views (no copy when there is neither grouped-query sharing nor a bias).
"""

from __future__ import annotations

import torch

from .base import Layout, copy_into

__all__ = ["Conv1DHeads", "GroupedQueryKey", "GroupedValueOutput", "linear_rows_as_heads"]


def linear_rows_as_heads(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """An ``nn.Linear`` weight (H·r, d) producing per-head features → (H, d, r) view."""
    out_features, d = weight.shape
    return weight.view(n_heads, out_features // n_heads, d).transpose(1, 2)


def _with_bias_row(heads: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """(H, d, r) factors and a (H·r,) bias → (H, d+1, r) ([W; b] acts on [x, 1]); no bias: as is."""
    if bias is None:
        return heads
    return torch.cat([heads, bias.view(heads.shape[0], 1, -1)], dim=1)


def _write_heads(weight_heads: torch.Tensor, bias: torch.Tensor | None, factor: torch.Tensor):
    """Inverse of ``_with_bias_row``: copy a (H, d[+1], r) factor into its weight view and bias."""
    if bias is None:
        copy_into(weight_heads, factor)
        return
    copy_into(weight_heads, factor[:, :-1])
    copy_into(bias.view(factor.shape[0], 1, -1), factor[:, -1:])


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
        copy_into(self._out(out), point[3])


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
        a = _with_bias_row(linear_rows_as_heads(q, self.n_heads), q_bias)  # (H, d[+1], r)
        b = _with_bias_row(linear_rows_as_heads(k, self.n_kv), k_bias)  # (H_kv, d[+1], r)
        return (a.reshape(self.n_kv, -1, a.shape[-1]), b)

    def scatter(self, params, point) -> None:
        q, q_bias, k, k_bias = self._split(params)
        a = point[0].reshape(self.n_heads, -1, point[0].shape[-1])
        _write_heads(linear_rows_as_heads(q, self.n_heads), q_bias, a)
        _write_heads(linear_rows_as_heads(k, self.n_kv), k_bias, point[1])


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
        wv = _with_bias_row(linear_rows_as_heads(v, self.n_kv), v_bias)
        blocks = self._out_blocks(rest[-1])
        return (wv, blocks.reshape(self.n_kv, blocks.shape[1], -1))

    def scatter(self, params, point) -> None:
        v, *rest = params
        v_bias = rest[0] if self.has_bias else None
        _write_heads(linear_rows_as_heads(v, self.n_kv), v_bias, point[0])
        blocks = self._out_blocks(rest[-1])
        copy_into(blocks, point[1].view(blocks.shape))
