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

Subnormals. ALiBi drives far-away weights to e^{−m_h·(i − j)}; below the smallest normal float32
(tiny = 2⁻¹²⁶ ≈ e^{−87.3}) they are subnormal floats, which x86 cores process ~100× slower, in the
forward and more so in the backward, where they meet gradients of 1e-5 (one layer at T = 2,048:
269 ms against 66 ms for plain causal SDPA). So the feature route keeps, per head, only the keys
inside a window that follows the slope (``alibi_window``; docs/theory/relational.md): every kept
key has bias ≥ −keep, every key left out bias < −drop, with, per dtype,

    keep = ln(1/tiny) − 24    (float32 63.3: kept weights ≥ 3e-28 ≈ e^24·tiny before content),
    drop = 2.5 · ln(1/eps)    (float32 39.9: left-out weights ≤ 5e-18 = eps^2.5 of the diagonal's).

The e^24 margin leaves room for the content scores and for the backward's products with
gradients. A left-out key's weight relative to the diagonal key is below e^{−drop + Δ_i}, Δ_i =
max_j ⟨q_i, k_j − k_i⟩ the largest content-score advantage in row i, so each output row moves by
at most 2·T·e^{−drop + Δ_i}·max_j ‖v_j‖: in float32 with Δ_i ≤ 10 and T ≤ 2¹⁶, below
1.5e-8·max‖v‖. The window is a run of overlapping causal blocks of ``past + chunk`` positions,
``chunk`` apart, batched into one fused causal SDPA call per windowed head, with local positions
(the features stay exact). Heads with m_h·(T − 1) ≤ keep (every head of a short sequence; in
float64, keep = 684, nearly always) take one plain call together. The half-precision and
``alibi="bias"`` routes compute exact ALiBi, without the window.

The alternative, FlexAttention's ``score_mod``, needs ``torch.compile`` on CPU (a C++ build per
shape and dtype, no float64) and in eager mode materialises the scores; this route is exact in
eager float32/float64 and keeps the kernel the standard model uses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

N_FEATURES = 2  # position coordinates prepended to every query, key and value
KEEP_MARGIN = 24.0  # nats between the smallest kept weight and the smallest normal float
DROP_POWER = 2.5  # keys left out weigh at most eps^DROP_POWER relative to the diagonal
EXACT_DTYPES = (torch.float32, torch.float64)  # dtypes in which the features are exact
SLOPE_BITS = 8  # significant bits kept in each slope: m·j exact in float32 for j < 2^(24 - 8)


def alibi_slope_values(n_heads: int) -> tuple[float, ...]:
    """Geometric per-head slopes 2^(−8(h+1)/H) (Press et al.), rounded to 8 significant bits,
    as Python floats (host values: no tensor, whatever the default device).

    The rounding makes m_h·j exact in float32 for every position j < 2¹⁶ (see the module
    docstring); it changes no slope when H divides 8 and any other by at most 2⁻⁸ relative.
    """
    values = []
    for h in range(n_heads):
        mantissa, exponent = math.frexp(2.0 ** (-8.0 * (h + 1) / n_heads))  # mantissa ∈ [½, 1)
        values.append(math.ldexp(round(math.ldexp(mantissa, SLOPE_BITS)), exponent - SLOPE_BITS))
    return tuple(values)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """``alibi_slope_values`` as a tensor (H,)."""
    return torch.tensor(alibi_slope_values(n_heads))


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


def window_nats(dtype: torch.dtype) -> tuple[float, float]:
    """(drop, keep) in nats of ALiBi bias for ``dtype``: keys with bias < −drop may be left
    out, keys with bias ≥ −keep must be kept (float32: 39.9, 63.3; see the module docstring)."""
    info = torch.finfo(dtype)
    return DROP_POWER * -math.log(info.eps), -math.log(info.tiny) - KEEP_MARGIN


def alibi_window(slope: float, seq_len: int, dtype: torch.dtype) -> tuple[int, int] | None:
    """(past, chunk) of the blocked window of a head with slope m, or None for the whole row.

    Blocks of ``past + chunk`` positions start every ``chunk``; query t ≥ past of a block (and
    every query of the first) sees its keys at distances 0…t. So the kept distances are at most
    past + chunk − 1 = ⌊keep/m⌋ (bias ≥ −keep) and left-out ones exceed past = ⌈drop/m⌉ (bias
    < −drop). None when m·(T − 1) ≤ keep: no key falls below −keep.
    """
    drop, keep = window_nats(dtype)
    if slope * (seq_len - 1) <= keep:
        return None
    past = math.ceil(drop / slope)
    chunk = math.floor(keep / slope) - past + 1
    if chunk < 1:
        raise ValueError(
            f"ALiBi slope {slope} puts no distance between {drop:.1f} and "
            f"{keep:.1f} nats of bias ({dtype})"
        )
    return past, chunk


def _causal(qkv: torch.Tensor, slopes: torch.Tensor, lead: int) -> torch.Tensor:
    """Fused causal ALiBi over whole rows: ``qkv`` (3, B, H, T, F) → (B, H, T, lead + F)."""
    _, B, H, T, _ = qkv.shape
    feats = F.pad(alibi_features(slopes, T, qkv.dtype), (0, lead - N_FEATURES))  # zeros add 0
    q, key, v = torch.cat((feats[:, None].expand(3, B, H, T, lead), qkv), -1).unbind(0)
    return F.scaled_dot_product_attention(q, key, v, is_causal=True, scale=1.0)


def _windowed(qkv: torch.Tensor, slope: torch.Tensor, past: int, chunk: int, lead: int):
    """One head (``qkv`` (3, B, 1, T, F), ``slope`` (1,)) in blocks of past + chunk positions
    every chunk (``alibi_window``), all blocks in one call → (B, 1, T, lead + F)."""
    T = qkv.shape[3]
    n_blocks = -(-(T - past) // chunk)
    padded = F.pad(qkv, (0, 0, 0, past + n_blocks * chunk - T))  # (3, B, 1, N, F), future zeros
    blocks = padded.unfold(3, past + chunk, chunk).transpose(-1, -2)  # (3,B,1,n,past+chunk,F)
    y = _causal(blocks.flatten(2, 3), slope.expand(n_blocks), lead)  # (B, n, past+chunk, ·)
    y = torch.cat((y[:, 0, :past], y[:, :, past:].flatten(1, 2)), 1)  # (B, N, lead + F)
    return y[:, None, :T]


def alibi_attention(
    qkv: torch.Tensor, slopes: torch.Tensor, host_slopes: Sequence[float] | None = None
) -> torch.Tensor:
    """Causal ALiBi attention of per-head features, by the augmented-feature route.

    ``qkv`` (3, B, H, T, F): queries already multiplied by 1/√F, keys, values. Returns
    softmax(q kᵀ + m_h·(j − i), causal) v, shape (B, H, T, F), with keys beyond each head's
    ``alibi_window`` left out: one fused ``scaled_dot_product_attention`` call with
    ``is_causal=True`` for the heads that keep whole rows, one per windowed head.
    ``host_slopes``: the slopes as Python floats (read from ``slopes`` when not given, which
    synchronises with an accelerator).
    """
    _, B, H, T, n = qkv.shape
    lead = N_FEATURES + (-(n + N_FEATURES) % 8 if qkv.is_cuda else 0)  # GPU kernels: 8 | size
    host = slopes.tolist() if host_slopes is None else host_slopes
    windows = [alibi_window(m, T, qkv.dtype) for m in host]
    if all(w is None for w in windows):
        return _causal(qkv, slopes, lead)[..., lead:]  # (B, H, T, F); position coordinates 0
    whole = [h for h, w in enumerate(windows) if w is None]
    out: list[torch.Tensor | None] = [None] * H
    if whole:
        y = _causal(qkv[:, :, whole], slopes[whole], lead)  # (B, len(whole), T, lead + F)
        for h, y_h in zip(whole, y.unbind(1)):
            out[h] = y_h
    for h, w in enumerate(windows):
        if w is not None:
            out[h] = _windowed(qkv[:, :, h : h + 1], slopes[h : h + 1], *w, lead)[:, 0]
    return torch.stack(out, 1)[..., lead:]  # (B, H, T, F)


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
