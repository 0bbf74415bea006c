r"""LoRA adapters on the quotient: one GL(r) bundle per adapter pair, stacked by shape.

A LoRA adapter adds ΔW = s·B A to a frozen weight (B (d_out, r), A (r, d_in), s = α/r). For any
invertible g, (B g, g⁻¹ A) gives the same ΔW: the adapter pair is a ``HeadOV`` point with one
head (``docs/theory/bundles.md``), invariant B A. Pairs of one shape are stacked as the heads of
one bundle (layout ``quotopt.groups.layouts.LoRAPairs``), so a model with LoRA on q and v of
every layer has one or two bundle groups, not one per module.

Detected on layers of the ``peft`` library (any module with ``lora_A`` / ``lora_B`` module dicts:
every adapter whose weights are trainable) and on ``LoRALinear``, quotopt's own minimal wrapper for
plain ``nn.Linear`` layers where ``peft`` is absent (``add_lora``). Each pair is verified like any
detected candidate (a float64 copy of the layer, everything randomised).

The usual start B = 0 is rank-deficient: the quotient is singular there and the invariant
metric's Gram BᵀB is zero. Every metric steps from it: under the undamped invariant metric the
zero Gram gets the zero pseudo-inverse (B's gradient is still taken, A's is zero there, as it is
for any metric), and the head is flagged as rank-deficient until B gains rank. A damping
(``symmetries(..., metric="invariant", lora_damping=1e-3)``: ⟨U, V⟩ = tr((AAᵀ + δ)U_BᵀV_B) +
tr((BᵀB + δ)U_A V_Aᵀ), the scaled-GD preconditioner of Zhang & Pilanci 2024) keeps the metric
positive definite, at the price of exact GL(r) invariance (it is only O(r)-invariant).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable

import torch
from torch import nn

import manifolds as M

from ..candidates import Option, Request, Slot
from ..layouts import LoRAPairs

__all__ = [
    "LoRALinear",
    "LoRARankWarning",
    "add_lora",
    "lora_pairs",
    "lora_slots",
    "orthonormal_start",
    "stack_adapters",
]


class LoRARankWarning(UserWarning):
    """A LoRA adapter's rank exceeds min(d_out, d_in): it has no GL(r) quotient and is optimised
    as plain parameters."""


class LoRALinear(nn.Module):
    """``base(x) + (α/r)·(x Aᵀ) Bᵀ`` with ``base`` frozen, A (r, d_in) ~ Kaiming-uniform, B = 0."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        if r <= 0 or r > min(base.in_features, base.out_features):
            raise ValueError(
                f"LoRA rank r must be in [1, {min(base.in_features, base.out_features)}], got {r}"
            )
        self.base, self.r, self.scaling = base, r, alpha / r
        base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(
            torch.zeros(base.out_features, r, dtype=w.dtype, device=w.device)
        )
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_A.T) @ self.lora_B.T

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The plain ``nn.Linear`` with W + (α/r)·B A."""
        layer = nn.Linear(self.base.in_features, self.base.out_features, self.base.bias is not None)
        layer = layer.to(self.base.weight)
        layer.weight.copy_(self.base.weight + self.scaling * self.lora_B @ self.lora_A)
        if self.base.bias is not None:
            layer.bias.copy_(self.base.bias)
        return layer


def add_lora(model: nn.Module, targets: Iterable[str], r: int = 8, alpha: float = 16.0):
    """Freeze ``model`` and wrap every ``nn.Linear`` whose attribute name is in ``targets`` in a
    ``LoRALinear``, in place; returns ``model``. Raises ``ValueError`` if no target matched."""
    targets = set(targets)
    model.requires_grad_(False)
    hits = []
    for path, module in list(model.named_modules()):
        for name, child in list(module.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(module, name, LoRALinear(child, r, alpha))
                hits.append(f"{path}.{name}" if path else name)
    if not hits:
        raise ValueError(f"add_lora: no nn.Linear named one of {sorted(targets)} in the model")
    return model


def lora_pairs(model: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(module path and adapter name, B, A) of every trainable adapter pair in ``model``."""
    return [
        (f"{path}:{name}", b, a)
        for path, module in model.named_modules()
        for name, b, a in _pairs(module)
    ]


@torch.no_grad()
def orthonormal_start(model: nn.Module) -> int:
    """Move every trainable adapter with B = 0 along its orbit to A with orthonormal rows
    (Aᵀ = Q R ↦ A = Qᵀ, i.e. (B, A)·g with g = Rᵀ): B A stays 0, so the model computes the same
    function, and the representative no longer depends on A's initial scale and basis (up to
    O(r)). At B = 0 no balanced representative exists, so this is the gauge an optimiser that
    dresses can start from. Returns the number of adapters moved."""
    moved = 0
    for _, b, a in lora_pairs(model):
        if not bool((b == 0).all()):
            continue
        q, _ = torch.linalg.qr(a.mT.double())
        a.copy_(q.mT)
        moved += 1
    return moved


def _pairs(module: nn.Module) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(adapter name, B, A) of every trainable adapter pair of a LoRA layer."""
    if isinstance(module, LoRALinear):
        return [("lora", module.lora_B, module.lora_A)] if module.lora_A.requires_grad else []
    lora_a, lora_b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if not (isinstance(lora_a, nn.ModuleDict) and isinstance(lora_b, nn.ModuleDict)):
        return []
    pairs = []
    for name in lora_a.keys() & lora_b.keys():
        a, b = getattr(lora_a[name], "weight", None), getattr(lora_b[name], "weight", None)
        if a is not None and b is not None and a.dim() == b.dim() == 2 and a.requires_grad:
            pairs.append((name, b, a))
    return sorted(pairs, key=lambda t: t[0])


def _probe(module: nn.Module, d_in: int, dtype):
    return lambda gen: ((torch.randn(2, 3, d_in, generator=gen, dtype=dtype),), {})


def _bundle(n: int, shape: tuple[int, int, int], metric: str, damping: float) -> M.HeadOV:
    d_out, r, d_in = shape
    damping = damping if metric == "invariant" else 0.0
    return M.HeadOV(n, d_out, r, metric, factor_rows=(d_out, d_in), damping=damping)


def lora_slots(path: str, module: nn.Module, request: Request) -> list[Slot]:
    """One slot per trainable adapter pair of a LoRA layer (``path`` ends with a dot);
    ``request.lora_damping`` > 0 damps the invariant metric (admissible at B = 0,
    O(r)-invariant only)."""
    metric, damping = request.metric, request.lora_damping
    slots = []
    for name, b, a in _pairs(module):
        (d_out, r), d_in = b.shape, a.shape[1]
        if r > min(d_out, d_in):
            slots.append(_rank_too_large(path, module, name, (b, a), (d_out, r, d_in)))
            continue
        bundle = _bundle(1, (d_out, r, d_in), metric, damping)
        group = {
            "params": [b, a],
            "bundle": bundle,
            "layout": LoRAPairs(1),
            "name": f"{path}lora.{name}",
            "lora": (d_out, r, d_in),
        }
        option = Option(group, "GL(r) on the pair (B g, g⁻¹ A)")
        slots.append(
            Slot(
                module,
                path,
                "lora",
                f"adapter {name}",
                [option],
                probe=_probe(module, d_in, a.dtype),
                family="LoRA adapter pair",
            )
        )
    return slots


def _rank_too_large(path: str, module: nn.Module, name: str, params, shape) -> Slot:
    """The slot of an adapter whose rank exceeds min(d_out, d_in): B A has rank at most
    min(d_out, d_in) < r, so no pair (B, A) is of full rank r and GL(r) does not act freely —
    there is no quotient to step on. The pair is left to the plain group, with a warning."""
    d_out, r, d_in = shape
    note = (
        f"adapter {name!r} has rank r={r} > min(d_out, d_in)={min(d_out, d_in)} "
        f"(B {d_out}x{r}, A {r}x{d_in}): not a GL(r) bundle, left to the plain group; "
        f"use a LoRA rank r <= {min(d_out, d_in)} for a quotient step"
    )
    warnings.warn(f"{path}lora.{name}: {note}", LoRARankWarning, stacklevel=2)
    return Slot(
        module,
        path,
        "lora",
        f"adapter {name}",
        [],
        note=note,
        family="LoRA adapter pair",
        params=tuple(params),
    )


def stack_adapters(groups: list[dict], request: Request) -> list[dict]:
    """Adapter groups of one shape (d_out, r, d_in) → one ``HeadOV`` group with one head each,
    named ``lora.{d_out}x{r}x{d_in}``; other groups pass through, in order."""
    metric, damping = request.metric, request.lora_damping
    by_shape: dict[tuple, list[dict]] = {}
    out: list = []
    for group in groups:
        shape = group.get("lora")
        if shape is None:
            out.append(group)
            continue
        if shape not in by_shape:
            by_shape[shape] = []
            out.append(shape)
        by_shape[shape].append(group)
    result = []
    for item in out:
        if isinstance(item, dict):
            result.append(item)
            continue
        members = by_shape[item]
        d_out, r, d_in = item
        bundle = _bundle(len(members), item, metric, damping)
        params = [p for g in members for p in g["params"]]
        result.append(
            {
                "params": params,
                "bundle": bundle,
                "layout": LoRAPairs(len(members)),
                "name": f"lora.{d_out}x{r}x{d_in}",
                "members": [g["name"] for g in members],
            }
        )
    return result
