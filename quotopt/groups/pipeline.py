"""Find a model's continuous parameter symmetries and group its parameters by them.

``symmetries(model)`` returns torch param groups covering every trainable parameter exactly
once. Groups with a symmetry carry ``"bundle"`` (a ``manifolds.Bundle``), ``"name"`` and, where
the model's storage differs from the bundle's coordinates, ``"layout"``
(``quotopt.groups.layouts``);
their ``"params"`` are the model's own ``nn.Parameter``s. The result plugs straight into
``QuotientAdam(groups, ...)``. Where the groups come from, in order of precedence:

1. ``declared=[...]``: the user's groups. Several declared groups that share a tensor on disjoint
   entries (the query/key and value/output heads of one fused projection) are composed into one
   ``ProductBundle`` group; on the same entries they are refused. A module owning a declared
   parameter is never detected.
2. The model's own declaration: the outermost modules with a ``symmetry_groups`` method
   (``quotopt.models.Transformer``, ``RelationalTransformer``; see ``quotopt.groups.declare``).
   Nothing inside them is detected.
3. Detection by structure, for code quotopt does not own, by the detectors registered in
   ``quotopt.groups.registry`` (``quotopt.groups.detectors``: ``torch.nn`` attention and
   encoder/decoder layers, LoRA adapters, Hugging Face families). Every candidate is **verified
   before it is returned**: on a float64 copy of the smallest module holding it, with every
   parameter of that module randomised, random inputs and random group elements
   (``quotopt.groups.checks.check_in_module``); a candidate that changes the output by more than
   ``tolerance`` is dropped and reported. A key bias that is a pure gauge direction gets its own
   group with ``lr = 0`` and no decay.

``describe(model)`` (or ``symmetries(model, report=True)``) gives the table of what was found, the
group's dimension and verified change, or why there is none, and the share of parameters covered.
A model in which nothing is found warns, and so does one whose detected candidates could not be
verified because the example forward failed or could not be built (the fix: ``example_inputs``).
A module whose float64 copy does not run is reported as such, with the known fix where there is
one (a detector's ``float64_fix``), not as a rejected candidate.

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

from .accept import check_slots
from .candidates import Request
from .checks import gauge_transform, group_point, verify, write_point
from .compose import compose_groups
from .report import SymmetryReport, note_unrecognised, summarise
from .walk import declared_groups, finish, proposed_slots
from .walk import example_inputs as built_inputs

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
            a Hugging Face config (``quotopt.groups.example_inputs``); torch's own layers and LoRA
            layers need none.
        tolerance: largest relative output change a detected candidate may cause.
        generator: randomness of the checks (default: a fixed seed, so detection is
            deterministic and leaves the global RNG alone).
        lora_damping: damping of the invariant metric on LoRA adapter pairs
            (``quotopt.groups.detectors.lora``): > 0 makes the rank-deficient start B = 0
            admissible, at the price of exact gauge equivariance (the damped metric is
            O(r)-invariant only).
        geometry: how the bundles' frames and re-dressing are computed (``use_geometry``).
        report: also return the ``SymmetryReport`` (``(groups, report)``).

    Raises ``ValueError`` naming any parameter covered twice or (``plain=False``) not at all.
    """
    names = {id(p): n for n, p in model.named_parameters()}
    table = SymmetryReport(type(model).__name__)
    user, _ = compose_groups([dict(g) for g in declared], names, refuse=True)
    for g in user:
        table.add(g["name"], "declared", "declared", g)
    request = Request(
        metric=metric,
        heads=heads,
        rescaling=rescaling,
        residual=residual,
        lora_damping=lora_damping,
    )
    own, skip = declared_groups(model, request)
    user_ids = {id(p) for g in user for p in g["params"]}
    own = [g for g in own if not user_ids & {id(p) for p in g["params"]}]
    for g in own:
        table.add(g["name"], "model", "model", g)
    declared_ids = {id(p) for g in user + own for p in g["params"]}
    slots, frozen_paths = proposed_slots(model, request, skip, declared_ids)
    example = example_inputs if example_inputs is not None else built_inputs(model)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    found, frozen, unverified = check_slots(model, slots, table, example, tolerance, generator)
    note_unrecognised(model, slots, skip, frozen_paths, table)
    found, dropped = compose_groups(found, names, refuse=False, compose_name=_composed_name)
    found = finish(found, request)
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
    return {k: v for k, v in group.items() if k != "compose"}


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
