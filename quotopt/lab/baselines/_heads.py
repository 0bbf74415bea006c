"""Find the attention modules whose heads are stored as factors wq, wk, wv and wo."""

from __future__ import annotations

from torch import nn


def factored_attention(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module owning ``wq, wk, wv`` (H, d, r) and ``wo`` (H, r, d)."""
    found = []
    for name, module in model.named_modules():
        own = dict(module.named_parameters(recurse=False))
        if {"wq", "wk", "wv", "wo"} <= own.keys():
            found.append((name, module))
    if not found:
        raise ValueError(
            f"{type(model).__name__} has no attention module with parameters wq, wk, wv, wo"
        )
    return found
