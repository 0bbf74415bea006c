"""The relational model's Gram-gated channel MLP, with a backward that recomputes the gate.

For a channels-last token X (D × k) and weights W_in, W_gate (k × m), W_out (m × k):

    h = X W_in,  g = X W_gate,  s_c = ⟨g_c, h_c⟩ / √D,  σ_c = sigmoid(s_c),  a = h · σ,
    out = a W_out,

with h_c, g_c the columns (hidden channel vectors, in R^D) and σ broadcast over the gauge axis.
Plain autograd keeps [h, g] (2·D·m per token) and a (D·m) for the backward pass: three channel
tensors, against the standard MLP's two of the same size (pre-activation and activation).
``gram_gated_mlp`` keeps only X — already alive as the block's normalised input — and the
weights, and recomputes [h, g] = X [W_in | W_gate] in the backward pass (one GEMM, a third of
the forward's GEMM work). With dout = ∂L/∂out:

    ∂W_out = aᵀ dout,   da = dout W_outᵀ,
    ds_c = Σ_D (da · h)_c · σ_c (1 − σ_c) / √D,
    dh = da · σ + ds · g,   dg = ds · h,
    ∂[W_in | W_gate] = Xᵀ [dh | dg],   ∂X = [dh | dg] [W_in | W_gate]ᵀ,

where every product sums over the token (and gauge) rows. In a plain backward pass dh is
formed in place in da, so at most four hidden-width buffers (h, g, da, dg) live at once; under
``create_graph=True`` the same formulas run out of place, so double backward (Hessian-vector
products, batched ones with ``is_grads_batched=True`` included) works as well.
Under autocast the recomputation replays the forward's autocast state.
"""

from __future__ import annotations

import math

import torch


def gate_reference(x: torch.Tensor, w_in, w_gate, w_out) -> torch.Tensor:
    """The MLP by plain autograd (the reference; keeps [h, g] and a for backward)."""
    h, g = (x @ torch.cat((w_in, w_gate), 1)).chunk(2, -1)  # (…, D, m) each
    s = (g * h).sum(-2, keepdim=True) / math.sqrt(x.shape[-2])  # (…, 1, m), O(D)-invariant
    return (h * torch.sigmoid(s)) @ w_out  # (…, D, k)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _RecomputedGate(torch.autograd.Function):
    """Forward as ``gate_reference``; saves X and the weights only (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, w_in, w_gate, w_out):
        ctx.device_type = x.device.type
        ctx.autocast = _autocast_state(ctx.device_type)
        ctx.save_for_backward(x, w_in, w_gate, w_out)
        return gate_reference(x, w_in, w_gate, w_out)

    @staticmethod
    def backward(ctx, dout):
        x, w_in, w_gate, w_out = ctx.saved_tensors
        enabled, dtype = ctx.autocast
        need = ctx.needs_input_grad
        root_d = math.sqrt(x.shape[-2])
        with torch.autocast(ctx.device_type, dtype=dtype, enabled=enabled):
            w_cat = torch.cat((w_in, w_gate), 1)  # (k, 2m)
            hg = x @ w_cat  # (…, D, 2m), recomputed
            h, g = hg.chunk(2, -1)  # (…, D, m) each
            sig = torch.sigmoid((g * h).sum(-2, keepdim=True) / root_d)  # (…, 1, m)
            d_out = None
            if need[3]:
                a = h * sig  # (…, D, m), dropped as soon as ∂W_out is formed
                d_out = a.reshape(-1, a.shape[-1]).T @ dout.reshape(-1, dout.shape[-1])  # (m, k)
                del a
            da = dout @ w_out.T  # (…, D, m)
            ds = (da * h).sum(-2, keepdim=True) * (sig * (1 - sig)) / root_d  # (…, 1, m)
            dg = ds * h  # (…, D, m)
            if torch.is_grad_enabled():  # double backward: out of place, differentiable
                dh = da * sig + ds * g
            else:  # in place in da, a fresh tensor (vmap-safe: is_grads_batched batches it)
                dh = da.mul_(sig).addcmul_(g, ds)
            del hg, h, g, da
            rows_x = x.reshape(-1, x.shape[-1])  # (rows, k)
            dx = dh @ w_in.T + dg @ w_gate.T if need[0] else None  # (…, D, k)
            d_in = rows_x.T @ dh.reshape(-1, dh.shape[-1]) if need[1] else None  # (k, m)
            d_gate = rows_x.T @ dg.reshape(-1, dg.shape[-1]) if need[2] else None  # (k, m)
        return dx, d_in, d_gate, d_out


def gram_gated_mlp(x: torch.Tensor, w_in, w_gate, w_out, recompute: bool = True) -> torch.Tensor:
    """The Gram-gated MLP of ``x`` (…, D, k); ``recompute`` selects the lean backward (equal
    to ``gate_reference`` in forward and gradients, to round-off)."""
    if recompute and torch.is_grad_enabled():
        return _RecomputedGate.apply(x, w_in, w_gate, w_out)
    return gate_reference(x, w_in, w_gate, w_out)
