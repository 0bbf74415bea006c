"""ALiBi for the relational model without a T×T tensor: slopes as two extra query/key features.

ALiBi adds −m_h·(i − j) to the score of query i and key j ≤ i in head h (Press, Smith, Lewis
2022). Writing that bias as an inner product of per-position features,

    m_h·(j − i) = ⟨(m_h, −m_h·i), (j, 1)⟩,

the biased score ⟨q_i, k_j⟩·s + m_h·(j − i) (s = 1/√F, F the head's feature size) is one plain
inner product of augmented vectors q̃_i = (m_h, −m_h·i, s·q_i) and k̃_j = (j, 1, k_j). Padding
the values with two zero coordinates, ṽ_j = (0, 0, v_j), makes every head's q̃, k̃, ṽ the same
size, so ``scaled_dot_product_attention(q̃, k̃, ṽ, is_causal=True, scale=1)`` computes ALiBi
attention exactly (its output's first two coordinates are 0) on the fused kernel, with the
causal upper half skipped, no mask tensor and nothing of size T×T built or kept for backward.
On CUDA more zero coordinates are added, so that the size is a multiple of 8 as the fused GPU
kernels want. The features are constants, so the gradient is that of the reference path, and
they are scalars of the position only, so O(D) invariance and GL(r) per head hold as before.

Round-off. Scores of size m_h·T would cost float32 |m_h·T|·2⁻²⁴ absolute error if formed as
m_h·j plus a row constant (1.2e-5 relative output error at T = 4,096 in a measurement). Here the
position features come *first*: a dot-product kernel that accumulates in order (the CPU flash
kernel does; measured) forms m_h·j − m_h·i before adding ⟨q, k⟩, and both products are exact
when m_h has at most 8 significant bits and i, j < 2¹⁶, so that difference is exact and the
error is the reference path's (1.5e-7 relative at every T up to 4,096, H = 3, 4, 8).
``alibi_slopes`` therefore rounds the geometric slopes to 8 significant bits (a change of at
most 0.4 %, none when H divides 8). In half precision (bf16/fp16 autocast) positions above 256
(2,048) are not representable, so there the reference bias is used instead.

Denormals (CPU). ALiBi drives far-away probabilities to 1e-38…1e-45, subnormal floats that
x86 cores handle ~100× slower, in the forward and more so in the backward: at T = 2,048 one
layer's attention took 269 ms against 66 ms for plain causal SDPA, and 85 ms with
``torch.set_flush_denormal(True)`` (the materialised bias suffers the same). Those probabilities
are 30 orders below float32 resolution, so flushing them is harmless; call it once at start-up,
before any parallel work (worker threads inherit it). A library should not flip that process-wide
switch by itself, so this module does not.

The alternative, FlexAttention's ``score_mod``, needs ``torch.compile`` on CPU (a C++ build per
shape and dtype, no float64) and in eager mode materialises the scores; this route is exact in
eager float32/float64 and keeps the kernel the standard model uses.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

N_FEATURES = 2  # position coordinates prepended to every query, key and value
EXACT_DTYPES = (torch.float32, torch.float64)  # dtypes in which the features are exact
SLOPE_BITS = 8  # significant bits kept in each slope: m·j exact in float32 for j < 2^(24 - 8)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Geometric per-head slopes 2^(−8(h+1)/H) (Press et al.), rounded to 8 significant bits.

    The rounding makes m_h·j exact in float32 for every position j < 2¹⁶ (see the module
    docstring); it changes no slope when H divides 8 and any other by at most 2⁻⁸ relative.
    """
    slopes = torch.tensor([2.0 ** (-8.0 * (h + 1) / n_heads) for h in range(n_heads)])
    mantissa, exponent = torch.frexp(slopes)  # slopes = mantissa · 2^exponent, mantissa ∈ [½, 1)
    return torch.ldexp(torch.round(torch.ldexp(mantissa, torch.tensor(SLOPE_BITS))), exponent - 8)


def alibi_bias(slopes: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Additive causal ALiBi bias (1, H, T, T): −m_h·(i − j) for j ≤ i, −inf for j > i.

    The materialised reference (and the half-precision path). Four-dimensional on purpose:
    torch 2.13's CPU dispatcher sends SDPA with a 4-D float mask to the fused flash kernel, a 3-D
    one to the math path that materialises (B, H, T, T) probabilities.
    """
    pos = torch.arange(seq_len, device=slopes.device)
    rel = (pos[None, :] - pos[:, None]).to(slopes.dtype)  # (T, T), j − i
    bias = slopes[:, None, None] * rel  # (H, T, T)
    return bias.masked_fill(rel > 0, float("-inf")).unsqueeze(0)  # (1, H, T, T)


def alibi_features(slopes: torch.Tensor, seq_len: int, dtype: torch.dtype) -> torch.Tensor:
    """The position coordinates (3, H, T, 2): query (m_h, −m_h·i), key (j, 1), value (0, 0)."""
    H, device = slopes.shape[0], slopes.device
    pos = torch.arange(seq_len, device=device, dtype=dtype)  # (T,)
    m = slopes.to(dtype)[:, None].expand(H, seq_len)  # (H, T)
    query = torch.stack((m, -m * pos), -1)  # (H, T, 2)
    key = torch.stack((pos, torch.ones_like(pos)), -1).expand(H, seq_len, 2)  # (H, T, 2)
    return torch.stack((query, key, torch.zeros_like(key)))  # (3, H, T, 2)


def alibi_attention(qkv: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Causal ALiBi attention of per-head features, by the augmented-feature route.

    ``qkv`` (3, B, H, T, F): queries already multiplied by 1/√F, keys, values. Returns
    softmax(q kᵀ + m_h·(j − i), causal) v, shape (B, H, T, F), through one fused
    ``scaled_dot_product_attention`` call with ``is_causal=True``.
    """
    _, B, H, T, n = qkv.shape
    lead = N_FEATURES + (-(n + N_FEATURES) % 8 if qkv.is_cuda else 0)  # GPU kernels: 8 | size
    feats = F.pad(alibi_features(slopes, T, qkv.dtype), (0, lead - N_FEATURES))  # zeros add 0
    q, key, v = torch.cat((feats[:, None].expand(3, B, H, T, lead), qkv), -1).unbind(0)
    y = F.scaled_dot_product_attention(q, key, v, is_causal=True, scale=1.0)  # (B,H,T,lead+F)
    return y[..., lead:]  # (B, H, T, F); the leading (position) coordinates of y are 0


def reference_attention(qkv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """softmax(q kᵀ + bias) v with q already scaled, by SDPA with the materialised mask (or the
    plain causal mask when ``bias`` is None); ``qkv`` (3, B, H, T, F)."""
    q, key, v = qkv.unbind(0)
    if bias is None:
        return F.scaled_dot_product_attention(q, key, v, is_causal=True, scale=1.0)
    return F.scaled_dot_product_attention(q, key, v, attn_mask=bias.to(q.dtype), scale=1.0)


def explicit_probs(qkv: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Attention probabilities (B, H, T, T), materialised; for tests and analysis."""
    q, key, _ = qkv.unbind(0)
    T = q.shape[2]
    if bias is None:
        causal = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
        bias = torch.zeros(T, T, dtype=q.dtype, device=q.device).masked_fill(causal, -math.inf)
    return torch.softmax(q @ key.transpose(-1, -2) + bias.to(q.dtype), dim=-1)
