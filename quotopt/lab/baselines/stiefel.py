r"""Orthonormal head factors on geoopt's Stiefel manifold, trained with RiemannianAdam.

``stiefel_heads`` puts every attention module's ``wq``, ``wk``, ``wv`` (H, d, r) on
St(d, r) = {W : Wᵀ W = I_r}, batched over heads, after projecting them there (``projx``, the
polar factor). ``wo`` (H, r, d) stays Euclidean: geoopt's Stiefel needs shape[-1] ≤ shape[-2].

This constrains the function class: it is a different model, not a reduction to the quotient.

* OV: a full-rank W_V = Q R (thin QR) gives W_V W_O = Q (R W_O), so orthonormal W_V with free
  W_O loses nothing; it is a gauge fixing of GL(r) down to O(r), acting as (W_V g, gᵀ W_O).
* QK: with both factors orthonormal, W_Q W_Kᵀ has all r singular values equal to 1, so only its
  row and column spaces are learned: the scale of the scores is fixed (1/√r on RMS-normed
  inputs), and of GL(r) only O(r), acting as (W_Q g, W_K g), is left.

Projecting also changes the function of the model it is given, from the first step on.
geoopt is an optional dependency (the ``interop`` extra).
"""

from __future__ import annotations

import torch
from torch import nn

from ._heads import factored_attention

__all__ = ["geoopt_stiefel_adam", "stiefel_heads"]


def _geoopt():
    try:
        import geoopt
    except ImportError as error:
        raise ImportError(
            "the Stiefel baseline needs geoopt: pip install 'quotopt[interop]' "
            "(or pip install geoopt)"
        ) from error
    return geoopt


@torch.no_grad()
def stiefel_heads(model: nn.Module, canonical: bool = True) -> None:
    """Replace every attention module's ``wq``, ``wk``, ``wv`` by a ``geoopt.ManifoldParameter``
    on ``geoopt.Stiefel(canonical=canonical)``, projected onto it (in place; see the module
    docstring). ``canonical=False`` is the embedded metric with a QR retraction. Call it before
    building any optimiser: the old parameters are gone."""
    geoopt = _geoopt()
    manifold = geoopt.Stiefel(canonical=canonical)
    for _, module in factored_attention(model):
        for name in ("wq", "wk", "wv"):
            point = manifold.projx(getattr(module, name).detach())  # (H, d, r), orthonormal
            setattr(module, name, geoopt.ManifoldParameter(point, manifold=manifold))


def geoopt_stiefel_adam(
    model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    """``stiefel_heads(model)`` (canonical metric), then ``geoopt.optim.RiemannianAdam`` over
    all parameters. geoopt's weight decay is L2 added to the gradient, not AdamW's decoupled
    decay."""
    stiefel_heads(model)
    return _geoopt().optim.RiemannianAdam(
        model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay
    )
