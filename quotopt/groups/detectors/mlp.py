"""Module structure by role names or shapes, and MLP units found by it (any model).

A projection is a child or grandchild holding a 2-D ``weight`` under a role name; where no role
name is known, a module whose class name says attention or MLP is read from its projections'
shapes in registration order (``linears``), and the check rejects a wrong reading. MLPs: gated
``down(act(gate(x)) ⊙ up(x))`` is unchanged by (up row j × s, down column j / s) for any s ≠ 0
whatever the activation; a two-layer ``down(act(up(x)))`` by (s, s⁻ᵏ) for s > 0 where act is
positively homogeneous of degree k (``homogeneity_degree``: ReLU k = 1, ReLU² k = 2): positive
rescaling for k = 1, the degree-2 rescaling where the bundle offers it, and otherwise (GELU, SiLU)
a candidate the check rejects and the report explains (``docs/theory/bundles.md``). Experts
stored as 3-D tensors get the gated rule per expert and unit.
"""

from __future__ import annotations

import torch
from torch import nn

import manifolds as M

from ..candidates import Option, Slot
from ..layouts import ProjectionHeads, Rows

__all__ = [
    "experts_slots",
    "homogeneity_degree",
    "linears",
    "looks_like",
    "mlp_slots",
    "projection",
]

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


def in_features(layer) -> int:
    return layer.weight.shape[0] if conv1d(layer) else layer.weight.shape[1]


def linears(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Children and grandchildren holding a 2-D ``weight``, in registration order: the
    projections a module's structure is read from where no role name is known."""
    found = []
    for name, sub in module.named_modules():
        w = getattr(sub, "weight", None)
        if 0 < name.count(".") + 1 <= 2 and isinstance(w, nn.Parameter) and w.dim() == 2:
            found.append((name, sub))
    return found


def looks_like(module: nn.Module, kind: str) -> bool:
    """Whether the class name says ``kind`` (``"attention"`` or ``"mlp"``): where the role names
    fail, such modules are read by structure."""
    name = type(module).__name__
    return "Attention" in name if kind == "attention" else name.endswith(("MLP", "FeedForward"))


# ---- MLPs --------------------------------------------------------------------------------------
def _units_option(path, metric, up, down, up_rows, structure, degree=1) -> Option | None:
    """Rescaling of units j: up features ``up_rows`` (m,) (and their bias), down's input j, by
    (s, s⁻ᵈᵉᵍʳᵉᵉ); None where the rescaling bundle has no such degree."""
    m = up_rows.numel()
    conv_up, conv_down = conv1d(up), conv1d(down)
    params = [up.weight] + ([up.bias] if up.bias is not None else []) + [down.weight]
    fan_in = Rows(
        0, up_rows.view(m, 1, 1), bias=1 if up.bias is not None else None, transposed=conv_up
    )
    fan_out = Rows(len(params) - 1, torch.arange(m).view(m, 1, 1), transposed=not conv_down)
    d_in = in_features(up) + int(up.bias is not None)
    d_out = down.weight.shape[1] if conv_down else down.weight.shape[0]
    if degree == 1:
        bundle = M.PositiveRescaling(m, d_in, d_out, metric)
    else:
        try:
            bundle = M.PositiveRescaling(m, d_in, d_out, metric, degree=degree)
        except TypeError:
            return None
    group = {
        "params": params,
        "bundle": bundle,
        "layout": ProjectionHeads([fan_in, fan_out], "units"),
        "name": f"{path}units",
    }
    return Option(group, structure)


def _activation(module):
    """(name, callable or None) of the activation a module (or its ``intermediate``) holds."""
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
                return getattr(act, "__name__", type(act).__name__), act
    return "unknown", None


@torch.no_grad()
def homogeneity_degree(act) -> int | None:
    """k ∈ {1, 2} with act(s·x) = sᵏ·act(x) for s > 0 (ReLU: 1, ReLU²: 2), checked in float64
    on points of both signs; None for any other activation (GELU, SiLU) or one that fails."""
    x = torch.linspace(-3.0, 3.0, 25, dtype=torch.float64)
    try:
        y = act(x)
        if not isinstance(y, torch.Tensor) or not y.abs().max() > 0:
            return None
        for k in (1, 2):
            if all(torch.allclose(act(s * x), s**k * y, rtol=1e-12, atol=0) for s in (0.3, 2.5)):
                return k
    except (RuntimeError, TypeError, ValueError):
        return None
    return None


def _one_input(layer):
    """Call a module on one random (2, 3, d_in) tensor (an expert no example token reached)."""
    d_in, dtype = in_features(layer), layer.weight.dtype
    return lambda gen: ((torch.randn(2, 3, d_in, generator=gen, dtype=dtype),), {})


def _gated(path, module, metric, up, down, halves, family) -> list[Slot]:
    """Gated units: ``halves`` = [(up layer, feature offset, label)] tried in order; up row j × s,
    down column j / s for any s ≠ 0 whatever the activation."""
    m = in_features(down)
    options = [
        _units_option(path, metric, layer, down, torch.arange(m) + off, label)
        for layer, off, label in halves
    ]
    return [Slot(module, path, "mlp", "units", options, family=family, fallback=_one_input(up))]


def _two_layer(path, module, metric, up, down, names, how="") -> list[Slot]:
    """down(act(up(x))): positive rescaling (s, s⁻¹) for a degree-1 activation (ReLU), the
    (s, s⁻²) rescaling for a degree-2 one (ReLU²), offered and rejected by the check for others
    (``names``: the up and down role names)."""
    (up_n, down_n), (act, fn) = names, _activation(module)
    degree = homogeneity_degree(fn) if fn is not None else None
    rows = torch.arange(out_features(up))
    family = f"two-layer MLP ({up_n}, {down_n}{how}), {act}"
    slot = Slot(module, path, "mlp", "units", family=family)
    if degree == 2:
        structure = f"{up_n} → {act} → {down_n}: (s, s⁻²) rescaling"
        option = _units_option(path, metric, up, down, rows, structure, degree=2)
        if option is None:  # a manifolds without the degree-2 bundle
            slot.note = (
                f"activation {act} is positively homogeneous of degree 2 (as ReLU² is): the "
                "(s, s⁻²) rescaling needs a rescaling bundle of degree 2, "
                "manifolds.PositiveRescaling(..., degree=2), which manifolds does not provide"
            )
    else:
        structure = f"{up_n} → {act} → {down_n}: positive rescaling"
        option = _units_option(path, metric, up, down, rows, structure)
        if degree is None:
            slot.note = f"activation {act} is not positively homogeneous: no rescaling"
    slot.options = [option] if option is not None else []
    slot.params = (up.weight, down.weight)
    return [slot]


def mlp_slots(path: str, module: nn.Module, metric: str) -> list[Slot]:
    """The MLP slot of ``module`` by role names (gated, fused gated, two-layer), else by structure
    where its class name says MLP, else its experts (``experts_slots``)."""
    for gate_n, up_n, down_n in GATED:
        gate, up, down = (projection(module, (n,)) for n in (gate_n, up_n, down_n))
        if gate and up and down and "." not in gate[0] + up[0] + down[0]:
            label = f"gated ({gate_n}, {up_n}, {down_n}): up × s, down / s"
            return _gated(path, module, metric, up[1], down[1], [(up[1], 0, label)], "gated MLP")
    fused, down = projection(module, ("gate_up_proj",)), projection(module, ("down_proj",))
    if fused and down and "." not in fused[0]:
        return _fused_gated(path, module, metric, fused, down, "gated MLP, fused gate/up")
    for up_n, down_n in PAIRS:
        up, down = projection(module, (up_n,)), projection(module, (down_n,))
        if up and down and out_features(up[1]) == in_features(down[1]):
            return _two_layer(path, module, metric, up[1], down[1], (up_n, down_n))
    if looks_like(module, "mlp"):
        found = _mlp_by_structure(path, module, metric)
        if found:
            return found
    return experts_slots(path, module, metric)


def _fused_gated(path, module, metric, fused, down, family) -> list[Slot]:
    m = in_features(down[1])
    halves = [
        (fused[1], off, f"gated, fused {fused[0]}, up = {half} half")
        for off, half in ((m, "second"), (0, "first"))
    ]
    return _gated(path, module, metric, fused[1], down[1], halves, family)


def _mlp_by_structure(path, module, metric) -> list[Slot]:
    """An MLP-named module whose projections have no known role names, read from their shapes
    in registration order: (up, down), (fused gate/up of 2m, down) or (a, b, down) with a, b of
    one shape, either of them the up projection."""
    found = linears(module)
    if len(found) == 2:
        (un, up), (dn, down) = found
        if in_features(up) != out_features(down):
            return []
        if out_features(up) == in_features(down):
            return _two_layer(path, module, metric, up, down, (un, dn), ", by structure")
        if out_features(up) == 2 * in_features(down):
            family = f"gated MLP, fused {un}, {dn}, by structure"
            return _fused_gated(path, module, metric, found[0], found[1], family)
    if len(found) == 3:
        (an, a), (bn, b), (dn, down) = found
        if a.weight.shape == b.weight.shape and out_features(a) == in_features(down):
            halves = [(b, 0, f"gated, up = {bn}"), (a, 0, f"gated, up = {an}")]
            family = f"gated MLP ({an}, {bn}, {dn}), by structure"
            return _gated(path, module, metric, b, down, halves, family)
    return []


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
