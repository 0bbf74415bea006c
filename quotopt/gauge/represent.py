r"""Choose a representative, write it into the model, check that the function is unchanged.

``quantise_gauge(model, method, quant, batches)`` is the whole procedure on a Hugging Face
LLaMA-family model: fold the RMSNorm gains (``fold_rms_gains``), read the weights, search the
method's part of the fibre (``GaugeSearch``) for the elements minimising the end-to-end loss of
the fake-quantised model on calibration batches, move the weights in float64 by the exact
elements (``Fibre.exact``), check that the float64 logits moved by no more than ``tolerance``
relative to their norm (``function_change``), copy the representative into ``model`` and return a
``GaugeReport`` with the objectives before and after. The weights written are full precision:
the representative is the model that quantises better, not a quantised model.
"""

from __future__ import annotations

import dataclasses

import torch

from ..groups import fold_rms_gains
from .fibre import Fibre
from .methods import plan_of
from .model import LlamaWeights, forward
from .objectives import end_to_end, outliers, weight_error
from .quantisers import QuantSpec
from .search import GaugeSearch

__all__ = ["GaugeReport", "function_change", "represent", "measure", "quantise_gauge"]


@torch.no_grad()
def function_change(w0: LlamaWeights, w1: LlamaWeights, tokens: torch.Tensor) -> float:
    """‖f₁(x) − f₀(x)‖ / ‖f₀(x)‖ of the logits in float64 (no quantisation)."""
    a = forward(w0.to(torch.float64), tokens)
    b = forward(w1.to(torch.float64), tokens)
    return float((b - a).norm() / a.norm())


def represent(
    weights: LlamaWeights,
    fibre: Fibre,
    elements: dict,
    tokens: torch.Tensor,
    tolerance: float = 1e-9,
) -> tuple[LlamaWeights, float]:
    """(the float64 representative ``weights``·``elements``, its ``function_change``); raises
    ``ValueError`` where the change exceeds ``tolerance``."""
    w64 = weights.detach().to(torch.float64)
    with torch.no_grad():
        moved = fibre.act(w64, Fibre.exact(elements))
    change = function_change(w64, moved, tokens)
    if not change <= tolerance:
        raise ValueError(
            f"the representative changed the float64 logits by {change:.3g} > "
            f"tolerance={tolerance:g}; an element is ill-conditioned (lower lr)"
        )
    return moved, change


@torch.no_grad()
def measure(w: LlamaWeights, quant: QuantSpec, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Weight error, outlier measures and end-to-end loss of ``w`` under ``quant`` on x → y."""
    out = outliers(w, x)
    return dict(
        weight_error=float(weight_error(w, quant)),
        kurtosis=float(out["kurtosis"]),
        max_over_rms=float(out["max_over_rms"]),
        loss=float(end_to_end(w, quant, x, y)),
    )


@dataclasses.dataclass
class GaugeReport:
    """What ``quantise_gauge`` did: the method, the objectives on the first calibration batch
    before (the model as given) and after, and the float64 function change."""

    method: str
    quant: str
    before: dict
    after: dict
    function_change: float
    history: list

    def __str__(self) -> str:
        rows = [
            f"{self.method} at {self.quant}: float64 function change {self.function_change:.1e}",
            f"  {'':<14}{'before':>12}{'after':>12}",
        ]
        rows += [f"  {k:<14}{self.before[k]:>12.4g}{self.after[k]:>12.4g}" for k in self.before]
        return "\n".join(rows)


def quantise_gauge(
    model,
    method: str = "joint",
    quant: QuantSpec | str = "W4A4KV4",
    batches=None,
    steps: int = 100,
    lr: float = 1e-2,
    seed: int = 0,
    tolerance: float = 1e-9,
    on_step=None,
) -> GaugeReport:
    """Move ``model`` (a Hugging Face LLaMA-family causal LM, in place) to the representative of
    its orbit that ``method`` finds (module docstring).

    Args:
        batches: ``batches(step) -> (x, y)`` calibration windows (token ids, next tokens).
        steps, lr: the search's (``GaugeSearch``); ``seed`` seeds the Hadamard starts.
        tolerance: the largest float64 relative change of the logits accepted.
        on_step: ``on_step(step, loss)`` after each step (a progress bar).
    """
    quant = QuantSpec.parse(quant) if isinstance(quant, str) else quant
    if batches is None:
        raise ValueError("batches: pass a function step -> (x, y) of calibration windows")
    fold_rms_gains(model)
    dtype = next(model.parameters()).dtype
    original = LlamaWeights.from_hf(model)  # the model's precision: the representative's source
    weights = original.to(torch.float32)  # the search's
    fibre = Fibre(weights)
    gen = torch.Generator().manual_seed(seed)
    objective = lambda w, step: end_to_end(w, quant, *batches(step))  # noqa: E731
    search = GaugeSearch(fibre, weights, plan_of(method), objective, steps, lr, gen)
    search.run(on_step)
    x, y = batches(0)
    moved, change = represent(original, fibre, search.elements(), x, tolerance)
    before, after = measure(weights, quant, x, y), measure(moved.to(torch.float32), quant, x, y)
    moved.to(dtype).write_into(model)
    return GaugeReport(method, quant.name, before, after, change, search.history)
