r"""What a representative is judged by: objectives on ``LlamaWeights`` (docs/guides/quantise.md).

* ``weight_error(w, quant)``: mean over the quantised projections of ‖Q(W) − W‖²/‖W‖², RTN
  with ``quant``'s width and grouping; differentiable through the scales, the rounding held
  fixed (``quantise_weight(straight_through=False)``);
* ``outliers(w, tokens)``: per quantised linear input, averaged over tokens, the kurtosis
  E[x⁴]/E[x²]² over the features (3 for a Gaussian, large when a few channels dominate) and
  max|x|/rms(x) (what per-token RTN's step size is proportional to);
* ``end_to_end(w, quant, x, y)``: the next-token cross-entropy of the fake-quantised model,
  straight-through, as SpinQuant trains its rotations;
* ``perplexity(w, quant, x, y)``: exp of the mean cross-entropy over windows, in chunks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .model import LINEARS, LlamaWeights, forward
from .quantisers import QuantSpec, quantise_weight

__all__ = ["weight_error", "outliers", "end_to_end", "perplexity"]


def weight_error(w: LlamaWeights, quant: QuantSpec) -> torch.Tensor:
    """Mean relative RTN error of the blocks' projection weights (module docstring)."""
    errors = []
    for blk in w.blocks:
        for name in LINEARS:
            m = blk[name]
            q = quantise_weight(m, quant.w_bits or 16, quant.w_group, straight_through=False)
            errors.append((q - m).square().sum() / m.square().sum())
    return torch.stack(errors).mean()


def _token_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    second = x.square().mean(-1)
    kurtosis = x.pow(4).mean(-1) / second.square().clamp_min(1e-300)
    peak = x.abs().amax(-1) / second.sqrt().clamp_min(1e-300)
    return kurtosis.mean(), peak.mean()


def outliers(w: LlamaWeights, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """``{"kurtosis", "max_over_rms"}``: means over the quantised inputs (module docstring),
    and the same per input under ``"per_input"`` ({(block, name): (kurtosis, max/rms)})."""
    captured: dict = {}
    forward(w, tokens, None, capture=captured)
    per = {key: _token_stats(torch.cat(xs)) for key, xs in captured.items()}
    kurt = torch.stack([k for k, _ in per.values()]).mean()
    peak = torch.stack([p for _, p in per.values()]).mean()
    return {"kurtosis": kurt, "max_over_rms": peak, "per_input": per}


def end_to_end(w: LlamaWeights, quant: QuantSpec | None, x, y) -> torch.Tensor:
    """Mean next-token cross-entropy (nats) of ``w`` fake-quantised by ``quant`` on x → y."""
    logits = forward(w, x, quant)
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())


@torch.no_grad()
def perplexity(w: LlamaWeights, quant: QuantSpec | None, x, y, batch_size: int = 16) -> float:
    """exp(mean cross-entropy) over the windows x → y; ``inf`` where it overflows or is NaN."""
    total = sum(
        float(end_to_end(w, quant, a, b)) * len(a)
        for a, b in zip(x.split(batch_size), y.split(batch_size))
    )
    mean = total / len(x)
    return math.exp(mean) if math.isfinite(mean) and mean < 700 else math.inf
