"""Pieces shared by the two models: gain-free RMS normalisation and token validation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

RMS_EPS = 1e-6  # added to the mean square; keeps the norm smooth at 0 and never breaks O(d)


def rms_norm(x: torch.Tensor, n_dims: int = 1) -> torch.Tensor:
    """Gain-free RMS normalisation over the last ``n_dims`` axes: x / sqrt(mean(x²) + eps).

    There is no learnable gain and no centering, so the map commutes with every orthogonal
    transformation R of those axes (mean((xR)²) = mean(x²)): the reason O(d) rotations of the
    residual stream (and of the relational model's gauge axis) stay exact symmetries.
    """
    return F.rms_norm(x, x.shape[-n_dims:], eps=RMS_EPS)


def check_positive(**sizes: int | None) -> None:
    """Raise ``ValueError`` naming the first size that is given but not a positive int."""
    for name, value in sizes.items():
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_tokens(tokens: torch.Tensor, vocab_size: int, max_len: int, strict: bool) -> torch.Tensor:
    """Validate a (B, T) batch of token ids and return it as int32/int64.

    Dtype and shape checks read metadata only and never synchronise with the device. The range
    check (ids in [0, vocab_size)) reads the min and max back to the host — one sync per call — so
    it runs only when ``strict`` is true; turn it off for sync-free forwards on an accelerator (an
    out-of-range id then fails inside the embedding lookup, with a less helpful message).
    """
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a torch.Tensor, got {type(tokens).__name__}")
    dtype = tokens.dtype
    if dtype.is_floating_point or dtype.is_complex or dtype == torch.bool:
        raise ValueError(f"tokens must have an integer dtype, got {dtype}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must be 2-D (batch, seq_len), got shape {tuple(tokens.shape)}")
    seq_len = tokens.shape[1]
    if seq_len < 1:
        raise ValueError(f"tokens must have seq_len >= 1, got shape {tuple(tokens.shape)}")
    if seq_len > max_len:
        raise ValueError(f"sequence length {seq_len} exceeds the model's max_len {max_len}")
    if dtype not in (torch.int32, torch.int64):
        tokens = tokens.long()  # F.embedding takes int32/int64 only
    if strict and tokens.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(tokens))  # host sync
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {vocab_size}); got min {lo}, max {hi} "
                "(vocab_size is the number of ids)"
            )
    return tokens
