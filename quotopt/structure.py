"""Module structure by role names, and MLP units found by it (any model, not only Hugging Face).

A projection is a child or grandchild holding a 2-D ``weight`` under a role name. MLPs: gated
``down(act(gate(x)) ⊙ up(x))`` is unchanged by (up row j × s, down column j / s) for any s ≠ 0
whatever the activation; a two-layer ``down(act(up(x)))`` is offered positive rescaling, which
verifies only for a positively homogeneous activation (ReLU) — GELU/SiLU candidates are rejected
by the check and reported; experts stored as 3-D tensors get the gated rule per expert and unit.
"""

from __future__ import annotations

import torch
from torch import nn

import manifolds as M

from .detect import Option, Slot
from .layouts import ProjectionHeads, Rows

__all__ = ["experts_slots", "mlp_slots", "projection"]

GATED = (("gate_proj", "up_proj", "down_proj"), ("wi_0", "wi_1", "wo"), ("w1", "w3", "w2"))
PAIRS = (
    ("fc1", "fc2"),
    ("lin1", "lin2"),
    ("wi", "wo"),
    ("c_fc", "c_proj"),
    ("fc_in", "fc_out"),
    ("dense_h_to_4h", "dense_4h_to_h"),
    ("intermediate.dense", "output.dense"),
)


def projection(module: nn.Module, names) -> tuple[str, nn.Module] | None:
    """The first child or grandchild named in ``names`` holding a 2-D ``weight``."""
    candidates = [(n, m) for n, m in module.named_modules() if 0 < n.count(".") + 1 <= 2]
    for name in names:
        for path, sub in candidates:
            if path.split(".")[-1] == name or path == name:
                w = getattr(sub, "weight", None)
                if isinstance(w, nn.Parameter) and w.dim() == 2:
                    return path, sub
    return None


def conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D"  # GPT-2's y = x W + b, W (in, out)


def out_features(layer) -> int:
    return layer.weight.shape[1] if conv1d(layer) else layer.weight.shape[0]


# ---- MLPs --------------------------------------------------------------------------------------
def _units_option(path, metric, up, down, up_rows, structure) -> Option:
    """Rescaling of units j: up features ``up_rows`` (m,) (and their bias), down's input j."""
    m = up_rows.numel()
    conv_up, conv_down = conv1d(up), conv1d(down)
    params = [up.weight] + ([up.bias] if up.bias is not None else []) + [down.weight]
    fan_in = Rows(
        0, up_rows.view(m, 1, 1), bias=1 if up.bias is not None else None, transposed=conv_up
    )
    fan_out = Rows(len(params) - 1, torch.arange(m).view(m, 1, 1), transposed=not conv_down)
    d_in = (up.weight.shape[0] if conv_up else up.weight.shape[1]) + int(up.bias is not None)
    d_out = down.weight.shape[1] if conv_down else down.weight.shape[0]
    group = {
        "params": params,
        "bundle": M.PositiveRescaling(m, d_in, d_out, metric),
        "layout": ProjectionHeads([fan_in, fan_out], "units"),
        "name": f"{path}units",
    }
    return Option(group, structure)


def _activation(module) -> str:
    for name in (
        "act",
        "act_fn",
        "activation_fn",
        "activation",
        "intermediate_act_fn",
        "gelu_impl",
    ):
        for owner in (module, getattr(module, "intermediate", None)):
            act = getattr(owner, name, None) if owner is not None else None
            if act is not None:
                return getattr(act, "__name__", type(act).__name__)
    return "unknown"


def _one_input(layer):
    """Call a module on one random (2, 3, d_in) tensor (an expert no example token reached)."""
    d_in = layer.weight.shape[0] if conv1d(layer) else layer.weight.shape[1]
    dtype = layer.weight.dtype
    return lambda gen: ((torch.randn(2, 3, d_in, generator=gen, dtype=dtype),), {})


def mlp_slots(path: str, module: nn.Module, metric: str) -> list[Slot]:
    for gate_n, up_n, down_n in GATED:
        gate, up, down = (projection(module, (n,)) for n in (gate_n, up_n, down_n))
        if gate and up and down and "." not in gate[0] + up[0] + down[0]:
            m = out_features(up[1])
            option = _units_option(
                path,
                metric,
                up[1],
                down[1],
                torch.arange(m),
                f"gated ({gate_n}, {up_n}, {down_n}): up × s, down / s",
            )
            fallback = _one_input(up[1])
            return [
                Slot(module, path, "mlp", "units", [option], family="gated MLP", fallback=fallback)
            ]
    fused, down = projection(module, ("gate_up_proj",)), projection(module, ("down_proj",))
    if fused and down and "." not in fused[0]:
        m = out_features(fused[1]) // 2
        options = [
            _units_option(
                path,
                metric,
                fused[1],
                down[1],
                torch.arange(m) + off,
                f"gated, fused gate_up_proj, up = {half} half",
            )
            for off, half in ((m, "second"), (0, "first"))
        ]
        return [
            Slot(
                module,
                path,
                "mlp",
                "units",
                options,
                family="gated MLP, fused gate/up",
                fallback=_one_input(fused[1]),
            )
        ]
    for up_n, down_n in PAIRS:
        up, down = projection(module, (up_n,)), projection(module, (down_n,))
        if (
            up
            and down
            and out_features(up[1])
            == (down[1].weight.shape[0] if conv1d(down[1]) else down[1].weight.shape[1])
        ):
            act = _activation(module)
            option = _units_option(
                path,
                metric,
                up[1],
                down[1],
                torch.arange(out_features(up[1])),
                f"{up_n} → {act} → {down_n}: positive rescaling",
            )
            note = f"activation {act} is not positively homogeneous: no rescaling"
            return [
                Slot(
                    module,
                    path,
                    "mlp",
                    "units",
                    [option],
                    note=note,
                    family=f"two-layer MLP ({up_n}, {down_n}), {act}",
                )
            ]
    return experts_slots(path, module, metric)


def experts_slots(path: str, module: nn.Module, metric: str) -> list[Slot]:
    """Experts stored as ``gate_up_proj`` (E, 2m, d) and ``down_proj`` (E, d_out, m)."""
    gate_up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (isinstance(gate_up, nn.Parameter) and isinstance(down, nn.Parameter)):
        return []
    if gate_up.dim() != 3 or down.dim() != 3:
        return []
    n_exp, two_m, d = gate_up.shape
    m = two_m // 2
    expert = torch.arange(n_exp).repeat_interleave(m).view(-1, 1, 1)
    unit = torch.arange(m).repeat(n_exp).view(-1, 1, 1)
    options = []
    for off, half in ((m, "second"), (0, "first")):
        layout = ProjectionHeads(
            [Rows(0, (expert, unit + off)), Rows(1, (expert, unit), transposed=True)],
            "expert units",
        )
        bundle = M.PositiveRescaling(n_exp * m, d, down.shape[1], metric)
        group = {
            "params": [gate_up, down],
            "bundle": bundle,
            "layout": layout,
            "name": f"{path}units",
        }
        options.append(Option(group, f"per expert and unit, up = {half} half of gate_up_proj"))
    return [Slot(module, path, "experts", "units", options, family=f"{n_exp} experts (3-D)")]
