"""Find a model's continuous parameter symmetries and group its parameters by them.

``symmetries(model)`` returns torch param groups covering every trainable parameter exactly
once. Groups with a symmetry carry ``"bundle"`` (a ``manifolds.Bundle``), ``"name"`` and, where
the model's storage differs from the bundle's coordinates, ``"layout"`` (``quotopt.layouts``);
their ``"params"`` are the model's own ``nn.Parameter``s. The result plugs straight into
``QuotientAdam(groups, ...)``. Where the groups come from, in order of precedence:

1. ``declared=[...]``: the user's groups. Several declared groups that share a tensor on disjoint
   entries (the query/key and value/output heads of one fused projection) are composed into one
   ``ProductBundle`` group; on the same entries they are refused. A module owning a declared
   parameter is never detected.
2. The model's own declaration: the outermost modules with a ``symmetry_groups`` method
   (``quotopt.models.Transformer``, ``RelationalTransformer``; see ``quotopt.declare``). Nothing
   inside them is detected.
3. Detection by structure, for code quotopt does not own: ``torch.nn.MultiheadAttention`` and
   encoder/decoder layers (``quotopt.detect``), Hugging Face families (``quotopt.hf``), LoRA
   adapters (``quotopt.lora``). Every candidate is **verified before it is returned**: on a
   float64 copy of the smallest module holding it, with every parameter of that module
   randomised, random inputs and random group elements (``quotopt.checks.check_in_module``); a
   candidate that changes the output by more than ``tolerance`` is dropped and reported. A key
   bias that is a pure gauge direction gets its own group with ``lr = 0`` and no decay.

``describe(model)`` (or ``symmetries(model, report=True)``) gives the table of what was found, the
group's dimension and verified change, or why there is none, and the share of parameters covered.
A model in which nothing is found warns, and so does one whose detected candidates could not be
verified because the example forward failed or could not be built (the fix: ``example_inputs``).
A module whose float64 copy does not run is reported as such, with the known fix where there is
one (``quotopt.hf.float64_fix``), not as a rejected candidate.

Not reduced, by design: the O(d) of LayerNorm models (centring breaks it to the stabiliser of
the all-ones vector), GELU/SiLU MLPs without a gate (no rescaling). ReLU² MLPs get the
degree-2 rescaling (s, s⁻²). O(d) together with the heads on the same tensors is one joint
group where the model declares it (``Transformer`` with ``residual=True``;
``docs/guides/combinations.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .checks import Float64Error, check_in_module, gauge_transform, group_point, verify, write_point
from .detect import compose_groups, torch_slots
from .hf import example_inputs as hf_example_inputs
from .hf import float64_fix, hf_slots
from .lora import lora_slots, stack_adapters
from .report import SymmetryReport, note_unrecognised, summarise

__all__ = [
    "describe",
    "gauge_transform",
    "group_point",
    "symmetries",
    "use_geometry",
    "verify",
    "write_point",
]

DEFAULT_TOLERANCE = 1e-6  # float32 steps inside HF modules leave ≈1e-7; a wrong group ≥ 1e-3


def _declaring_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    found: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if any(path == p or path.startswith(p + ".") or p == "" for p, _ in found):
            continue
        if callable(getattr(module, "symmetry_groups", None)):
            found.append((path, module))
    return found


def _model_groups(model, metric, heads, residual, rescaling):
    groups, covered_paths = [], []
    for path, module in _declaring_modules(model):
        own = module.symmetry_groups(metric, heads=heads, residual=residual, rescaling=rescaling)
        prefix = f"{path}." if path else ""
        groups += [dict(g, name=prefix + g["name"]) for g in own]
        covered_paths.append(path)
    if residual is True and not groups:
        raise ValueError(
            f"residual=True: no module of {type(model).__name__} declares its O(d) (a "
            "symmetry_groups method); declare it with manifolds.ResidualRotation in declared=[...]"
        )
    return groups, covered_paths


def _slots(model, metric, heads, rescaling, skip_paths, declared_ids, lora_damping=0.0):
    owners = {}
    for _, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = module
    blocked = {id(owners[i]) for i in declared_ids if i in owners}
    order = {id(m): i for i, (_, m) in enumerate(model.named_modules())}
    claimed: set[int] = set(declared_ids)
    slots, frozen_paths = [], []
    for path, module in reversed(list(model.named_modules())):  # children before parents
        if any(path == p or path.startswith(p + ".") or p == "" for p in skip_paths):
            continue
        prefix = f"{path}." if path else ""
        found = torch_slots(prefix, module, metric, heads, rescaling)
        found = found or lora_slots(prefix, module, metric, lora_damping)
        found = found or hf_slots(prefix, module, metric, heads, rescaling)
        taken = set()
        for slot in found:
            proposed = bool(slot.options)
            slot.options = [
                o for o in slot.options if all(p.requires_grad for p in o.group["params"])
            ]
            if proposed and not slot.options:
                frozen_paths.append(slot.path.rstrip("."))  # a frozen base: nothing to optimise
                continue
            ids = {id(p) for o in slot.options for p in o.group["params"]}
            ids |= {id(p) for p in slot.params}
            ids |= {id(p) for o in slot.options for _, p in o.frozen}
            if not slot.options and not slot.note:
                continue
            if ids & claimed or id(module) in blocked or {id(owners.get(i)) for i in ids} & blocked:
                continue
            taken |= ids
            slots.append(slot)
        claimed |= taken
    return sorted(slots, key=lambda s: order[id(s.module)]), frozen_paths


def _record_calls(model, modules, inputs) -> dict[int, tuple]:
    """The first (args, kwargs) each module is called with in one forward of ``model``."""
    calls: dict[int, tuple] = {}

    def hook(module, args, kwargs):
        calls.setdefault(id(module), (args, dict(kwargs)))

    handles = [m.register_forward_pre_hook(hook, with_kwargs=True) for m in modules]
    modes = [(m, m.training) for m in model.modules()]
    args, kwargs = inputs
    try:
        model.eval()
        with torch.no_grad():
            model(*args, **kwargs)
    finally:
        for m, training in modes:  # every module's own mode, not one flag for all
            m.training = training
        for h in handles:
            h.remove()
    return calls


def _check_slots(model, slots, report, example, tolerance, generator):
    """Verify each slot's options in order; returns (accepted groups, frozen key biases, paths of
    slots left unverified for want of a working example forward, and why)."""
    needs = [s.module for s in slots if s.probe is None and s.options]
    calls, failure = {}, ""
    if needs and example is not None:
        try:
            calls = _record_calls(model, needs, example)
        except Exception as error:  # noqa: BLE001 - reported: the user's inputs did not fit
            failure = f"the example forward failed ({type(error).__name__}: {error})"
    if example is None:
        failure = "no example inputs could be built for the model"
    accepted, frozen, unverified = [], [], []
    for slot in slots:
        call = slot.probe(generator) if slot.probe is not None else calls.get(id(slot.module))
        if call is None and slot.fallback is not None:
            call = slot.fallback(generator)
        if not slot.options:
            report.add(slot.path, slot.part, "detected", structure=slot.family, note=slot.note)
            continue
        if call is None:
            why = "not called by the example inputs" if not failure else failure
            if example is None:
                why = "not verified: pass example_inputs=(args, kwargs)"
            unverified += [slot.path.rstrip(".")] if failure else []
            report.add(slot.path, slot.part, "detected", structure=slot.family, note=why)
            continue
        option = _first_verified(slot, call, report, tolerance, generator)
        if option is not None:
            option.group["compose"] = slot.compose
            accepted.append(option.group)
            frozen += [(label, p, slot) for label, p in option.frozen]
    return accepted, frozen, (unverified, failure)


def _first_verified(slot, call, report, tolerance, generator):
    """The first of ``slot``'s options whose check passes (reported with the ones tried before
    it), or None (reported with every option tried, or with the module's float64 failure)."""
    tried = []
    for option in slot.options:
        try:
            change, _ = check_in_module(slot.module, option.group, call, generator)
        except Float64Error as error:
            fix = float64_fix(slot.module) or (
                "declare the groups and check them with quotopt.verify in the model's dtype"
            )
            note = f"not verified: {error}; {fix}"
            report.add(slot.path, slot.part, "detected", structure=slot.family, note=note)
            return None
        except (ValueError, RuntimeError, TypeError) as error:
            tried.append(f"{option.structure}: {error}")
            continue
        if change <= tolerance:
            report.add(
                slot.path,
                slot.part,
                "detected",
                option.group,
                change=change,
                structure=f"{slot.family}; {option.structure}",
                tried=tuple(tried),
            )
            return option
        tried.append(f"{option.structure}: change {change:.0e}")
    note = slot.note or "no candidate verified"
    tried_all = f"{note} (tried {'; '.join(tried)})"
    report.add(slot.path, slot.part, "detected", structure=slot.family, note=tried_all)
    return None


def _composed_name(members: list[dict]) -> str:
    return members[0].get("compose") or members[0]["name"]


def symmetries(
    model: nn.Module,
    *,
    metric: str = "euclidean",
    heads: bool = True,
    residual: bool | str = "auto",
    rescaling: bool = True,
    declared: Sequence[dict] = (),
    plain: bool = True,
    example_inputs=None,
    tolerance: float = DEFAULT_TOLERANCE,
    generator: torch.Generator | None = None,
    lora_damping: float = 0.0,
    geometry: str = "exact",
    report: bool = False,
):
    """Param groups of ``model`` by symmetry (see the module docstring).

    Args:
        metric: metric of the head and rescaling bundles (``"euclidean"`` or ``"invariant"``).
        heads: GL(r) per attention head; ``rescaling``: rescaling of MLP units (and LoRA).
        residual: O(d) — ``"auto"`` where the model declares it disjoint from the heads
            (``RelationalTransformer``'s embeddings); ``True`` also where it is not
            (``Transformer``: jointly with the heads, or alone with ``heads=False``); ``False``
            never.
        declared: user-declared groups, taken first.
        plain: put every remaining trainable parameter in one group without a bundle
            (``name="plain"``); with ``False`` a remaining parameter is an error.
        example_inputs: ``(args, kwargs)`` for one forward of ``model``, from which the modules
            detected candidates live in are called when they are verified; default: built from
            a Hugging Face config (``quotopt.hf.example_inputs``); torch's own layers and LoRA
            layers need none.
        tolerance: largest relative output change a detected candidate may cause.
        generator: randomness of the checks (default: a fixed seed, so detection is
            deterministic and leaves the global RNG alone).
        lora_damping: damping of the invariant metric on LoRA adapter pairs (``quotopt.lora``):
            > 0 makes the rank-deficient start B = 0 admissible, at the price of exact gauge
            equivariance (the damped metric is O(r)-invariant only).
        geometry: how the bundles' frames and re-dressing are computed (``use_geometry``).
        report: also return the ``SymmetryReport`` (``(groups, report)``).

    Raises ``ValueError`` naming any parameter covered twice or (``plain=False``) not at all.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    table = SymmetryReport(type(model).__name__)
    user, _ = compose_groups([dict(g) for g in declared], names, refuse=True)
    for g in user:
        table.add(g["name"], "declared", "declared", g)
    own, skip = _model_groups(model, metric, heads, residual, rescaling)
    user_ids = {id(p) for g in user for p in g["params"]}
    own = [g for g in own if not user_ids & {id(p) for p in g["params"]}]
    for g in own:
        table.add(g["name"], "model", "model", g)
    declared_ids = {id(p) for g in user + own for p in g["params"]}
    slots, frozen_paths = _slots(model, metric, heads, rescaling, skip, declared_ids, lora_damping)
    example = example_inputs if example_inputs is not None else hf_example_inputs(model)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    found, frozen, unverified = _check_slots(model, slots, table, example, tolerance, generator)
    note_unrecognised(model, slots, skip, frozen_paths, table)
    found, dropped = compose_groups(found, names, refuse=False, compose_name=_composed_name)
    found = stack_adapters(found, metric, lora_damping)
    for g, reason in dropped:
        table.add(g["name"], "-", "detected", note=f"dropped: {reason}")
    keys = [
        {"params": [p], "name": label, "lr": 0.0, "weight_decay": 0.0, "frozen": True}
        for label, p, _ in frozen
    ]
    for label, _, slot in frozen:
        table.add(
            slot.path,
            "key bias",
            "frozen",
            group=None,
            note=f"{label}: softmax shift (pure gauge), a frozen group no step moves",
        )
    groups = _complete(model, user + own + [_clean(g) for g in found] + keys, plain)
    groups = use_geometry(groups, geometry)
    summarise(model, groups, table, *unverified)
    return (groups, table) if report else groups


def use_geometry(groups: Sequence[dict], geometry: str) -> list[dict]:
    """``groups`` with every bundle that offers ``geometry`` (``Bundle.with_geometry``:
    ``"exact"`` factorisations or matmul-only ``"iterative"`` frames, which the GL(r) head
    pairs ``HeadQK`` / ``HeadOV`` offer) switched to it; other bundles keep theirs."""
    if geometry not in ("exact", "iterative"):
        raise ValueError(f"geometry must be 'exact' or 'iterative', got {geometry!r}")
    out = []
    for group in groups:
        bundle = group.get("bundle")
        if bundle is not None and bundle.geometry != geometry:
            try:
                group = dict(group, bundle=bundle.with_geometry(geometry))
            except NotImplementedError:
                pass  # this bundle has one route
        out.append(group)
    return out


def _clean(group: dict) -> dict:
    return {k: v for k, v in group.items() if k not in ("compose", "lora")}


def describe(model: nn.Module, **kwargs) -> SymmetryReport:
    """The ``SymmetryReport`` of ``symmetries(model, **kwargs)``; ``print`` it for the table."""
    return symmetries(model, report=True, **kwargs)[1]


def _complete(model: nn.Module, groups: list[dict], plain: bool) -> list[dict]:
    names = {id(p): n for n, p in model.named_parameters()}
    seen: dict[int, str] = {}
    for group in groups:
        for p in group["params"]:
            label = names.get(id(p), "<a tensor that is not a parameter of the model>")
            if id(p) in seen:
                raise ValueError(f"parameter {label} is in both {seen[id(p)]} and {group['name']}")
            seen[id(p)] = group.get("name", "?")
    rest = [p for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if rest and not plain:
        missing = ", ".join(names[id(p)] for p in rest)
        raise ValueError(f"parameters not covered by any symmetry group: {missing}")
    if rest:
        groups.append({"params": rest, "name": "plain"})
    return groups
